"""CPU-seconds per training step of testbed methods, measured side by side: the steps_scale of a compute-matched row.

A compute-matched control (methods.yaml ``steps_scale``) trains as many more steps as its step is cheaper than the
method it is matched to, so both spend the same CPU-seconds. Each method's run config is the testbed's
(``grace_app.testbed.configs.method_config``, the tuned values, the shared training attack) on the default world and
its shipped tiny CLIP; its step cost is the difference of two runs' process CPU time, ``--long`` and ``--short``
steps, over ``long - short``, so the set-up cost (model loading, data pipeline start) cancels. Methods are
interleaved over ``--reps`` rounds and the median taken; torch runs on one thread (the studies' lanes do). Prints
each method's ms/step and its ratio to the reference (the first method).

    PYTHONPATH=. python bench/compute_match.py --methods grace,lora-tecoa,grace-core --out /tmp/cm
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def _cpu_seconds(method: str, steps: int, out: Path, data: Path, pretrained: Path) -> float:
    import shutil

    from grace_app.testbed.configs import load_methods, method_config
    from grace_plugin.finetune import fine_tune

    run = out / "runs" / f"{method}-{steps}"
    shutil.rmtree(run, ignore_errors=True)
    # the method's own config at `steps` steps; steps_scale is what is being measured, so it is not applied here
    m = load_methods()[method]
    m.steps_scale = 1.0
    cfg = method_config(m, overrides={"train": {"seed": 0, "device": "cpu"}}, steps=steps)
    t0 = time.process_time()
    fine_tune(m.recipe, pretrained, data / "id", run, cfg, progress=False)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="grace,lora-tecoa")
    ap.add_argument("--short", type=int, default=20)
    ap.add_argument("--long", type=int, default=80)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="studies/compute_match")
    ap.add_argument("--json", default=None, help="write the table here (for `grace results --add`)")
    args = ap.parse_args()

    import torch

    from grace_app.studies.quickstart import prepare_testbed

    torch.set_num_threads(1)
    out = Path(args.out)
    data, pretrained = prepare_testbed(out, 0, "default", progress=False, echo=print)
    methods = args.methods.split(",")
    per_step: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(args.reps):
        for m in methods:
            long_s = _cpu_seconds(m, args.long, out, data, pretrained)
            short_s = _cpu_seconds(m, args.short, out, data, pretrained)
            per_step[m].append((long_s - short_s) / (args.long - args.short))
            print(f"round {rep}: {m} {1e3 * per_step[m][-1]:.1f} ms/step", flush=True)
    ref = statistics.median(per_step[methods[0]])
    rows = []
    print(f"\n| method | ms/step (median of {args.reps}) | {methods[0]} / method |\n|---|---:|---:|")
    for m in methods:
        med = statistics.median(per_step[m])
        rows.append({"method": m, "ms_per_step": round(1e3 * med, 1), "ratio": round(ref / med, 3),
                     "rounds_ms": [round(1e3 * v, 1) for v in per_step[m]]})
        print(f"| {m} | {1e3 * med:.1f} | {ref / med:.3f} |")
    if args.json:
        from grace_app.studies.publish import write_bench_table

        write_bench_table(
            args.json, "compute_match", "Training step cost of testbed methods (the compute-matched rows' steps_scale)",
            f"PYTHONPATH=. python bench/compute_match.py --methods {args.methods} --reps {args.reps}",
            [f"Default world, its shipped tiny CLIP, each method's testbed config at its tuned values, torch on 1 "
             f"thread. Step cost = (CPU-s of a {args.long}-step run - CPU-s of a {args.short}-step run) / "
             f"{args.long - args.short}, median over {args.reps} interleaved rounds. ratio: {methods[0]}'s step cost "
             f"over the method's: the steps_scale that gives the method {methods[0]}'s CPU-seconds."],
            ["method", "ms_per_step", "ratio", "rounds_ms"], rows)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
