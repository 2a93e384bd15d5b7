"""Positive control for LAR-AWP: can the weight perturbation act on the testbed? GRACE at increasing rho.

Adversarial weight perturbation (Wu et al. 2020, arXiv 2004.05884, §3-4) is credited with a flatter *adversarial*
loss landscape in weight space. A null result for AWP (GRACE against its rho = 0 core) means something only if the
mechanism can act here at all: this bench trains GRACE at its tuned values (configs/testbed/tuned.yaml) with only
rho changed, from 0 (the AWP view equals the adversarial view) to 16x the tuned value, and measures per run:

- the perturbation's bite, dL: the logged mean over the last third of the run of L(w + v) - L(w) on the adversarial
  view (GRACE's ``delta_l``);
- the curvature of the adversarial loss at the final weights: the top Hessian eigenvalue (power iteration, its
  iterations and last relative change reported) and the Hutchinson trace of the cross-entropy at APGD-CE images found
  once at those weights (``eval_suites`` geometry suite, ``hessian_loss="adversarial"``), over the visual tower;
- ID top-1 and APGD-CE robust top-1 (l_inf 4/255) on the first ``--n-adv`` ID test images.

Each dose is compared with rho = 0 on the same seeds (paired 95% t interval over seeds): the control *passes* when dL
rises and the adversarial top eigenvalue falls at some dose; a flat response at every dose means the testbed cannot
show AWP's mechanism, and a null verdict on AWP elsewhere says nothing about AWP.

    PYTHONPATH=. python bench/awp_dose.py --out studies/awp_dose --seeds 0,1,2 \
        --json docs/results/data/bench-awp_dose.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

DOSES = (0.0, 1.0, 4.0, 16.0)  # multiples of GRACE's tuned rho


def _run(mult: float, seed: int, out: Path, data: Path, pretrained: Path, steps: int) -> Path:
    """GRACE at ``mult`` x its tuned rho for ``seed`` (a finished run is reused: the bench resumes)."""
    from grace_app.testbed.configs import method_config
    from grace_plugin.finetune import fine_tune

    run = out / "runs" / f"rho{mult:g}x" / f"seed{seed}"
    if (run / "checkpoint.json").is_file():
        return run
    # rho must be > 0; the dose 0 is awp "zero": L_LAR (and the volume's AWP view) on the unperturbed adversarial
    # view, every other setting unchanged
    recipe = {"awp": "zero"} if mult == 0 else {"rho": method_config("grace").recipe.rho * mult}
    cfg = method_config("grace", overrides={"train": {"seed": seed, "device": "cpu"}, "recipe": recipe}, steps=steps)
    return fine_tune("grace", pretrained, data / "id", run, cfg, progress=False)


def _delta_l(run: Path) -> float | None:
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    vals = [r["delta_l"] for r in lines if r.get("delta_l") is not None]
    tail = vals[-max(1, len(vals) // 3):]
    return statistics.fmean(tail) if tail else None


def _measure(run: Path, data: Path, n_adv: int, n_geometry: int, iters: int, seed: int) -> dict:
    from eval_suites.context import GeometryOptions, SuiteContext
    from eval_suites.engine import run_suites
    from registry import load_model

    ctx = SuiteContext(id_set=("id", data / "id"), data_root=data, eps=4 / 255, n_adv=n_adv, device="cpu", seed=seed,
                       progress=False, geometry=GeometryOptions(n=n_geometry, iters=iters, samples=8,
                                                                hessian_loss="adversarial"))
    t0 = time.time()
    rep = run_suites(load_model(run, device="cpu"), ["adv:apgd-ce", "geometry"], ctx)
    adv, geo = rep["suites"]["adv:apgd-ce"], rep["suites"]["geometry"]
    pi = geo["power_iteration"]
    return {"id": adv["clean_acc"], "adv": adv["robust_acc"], "lambda_max_adv": geo["hessian_top_eigenvalue"],
            "trace_adv": geo["hessian_trace"], "power_iters": pi["iterations"],
            "power_rel_change": pi["rel_change"], "seconds": round(time.time() - t0, 1)}


def _compare(rows: list[dict], key: str) -> dict:
    """Each dose minus rho = 0 on ``key``, paired over seeds: ``{dose: Spread (95% t) or None (< 2 seeds)}``."""
    from grace_app.studies.verdicts import paired_difference

    base = {r["seed"]: r[key] for r in rows if r["rho_x"] == 0}
    return {mult: paired_difference({r["seed"]: r[key] for r in rows if r["rho_x"] == mult}, base)
            for mult in sorted({r["rho_x"] for r in rows} - {0.0})}


def _verdict(diffs: dict, sign: int) -> str:
    """passes when some dose moves the quantity in the expected direction (its 95% interval excludes 0 there)."""
    moved = [m for m, d in diffs.items() if d is not None and (d.lo > 0 if sign > 0 else d.hi < 0)]
    return f"passes (at {', '.join(f'{m:g}x' for m in moved)})" if moved else "does not pass (no dose moves it)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="studies/awp_dose")
    ap.add_argument("--doses", default=",".join(f"{d:g}" for d in DOSES), help="multiples of GRACE's tuned rho")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-adv", type=int, default=200)
    ap.add_argument("--n-geometry", type=int, default=64)
    ap.add_argument("--iters", type=int, default=50, help="power-iteration budget (tolerance 1e-4 relative)")
    ap.add_argument("--size", default="default", choices=["default", "small"], help="small: a smoke run")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the table here (for `grace results --add`)")
    args = ap.parse_args()

    from grace_app.studies.quickstart import prepare_testbed
    from grace_app.testbed.configs import method_config

    out = Path(args.out)
    data, pretrained = prepare_testbed(out, 0, args.size, args.pretrain_steps, progress=False, echo=print)
    doses, seeds = [float(d) for d in args.doses.split(",")], [int(s) for s in args.seeds.split(",")]
    rho = method_config("grace").recipe.rho
    rows = []
    for seed in seeds:
        for mult in doses:
            run = _run(mult, seed, out, data, pretrained, args.steps)
            r = {"rho_x": mult, "rho": rho * mult, "seed": seed, "delta_l": _delta_l(run),
                 **_measure(run, data, args.n_adv, args.n_geometry, args.iters, seed)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    if len(seeds) < 2 or 0.0 not in doses:
        return  # a partial run (one lane's seeds): the lane that runs them all writes the table
    checks = {"dL (perturbation bite) rises": ("delta_l", +1), "adversarial lambda_max falls": ("lambda_max_adv", -1),
              "adversarial trace falls": ("trace_adv", -1), "ID": ("id", 0), "Adv (APGD-CE)": ("adv", 0)}
    notes = []
    for name, (key, sign) in checks.items():
        diffs = _compare(rows, key)
        text = "; ".join(f"{m:g}x - 0: {'-' if d is None else d.text(3 if key == 'delta_l' else 2)}"
                         for m, d in diffs.items())
        verdict = f" -> {_verdict(diffs, sign)}" if sign else ""
        notes.append(f"{name}: {text}{verdict}")
        print(notes[-1])
    if args.json:
        from grace_app.studies.publish import write_bench_table

        write_bench_table(
            args.json, "awp_dose", "Positive control: LAR-AWP's dose-response (GRACE at 0 to 16x its tuned rho)",
            f"PYTHONPATH=. python bench/awp_dose.py --seeds {args.seeds} --doses {args.doses}",
            [f"World v2 seed 0, {args.steps} steps, GRACE at its tuned values with rho = rho_x x {rho:.4g} (relative "
             "per layer; rho_x 0: awp 'zero', the AWP view left unperturbed), the default world's shipped tiny "
             "CLIP. delta_l: mean over the last third of the run of L(w+v) - L(w) on the adversarial view "
             "(logged). lambda_max_adv and trace_adv: top Hessian eigenvalue (power iteration, tolerance 1e-4 "
             f"relative, at most {args.iters} iterations; power_iters and power_rel_change say how it ended) and "
             "Hutchinson trace (8 probes) of the cross-entropy at APGD-CE images of the first "
             f"{args.n_geometry} ID test images, over the visual tower's parameters. id, adv: clean and APGD-CE "
             f"top-1 (%) on the first {args.n_adv} ID test images.",
             "Each dose minus rho = 0, paired over seeds (95% t interval); the control passes when some dose moves "
             "the quantity in AWP's direction (arXiv 2004.05884 §4: a flatter adversarial loss).", *notes],
            ["rho_x", "rho", "seed", "delta_l", "lambda_max_adv", "power_iters", "power_rel_change", "trace_adv", "id",
             "adv", "seconds"], rows)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
