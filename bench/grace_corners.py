"""GRACE at the corners of its range: does it train to the end, finite, and what does its perturbation do?

For every corner of ρ (relative) x λ_GV x lr (default {5e-4, 5e-3, 5e-2} x {0, 1, 100} x {3e-4, 3e-3}), GRACE is
trained on the testbed (the quickstart world, the testbed's GRACE config: ``configs/testbed/``) for the study length
and its run folder read back: steps finished, steps skipped for a non-finite loss (and whether the run stopped as
diverged), the mean over logged steps of ΔL (L_LAR minus the unperturbed adversarial loss), of ``||Δ||/||W||`` and of
the cosine of Δ with the layer gradient, and the last logged feature spread (mean cosine between different images).
Prints the table and writes a JSON that ``grace results --add`` turns into a docs page.

    PYTHONPATH=. python bench/grace_corners.py --out /tmp/corners --json docs/results/data/bench-grace_corners.json
    PYTHONPATH=. python bench/grace_corners.py --rhos 5e-3 --gvs 1 --lrs 3e-3 --ascents svd,factor   # ascents
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _read_run(run: Path) -> dict:
    logs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()] if (run / "log.jsonl").is_file() \
        else []

    def mean(key):
        vals = [r[key] for r in logs if isinstance(r.get(key), (int, float))]
        return statistics.fmean(vals) if vals else None

    spread = [r["feature_spread"] for r in logs if r.get("feature_spread") is not None]
    return {"delta_l": mean("delta_l"), "awp_rel": mean("awp_rel"), "awp_cos": mean("awp_cos"),
            "gv_share": mean("gv_share"), "feature_spread": spread[-1] if spread else None,
            "last_logged_step": logs[-1]["step"] if logs else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="studies/grace_corners")
    ap.add_argument("--rhos", default="5e-4,5e-3,5e-2")
    ap.add_argument("--gvs", default="0,1,100")
    ap.add_argument("--lrs", default="3e-4,3e-3")
    ap.add_argument("--ascents", default="svd", help="recipe.awp_ascent values (svd, factor)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="grace_corners", help="the results page's name (bench-NAME.md)")
    ap.add_argument("--title", default="GRACE at the corners of its range (testbed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from grace_app.studies.quickstart import prepare_testbed
    from grace_app.testbed.configs import method_config
    from grace_plugin.finetune import fine_tune
    from grace_plugin.trainer import TrainingDiverged

    out = Path(args.out)
    data, pretrained = prepare_testbed(out, args.seed, progress=False, echo=lambda *a: None)
    rows = []
    for ascent in args.ascents.split(","):
        for rho in _floats(args.rhos):
            for gv in _floats(args.gvs):
                for lr in _floats(args.lrs):
                    over = {"train": {"lr": lr, "seed": args.seed, "device": "cpu"},
                            "recipe": {"rho": rho, "rho_mode": "relative", "lambda_gv": gv, "awp_ascent": ascent}}
                    cfg = method_config("grace", overrides=over, steps=args.steps, tuned=False)
                    run = out / "runs" / f"{ascent}-rho{rho:g}-gv{gv:g}-lr{lr:g}"
                    t0, status = time.time(), "finished"
                    try:
                        fine_tune("grace", pretrained, data / "id", run, cfg, progress=False)
                        meta = json.loads((run / "checkpoint.json").read_text())
                        skipped = meta["metrics"]["train"].get("skipped_steps", 0)
                    except TrainingDiverged as e:
                        status, skipped = f"diverged: {e}", None
                    row = {"ascent": ascent, "rho": rho, "lambda_gv": gv, "lr": lr, "status": status,
                           "skipped_steps": skipped, **_read_run(run), "seconds": round(time.time() - t0, 1)}
                    rows.append(row)
                    fmt = {k: ("-" if v is None else f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
                    print(f"{ascent} rho {rho:g} gv {gv:g} lr {lr:g}: {status}, skipped {fmt['skipped_steps']}, "
                          f"dL {fmt['delta_l']}, rel {fmt['awp_rel']}, cos {fmt['awp_cos']}, spread "
                          f"{fmt['feature_spread']} ({row['seconds']:.0f} s)", flush=True)
    ok = sum(r["status"] == "finished" and not r["skipped_steps"] for r in rows)
    print(f"\n{ok} of {len(rows)} runs finished with every step finite")
    if args.json:
        doc = {"bench": "table", "name": args.name, "title": args.title,
               "command": "PYTHONPATH=. python bench/grace_corners.py " + " ".join(
                   f"--{k} {v}" for k, v in vars(args).items() if v is not None and k not in ("json", "out", "title")),
               "notes": [f"{args.steps} steps, seed {args.seed}, the quickstart world, configs/testbed/ GRACE "
                         "(untuned). "
                         "delta_l, awp_rel, awp_cos, gv_share: means over logged steps; feature_spread: the last "
                         f"logged step's. {ok} of {len(rows)} runs finished with every step finite."],
               "columns": ["ascent", "rho", "lambda_gv", "lr", "status", "skipped_steps", "delta_l", "awp_rel",
                           "awp_cos", "gv_share", "feature_spread", "seconds"],
               "rows": rows, "date": time.strftime("%Y-%m-%d")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
