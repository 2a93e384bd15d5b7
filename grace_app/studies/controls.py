"""``grace study controls``: positive controls. Can the mechanisms GRACE is built from act on the testbed at all?

A null verdict on a part of GRACE (GRACE against its tuned rho = 0 core, ``grace study core``) says something about
that part only where the part can be seen to act here. Each control trains *arms* (a method at a dose, or several
methods in one regime) on the default testbed world, measures each run, and judges checks that pass or fail:

- ``awp-dose``: LAR-AWP's dose-response, GRACE at its tuned values with rho at 0 (awp ``zero``), 1x, 4x and 16x
  the tuned value: the perturbation's bite (``delta_l``), the top Hessian eigenvalue and trace of the *adversarial* loss
  (power iteration to a stated tolerance, reported), ID and APGD-CE robust accuracy. AWP is credited with a flatter
  adversarial loss (Wu et al., arXiv 2004.05884, Sec. 4).
- ``overfit``: the regime AWP was made for, robust overfitting (Rice et al., arXiv 2002.11569): long runs with the
  paper's PGD-10 training attack, robust accuracy on held-out and on training images along the run, the best-to-last
  drop and the train - test robust gap, for GRACE, its core and LoRA-TeCoA.
- ``volume``: the Gram volume's dose-response, GRACE with lambda_GV from 0 to 100: the clean/adversarial/AWP
  feature cosines, the ID->OOD and ID->Adv class-centroid cosines, the feature spread, and each loss term's share of
  the gradient (``grace_plugin.losses.gradient_shares``), not only of the loss.

Controls are a registry (``CONTROLS``); a new one is a new entry. Runs live under ``OUT/runs/<control>/<arm>/seed<k>``
and are reused when finished with the same config (resumed when killed), measurements are cached beside them, so a
control can be split over processes (``--arms``, ``--seeds``) and joined by a last invocation that judges and
writes ``controls.json`` and ``controls.md`` (``grace results --add OUT`` makes the page).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

__all__ = ["CONTROLS", "Arm", "Control", "ControlsConfig", "run_controls", "controls_markdown", "tail_mean",
           "overfit_curve"]

# PGD-10 with step 1/255 at l_inf 4/255: GRACE's training attack (arXiv 2603.27139 Sec. 6.1)
PAPER_ATTACK = {"pgd_steps": 10, "pgd_alpha": 1 / 255, "pgd_eps": 4 / 255}
OVERFIT_DROP = 2.0  # points of held-out robust accuracy lost from the best check to the last: "overfits robustly"


@dataclass(frozen=True)
class Arm:
    label: str
    method: str
    dose: float | None = None
    overrides: dict = field(default_factory=dict)  # nested, on top of the method's testbed config and tuned values


@dataclass(frozen=True)
class Control:
    name: str
    title: str
    question: str
    steps: int
    arms: Callable[[], list[Arm]]
    measure: Callable  # (run_dir, data, cfg, seed) -> dict
    judge: Callable  # (rows) -> list of checks {"check", "verdict", "numbers"}
    notes: Callable  # (cfg, steps) -> list of definitions for the page


@dataclass
class ControlsConfig:
    out: Path
    controls: list[str]
    seed: int = 0  # the world
    run_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int | None = None  # None: each control's own
    arms: list[str] | None = None  # only these arms (a lane); judging needs every arm
    n_adv: int = 200
    n_geometry: int = 64
    geometry_iters: int = 50
    device: str = "auto"
    size: str = "default"
    pretrain_steps: int | None = None
    pretrain_threads: int | None = None


CONTROLS: dict[str, Control] = {}


def register_control(c: Control) -> Control:
    CONTROLS[c.name] = c
    return c


# ------------------------------------------------------------------------------------------ pure helpers
def log_lines(run: Path) -> list[dict]:
    f = run / "log.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def tail_mean(lines: list[dict], key: str, fraction: float = 1 / 3) -> float | None:
    """Mean of ``key`` over the last ``fraction`` of the log lines that have it (None when none has)."""
    vals = [float(r[key]) for r in lines if r.get(key) is not None]
    tail = vals[-max(1, int(len(vals) * fraction)):] if vals else []
    return statistics.fmean(tail) if tail else None


def overfit_curve(checks: list[dict]) -> dict:
    """From a run's validation checks (``step``, ``val_robust``, ``train_robust``, ...): the best held-out robust
    accuracy and its step, the last, the best-to-last drop (Rice et al., arXiv 2002.11569, Sec. 3), and the train -
    held-out robust gap at the best check and at the last. Ties of the best go to the earlier check."""
    from grace_plugin.robust_validation import select_check

    if not checks:
        return {}
    best, last = select_check(checks, "best_robust"), checks[-1]  # the trainer's own selection rule
    out = {"best_robust": best["val_robust"], "best_step": best["step"], "last_robust": last["val_robust"],
           "drop": best["val_robust"] - last["val_robust"], "last_clean": last["val_clean"],
           "checks": len(checks)}
    if "train_robust" in last:
        out.update(train_robust_last=last["train_robust"], gap_last=last["train_robust"] - last["val_robust"],
                   gap_best=best["train_robust"] - best["val_robust"],
                   train_rise=last["train_robust"] - best["train_robust"])
    return out


def _by_arm(rows: list[dict], key: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get(key) is not None:
            out.setdefault(r["arm"], {})[r["seed"]] = float(r[key])
    return out


def _versus(rows: list[dict], key: str, arm: str, base: str, sign: int, what: str, min_effect: float = 0.0,
            relative: bool = False) -> dict:
    """A check that ``arm`` minus ``base`` on ``key`` has sign ``sign`` (paired over seeds, 95% t interval): passes
    when the interval excludes 0 on that side and the mean moves by at least ``min_effect`` (a fraction of the base's
    mean with ``relative``; below it: negligible), fails when the interval excludes 0 on the other side, else
    inconclusive."""
    from .verdicts import HOLDS, paired_difference, paired_verdict

    vals = _by_arm(rows, key)
    a, b = vals.get(arm, {}), vals.get(base, {})
    d = paired_difference(a, b)
    common = sorted(set(a) & set(b))
    if d is None:
        diff = [a[s] - b[s] for s in common]
        return {"check": what, "verdict": "inconclusive", "numbers": f"{arm} - {base}: " + (
            f"{statistics.fmean(diff):+.3g} on {len(diff)} seed (no interval)" if diff else "not measured")}
    floor = min_effect * abs(statistics.fmean(b[s] for s in common)) if relative else min_effect
    verdict = paired_verdict(d, "greater" if sign > 0 else "less")  # the studies' rule on the same interval
    if verdict == HOLDS:
        verdict = "passes" if abs(d.mean) >= floor else f"negligible (|effect| < {floor:.3g})"
    return {"check": what, "verdict": verdict,
            "numbers": f"{arm} - {base}: {d.mean:+.3g} [{d.lo:+.3g}, {d.hi:+.3g}] (paired 95% t, {d.n} seeds)"}


def _any_dose(rows: list[dict], key: str, base: str, sign: int, what: str, min_effect: float = 0.0,
              relative: bool = False) -> dict:
    """``_versus`` at every arm against ``base``: passes when some dose passes (its numbers listed for all, with each
    dose's verdict), fails when every dose fails."""
    checks = {arm: _versus(rows, key, arm, base, sign, what, min_effect, relative)
              for arm in dict.fromkeys(r["arm"] for r in rows) if arm != base}
    verdicts = [c["verdict"] for c in checks.values()]
    verdict = "passes" if "passes" in verdicts else "fails" if verdicts and all(v == "fails" for v in verdicts) \
        else next((v for v in verdicts if v.startswith("negligible")), "inconclusive")
    passing = [a for a, c in checks.items() if c["verdict"] == "passes"]
    return {"check": what, "verdict": verdict + (f" (at {', '.join(passing)})" if passing else ""),
            "numbers": "; ".join(c["numbers"] for c in checks.values())}


def _report(rows: list[dict], key: str, base: str, what: str) -> dict:
    """Differences from ``base`` reported without a direction to pass (what the dose costs or buys)."""
    return {**_any_dose(rows, key, base, +1, what), "verdict": "reported"}


def _levels(rows: list[dict], key: str, what: str) -> dict:
    """Each arm's mean of ``key`` over its seeds, reported (a quantity that its base arm does not have)."""
    vals = _by_arm(rows, key)
    return {"check": what, "verdict": "reported",
            "numbers": "; ".join(f"{a}: {statistics.fmean(v.values()):.3g} ({len(v)} seeds)" for a, v in vals.items())
            or "not measured"}


# ------------------------------------------------------------------------------------------ measurements
def _suites(run: Path, data: Path, cfg: ControlsConfig, seed: int, names: list[str], hessian_loss: str) -> dict:
    from eval_suites.context import GeometryOptions, SuiteContext
    from eval_suites.engine import run_suites
    from grace_plugin.runtime import resolve_device
    from registry import load_model

    device = str(resolve_device(cfg.device))
    ctx = SuiteContext(id_set=("id", data / "id"), data_root=data, eps=4 / 255, n_adv=cfg.n_adv, device=device,
                       seed=seed, progress=False,
                       geometry=GeometryOptions(n=cfg.n_geometry, iters=cfg.geometry_iters, samples=8,
                                                hessian_loss=hessian_loss))
    return run_suites(load_model(run, device=device), names, ctx)


def _axes_suites() -> list[str]:
    """ID, the testbed's OOD sets and APGD-CE: the suites of the axes the volume and ranks controls report."""
    from .quickstart import OOD_SETS

    return ["id", *(f"ood:{s}" for s in OOD_SETS), "adv:apgd-ce"]


def _axes(suites: dict) -> dict:
    """ID top-1, the mean top-1 over the OOD sets and APGD-CE top-1 (%) from ``run_suites``' results."""
    ood = [v["top1"] for k, v in suites.items() if k.startswith("ood:") and v.get("top1") is not None]
    return {"id": suites["id"]["top1"], "ood": statistics.fmean(ood) if ood else None,
            "adv": suites["adv:apgd-ce"]["robust_acc"]}


def _train_cost(run: Path) -> dict:
    meta = run / "checkpoint.json"
    train = (json.loads(meta.read_text()).get("metrics") or {}).get("train") or {} if meta.is_file() else {}
    return {"steps": train.get("steps"), "cpu_seconds": train.get("total_cpu_seconds", train.get("cpu_seconds"))}


def _measure_awp(run: Path, data: Path, cfg: ControlsConfig, seed: int) -> dict:
    rep = _suites(run, data, cfg, seed, ["adv:apgd-ce", "geometry"], "adversarial")
    adv, geo = rep["suites"]["adv:apgd-ce"], rep["suites"]["geometry"]
    pi = geo["power_iteration"]
    return {"delta_l": tail_mean(log_lines(run), "delta_l"), "lambda_max_adv": geo["hessian_top_eigenvalue"],
            "power_iters": pi["iterations"], "power_rel_change": pi["rel_change"], "power_converged": pi["converged"],
            "trace_adv": geo["hessian_trace"], "id": adv["clean_acc"], "adv": adv["robust_acc"]}


def _measure_overfit(run: Path, data: Path, cfg: ControlsConfig, seed: int) -> dict:
    checks = [r for r in log_lines(run) if "val_robust" in r]
    return {**overfit_curve(checks), "curve": [{k: c.get(k) for k in ("step", "val_clean", "val_robust",
                                                                      "train_clean", "train_robust")}
                                               for c in checks]}


def _measure_volume(run: Path, data: Path, cfg: ControlsConfig, seed: int) -> dict:
    from .quickstart import OOD_SETS

    lines = log_lines(run)
    s = _suites(run, data, cfg, seed, [*_axes_suites(), "geometry"], "clean")["suites"]
    geo = s["geometry"]
    cc = geo["centroid_cosine"]
    ood_cc = [cc[n] for n in OOD_SETS if cc.get(n) is not None]
    out = {k: tail_mean(lines, k) for k in ("cos_id_adv", "cos_id_awp", "cos_adv_awp", "l_gv", "gv_share",
                                            "gshare_task", "gshare_lar", "gshare_gv", "gnorm_gv", "gnorm_total")}
    out.update(**_axes(s), feature_spread=s["id"].get("feature_spread"), centroid_adv=cc.get("adv"),
               centroid_ood=statistics.fmean(ood_cc) if ood_cc else None,
               lambda_max=geo["hessian_top_eigenvalue"])
    return out


# ------------------------------------------------------------------------------------------ the controls
def _tuned(method: str, key: str) -> float:
    from ..testbed.configs import method_config

    section, name = key.split(".")
    return float(getattr(getattr(method_config(method), section), name))


def _awp_arms() -> list[Arm]:
    # rho must be > 0: the dose 0 is awp "zero" (L_LAR, and the volume's AWP view, on the unperturbed adversarial view)
    rho = _tuned("grace", "recipe.rho")
    return [Arm("rho0x", "grace", 0.0, {"recipe": {"awp": "zero"}})] + \
        [Arm(f"rho{m:g}x", "grace", m, {"recipe": {"rho": rho * m}}) for m in (1.0, 4.0, 16.0)]


def _judge_awp(rows: list[dict]) -> list[dict]:
    return [_any_dose(rows, "delta_l", "rho0x", +1, "the perturbation bites: delta_l rises with rho"),
            _any_dose(rows, "lambda_max_adv", "rho0x", -1, "the adversarial loss flattens: its lambda_max falls "
                      "(by >= 10%)", 0.1, relative=True),
            _any_dose(rows, "trace_adv", "rho0x", -1, "the adversarial loss flattens: its Hessian trace falls (by >= "
                      "10%)", 0.1, relative=True),
            _flat_and_working(rows),
            _report(rows, "id", "rho0x", "ID top-1 (what the dose costs)"),
            _report(rows, "adv", "rho0x", "APGD-CE robust top-1")]


ID_COST = 5.0  # points of ID top-1 a dose may cost and still count as a working model (awp-dose)


def _acts_and_works(rows: list[dict], key: str, base: str, sign: int, what: str, min_effect: float,
                    relative: bool = True) -> dict:
    """A mechanism acting on ``key`` (``_versus`` passes at a dose) counts only where the model still works: ID
    top-1 within ``ID_COST`` points of ``base`` (the paired 95% interval's lower end above -ID_COST). A collapsed,
    near-uniform classifier has a flat loss and aligned features too."""
    from .verdicts import paired_difference

    ids = _by_arm(rows, "id")
    ok, parts = [], []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        if arm == base:
            continue
        acts = _versus(rows, key, arm, base, sign, "", min_effect, relative)["verdict"] == "passes"
        d = paired_difference(ids.get(arm, {}), ids.get(base, {}))
        working = d is not None and d.lo > -ID_COST
        parts.append(f"{arm}: {'moved' if acts else 'not moved'}, ID "
                     + ("-" if d is None else f"{d.mean:+.3g} [{d.lo:+.3g}, {d.hi:+.3g}]"))
        if acts and working:
            ok.append(arm)
    return {"check": f"{what} while the model still works (ID within {ID_COST:g} points of {base})",
            "verdict": f"passes (at {', '.join(ok)})" if ok else "fails", "numbers": "; ".join(parts)}


def _flat_and_working(rows: list[dict]) -> dict:
    return _acts_and_works(rows, "lambda_max_adv", "rho0x", -1, "the adversarial loss flattens (lambda_max down "
                           ">= 10%)", 0.1)


def _awp_notes(cfg: ControlsConfig, steps: int) -> list[str]:
    return [f"GRACE at its tuned values (configs/testbed/tuned.yaml), {steps} steps, with rho = rho_x x the tuned "
            f"rho {_tuned('grace', 'recipe.rho'):.4g} (relative per layer); rho0x is awp 'zero' (the AWP view left "
            "unperturbed).",
            "delta_l: mean over the last third of the run of L(w+v) - L(w) on the adversarial view (logged). "
            "lambda_max_adv and trace_adv: top Hessian eigenvalue (power iteration, tolerance 1e-4 relative, at most "
            f"{cfg.geometry_iters} iterations; power_iters, power_rel_change and power_converged say how it ended) "
            "and Hutchinson trace (8 probes) of the cross-entropy at APGD-CE images of the first "
            f"{cfg.n_geometry} ID test images (found once, then held fixed), over the visual tower's parameters.",
            f"id, adv: clean and APGD-CE (l_inf 4/255) top-1 (%) on the first {cfg.n_adv} ID test images."]


def _overfit_arms() -> list[Arm]:
    over = {"recipe": dict(PAPER_ATTACK),
            "train": {"val_every": 100, "val_n": 256, "val_train_n": 256, "val_attack": "pgd10", "ckpt_every": 250}}
    return [Arm(m, m, None, over) for m in ("grace", "grace-core", "lora-tecoa")]


def _judge_overfit(rows: list[dict]) -> list[dict]:
    means = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm and r.get("drop") is not None]
        if rs:
            means[arm] = {k: statistics.fmean(r[k] for r in rs) for k in ("drop", "gap_last", "train_rise")}
    overfit = [a for a, m in means.items() if m["drop"] >= OVERFIT_DROP and m["train_rise"] > 0]
    regime = {"check": f"the regime overfits robustly: some arm's held-out robust accuracy ends >= {OVERFIT_DROP:g} "
                       "points below its best while its train robust accuracy still rises",
              "verdict": "passes" if overfit else "fails",
              "numbers": "; ".join(f"{a}: drop {m['drop']:.2f}, train rise {m['train_rise']:+.2f}, train - held-out "
                                   f"gap {m['gap_last']:.2f}" for a, m in means.items())}
    return [regime,
            _versus(rows, "drop", "grace", "grace-core", -1, "AWP reduces robust overfitting: GRACE's best-to-last "
                                                              "drop below its core's"),
            _versus(rows, "gap_last", "grace", "grace-core", -1, "AWP narrows the train - held-out robust gap"),
            _versus(rows, "best_robust", "grace", "grace-core", +1, "GRACE's best held-out robust accuracy above "
                                                                     "its core's"),
            _versus(rows, "last_robust", "grace", "lora-tecoa", +1, "GRACE's last held-out robust accuracy above "
                                                                     "LoRA-TeCoA's")]


def _overfit_notes(cfg: ControlsConfig, steps: int) -> list[str]:
    return [f"{steps} steps with GRACE's training attack (PGD-10, step 1/255, l_inf 4/255; the other studies use the "
            "testbed's PGD-3), each method at its tuned values; a check every 100 steps (and at the last) scores the "
            "first 256 ID test images (held-out) and the first 256 ID training images clean and under PGD-10 (step "
            "2.5 eps/10, no random start): train.val_train_n.",
            "drop: best held-out robust accuracy minus the last (the best-to-last drop of Rice et al., arXiv "
            "2002.11569); gap_last: train minus held-out robust accuracy at the last check; train_rise: train robust "
            "accuracy at the last check minus at the best held-out check.",
            f"A run overfits robustly here when its drop is at least {OVERFIT_DROP:g} points (8 of 256 images) while "
            "its train robust accuracy still rises: a stated threshold, not a test."]


def _volume_arms() -> list[Arm]:
    doses = [("gv0", 0.0), ("gv-tuned", _tuned("grace", "recipe.lambda_gv")), ("gv1", 1.0), ("gv10", 10.0),
             ("gv100", 100.0)]
    return [Arm(label, "grace", d, {"recipe": {"lambda_gv": d, "grad_terms_every": 10}}) for label, d in doses]


MISALIGN = {"cos_id_adv": "mis_id_adv", "cos_id_awp": "mis_id_awp", "centroid_adv": "mis_centroid_adv",
            "centroid_ood": "mis_centroid_ood"}


def _judge_volume(rows: list[dict]) -> list[dict]:
    """Alignment is judged on the misalignment 1 - cos, relative to gv0's: the views start within 0.01 of 1, so an
    absolute rise in cosine could not show what the volume does."""
    rows = [{**r, **{m: 1 - r[c] for c, m in MISALIGN.items() if r.get(c) is not None}} for r in rows]
    return [_any_dose(rows, "mis_id_adv", "gv0", -1, "the volume aligns the views: 1 - cos(f_ID, f_Adv) falls by "
                      ">= 10%", 0.1, relative=True),
            _any_dose(rows, "mis_id_awp", "gv0", -1, "1 - cos(f_ID, f_AWP) falls by >= 10%", 0.1, relative=True),
            _any_dose(rows, "mis_centroid_adv", "gv0", -1, "ID->Adv class centroids align: 1 - cos falls by >= 10%",
                      0.1, relative=True),
            _any_dose(rows, "mis_centroid_ood", "gv0", -1, "ID->OOD class centroids align (the axis the volume is "
                      "credited with): 1 - cos falls by >= 10%", 0.1, relative=True),
            _acts_and_works(rows, "mis_centroid_ood", "gv0", -1, "ID->OOD centroids align", 0.1),
            _any_dose(rows, "ood", "gv0", +1, "OOD top-1 rises (by >= 1 point)", 1.0),
            _levels(rows, "gshare_gv", "the volume's share of the gradient (projection on the step)"),
            _levels(rows, "gshare_lar", "L_LAR's share of the gradient"),
            _report(rows, "feature_spread", "gv0", "feature spread (mean cosine between different ID images)"),
            _report(rows, "id", "gv0", "ID top-1"), _report(rows, "adv", "gv0", "APGD-CE robust top-1")]


def _volume_notes(cfg: ControlsConfig, steps: int) -> list[str]:
    return [f"GRACE at its tuned values, {steps} steps, with lambda_GV at 0 (the volume logged, not trained), the "
            f"tuned {_tuned('grace', 'recipe.lambda_gv'):.4g}, 1, 10 and 100.",
            "cos_*: batch-mean cosines between the clean, adversarial and AWP views' features, mean over the last "
            "third of the run (logged). gshare_*: each weighted term's projection on the step's gradient over the "
            "LoRA parameters, <g_t, g> / ||g||^2 (sums to 1 over task, LAR and GV), every 10th step, last third; "
            "gnorm_gv: the volume's gradient norm; gv_share: its share of the loss.",
            f"id, ood: top-1 (%) on the ID test split and the mean over the four OOD sets; adv: APGD-CE top-1 on the "
            f"first {cfg.n_adv} ID test images; centroid_adv / centroid_ood: mean over classes of the cosine between "
            f"the ID and the adversarial (OOD) class centroids of the first {cfg.n_geometry} images of each set; "
            "feature_spread: mean cosine between different ID test images' features.",
            "Alignment checks are judged on the misalignment 1 - cos against gv0's (a fall of >= 10%), since the views "
            "start within 0.01 of a cosine of 1; a check that also needs a working model keeps ID within "
            f"{ID_COST:g} points of gv0."]


def _ranks_arms() -> list[Arm]:
    """The curriculum's rank levels (bottom / middle / top curvature band) under the SVD ascent, and the default
    levels under the paper-literal factor ascent (GRACE Alg. 1 l. 9-12)."""
    arms = [Arm(f"svd-{''.join(map(str, lv))}", "grace", None, {"recipe": {"rank_levels": lv, "awp_ascent": "svd"}})
            for lv in ([0, 2, 4], [0, 1, 1], [0, 4, 4])]
    return arms + [Arm("factor-024", "grace", None, {"recipe": {"rank_levels": [0, 2, 4], "awp_ascent": "factor"}})]


def _measure_ranks(run: Path, data: Path, cfg: ControlsConfig, seed: int) -> dict:
    from eval_suites.report import harmonic_mean

    lines = log_lines(run)
    axes = _axes(_suites(run, data, cfg, seed, _axes_suites(), "clean")["suites"])
    last = next((r for r in reversed(lines) if any(k.startswith("rank/") for k in r)), {})
    ranks = [v for k, v in last.items() if k.startswith("rank/")]
    return {"delta_l": tail_mean(lines, "delta_l"), "awp_cos": tail_mean(lines, "awp_cos"),
            "mean_rank": statistics.fmean(ranks) if ranks else None,
            "rank_changes": (lines[-1] if lines else {}).get("awp_rank_changes"), **axes,
            "hm": harmonic_mean(axes.values())}


def _judge_ranks(rows: list[dict]) -> list[dict]:
    return [_versus(rows, "delta_l", "factor-024", "svd-024", -1, "the factor ascent finds a weaker perturbation "
                    "than the SVD ascent (delta_l lower)"),
            *(_report(rows, k, "svd-024", f"{k} against GRACE's levels [0, 2, 4] with the SVD ascent")
              for k in ("delta_l", "hm", "id", "ood", "adv"))]


def _ranks_notes(cfg: ControlsConfig, steps: int) -> list[str]:
    return [f"GRACE at its tuned values, {steps} steps, with the curriculum's rank levels (bottom 20% / middle / top "
            "20% of the curvature) and the ascent changed: svd-024 is GRACE as tuned; factor-024 the paper-literal "
            "factor ascent from a random A.",
            "delta_l, awp_cos: logged bite of the perturbation and its cosine with the layer gradient, last third; "
            "mean_rank: mean AWP rank over the adapted layers at the last curriculum update; rank_changes: the "
            "curriculum's cumulative rank changes.",
            f"id, ood, adv, hm: ID top-1, mean OOD top-1, APGD-CE top-1 on the first {cfg.n_adv} ID test images (%), "
            "and their harmonic mean."]


register_control(Control("awp-dose", "LAR-AWP's dose-response", "Does the weight perturbation flatten the adversarial "
                         "loss when its radius grows?", 300, _awp_arms, _measure_awp, _judge_awp, _awp_notes))
register_control(Control("overfit", "Robust overfitting in long runs", "Do long PGD-10 runs overfit robustly, and "
                         "does AWP reduce it?", 1500, _overfit_arms, _measure_overfit, _judge_overfit,
                         _overfit_notes))
register_control(Control("ranks", "The curriculum's ranks and the AWP ascent", "What do the curriculum's rank "
                         "levels and the paper-literal factor ascent change?", 300, _ranks_arms, _measure_ranks,
                         _judge_ranks, _ranks_notes))
register_control(Control("volume", "The Gram volume's dose-response", "Does the volume term align clean, adversarial "
                         "and OOD features when its weight is large?", 300, _volume_arms, _measure_volume,
                         _judge_volume, _volume_notes))


# ------------------------------------------------------------------------------------------ running
def _train_arm(control: Control, arm: Arm, seed: int, steps: int, out: Path, data: Path, pretrained: Path,
               cfg: ControlsConfig, echo) -> Path:
    """One arm's run for ``seed``: reused when finished with the same config, resumed when killed, else trained."""
    from grace_plugin.config import to_dict
    from grace_plugin.finetune import fine_tune

    from ..testbed.configs import load_methods, merge, method_config
    from .runner import finished_run_matches, killed_run_matches

    m = load_methods()[arm.method]
    run_dir = out / "runs" / control.name / arm.label / f"seed{seed}"
    run_cfg = method_config(m, overrides=merge({"train": {"seed": seed, "device": cfg.device}}, arm.overrides),
                            steps=steps)
    if finished_run_matches(run_dir, m.recipe, to_dict(run_cfg)):
        echo(f"      {control.name} {arm.label} seed {seed}: reusing the finished run (same config)")
        return run_dir
    resume = killed_run_matches(run_dir, m.recipe, to_dict(run_cfg))
    echo(f"      {control.name} {arm.label} seed {seed}: {'resuming' if resume else 'training'}")
    return fine_tune(m.recipe, pretrained, data / "id", run_dir, run_cfg, progress=False, resume=resume)


def _measured(control: Control, run: Path, data: Path, cfg: ControlsConfig, seed: int, cache: Path) -> dict:
    """``control.measure`` of a run, or its cached result when the model files and settings are unchanged."""
    from grace_plugin.tensor_io import atomic_write_text

    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(run.glob("*.safetensors"))}
    sig = {"files": files, "n_adv": cfg.n_adv, "n_geometry": cfg.n_geometry, "iters": cfg.geometry_iters,
           "device": cfg.device, "seed": seed, "log": (run / "log.jsonl").stat().st_size}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("signature") == sig:
            return saved["measured"]
    t0 = time.time()
    res = {**control.measure(run, data, cfg, seed), "measure_seconds": round(time.time() - t0, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps({"signature": sig, "measured": res}) + "\n")
    return res


def run_controls(cfg: ControlsConfig, echo=print) -> dict:
    """Train, measure and (when every arm was asked for) judge each control; writes ``controls.json`` and
    ``controls.md`` under ``cfg.out`` from every control judged so far (a control not rerun keeps its last doc)."""
    from grace_plugin.errors import UsageError
    from grace_plugin.runfolder import folder_lock
    from grace_plugin.tensor_io import atomic_write_text
    from grace_app.testbed.tiny_clip import tiny_clip_identity

    from .quickstart import prepare_testbed

    unknown = [c for c in cfg.controls if c not in CONTROLS]
    if unknown:
        raise UsageError(f"--control {','.join(unknown)}: unknown; valid: {', '.join(CONTROLS)}")
    out = Path(cfg.out)
    data, pretrained = prepare_testbed(out, cfg.seed, cfg.size, cfg.pretrain_steps, False, echo,
                                       pretrain_threads=cfg.pretrain_threads)
    judged: dict[str, dict] = {}
    for name in cfg.controls:
        control, t0 = CONTROLS[name], time.time()
        arms = control.arms()
        if cfg.arms:
            bad = [a for a in cfg.arms if a not in {x.label for x in arms}] if len(cfg.controls) == 1 else []
            if bad:
                raise UsageError(f"--arms {','.join(bad)}: not an arm of {name}; its arms: "
                                 f"{', '.join(a.label for a in arms)}")
            arms = [a for a in arms if a.label in cfg.arms]
        steps = cfg.steps or control.steps
        rows = []
        for seed in cfg.run_seeds:
            for arm in arms:
                run = _train_arm(control, arm, seed, steps, out, data, pretrained, cfg, echo)
                cache = out / "evals" / name / arm.label / f"seed{seed}.json"
                rows.append({"arm": arm.label, "method": arm.method, "dose": arm.dose, "seed": seed,
                             **_train_cost(run), **_measured(control, run, data, cfg, seed, cache)})
                echo(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}, default=str))
        if cfg.arms and len(arms) < len(control.arms()):
            echo(f"      {name}: {len(arms)} of {len(control.arms())} arms (a lane): not judged")
            continue
        judged[name] = {
            "title": control.title, "question": control.question, "steps": steps, "seeds": cfg.run_seeds,
            "notes": control.notes(cfg, steps), "rows": rows, "checks": control.judge(rows),
            "seconds": round(time.time() - t0, 1)}
    doc_file = out / "controls.json"
    with folder_lock(out, what="controls page", wait=echo):  # lanes finish in any order: read, add, write as one
        doc = json.loads(doc_file.read_text()) if doc_file.is_file() else {"controls": {}}
        doc["controls"].update(judged)
        doc.update(kind="controls", world_seed=cfg.seed, size=cfg.size, tiny_clip=tiny_clip_identity(pretrained))
        atomic_write_text(doc_file, json.dumps(doc, indent=2, default=str) + "\n")
        atomic_write_text(out / "controls.md", controls_markdown(doc))
    return doc


# ------------------------------------------------------------------------------------------ the page
_COLUMNS = {"awp-dose": ("delta_l", "lambda_max_adv", "power_iters", "trace_adv", "id", "adv"),
            "overfit": ("best_robust", "best_step", "last_robust", "drop", "train_robust_last", "gap_last",
                        "last_clean", "cpu_seconds"),
            "ranks": ("delta_l", "awp_cos", "mean_rank", "rank_changes", "id", "ood", "adv", "hm"),
            "volume": ("cos_id_adv", "cos_id_awp", "cos_adv_awp", "gshare_gv", "gshare_lar", "gnorm_gv",
                       "gv_share", "centroid_adv", "centroid_ood", "feature_spread", "id", "ood", "adv")}


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def controls_markdown(doc: dict) -> str:
    """The controls page: per control its question, each check's verdict and numbers, the per-run table, notes."""
    world = doc.get("world_seed") or 0
    lines = [f"# Positive controls{f', world seed {world}' if world else ''}", "",
             "`grace study controls`: can the mechanisms GRACE is built from act on this testbed at all? Each "
             "check passes, fails, is inconclusive (its interval spans 0) or is reported without a direction.", ""]
    for name, c in doc["controls"].items():
        lines += [f"## {c['title']} (`{name}`)", "", f"{c['question']} {c['steps']} steps, seeds "
                  f"{', '.join(map(str, c['seeds']))}.", "", "| check | verdict | numbers |", "|---|---|---|"]
        lines += [f"| {k['check']} | {k['verdict']} | {k['numbers']} |" for k in c["checks"]]
        cols = ["arm", "seed", *(k for k in _COLUMNS.get(name, ()) if any(k in r for r in c["rows"]))]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(k)) for k in cols) + " |" for r in c["rows"]]
        lines += ["", *(f"- {n}" for n in c["notes"]), ""]
    return "\n".join(lines)
