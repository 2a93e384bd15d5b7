"""Evaluation throughput, printed as ratios (no timing is asserted anywhere).

1. Our `adv:autoattack` suite vs robustbench.eval.benchmark on the same model and images: wall-time ratio
   ours / RobustBench (goal <= 1.0) with both robust accuracies (they must be identical). The model is the 16-px
   linear template model of the equality tests (tests/test_suites_robustbench.py) over an ImageNet-layout folder
   built in a temp dir: half the images are provably robust, so every AutoAttack component runs to completion.
   Both run once untimed first (imports, first-call kernels), then ``--reps`` interleaved rounds; medians.
2. Clean-eval images/s of the `id` suite on the RobustBench subset layout.
3. 2 processes vs 1 under torchrun (gloo, 1 thread each): `grace eval --data ID --attack apgd-ce` with the testbed's
   tiny CLIP (``grace_plugin.testbed.tiny_clip``, cached after its first pretraining) on the default synthetic world
   (600 ID test images); the speed-up of the adversarial suite (its seconds in report.json, rank 0) and of the whole
   command (wall time, process start included), and whether both reports are identical (goal >= 1.7x).

    PYTHONPATH=. python bench/eval_speed.py [--n 8] [--reps 3] [--threads 1] [--n-adv 256] [--device cuda]
    [--world DIR]   (an existing synthetic world, e.g. studies/table6/data, instead of writing one)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _torchrun(nproc: int, args: list[str]) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "grace_plugin", "eval", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def ranks_vs_one(n_adv: int, world: str | None = None, batch: int = 32) -> None:
    from grace_plugin.data.synthetic import write_synthetic_world
    from grace_plugin.testbed import tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = Path(world) if world else root / "world"
        if not world:
            write_synthetic_world(data, seed=0, progress=False)
        clip = tiny_clip(data, root / "clip", progress=False)
        args = ["--model", str(clip), "--data", str(data / "id"), "--attack", "apgd-ce", "--n-adv",
                str(n_adv), "--batch-size", str(batch), "--device", "cpu", "--no-progress"]
        wall, reps = {}, {}
        for nproc in (1, 2):
            wall[nproc] = _torchrun(nproc, [*args, "--out", str(root / f"p{nproc}")])
            reps[nproc] = json.loads((root / f"p{nproc}" / "report.json").read_text())
        adv = {k: reps[k]["seconds"]["adv:apgd-ce"] for k in (1, 2)}
        same = all(reps[1][k] == reps[2][k] for k in ("datasets", "definitions")) and \
            {k: v for k, v in reps[1]["adversarial"].items()} == {k: v for k, v in reps[2]["adversarial"].items()}
        a = reps[2]["adversarial"]
        print(f"apgd-ce Linf 4/255 on {n_adv} testbed images (tiny CLIP, batch {batch}, 1 thread per process): "
              f"adv suite 1 process {adv[1]:.1f} s, 2 processes {adv[2]:.1f} s -> speed-up {adv[1] / adv[2]:.2f}x | "
              f"whole command {wall[1]:.1f} s vs {wall[2]:.1f} s -> {wall[1] / wall[2]:.2f}x | robust "
              f"{a['robust_acc']:.2f} on n={a['n']} | reports identical: {same}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8, help="images (half robust)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clean-n", type=int, default=5000, help="images for the clean-eval throughput")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds of the AutoAttack comparison (medians)")
    ap.add_argument("--n-adv", type=int, default=256, help="images attacked in the 2-vs-1 process comparison")
    ap.add_argument("--adv-batch", type=int, default=32, help="batch size of the 2-vs-1 process comparison")
    ap.add_argument("--world", default=None, help="an existing synthetic world folder (default: write one)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (both evaluators run there)")
    ap.add_argument("--skip-ranks", action="store_true", help="leave out part 3 (CPU processes; gpu_check.sh)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import grace_plugin  # noqa: F401  (autoattack shim)
    from robustbench.eval import benchmark
    from test_suites_robustbench import TemplateModel, _loaded, make_imagenet

    from eval_suites.context import SuiteContext
    from eval_suites.suites import run_suites
    from grace_plugin.data.transforms import eval_transform

    eps = 4 / 255
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        templates, _ = make_imagenet(root, [0.1, 0.02] * (a.n // 2))
        model = TemplateModel(templates).eval()
        ctx = SuiteContext(id_set=("imagenet", root), eps=eps, n_adv=a.n, n_imagenet=a.n, batch_size=a.n,
                           device=a.device)

        def ours_once():  # a fresh context each time: nothing cached from an earlier round
            fresh = dataclasses.replace(ctx, cache={})
            return run_suites(_loaded(model), ["adv:autoattack"], fresh)["suites"]["adv:autoattack"]

        def robustbench_once():
            return benchmark(model, n_examples=a.n, dataset="imagenet", threat_model="Linf", data_dir=str(root),
                             eps=eps, batch_size=a.n, preprocessing=eval_transform(model.pretrained_cfg),
                             device=torch.device(a.device))

        ours_once(), robustbench_once()  # warm-up: imports and first-call costs hit neither timed run
        times = {"ours": [], "rb": []}
        for _ in range(a.reps):  # interleaved rounds: drift on a shared machine hits both alike
            t0 = time.perf_counter()
            ours = ours_once()
            times["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            clean, robust = robustbench_once()
            times["rb"].append(time.perf_counter() - t0)
        t_ours, t_rb = statistics.median(times["ours"]), statistics.median(times["rb"])
        print(f"autoattack Linf 4/255 on {a.n} images ({a.device}, {a.threads} thread(s), median of {a.reps}): "
              f"ours {t_ours:.2f} s "
              f"(clean {ours['clean_acc']:.2f}, robust {ours['robust_acc']:.2f}) | robustbench.benchmark "
              f"{t_rb:.2f} s (clean {100 * clean:.2f}, robust {100 * robust:.2f}) | ratio ours/robustbench "
              f"{t_ours / t_rb:.2f} | identical: "
              f"{ours['robust_acc'] == 100 * robust and ours['clean_acc'] == 100 * clean}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = min(a.clean_n, 5000)
        templates, _ = make_imagenet(root, [0.1] * n)
        model = TemplateModel(templates).eval()
        ctx = SuiteContext(id_set=("imagenet", root), n_imagenet=n, batch_size=256, device=a.device)
        t0 = time.perf_counter()
        rep = run_suites(_loaded(model), ["id"], ctx)
        dt = time.perf_counter() - t0
        print(f"clean eval (id suite, {a.device}, RobustBench ImageNet subset, 16 px PNG, linear model): "
              f"{n} images in {dt:.1f} s "
              f"= {n / dt:.0f} images/s (top-1 {rep['axes']['id']:.2f})")

    if not a.skip_ranks:
        ranks_vs_one(a.n_adv, a.world, a.adv_batch)


if __name__ == "__main__":
    main()
