"""Evaluation throughput, printed as ratios (no timing is asserted anywhere).

1. Our `adv:autoattack` suite vs robustbench.eval.benchmark on the same model and images: wall-time ratio
   ours / RobustBench (goal <= 1.0) with both robust accuracies (they must be identical). The model is the 16-px
   linear template model of the equality tests (tests/test_suites_robustbench.py) over an ImageNet-layout folder
   built in a temp dir: half the images are provably robust, so every AutoAttack component runs to completion.
   Both run once untimed first (imports, first-call kernels), then ``--reps`` interleaved rounds; medians.
2. Clean-eval images/s of the `id` suite on the RobustBench subset layout.
3. 2 processes vs 1 under torchrun (gloo, 1 thread each): `grace eval --data SET --attack apgd-ce` with the
   testbed's tiny CLIP (``grace_app.testbed.tiny_clip.tiny_clip``, cached after its first pretraining) on a synthetic
   ``--images``-image set in ``--shards`` tars: each suite's throughput (its seconds in report.json) and the whole
   command's, the fixed costs (report.json ``startup``: interpreter and imports, process group, model load, heads;
   the rest of the command) apart from the per-image cost, and whether both reports are identical, per-sample
   strings included (goal >= 1.7x for both suites).
4. Peak RSS (``ru_maxrss``) of a clean evaluation of ``--images`` vs a tenth of them (goal: within 10%).

    PYTHONPATH=. python bench/eval_speed.py [--n 8] [--reps 5] [--threads 1] [--images 8000] [--shards 32]
    [--n-adv 512] [--device cuda] [--world DIR]   (an existing synthetic world for the tiny CLIP's pretraining)
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


def _torchrun(nproc: int, args: list[str], rss_file: Path | None = None) -> float:
    """Wall seconds of ``grace eval ARGS`` under torchrun (1 thread a process); ``rss_file``: one process run through
    a wrapper that writes its peak RSS (KiB, ``ru_maxrss``) there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if rss_file is not None:
        wrapper = ("import resource, runpy, sys\nsys.argv = ['grace', *sys.argv[2:]]\ntry:\n"
                   "    runpy.run_module('grace_plugin', run_name='__main__')\nfinally:\n"
                   "    open(sys.argv_rss, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))")
        cmd = [sys.executable, "-c", wrapper.replace("sys.argv_rss", repr(str(rss_file))), "--", "eval", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "grace_app", "eval", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _comparable(rep: dict) -> dict:
    """What must not depend on the number of processes: per-set counts, per-sample strings, heads, intervals, the
    attack's counts and per-sample strings, both definitions (timings and resume counts aside)."""
    adv = {k: v for k, v in (rep["adversarial"] or {}).items() if k != "resumed_batches"}
    return {"datasets": rep["datasets"], "adversarial": adv, "definitions": rep["definitions"]}


def _big_set(root: Path, n: int, shards: int, seed: int) -> Path:
    """A ``n``-image ID test set of the synthetic world's kind in ``shards`` equal tars (other splits tiny)."""
    from grace_app.testbed.world import SyntheticWorldSpec, write_synthetic_world

    spec = SyntheticWorldSpec(train_per_class=1, test_per_class=n // 10, ood_per_class=1, pairs=10,
                              shard_size=-(-n // shards))
    write_synthetic_world(root, seed=seed, spec=spec, progress=False)
    return root / "id"


def ranks_vs_one(n: int, shards: int, n_adv: int, world: str | None = None, batch: int = 64) -> dict:
    """Clean (`id` suite, all ``n`` images) and APGD-CE (first ``n_adv``) in one `grace eval`, at 1 and 2 processes;
    fixed costs (start-up: interpreter and imports, process group, model load, heads; report writing) apart from
    the suites' per-image seconds; then peak RSS of a clean evaluation of ``n`` vs ``n // 10`` images. Returns the
    table's rows and notes (``--json``)."""
    from grace_app.testbed.world import write_synthetic_world
    from grace_app.testbed.tiny_clip import tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = Path(world) if world else root / "world"
        if not world:
            write_synthetic_world(data, seed=0, progress=False)
        clip = tiny_clip(data, root / "clip", progress=False)
        big = _big_set(root / "big", n, shards, seed=1)
        args = ["--model", str(clip), "--data", str(big), "--attack", "apgd-ce", "--n-adv", str(n_adv),
                "--batch-size", str(batch), "--device", "cpu", "--no-progress"]
        wall, reps = {}, {}
        for nproc in (1, 2):
            wall[nproc] = _torchrun(nproc, [*args, "--out", str(root / f"p{nproc}")])
            reps[nproc] = json.loads((root / f"p{nproc}" / "report.json").read_text())
        print(f"\n{n} images in {shards} shards, APGD-CE Linf 4/255 on the first {n_adv}, tiny CLIP, batch {batch}, "
              "1 thread per process, CPU:")
        print("| processes | start-up s (interpreter+imports / process group / model / wait for ranks / heads) "
              "| clean s | clean img/s"
              " | APGD-CE s | APGD-CE img/s | rest of the command s | whole command s |")
        print("|---|---|---|---|---|---|---|---|")
        rows = []
        for k in (1, 2):
            r, sec = reps[k], reps[k]["seconds"]
            st = r["startup"]
            rest = wall[k] - sum(sec.values()) - (st["imports"] or 0) - st["process_group"] - st["model_load"] \
                - st["wait_for_ranks"]
            print(f"| {k} | {st['imports']:.1f} / {st['process_group']:.2f} / {st['model_load']:.2f} / "
                  f"{st['wait_for_ranks']:.2f} / {st['heads']:.2f} | {sec['id']:.1f} | {n / sec['id']:.0f} | "
                  f"{sec['adv:apgd-ce']:.1f} | "
                  f"{n_adv / sec['adv:apgd-ce']:.1f} | {rest:.1f} | {wall[k]:.1f} |")
            rows.append({"processes": k, "imports_s": st["imports"], "process_group_s": st["process_group"],
                         "model_load_s": st["model_load"], "wait_for_ranks_s": st["wait_for_ranks"],
                         "heads_s": st["heads"], "clean_s": sec["id"], "clean_img_per_s": round(n / sec["id"], 1),
                         "apgd_ce_s": sec["adv:apgd-ce"], "apgd_ce_img_per_s": round(n_adv / sec["adv:apgd-ce"], 2),
                         "rest_s": round(rest, 2), "wall_s": round(wall[k], 2)})
        ratio = {s: reps[1]["seconds"][s] / reps[2]["seconds"][s] for s in ("id", "adv:apgd-ce")}
        per_image = {s: 1000 * reps[1]["seconds"][s] / m for s, m in (("id", n), ("adv:apgd-ce", n_adv))}
        fixed = wall[1] - sum(reps[1]["seconds"].values())
        same = _comparable(reps[1]) == _comparable(reps[2])
        a = reps[2]["adversarial"]
        summary = (f"2 / 1 processes throughput: clean {ratio['id']:.2f}x, APGD-CE {ratio['adv:apgd-ce']:.2f}x | whole "
              f"command {wall[1] / wall[2]:.2f}x | 1 process: fixed {fixed:.1f} s, per image {per_image['id']:.2f} ms"
              f" clean, {per_image['adv:apgd-ce']:.1f} ms APGD-CE | rank split "
              f"{reps[2]['config']['rank_split']} | top-1 {reps[2]['datasets']['id']['top1']:.2f} (n="
              f"{reps[2]['datasets']['id']['n']}), robust {a['robust_acc']:.2f} (n={a['n']}) | reports identical "
              f"(counts, per-sample strings, heads, definitions): {same}")
        print(summary)

        small = _big_set(root / "small", n // 10, max(1, shards // 10), seed=2)
        rss = {}
        for m, d in ((n // 10, small), (n, big)):
            f = root / f"rss{m}"
            _torchrun(1, ["--model", str(clip), "--data", str(d), "--batch-size", str(batch), "--device", "cpu",
                          "--no-progress", "--out", str(root / f"rss{m}.out")], rss_file=f)
            rss[m] = int(f.read_text()) / 1024
        memory = (f"peak RSS of a clean evaluation (1 process): {n // 10} images {rss[n // 10]:.0f} MiB, {n} images "
                  f"{rss[n]:.0f} MiB -> {rss[n] / rss[n // 10]:.3f}x (goal <= 1.10)")
        print(memory)
    setting = (f"{n} images in {shards} shards (synthetic world kind, 32 px), clean `id` suite on all, APGD-CE Linf "
               f"4/255 on the first {n_adv}, the testbed's tiny CLIP (zero-shot head built), batch {batch}, "
               "1 thread per process, CPU, gloo; seconds from report.json (rank 0), start-up = report.json "
               "`startup`, rest = the torchrun launcher, report writing and exit")
    return {"rows": rows, "notes": [setting, summary, memory]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8, help="images (half robust)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clean-n", type=int, default=5000, help="images for the clean-eval throughput")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds of the AutoAttack comparison (medians)")
    ap.add_argument("--images", type=int, default=8000, help="images of the set of the 2-vs-1 process comparison")
    ap.add_argument("--shards", type=int, default=32, help="its shards")
    ap.add_argument("--n-adv", type=int, default=512, help="images attacked in the 2-vs-1 process comparison")
    ap.add_argument("--adv-batch", type=int, default=64, help="batch size of the 2-vs-1 process comparison")
    ap.add_argument("--world", default=None, help="an existing synthetic world folder (default: write one)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (both evaluators run there)")
    ap.add_argument("--json", default=None, help="write the results as a table document (`grace results --add`)")
    ap.add_argument("--skip-ranks", action="store_true", help="leave out part 3 (CPU processes; gpu_check.sh)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    import grace_plugin  # noqa: F401  (autoattack shim)
    from robustbench.eval import benchmark

    from grace_app.testbed.probe import TemplateModel, loaded_template_model, make_imagenet

    from eval_suites.context import SuiteContext
    from eval_suites.engine import run_suites
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
            return run_suites(loaded_template_model(model), ["adv:autoattack"], fresh)["suites"]["adv:autoattack"]

        def robustbench_once():
            return benchmark(model, n_examples=a.n, dataset="imagenet", threat_model="Linf", data_dir=str(root),
                             eps=eps, batch_size=a.n, preprocessing=eval_transform(model.pretrained_cfg),
                             device=torch.device(a.device))

        calls = []  # model forwards (attack iterations and accuracy checks) of each path, counted in the warm-up
        hook = model.register_forward_hook(lambda *_: calls.append(1))
        ours_once()
        n_ours = len(calls)
        robustbench_once()  # warm-up: imports and first-call costs hit neither timed run
        n_rb = len(calls) - n_ours
        hook.remove()
        times = {"ours": [], "rb": []}
        for _ in range(a.reps):  # interleaved rounds: drift on a shared machine hits both alike
            t0 = time.perf_counter()
            ours = ours_once()
            times["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            clean, robust = robustbench_once()
            times["rb"].append(time.perf_counter() - t0)
        t_ours, t_rb = statistics.median(times["ours"]), statistics.median(times["rb"])
        aa = (f"autoattack Linf 4/255 on {a.n} images ({a.device}, {a.threads} thread(s), median of {a.reps}): "
              f"ours {t_ours:.2f} s "
              f"(clean {ours['clean_acc']:.2f}, robust {ours['robust_acc']:.2f}) | robustbench.benchmark "
              f"{t_rb:.2f} s (clean {100 * clean:.2f}, robust {100 * robust:.2f}) | ratio ours/robustbench "
              f"{t_ours / t_rb:.2f} | identical: "
              f"{ours['robust_acc'] == 100 * robust and ours['clean_acc'] == 100 * clean} | model forwards: ours "
              f"{n_ours}, robustbench {n_rb}")
        print(aa)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = min(a.clean_n, 5000)
        templates, _ = make_imagenet(root, [0.1] * n)
        model = TemplateModel(templates).eval()
        ctx = SuiteContext(id_set=("imagenet", root), n_imagenet=n, batch_size=256, device=a.device)
        t0 = time.perf_counter()
        rep = run_suites(loaded_template_model(model), ["id"], ctx)
        dt = time.perf_counter() - t0
        clean = (f"clean eval (id suite, {a.device}, RobustBench ImageNet subset, 16 px PNG, linear model): "
                 f"{n} images in {dt:.1f} s = {n / dt:.0f} images/s (top-1 {rep['axes']['id']:.2f})")
        print(clean)

    doc = {"rows": [], "notes": []}
    if not a.skip_ranks:
        doc = ranks_vs_one(a.images, a.shards, a.n_adv, a.world, a.adv_batch)
    if a.json:
        cols = ["processes", "imports_s", "process_group_s", "model_load_s", "wait_for_ranks_s", "heads_s", "clean_s",
                "clean_img_per_s", "apgd_ce_s", "apgd_ce_img_per_s", "rest_s", "wall_s"]
        out = {"bench": "table", "name": f"eval_speed-{a.device}", "title": f"Evaluation speed ({a.device})",
               "command": "PYTHONPATH=. python bench/eval_speed.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                   if v not in (None, False) and k != "json"),
               "notes": [aa, clean, *doc["notes"]], "columns": cols, "rows": doc["rows"],
               "date": time.strftime("%Y-%m-%d")}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
