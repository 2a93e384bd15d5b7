"""Tuned GRACE against its own LoRA core on validation data: what do the weight perturbation and the volume term buy?

Reads a `grace study tune` folder (its ``tuning.json``): GRACE's selected point and that point's validation results
on each re-scoring seed (``seed_results``). Trains, with the tuning protocol (configs/testbed/tuning.yaml: ID train
minus the held-out validation split, same steps, same attack), on the same seeds:

- ``core``: the same point with rho = 0 and lambda_GV = 0 (``recipe.awp=zero``: L_LAR on the unperturbed
  adversarial view, no extra pass; ``recipe.gram_volume=false``: no volume term, as lambda_GV = 0), i.e. LoRA +
  adversarial CE (arXiv 2603.27139 Eq. 4 with Delta = 0 in L_LAR-AWP and no L_GV): Table 8's ``+ L_LAR at rho = 0`` row;
- ``no-gv``: the same point without the volume term only (the perturbation kept), which tells which term costs or helps.

Prints each seed's validation clean, robust, HM and feature spread, and the paired difference GRACE - variant of the
validation HM over the common seeds with its 95% t interval (``verdicts.paired_difference``); the tuned LoRA-TeCoA's
re-scored seeds are shown for reference when the folder tuned it. Writes a JSON that ``grace results --add`` turns
into a docs page.

    PYTHONPATH=. python bench/grace_core.py --tune studies/tune --json docs/results/data/bench-grace_core.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# each variant is a Table 8 row of configs/testbed/methods.yaml (its `set` switches, read from there): the core is
# "+ L_LAR at rho = 0", no-gv is "+ LAR-AWP, curvature curriculum"
VARIANTS = {"core": "ablation-lar-rho0", "no-gv": "ablation-awp-curriculum"}
KEEP = ("val_clean", "val_robust", "hm", "feature_spread")


def _seed_results(res: dict) -> dict[int, dict]:
    """The selected trial's validation results per seed (tuning.json keys are strings)."""
    row = next(r for r in res["rescored"] if r["trial"] == res["selected"])
    return {int(k): v for k, v in (row.get("seed_results") or {}).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", required=True, help="a `grace study tune` folder that tuned grace")
    ap.add_argument("--variants", default="core,no-gv")
    ap.add_argument("--json", default=None, help="write the table here (for `grace results --add`)")
    args = ap.parse_args()

    from grace_app.testbed.configs import load_methods, load_tuning
    from grace_app.studies.tuning import validation_trial
    from grace_app.studies.verdicts import paired_difference

    tune = Path(args.tune)
    doc = json.loads((tune / "tuning.json").read_text())
    grace = doc["methods"]["grace"]
    if grace.get("selected") is None or not grace.get("rescored"):
        raise SystemExit(f"{tune / 'tuning.json'}: grace has no selected, re-scored trial")
    point, ours = grace["values"], _seed_results(grace)
    if not ours:
        raise SystemExit(f"{tune / 'tuning.json'}: the selected trial has no per-seed results (re-run the tune once "
                         "with this version: it re-reads them from the study without training)")
    proto, methods = load_tuning(), load_methods()
    steps, n_val_adv = int(doc["steps"]), int(proto["n_val_adv"])
    prune = {"val_every": int(proto.get("prune_every", 0)), "val_n": int(proto.get("prune_val_n", 128))}
    ctx = dict(id_set=("val", tune / "val_split"), eps=float(proto.get("eps", 4 / 255)), n_adv=n_val_adv,
               device="cpu", seed=int(doc["seed"]))
    rows = [{"model": "GRACE (tuned)", "seed": s, **{k: r.get(k) for k in KEEP}} for s, r in sorted(ours.items())]
    lora = doc["methods"].get("lora-tecoa")
    if lora and lora.get("selected") is not None and lora.get("rescored"):
        rows += [{"model": "LoRA-TeCoA (tuned)", "seed": s, **{k: r.get(k) for k in KEEP}}
                 for s, r in sorted(_seed_results(lora).items())]
    unknown = [n for n in args.variants.split(",") if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    for name in args.variants.split(","):
        switches = methods[VARIANTS[name]].set
        for seed in sorted(ours):
            run = tune / "trials" / "grace-variants" / f"{name}-seed{seed}"
            cached = run.parent / f"{run.name}.json"
            if cached.is_file():  # a finished variant run is not trained again
                res = json.loads(cached.read_text())
            else:
                # the tuning's own training settings (its seed and validation checks: the same training as GRACE's)
                over = {"train": {"seed": seed, "device": "cpu", **(prune if prune["val_every"] else {})}}
                t0 = time.time()
                res = validation_trial(methods["grace"], {**point, **switches}, run, tune / "pretrained",
                                       tune / "val_split", steps, over, ctx, proto.get("attack", "apgd-ce"))
                res["seconds"] = round(time.time() - t0, 1)
                cached.write_text(json.dumps(res) + "\n")
            rows.append({"model": f"GRACE, {name} ({', '.join(f'{k}={v}' for k, v in switches.items())})",
                         "seed": seed, **{k: res.get(k) for k in KEEP}})
            print(f"{name:<6} seed {seed}: val clean {res['val_clean']:.2f} robust {res['val_robust']:.2f} HM "
                  f"{res['hm']:.2f} spread {res['feature_spread']:.3f}", flush=True)
    hm = {}
    for r in rows:
        hm.setdefault(r["model"], {})[r["seed"]] = r["hm"]
    print("\n| model | seeds | val HM (mean) | GRACE - model, paired (95% t) |")
    summary = []
    for model, by_seed in hm.items():
        mean = sum(by_seed.values()) / len(by_seed)
        d = None if model == "GRACE (tuned)" else paired_difference(hm["GRACE (tuned)"], by_seed)
        diff = "-" if d is None else d.text()
        summary.append({"model": model, "seeds": len(by_seed), "val_hm_mean": mean, "grace_minus_model_text": diff,
                        "grace_minus_model": None if d is None else d.record()})
        print(f"| {model} | {len(by_seed)} | {mean:.2f} | {diff} |")
    if args.json:
        out = {"bench": "table", "name": "grace_core",
               "title": "Tuned GRACE against its LoRA core (validation split)",
               "command": f"PYTHONPATH=. python bench/grace_core.py --tune TUNE --variants {args.variants}",
               "notes": [f"GRACE's selected point from `grace study tune` ({steps} steps, world {doc['size']}, seed "
                         f"{doc['seed']}): {', '.join(f'{k}={v}' for k, v in point.items())}. Each row is one seed "
                         f"trained on ID train minus the validation split and scored there: clean top-1, robust top-1 "
                         f"under APGD-CE 4/255 on {n_val_adv} validation images, their HM, feature spread. core: rho 0 "
                         "(L_LAR on the unperturbed adversarial view) and lambda_GV 0; no-gv: lambda_GV 0 only.",
                         "Paired difference of the validation HM (GRACE - model) over common seeds: "
                         + "; ".join(f"{s['model']}: {s['grace_minus_model_text']}" for s in summary
                                     if s["grace_minus_model"])],
               "columns": ["model", "seed", *KEEP], "rows": rows, "summary": summary,
               "date": time.strftime("%Y-%m-%d")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
