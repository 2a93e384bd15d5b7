"""Resume latency at a late step: replaying the stream (the old trainer) vs seeking it (``TrainStream.seek``).

Writes ``--shards`` tar shards of ``--per-shard`` JPEG photos (``--size`` px, ImageNet-like sizes) to a temp folder,
then for a position of ``--batches`` batches of ``--batch`` images:

* replay: the time to re-read those batches through the training loader (what ``--resume`` did before: decode
  ``step x grad_accum`` batches and throw them away), timed to the first new batch;
* seek: a fresh loader sought to the saved cursor, timed to the first new batch (which must equal the replayed one).

Prints both times, the decode cost per image and the replay cost extrapolated to GRACE's protocol (step 200,000 at
batch 256 on one loader process; more workers divide it, and every worker decodes).

    python bench/resume_cost.py                          # 224 px, 160 batches of 64
    python bench/resume_cost.py --batches 400 --workers 2

``--cli`` measures the whole command instead, on the small synthetic world and a tiny CLIP: for ``ft`` and ``grace``
with 0 and 2 loader workers, ``grace train --steps 401 --resume`` on a run whose state is at step 400 (a finished
400-step run, whose final state is kept; and, ``--paths both``, a run of 800 steps killed after its step-400
checkpoint) against a fresh ``grace train --steps 1``, both timed as whole processes (start-up included). The goal
is a resume that costs at most 1.2x the fresh step.

    python bench/resume_cost.py --cli [--paths extension|both] [--recipes ft,grace]
"""
from __future__ import annotations

import argparse
import statistics
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_shards(root: Path, shards: int, per_shard: int, size: int) -> list[str]:
    import webdataset as wds

    rng = np.random.default_rng(0)
    urls = []
    for s in range(shards):
        path = root / f"{s}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                base = np.kron(rng.uniform(0, 255, (size // 16 + 1, size // 16 + 1, 3)), np.ones((16, 16, 1)))
                img = np.clip(base[:size, :size] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype("uint8")
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"s{s:03d}_{i:05d}", "jpg": buf.getvalue(), "cls": str(i % 1000).encode()})
        urls.append(str(path))
    return urls


def cli_paths(recipes: list[str], paths: str, steps: int = 400, reps: int = 3) -> None:
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from grace_app.testbed.world import SyntheticWorldSpec, write_synthetic_world
    from grace_plugin.runfolder import partial_dir
    from grace_app.testbed.tiny_clip import PretrainConfig, pretrain_tiny_clip

    root = Path(tempfile.mkdtemp(prefix="grace_resume_cost_"))
    write_synthetic_world(root / "world", seed=0, spec=SyntheticWorldSpec.small())
    clip = pretrain_tiny_clip(root / "world" / "pairs", root / "clip", PretrainConfig(steps=30, batch_size=64, width=64,
                                                                                     layers=2, warmup_steps=5),
                              progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GRACE_PROGRESS="off",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def argv(recipe, out, n, workers, *extra):
        cheap = ["--set", "recipe.pgd_steps=2", "--set", "recipe.lora_rank=4"] if recipe == "grace" else []
        return [sys.executable, "-m", "grace_app", "train", "--recipe", recipe, "--init", str(clip), "--data",
                str(root / "world" / "id"), "--out", str(out), "--steps", str(n), "--no-progress", "--set",
                "train.batch_size=16", "--set", f"train.num_workers={workers}", "--set", "train.device=cpu",
                *cheap, *extra]

    def timed(cmd) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return time.perf_counter() - t0

    def copy_run(src: Path, dst: Path) -> Path:  # a resumed run is consumed: each round resumes a fresh copy
        for a, b in ((src, dst), (partial_dir(src), partial_dir(dst))):
            if a.exists():
                shutil.copytree(a, b)
        return dst

    print(f"grace train, small world, tiny CLIP, batch 16, 1 thread; state at step {steps}, then 1 more step; "
          f"median of {reps} interleaved rounds")
    print(f"{'recipe':8s} {'workers':>7s} {'path':10s} {'fresh 1 step':>13s} {'resume':>9s} {'ratio':>6s}")
    for recipe in recipes:
        for workers in (0, 2):
            tag = root / f"{recipe}_w{workers}"
            subprocess.run(argv(recipe, tag / "done", steps, workers), env=env, check=True, capture_output=True)
            todo = [("extension", tag / "done")]
            if paths == "both":  # killed after its step-400 checkpoint (ckpt_every), mid-way to 800 steps
                out = tag / "killed"
                p = subprocess.Popen(argv(recipe, out, 2 * steps, workers, "--set", f"train.ckpt_every={steps}",
                                          "--set", "train.log_every=1"), env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
                log = partial_dir(out) / "log.jsonl"
                while not (log.is_file() and log.read_text().count("\n") > steps + 1):
                    time.sleep(0.2)
                p.send_signal(signal.SIGKILL)
                p.wait()
                todo.append(("ckpt_every", out))
            for name, out in todo:
                fresh, resumed = [], []
                for r in range(reps):  # interleaved rounds, medians
                    fresh.append(timed(argv(recipe, tag / f"fresh_{name}_{r}", 1, workers)))
                    resumed.append(timed(argv(recipe, copy_run(out, tag / f"{name}_{r}"), steps + 1, workers,
                                              "--resume")))
                f, s = statistics.median(fresh), statistics.median(resumed)
                print(f"{recipe:8s} {workers:7d} {name:10s} {f:11.2f} s {s:7.2f} s {s / f:6.2f}  "
                      f"(fresh {min(fresh):.2f}-{max(fresh):.2f}, resume {min(resumed):.2f}-{max(resumed):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=400)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=160, help="the resume position, in batches")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--cli", action="store_true", help="time whole `grace train --resume` commands (see above)")
    ap.add_argument("--paths", default="both", choices=["extension", "both"])
    ap.add_argument("--recipes", default="ft,grace")
    ap.add_argument("--reps", type=int, default=3, help="--cli: timed rounds of each command (medians)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.cli:
        return cli_paths(a.recipes.split(","), a.paths, reps=a.reps)

    from grace_plugin.data.loader import make_train_loader
    from grace_plugin.data.transforms import train_transform
    from grace_plugin.data.source import batch_source

    pcfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875,
            "mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28)}
    tf = train_transform(pcfg, "none")
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), a.shards, a.per_shard, a.size)

        def loader():
            return make_train_loader(urls, tf, a.batch, 1000, seed=0, shuffle_buffer=1000, num_workers=a.workers)

        class Unseekable:  # the same stream, read the old way
            def __init__(self, inner):
                self.inner = inner

            def __iter__(self):
                return iter(self.inner)

        cursors = {}
        t0 = time.perf_counter()
        it, how = batch_source(Unseekable(loader()), consumed=0)
        for _ in range(a.batches):
            b = next(it)
            w, blk, off = (int(v) for v in b["cursor"])
            cursors[w] = (blk, off)
        want = next(it)
        t_replay = time.perf_counter() - t0

        t0 = time.perf_counter()
        it, how = batch_source(loader(), consumed=a.batches, cursors=cursors)
        got = next(it)
        t_seek = time.perf_counter() - t0
        assert how == "seek" and torch.equal(got["label"], want["label"]) and torch.equal(got["image"], want["image"])

    n = a.batches * a.batch
    per_image = t_replay / (n + a.batch)
    print(f"position: {a.batches} batches x {a.batch} = {n} images ({a.size} px JPEG -> 224), workers {a.workers}")
    print(f"replay (old --resume): {t_replay:8.2f} s to the first new batch ({1e3 * per_image:.2f} ms/image)")
    print(f"seek   (new --resume): {t_seek:8.2f} s to the first new batch (same batch, checked)")
    print(f"ratio replay/seek: {t_replay / t_seek:.0f}x")
    late = 200_000 * 256
    print(f"extrapolated replay at step 200,000, batch 256: {late * per_image / 3600:.1f} h on one loader process "
          f"(seek stays one block: about {t_seek:.1f} s)")


if __name__ == "__main__":
    main()
