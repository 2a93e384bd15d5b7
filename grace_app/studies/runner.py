"""``grace study NAME``: a named study on the testbed (rows, seeds, paper rows beside ours, verdicts on the claims).

Studies are data (configs/testbed/studies.yaml): ``table6``, ``table7``, ``table8`` (GRACE's ablation, built from the
composable components of the ``grace`` recipe), ``geometry`` and ``shift``. Each row is a method of methods.yaml
trained with its testbed settings (and the values ``grace study tune`` selected, tuned.yaml) for each seed, then
evaluated on the world's ID, OOD and adversarial axes (and, for ``geometry`` / ``shift``, that suite, cached apart
so those studies reuse the attacked evaluations of runs copied from another study's folder). Written under ``out``:
``study.json`` (every run, every aggregate, the verdicts), ``study.md`` and ``study.png`` (trade-off with error bars;
the geometry study plots its metrics).

Evaluation goes through ``_evaluate`` / ``_paper_axes`` only: the one evaluation engine
(``eval_suites.engine.run_suites``) and its ``strict`` and ``paper`` column definitions.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .study_page import AXES, GEOMETRY_METRICS
from .verdicts import evaluate_claim, paired, seed_mean, spread

__all__ = ["StudyConfig", "run_study", "aggregate_runs", "AXES", "GEOMETRY_METRICS"]

log = logging.getLogger(__name__)



@dataclass
class StudyConfig:
    name: str
    out: Path
    seed: int = 0
    seeds: int = 1
    run_seeds: list[int] | None = None  # explicit run seeds on the world of ``seed`` (else seed..seed+seeds-1)
    steps: int = 300
    n_adv: int = 600  # the whole ID test split of the default world
    eps: float = 4 / 255
    attack: str = "apgd-ce,apgd-dlr"  # several: Adv is their per-sample worst case (evaluate.worst_case)
    device: str = "cpu"
    size: str = "default"
    pretrain_steps: int | None = None
    pretrain_threads: int | None = None  # the tiny CLIP's pretraining threads (default 1: testbed.PretrainConfig)
    overrides: list[str] = field(default_factory=list)
    methods: list[str] | None = None  # only these rows of the study (e.g. to add seeds to some rows)
    n_geometry: int = 64
    geometry_iters: int = 20


# ------------------------------------------------------------------------------------------ evaluation adapter
def _evaluate(spec, data: Path, cfg: StudyConfig, seed: int, extra: str | None, reference: Path) -> dict:
    """One model's report (``report.json`` schema, from the one evaluation engine,
    ``eval_suites.engine.run_suites``) on the testbed: ID, OOD and the attacks; with ``extra`` (``geometry``,
    ``shift``) ID, OOD and that suite alone (its result under ``report["suites"][extra]``), so a geometry or shift
    study reuses another study's attacked evaluations of the same runs."""
    from grace_plugin.runtime import resolve_device
    from registry import load_model

    from eval_suites.context import GeometryOptions, SuiteContext
    from eval_suites.engine import run_suites

    from .quickstart import OOD_SETS

    device = str(resolve_device(cfg.device))
    loaded = load_model(spec, device=device)
    names = ["id"] + [f"ood:{n}" for n in OOD_SETS] + \
        ([f"adv:{a}" for a in cfg.attack.split(",")] if extra is None else [extra])
    geometry = extra == "geometry"
    ctx = SuiteContext(id_set=("id", data / "id"), data_root=data, eps=cfg.eps, n_adv=cfg.n_adv, device=device,
                       seed=seed, reference=str(reference) if geometry else None,
                       geometry=GeometryOptions(n=cfg.n_geometry, iters=cfg.geometry_iters))
    return run_suites(loaded, names, ctx)


def _attack_text(attack: str) -> str:
    names = attack.split(",")
    return names[0] if len(names) == 1 else f"the per-sample worst case of {' and '.join(names)}"


def _paper_axes(report: dict) -> dict:
    """Our numbers under the paper's Table 6 column definitions (the report's ``paper`` definition: OOD = mean of
    the V2/Sketch/R analogues; Adv = mean of the attack's robust accuracy and the natural-adversarial set `a`; HM of
    the three; GRACE arXiv 2603.27139 Table 6)."""
    d = report["definitions"]["paper"]
    return {k: d.get(k) for k in AXES}


def _run_record(report: dict) -> dict:
    """Axes, each run's intervals (Wilson 95% on ID and Adv), paper-definition axes, per-sample results."""
    axes = dict(report["axes"])
    ds = report.get("datasets") or {}
    ci = report["definitions"]["strict"].get("ci95") or {}
    intervals = {k: tuple(ci[k]) for k in ("id", "adv") if ci.get(k)}
    id_set = next((v for v in ds.values() if v.get("role") == "id"), {})
    rec = {"axes": axes, "intervals": intervals, "paper_axes": _paper_axes(report),
           "datasets": {k: v.get("top1") for k, v in ds.items()},
           # mean cosine between different ID test images' features: a collapsed model is seen in every table
           "feature_spread": id_set.get("feature_spread"),
           # which images each axis got right (report per_sample strings): the paired bootstraps of the verdicts
           "per_sample": {"id": id_set.get("per_sample"),
                          "ood": {k: v.get("per_sample") for k, v in ds.items() if v.get("role") == "ood"},
                          "adv": (report.get("adversarial") or {}).get("robust_per_sample")}}
    # each attack's own robust accuracy beside the per-sample worst case the Adv axis takes (several attacks)
    attacks = {name.split(":", 1)[1]: s.get("robust_acc") for name, s in (report.get("suites") or {}).items()
               if name.startswith("adv:") and isinstance(s, dict)}
    if len(attacks) > 1:
        rec["adv_by_attack"] = attacks
    return rec


def _extra_record(report: dict, extra: str) -> dict:
    """A run's ``geometry`` metrics or ``shift`` table from an extra suite's report."""
    g = (report.get("suites") or {}).get(extra)
    if extra == "shift":
        from .shift_table import shift_record

        return {"shift": shift_record(g)}
    cc = {k: v for k, v in g["centroid_cosine"].items() if v is not None}
    dl = {k: v for k, v in g["delta_lid"].items() if v is not None}
    ood_c = [v for k, v in cc.items() if k != "adv"]
    ood_l = [v for k, v in dl.items() if k != "adv"]
    return {"geometry": {"lambda_max": g["hessian_top_eigenvalue"],
                         "centroid_ood": statistics.fmean(ood_c) if ood_c else None,
                         "centroid_adv": cc.get("adv"),
                         "dlid_ood": statistics.fmean(ood_l) if ood_l else None,
                         "dlid_adv": dl.get("adv"), "drift": g.get("parameter_drift"),
                         "centroid_cosine": cc, "delta_lid": dl}}


def _training_record(run_dir: Path) -> dict:
    """What the recipe reported (checkpoint.json ``metrics.recipe``: GRACE's rank changes, GV share) and the last
    log line's curriculum counters."""
    out = {}
    meta = run_dir / "checkpoint.json"
    if meta.is_file():
        m = json.loads(meta.read_text()).get("metrics", {})
        out.update(m.get("recipe") or {})
        train = m.get("train") or {}
        # a resumed run's whole compute (total_*); a run written before those were recorded has this invocation's
        out.update(train_seconds=train.get("total_seconds", train.get("seconds")),
                   train_cpu_seconds=train.get("total_cpu_seconds", train.get("cpu_seconds")),
                   train_steps=train.get("steps"))
    logf = run_dir / "log.jsonl"
    if logf.is_file():
        lines = [json.loads(x) for x in logf.read_text().splitlines() if x.strip()]
        shares = [r["gv_share"] for r in lines if "gv_share" in r]
        if shares:
            out["gv_share_logged"] = {"first": shares[0], "last": shares[-1], "mean": statistics.fmean(shares)}
    return out


# ------------------------------------------------------------------------------------------ reuse
def finished_run_matches(run_dir: Path, recipe: str, resolved: dict) -> bool:
    """True when ``run_dir`` holds a finished run (its checkpoint.json is written last, by the atomic publish of
    grace_plugin/runfolder.py) trained with exactly ``resolved`` (its config.yaml) on the device that
    ``resolved``'s ``train.device`` means here ("auto" is CPU on one machine, CUDA on another): a study re-run, or
    one with a row added, retrains nothing that is already done."""
    from grace_plugin.runtime import resolve_device

    saved_file, meta = run_dir / "config.yaml", run_dir / "checkpoint.json"
    if not (meta.is_file() and saved_file.is_file()):
        return False
    device = str(resolve_device((resolved.get("train") or {}).get("device", "auto")))
    if json.loads(meta.read_text()).get("device") != device:
        return False
    return _same_config(saved_file, recipe, resolved)


def killed_run_matches(run_dir: Path, recipe: str, resolved: dict) -> bool:
    """A killed (or preempted) run staged beside ``run_dir`` with its resumable state, trained with exactly
    ``resolved``: resumed instead of trained again. Exactly: a study's number must be the stated config's, and a run
    resumed with, say, more steps would have followed another learning-rate schedule up to the kill (``grace train
    --resume`` allows that; a study does not). Another config's staged state is not resumed (the run starts afresh)."""
    from grace_plugin.runfolder import partial_dir

    work = partial_dir(run_dir)
    return (work / "train_state.pt").is_file() and _same_config(work / "config.yaml", recipe, resolved)


def _same_config(saved_file: Path, recipe: str, resolved: dict) -> bool:
    """``saved_file`` (a run's config.yaml), read by today's code, is ``resolved`` for ``recipe``."""
    import yaml

    from grace_plugin.config import ConfigError, to_dict
    from grace_plugin.finetune import build_config

    if not saved_file.is_file():
        return False
    saved = yaml.safe_load(saved_file.read_text()) or {}
    if saved.pop("recipe_name", None) != recipe:
        return False
    try:  # read by today's code: a field added since, at its default, is the same config
        saved = to_dict(build_config(recipe, overrides={k: v for k, v in saved.items() if isinstance(v, dict)}))
    except ConfigError:  # a field that no longer exists
        return False

    def norm(d):
        from grace_plugin.runtime import resolve_device

        d = yaml.safe_load(yaml.safe_dump(d, sort_keys=True))
        if isinstance(d.get("train"), dict):  # "auto" and "cpu" are one device on a machine without CUDA
            d["train"]["device"] = resolve_device(d["train"].get("device", "auto")).type
        return d

    return norm(saved) == norm(resolved)


def _eval_signature(spec, data: Path, cfg: StudyConfig, seed: int, extra: str | None) -> dict:
    """What one study evaluation depends on: the model files (sizes and mtimes), the world, the suite settings."""
    from grace_plugin.runtime import resolve_device

    spec = Path(spec)
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(spec.glob("*.safetensors"))}
    world = data / "world.json"
    return {"model": str(spec), "files": files, "world": world.read_text() if world.is_file() else None,
            "attack": cfg.attack, "eps": cfg.eps, "n_adv": cfg.n_adv, "seed": seed, "geometry": extra == "geometry",
            "n_geometry": cfg.n_geometry, "geometry_iters": cfg.geometry_iters,
            "device": str(resolve_device(cfg.device)),  # the device used ("auto" is CPU here, CUDA there)
            **({"extra": extra} if extra else {})}


def _model_key(path: str) -> str:
    """A model's place in its study folder (``runs/<row>/seed<k>``, or ``pretrained``): a study folder copied to
    another place (a geometry or shift study started from a table6 folder) keeps its evaluations; the files' sizes
    and mtimes in the signature still tell another model apart."""
    parts = Path(path).parts
    i = max((j for j, p in enumerate(parts) if p == "runs"), default=None)
    return "/".join(parts[i:]) if i is not None else Path(path).name


def _same_signature(saved: dict | None, sig: dict) -> bool:
    return isinstance(saved, dict) and {**saved, "model": _model_key(str(saved.get("model")))} == \
        {**sig, "model": _model_key(sig["model"])}


def _cached_evaluate(cache: Path, spec, data: Path, cfg: StudyConfig, seed: int, extra: str | None,
                     reference: Path) -> tuple[dict, bool]:
    """``_evaluate``, or its saved report when the signature is unchanged; (report, reused)."""
    from grace_plugin.tensor_io import atomic_write_text

    sig = json.loads(json.dumps(_eval_signature(spec, data, cfg, seed, extra), default=str))
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if _same_signature(saved.get("signature"), sig):
            return saved["report"], True
    report = _evaluate(spec, data, cfg, seed, extra, reference)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps({"signature": sig, "report": report}, default=str) + "\n")
    return report, False


# ------------------------------------------------------------------------------------------ aggregation
def aggregate_runs(runs: list[dict]) -> dict:
    """Per-metric mean, sample std (several seeds) and verdict spread over a row's runs."""
    agg: dict = {"n_seeds": len(runs)}

    def fill(key: str, metrics) -> None:
        agg[key] = {}
        for k in metrics:
            agg[key][k], std = seed_mean([r[key].get(k) for r in runs])
            if len(runs) > 1:
                agg[key][f"{k}_std"] = std

    fill("axes", AXES)
    fill("paper_axes", AXES)
    agg["feature_spread"], std = seed_mean([r.get("feature_spread") for r in runs])
    if len(runs) > 1:
        agg["feature_spread_std"] = std
    if runs and all("geometry" in r for r in runs):
        fill("geometry", GEOMETRY_METRICS)
    if runs and all("adv_by_attack" in r for r in runs):
        fill("adv_by_attack", sorted(runs[0]["adv_by_attack"]))
    if runs and all("shift" in r for r in runs):
        from .shift_table import aggregate_shift

        agg["shift"] = aggregate_shift(runs)
    return agg


def _spreads(runs: list[dict], definition: str = "ours") -> dict:
    """metric -> Spread for the verdicts under a column definition (ours, or the paper's: each run's
    ``paper_axes``): std over seeds, or the single run's own interval (ours only); each run's value by seed (paired
    claims) and its per-sample results (paired bootstraps, which recompute the axes under ``definition``)."""
    out = {}
    seeds = [r["seed"] for r in runs]
    samples = tuple((r["seed"], r["per_sample"]) for r in runs if r.get("per_sample"))
    axes = "paper_axes" if definition == "paper" else "axes"
    for k in AXES:
        interval = runs[0]["intervals"].get(k) if len(runs) == 1 and definition == "ours" else None
        out[k] = spread([(r.get(axes) or {}).get(k) for r in runs], tuple(interval) if interval else None, seeds)
        if out[k] is not None:
            out[k] = replace(out[k], samples=samples, definition=definition)
    if runs and all("geometry" in r for r in runs):
        for k in GEOMETRY_METRICS:
            out[k] = spread([r["geometry"].get(k) for r in runs], seeds=seeds)
    return out


def _judge(study: dict, results: dict, some_methods: bool) -> tuple[list, list, int, dict]:
    """The study's claims judged on both column definitions, how many were left out, and the paired table."""
    spreads = {name: _spreads(res["runs"]) for name, res in results.items()}
    claims = study.get("claims") or []
    if some_methods:  # a claim on a row this invocation did not run is left out (and counted), not "not measured"
        claims = [c for c in claims if _claim_rows(c) <= set(results)]
    omitted = len(study.get("claims") or []) - len(claims)
    return ([evaluate_claim(c, spreads) for c in claims], paper_verdicts(results, claims), omitted,
            _paired_table(spreads, study.get("paired_reference")))


def paper_verdicts(rows: dict, claims: list[dict]) -> list[dict]:
    """The claims on the ID/OOD/Adv/HM axes judged again under the paper's column definitions, with the same paired
    statistics (claims on other metrics, e.g. geometry, have one definition and are judged once)."""
    spreads = {name: _spreads(res["runs"], "paper") for name, res in rows.items()}
    return [evaluate_claim(c, spreads) for c in claims if c.get("metric") in AXES]


def verdicts_for_page(doc: dict) -> list[dict]:
    """The paper-definition verdicts of a study.json: its own, or, for one written before they were recorded,
    recomputed from its runs' per-sample results and the study's claims in studies.yaml (what ``grace results``
    shows on the page)."""
    if "verdicts_paper" in doc:
        return doc["verdicts_paper"]
    from ..testbed.configs import load_studies

    claims = (load_studies().get(doc["study"]) or {}).get("claims") or []
    claims = [c for c in claims if _claim_rows(c) <= set(doc["rows"])]
    return paper_verdicts(doc["rows"], claims)


def _claim_rows(claim: dict) -> set[str]:
    """The rows a claim of studies.yaml compares (``b: all`` needs none beyond ``a``)."""
    rows = {claim[k] for k in ("a",) if k in claim}
    b = claim.get("b")
    if isinstance(b, list):
        rows |= set(b)
    elif b and b != "all":
        rows.add(b)
    for x, y in claim.get("pairs") or []:
        rows |= {x, y}
    return rows


def _paired_table(spreads: dict, reference: str | None) -> dict:
    """Each row's paired difference from ``reference`` on every axis (mean of row_s - reference_s over the seeds both
    measured, 95% Student-t interval); {} without a reference."""
    if not reference or reference not in spreads:
        return {}
    out = {}
    for name, metrics in spreads.items():
        if name == reference:
            continue
        out[name] = {}
        for k in AXES:
            d = paired(metrics.get(k), spreads[reference].get(k))
            out[name][k] = None if d is None else d.record()
    return out


# ------------------------------------------------------------------------------------------ the study
def _study_rows(cfg: StudyConfig, studies: dict, methods: dict) -> tuple[dict, list[dict]]:
    """The study and the rows this invocation runs (``--methods``), each row's method checked."""
    from grace_plugin.config import ConfigError

    if cfg.name not in studies:
        raise ConfigError(f"unknown study {cfg.name!r}; valid: {', '.join(list(studies) + ['tune'])}")
    study = studies[cfg.name]
    rows = study["rows"]
    for r in rows:
        if r["method"] not in methods:
            raise ConfigError(f"studies.yaml: {cfg.name}: unknown method {r['method']!r}")
    if cfg.methods:
        names = [r["method"] for r in rows]
        unknown = [m for m in cfg.methods if m not in names]
        if unknown:
            raise ConfigError(f"--methods: {', '.join(unknown)} not a row of study {cfg.name}; its rows: "
                              f"{', '.join(names)}")
        rows = [r for r in rows if r["method"] in cfg.methods]
    return study, rows


def run_study(cfg: StudyConfig, progress: bool = False, echo=print) -> dict:
    from grace_plugin.config import to_dict
    from grace_plugin.finetune import fine_tune
    from grace_plugin.trainer import TrainingDiverged

    from eval_suites.leaderboard import reference_rows
    from .quickstart import user_overrides, prepare_testbed
    from ..testbed.configs import load_methods, load_studies, merge, method_config

    studies, methods = load_studies(), load_methods()
    study, rows = _study_rows(cfg, studies, methods)
    t0 = time.time()
    out = Path(cfg.out)
    data, pretrained = prepare_testbed(out, cfg.seed, cfg.size, cfg.pretrain_steps, progress, echo,
                                       ("[1/4]", "[2/4]"), pretrain_threads=cfg.pretrain_threads)
    seeds = list(cfg.run_seeds) if cfg.run_seeds else [cfg.seed + i for i in range(max(1, cfg.seeds))]
    trained = sorted({methods[r["method"]].recipe for r in rows if methods[r["method"]].recipe})
    user = user_overrides(cfg.overrides, trained) if trained else {}
    extras = [k for k in ("geometry", "shift") if study.get(k)]  # suites run beside the axes, cached apart
    results: dict[str, dict] = {}
    counts = {"reused": 0, "resumed": 0, "trained": 0}
    echo(f"[3/4] {cfg.name}: {len(rows)} rows x seeds {seeds} ({cfg.steps} steps each)")
    for r in rows:
        m = methods[r["method"]]
        runs, diverged = [], []
        for seed in seeds:
            if m.recipe is None:
                spec, run_dir = pretrained, None
            else:
                run_dir = out / "runs" / m.name / f"seed{seed}"
                over = merge({"train": {"seed": seed, "device": cfg.device}}, user.get(m.recipe, {}))
                run_cfg = method_config(m, overrides=over, steps=cfg.steps)
                if finished_run_matches(run_dir, m.recipe, to_dict(run_cfg)):
                    echo(f"      {m.name} seed {seed}: reusing the finished run in {run_dir} (same config)")
                    counts["reused"] += 1
                else:
                    resume = killed_run_matches(run_dir, m.recipe, to_dict(run_cfg))
                    if resume:
                        echo(f"      {m.name} seed {seed}: resuming the killed run in {run_dir} (same config)")
                    counts["resumed" if resume else "trained"] += 1
                    try:
                        fine_tune(m.recipe, pretrained, data / "id", run_dir, run_cfg, progress=progress,
                                  resume=resume)
                    except TrainingDiverged as e:  # a result about the method: recorded, and the study goes on
                        echo(f"      {m.name} seed {seed}: DIVERGED, no numbers for this seed ({e})")
                        diverged.append({"seed": seed, "error": str(e)})
                        continue
                spec = run_dir
            cache = out / "evals" / m.name / f"seed{seed}.json"
            report, reused = _cached_evaluate(cache, spec, data, cfg, seed, None, pretrained)
            rec = {"seed": seed, "run": str(spec), **_run_record(report)}
            for extra in extras:
                report, again = _cached_evaluate(cache.with_name(f"seed{seed}.{extra}.json"), spec, data, cfg, seed,
                                                 extra, pretrained)
                rec.update(_extra_record(report, extra))
                reused = reused and again
            how = "evaluation reused (same model and settings)" if reused else "evaluated"
            echo(f"      {m.name} seed {seed}: {how}")
            if run_dir is not None:
                rec["training"] = _training_record(run_dir)
            runs.append(rec)
        results[m.name] = {"label": r.get("label", m.name), "paper": r.get("paper"), "runs": runs,
                           "diverged": diverged, **aggregate_runs(runs)}
    echo(f"      runs: {counts['reused']} reused (finished), {counts['resumed']} resumed (killed), "
         f"{counts['trained']} trained")
    echo("[4/4] verdicts and report")
    verdicts, verdicts_paper, omitted, paired = _judge(study, results, bool(cfg.methods))
    refs = reference_rows(study["paper_table"]) if study.get("paper_table") else []
    from grace_app.testbed.tiny_clip import tiny_clip_identity

    doc = {"study": cfg.name, "world_seed": cfg.seed, "seeds": seeds, "steps": cfg.steps, "methods": cfg.methods,
           "size": cfg.size, "tiny_clip": tiny_clip_identity(pretrained),
           "attack": cfg.attack, "eps": cfg.eps, "n_adv": cfg.n_adv, "overrides": cfg.overrides, "rows": results,
           "verdicts": verdicts, "verdicts_paper": verdicts_paper, "claims_omitted": omitted,
           "shift_reference": study.get("shift_reference"),
           "paired_reference": study.get("paired_reference"), "paired": paired,
           "paper_table": study.get("paper_table"), "paper_rows": refs, "seconds": round(time.time() - t0, 1),
           "run_counts": counts,
           "column_definitions": {
               "ours": "ID = top-1 on the ID test split; OOD = mean top-1 over v2, sketch, rendition, a; Adv = "
                       f"{_attack_text(cfg.attack)} l_inf robust top-1 on the first {cfg.n_adv} ID test images; HM of "
                       "the three",
               "paper": f"OOD = mean(v2, sketch, rendition); Adv = mean({_attack_text(cfg.attack)} robust, a); HM of "
                        "ID, OOD, Adv (the paper's Table 6 caption, which uses APGD-CE alone)"},
           "intervals": "std: sample standard deviation over seeds; a run's interval: Wilson 95% (ID, Adv)"}
    from grace_plugin.tensor_io import atomic_write_text

    from .study_page import study_markdown, study_plot

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(out / "study.md", study_markdown(doc))
    png = study_plot(doc, out / "study.png")
    return {"doc": doc, "paths": {"json": out / "study.json", "md": out / "study.md", "png": png}}
