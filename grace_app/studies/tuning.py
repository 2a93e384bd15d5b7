"""``grace study tune``: one Optuna protocol for every method (configs/testbed/tuning.yaml).

Every method gets the same trial budget over its own log-uniform search space (``search.parse_space``), searched by
Optuna's TPE sampler after ``startup_trials`` random ones, starting from anchor trials at its published defaults
(enqueued once); with ``prune_every`` a trial's robust validation checks are the rungs of successive-halving pruning
on the step axis (a pruned trial counts in the budget and is never selected). Every trial trains on ID train minus a
held-out validation split (``grace_plugin.data.split.holdout_split``: never the test or OOD sets) and is scored
there: clean top-1, robust top-1 under the tuning attack, and the feature spread of the validation images. A trial
that diverged is recorded as failed; one whose feature spread passes the collapse threshold is recorded as
collapsed; neither is ever selected (``search.selectable``). A selected value in the outer tenth of its range widens
that range by a decade and the search goes on for ``widen_trials`` more trials (``search.edge_side``, ``widen``).
The top ``rescore_top`` selectable trials are trained again on ``rescore_seeds - 1`` more seeds and the best mean
score is selected.

The study lives in ``OUT/optuna.journal`` (Optuna's journal file storage, ``load_if_exists``): a killed
``grace study tune`` resumes without redoing finished trials (the trial it was running is not counted and its
point is queued again), and several processes, even on several nodes sharing
the disk, can work one study at once, each pinning its threads (``OMP_NUM_THREADS=1``). Each trial records its
training steps and CPU seconds, so every method's compute is reported beside its budget. The selected values are
written back as data (configs/testbed/tuned.yaml, a comment per method recording the protocol and the scores).
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .search import Axis, collapsed, edge_side, parse_space, selectable, widen

__all__ = ["TuneConfig", "trial_score", "select_trial", "validation_trial", "run_tuning", "write_tuned",
           "open_study", "study_rows"]


@dataclass
class TuneConfig:
    methods: list[str]
    out: Path
    trials: int | None = None  # default: tuning.yaml's
    steps: int | None = None  # default: tuning.yaml's
    seed: int = 0
    device: str = "cpu"
    size: str = "default"
    pretrain_steps: int | None = None
    pretrain_threads: int | None = None  # the tiny CLIP's pretraining threads (default 1: testbed.PretrainConfig)
    n_val_adv: int | None = None
    overrides: list[str] = field(default_factory=list)
    write: Path | None = None  # tuned.yaml to update (None: do not write)
    rescore_seeds: int | None = None  # default: tuning.yaml's
    task: str = "classification"  # vqa: on the VQA world, scored by VQA accuracy on vqav2 val (grace_plugin.tasks)
    backbone: str = "clip"  # vqa: the world's tiny CLIP, or its tiny CoCa (coca.yaml layered on vqa.yaml)


def trial_score(clean: float | None, robust: float | None) -> dict:
    """``{"hm", "mean"}`` of validation clean and robust top-1 (percent)."""
    from eval_suites.report import harmonic_mean

    if clean is None or robust is None:
        return {"hm": None, "mean": None}
    return {"hm": harmonic_mean([clean, robust]), "mean": (clean + robust) / 2}


# The mean's weight in a trial's value: at most 0.01 points of HM, so it only orders trials whose HM ties.
TIE_WEIGHT = 1e-4


def trial_score_value(rec: dict, score: str = "hm") -> float | None:
    """What Optuna (sampler, pruner) and the re-scoring see of a trial (``rec``: its ``hm``, ``val_clean`` and
    ``mean``). ``score``: ``hm`` (HM of validation clean and robust top-1) or ``clean`` (validation clean top-1, for a
    method that does not train for robustness: tuning.yaml ``score``). Plus ``TIE_WEIGHT`` x the clean+robust mean,
    which only orders trials whose score ties."""
    base = rec.get("hm") if score == "hm" else rec.get("val_clean")
    if base is None:
        return None
    return base + TIE_WEIGHT * (rec.get("mean") or 0.0)


SCORES = ("hm", "clean")


def select_trial(rows: list[dict], threshold: float) -> int | None:
    """Index of the selected row: among the selectable ones (finished, finite, not collapsed), the highest
    ``score`` (the mean over re-scored seeds where present), ties to the higher clean+robust mean, then the earlier
    trial; None when no row is selectable."""
    ok = [i for i, r in enumerate(rows) if selectable(r, threshold)]
    if not ok:
        return None
    return max(ok, key=lambda i: (round(rows[i].get("seed_score", rows[i]["score"]), 6),
                                  round(rows[i].get("mean") or 0.0, 6), -i))


def write_tuned(path: Path, selected: dict[str, dict], notes: dict[str, str], task: str = "classification",
                backbone: str = "clip") -> Path:
    """Update ``path`` (tuned.yaml): the given methods' entries replaced, the others kept; one comment per entry."""
    import yaml

    from grace_plugin.tensor_io import atomic_write_text

    current = {}
    if path.is_file():
        current = yaml.safe_load(path.read_text()) or {}
    old_notes = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("# [") and "]" in line:
                old_notes[line[3:line.index("]")]] = line
    current.update(selected)
    lines = ["# Selected values per method, written by `grace study tune` (grace_app/studies/tuning.py); layered over "
             "the", "# method's files by grace_app/testbed/configs.py. Protocol and grids: tuning.yaml.", ""]
    if task == "vqa":
        lines[:2] = ["# Selected values per method on the VQA world, written by `grace study tune --task vqa`",
                     "# (grace_app/studies/tuning.py); read by `grace study frames` (CLIP rows). Protocol and grids: "
                     "tuning.yaml."]
        if backbone != "clip":
            lines[:2] = [f"# Selected values per method on the VQA world for the {backbone} backbone, written by "
                         f"`grace study tune --task vqa --backbones {backbone}`", "# (grace_app/studies/tuning.py); "
                         f"read by `grace study frames` ({backbone} rows). Protocol and grids: tuning.yaml."]
    for name in sorted(current):
        lines.append(f"# [{name}] {notes[name]}" if name in notes else old_notes.get(name, f"# [{name}]"))
        lines.append(yaml.safe_dump({name: current[name]}, sort_keys=True, default_flow_style=False).rstrip())
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def validation_trial(method, point: dict, run_dir: Path, pretrained: Path, train_data: Path, steps: int,
                     overrides: dict, ctx_args: dict, attack: str, progress: bool = False, on_check=None,
                     base: dict | None = None) -> dict:
    """Train ``method`` (a methods.yaml ``Method``, untuned) at ``point`` (dotted keys) on ``train_data``'s train
    split, over ``base`` (the task's layer) and under ``overrides`` (``overrides`` win over ``point``, ``point`` over
    ``base``), then score it through the evaluation engine on the validation set ``ctx_args`` names (its ``task``
    and ``id_set``): ``{val_clean, val_robust, hm, mean, feature_spread}`` with its compute (``train_steps``,
    ``cpu_seconds`` of this process, ``wall_seconds``). ``on_check``: handed each robust validation check of the
    training (``fine_tune``), how a pruner sees the trial on the step axis."""
    from grace_plugin.finetune import fine_tune

    from eval_suites.context import SuiteContext
    from eval_suites.engine import evaluate, id_scores
    from ..testbed.configs import merge, method_config, nest

    t0, c0 = time.time(), time.process_time()
    run_cfg = method_config(method, overrides=merge(merge(base or {}, nest(point)), overrides), steps=steps,
                            tuned=False)
    fine_tune(method.recipe, pretrained, train_data, run_dir, run_cfg, progress=progress, on_check=on_check)
    ctx = SuiteContext(**ctx_args)
    # read by the task's evaluation (a VQA model reports no feature spread: never "collapsed")
    clean, robust, spread = id_scores(evaluate(str(run_dir), ["id", f"adv:{attack}"], ctx), ctx)
    return {"val_clean": clean, "val_robust": robust, **trial_score(clean, robust), "feature_spread": spread,
            "train_steps": steps, "cpu_seconds": round(time.process_time() - c0, 1),
            "wall_seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------------ Optuna


def open_study(out: Path, method: str, seed: int, startup_trials: int, prune_every: int = 0):
    """The method's study in ``out/optuna.journal`` (created, or loaded when it exists). The sampler's seed also
    counts the trials already stored, so a resumed process or a second worker does not redraw the same points.
    ``prune_every`` > 0: successive halving on the step axis (Optuna's ``SuccessiveHalvingPruner``, Jamieson &
    Talwalkar 2016, https://arxiv.org/abs/1502.07943; Li et al. 2020, https://arxiv.org/abs/1810.05934), a trial's
    rungs being its robust validation checks every ``prune_every`` steps; else no pruning."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=prune_every, reduction_factor=3)
              if prune_every else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=method, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=pruner)
    stored = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed * 100003 + stored, n_startup_trials=startup_trials)
    return study


def _suggest(trial, axes: list[Axis]) -> dict:
    return {a.key: trial.suggest_categorical(a.key, list(a.choices)) if a.categorical else
            trial.suggest_float(a.key, a.low, a.high, log=True) for a in axes}


def _counted(t) -> bool:
    """A trial that counts against the budget: it finished, or the objective recorded its divergence. A trial that
    failed otherwise (the process killed or interrupted under it) does not count and is redone."""
    return t.state.name in ("COMPLETE", "PRUNED") or (t.state.name == "FAIL" and bool(t.user_attrs.get("diverged")))


def _reclaim_killed(study) -> int:
    """Trials of a killed or interrupted tune are not counted and their points are queued again, once: RUNNING
    trials left by a dead process of this host are marked failed first. Returns how many were queued."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead_here(t):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # Optuna has no public call for it
    done = set(study.user_attrs.get("requeued", []))
    lost = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if not _counted(t) and t.number not in done]
    for t in lost:
        study.enqueue_trial(dict(t.params), user_attrs={"redo_of": t.number})
    if lost:
        study.set_user_attr("requeued", sorted(done | {t.number for t in lost}))
    return len(lost)


def _running_elsewhere(study) -> int:
    """Trials another worker is running now (they count towards the budget once they finish). A trial of this host
    whose process is dead, or one running longer than 3x the longest finished trial (a worker lost on another
    node), is not waited for: a lost worker never hangs the others."""
    import datetime

    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    took = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
            if t.datetime_complete is not None and t.datetime_start is not None]
    limit = 3 * max(took, default=3600.0)
    now, n = datetime.datetime.now(), 0
    for t in trials:
        if t.state != TrialState.RUNNING or t.user_attrs.get("pid") == os.getpid() or _dead_here(t):
            continue
        if t.datetime_start is not None and (now - t.datetime_start).total_seconds() > limit:
            continue
        n += 1
    return n


def _dead_here(t) -> bool:
    """A trial started by a process of this host that is no longer alive (killed under its trial)."""
    pid = t.user_attrs.get("pid")
    return t.user_attrs.get("host") == socket.gethostname() and pid is not None and not _alive(int(pid))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is starting: a RUNNING trial of its pid is a former process's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def study_rows(study) -> list[dict]:
    """One row per counted trial (``_counted``): number, state, params and what the objective recorded."""
    score, rows = study.user_attrs.get("score", "hm"), []
    for t in study.get_trials(deepcopy=False):
        if not _counted(t):
            continue
        ua = t.user_attrs
        rows.append({"trial": t.number, "state": t.state.name.lower(), "point": dict(t.params),
                     # from the recorded results (not t.value): a study stored before TIE_WEIGHT reads the same
                     "score": trial_score_value(ua, score) if t.state.name == "COMPLETE" else None,
                     **{k: ua.get(k) for k in ("val_clean", "val_robust", "hm", "mean", "feature_spread",
                                               "collapsed", "diverged", "train_steps", "cpu_seconds",
                                               "wall_seconds", "anchor", "pruned_at")}})
    return rows


def _space_of(study, method: str, proto: dict) -> list[Axis]:
    """The method's current axes: tuning.yaml's, as widened so far (kept in the study)."""
    saved = study.user_attrs.get("space")  # Axis.record()s: tuning.yaml's own format
    return parse_space(method, saved if saved is not None else (proto.get("space") or {}).get(method))


def _objective(method, run_root: Path, pretrained, train_data, steps, over, ctx_args, attack, threshold, progress,
               echo, axes_ref: list, base: dict | None = None):
    from grace_plugin.trainer import TrainingDiverged

    import optuna

    def objective(trial):
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        point = _suggest(trial, axes_ref[0])
        c0 = time.process_time()

        score = trial.study.user_attrs.get("score", "hm")

        def on_check(step, check):  # the pruner's view of the trial: its validation score at each rung
            sc = {"val_clean": check["val_clean"], **trial_score(check["val_clean"], check["val_robust"])}
            value = trial_score_value(sc, score)
            trial.report(value, step)
            if step < steps and trial.should_prune():
                # what the pruned trial cost, for the method's compute
                trial.set_user_attr("pruned_at", step)
                trial.set_user_attr("train_steps", step)
                trial.set_user_attr("cpu_seconds", round(time.process_time() - c0, 1))
                echo(f"      {method.name} trial {trial.number} {point}: pruned at step {step} (validation "
                     f"{score} {value:.2f})")
                raise optuna.TrialPruned(f"pruned at step {step}")

        try:
            res = validation_trial(method, point, run_root / f"trial{trial.number}", pretrained, train_data, steps,
                                   over, ctx_args, attack, progress, on_check=on_check, base=base)
        except TrainingDiverged as e:
            trial.set_user_attr("diverged", str(e).splitlines()[0][:300])
            echo(f"      {method.name} trial {trial.number} {point}: diverged (recorded, never selected)")
            return float("nan")  # Optuna records a NaN objective as a failed trial
        for k, v in res.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("collapsed", collapsed(res["feature_spread"], threshold))
        spread = res["feature_spread"]
        echo(f"      {method.name} trial {trial.number} {point}: val clean {res['val_clean']:.2f} robust "
             f"{res['val_robust']:.2f} spread {spread if spread is None else round(spread, 3)}"
             f"{' (collapsed: never selected)' if collapsed(spread, threshold) else ''}")
        value = trial_score_value(res, score)
        return value if value is not None else float("nan")

    return objective


def _rescore(study, rows: list[dict], cfg: TuneConfig, proto: dict, run_trial, echo) -> None:
    """The top ``rescore_top`` selectable rows trained again on more seeds (results kept in the study, so a resumed
    tune does not retrain them); each gets ``seed_score``, the mean value over its seeds, ``seed_mean``, the mean of
    the score itself (HM or clean top-1), and ``seed_results``: per seed, its validation clean and robust top-1, HM
    and feature spread."""
    import statistics

    threshold, score = float(proto["collapse_spread"]), study.user_attrs.get("score", "hm")
    seeds = int(cfg.rescore_seeds if cfg.rescore_seeds is not None else proto.get("rescore_seeds", 3))
    top = sorted((r for r in rows if selectable(r, threshold)), key=lambda r: -r["score"])[
        :int(proto.get("rescore_top", 3))]
    for r in top:
        keep = ("val_clean", "val_robust", "hm", "feature_spread")
        base = "hm" if score == "hm" else "val_clean"
        scores, hms, per_seed = [r["score"]], [r[base]], {cfg.seed: {k: r.get(k) for k in keep}}
        for k in range(1, seeds):
            key = f"rescore/{r['trial']}/{k}"
            res = study.user_attrs.get(key)
            if res is None:
                res = run_trial(r["point"], f"trial{r['trial']}-seed{k}", cfg.seed + k)
                study.set_user_attr(key, res)
                echo(f"      trial {r['trial']} re-scored on seed {cfg.seed + k}: val clean {res['val_clean']:.2f} "
                     f"robust {res['val_robust']:.2f}")
            scores.append(trial_score_value(res, score) if res.get("hm") is not None and not collapsed(
                res.get("feature_spread"), threshold) else float("-inf"))
            hms.append(res.get(base))
            per_seed[cfg.seed + k] = {f: res.get(f) for f in keep}
        r["seed_scores"], r["seed_results"] = scores, per_seed
        r["seed_mean"] = statistics.fmean(hms) if None not in hms else None
        r["seed_score"] = statistics.fmean(scores) if all(s > float("-inf") for s in scores) else float("-inf")


def _extension(study, rows: list[dict], proto: dict, score: str, threshold: float, budget: int) -> float | None:
    """The convergence rule: when the best-so-far score rose by more than ``converge_delta`` over the last third of
    the trials and fewer than ``max_extensions`` extensions ran, the budget grows by ``converge_trials`` (recorded
    in the study, so every worker sees it) and the late gain is returned; else None (the budget has converged)."""
    from .search import CONVERGE_DELTA, best_so_far, late_gain, score_key

    extensions, limit = int(study.user_attrs.get("extensions", 0)), int(proto.get("max_extensions", 0))
    gain = late_gain(best_so_far(rows, threshold, score_key(score)))
    if gain is None or gain <= float(proto.get("converge_delta", CONVERGE_DELTA)) or extensions >= limit:
        return None
    study.set_user_attr("budget", budget + int(proto.get("converge_trials", 8)))
    study.set_user_attr("extensions", extensions + 1)
    return gain


def _tune_method(name: str, study, proto: dict, cfg: TuneConfig, budget0: int, objective_for, run_trial,
                 echo) -> dict:
    """Run the method's study to its budget (widening edges), re-score the top trials; the method's result."""
    threshold = float(proto["collapse_spread"])
    score = (proto.get("score") or {}).get(name, "hm")
    if study.user_attrs.get("score", score) != score:
        from grace_plugin.config import ConfigError

        raise ConfigError(f"tuning.yaml: score.{name} is {score!r} but the study in --out was run on "
                          f"{study.user_attrs['score']!r}; tune into a new --out")
    study.set_user_attr("score", score)
    if not study.user_attrs.get("anchors_enqueued"):
        for point in (proto.get("anchors") or {}).get(name) or []:
            study.enqueue_trial(point, user_attrs={"anchor": True})
        study.set_user_attr("anchors_enqueued", True)
    killed = _reclaim_killed(study)
    if killed:
        echo(f"      {name}: {killed} trial(s) of a killed or interrupted run not counted; their points queued again")
    axes_ref: list = [[]]  # the current axes, read by the objective
    objective = objective_for(axes_ref)
    while True:
        rows = study_rows(study)
        # space, budget and widenings live in the study: another worker may have widened the space
        attrs = study.user_attrs
        budget, widenings = int(attrs.get("budget", budget0)), int(attrs.get("widenings", 0))
        axes_ref[0] = _space_of(study, name, proto)
        running = _running_elsewhere(study)
        if len(rows) + running < budget:
            study.optimize(objective, n_trials=1)
            continue
        if running:  # another worker's trials finish the budget: wait for them before selecting
            time.sleep(10)
            continue
        best = select_trial(rows, threshold)
        sides = {} if best is None else {a.key: edge_side(a, rows[best]["point"][a.key]) for a in axes_ref[0]
                                         if a.key in rows[best]["point"]}
        sides = {k: v for k, v in sides.items() if v}
        if not sides or widenings >= int(proto.get("max_widenings", 3)):
            more = _extension(study, rows, proto, score, threshold, budget)
            if not more:
                break
            echo(f"      {name}: best so far still rose by {more:.2f} over the last third of the trials; "
                 f"{int(proto.get('converge_trials', 8))} more trials")
            continue
        axes_ref[0] = [widen(a, sides[a.key]) if a.key in sides else a for a in axes_ref[0]]
        widenings, budget = widenings + 1, budget + int(proto.get("widen_trials", 8))
        study.set_user_attr("space", {a.key: a.record() for a in axes_ref[0]})
        study.set_user_attr("budget", budget)
        study.set_user_attr("widenings", widenings)
        echo(f"      {name}: selected {', '.join(f'{k} at the {v} edge' for k, v in sides.items())}; range widened "
             f"by a decade, {budget - len(rows)} more trials")
    _rescore(study, rows, cfg, proto, run_trial, echo)
    best = select_trial(rows, threshold)
    edges = [] if best is None else [a.key for a in axes_ref[0] if a.key in rows[best]["point"]
                                     and edge_side(a, rows[best]["point"][a.key])]
    rescored = [{"trial": r["trial"], "seed_scores": r.get("seed_scores"), "seed_results": r.get("seed_results")}
                for r in rows if "seed_scores" in r]
    compute = {"trials": len(rows), "trial_steps": sum(r.get("train_steps") or 0 for r in rows),
               "cpu_seconds": round(sum(r.get("cpu_seconds") or 0 for r in rows), 1),
               "rescore_cpu_seconds": round(sum(v.get("cpu_seconds") or 0 for k, v in study.user_attrs.items()
                                                if k.startswith("rescore/")), 1)}
    return {"trials": rows, "extensions": int(study.user_attrs.get("extensions", 0)),
            "selected": None if best is None else rows[best]["trial"],
            "values": None if best is None else dict(rows[best]["point"]), "at_range_edge": edges,
            "space": {a.key: a.record() for a in axes_ref[0]}, "widenings": widenings, "rescored": rescored,
            "score": score, "compute": compute, "collapsed": sum(bool(r.get("collapsed")) for r in rows),
            "diverged": sum(bool(r.get("diverged")) for r in rows), "best_row": None if best is None else rows[best]}


def _trial_data(cfg: TuneConfig, proto: dict, out: Path, n_val_adv: int, device: str, progress: bool, echo):
    """``(pretrained CLIP, the trials' training set, the validation SuiteContext's arguments, the task's config
    layer)``. Classification: the testbed world, trials train on ID train minus a held-out validation split and are
    scored on it; VQA: the VQA world, trials train on vqav2 train and are scored on its val split (never test or
    OOD), under the VQA layer (configs/testbed/vqa.yaml: answers, no robust validation)."""
    ctx_args = dict(eps=float(proto.get("eps", 4 / 255)), n_adv=n_val_adv, device=device, seed=cfg.seed)
    if cfg.task == "vqa":
        from .quickstart_vqa import prepare_vqa_testbed
        from ..testbed.configs import _load, merge

        data, pretrained = prepare_vqa_testbed(out, cfg.seed, cfg.size, cfg.pretrain_steps, progress, echo, {},
                                               cfg.backbone)
        layer = _load("vqa.yaml") if cfg.backbone == "clip" else merge(_load("vqa.yaml"), _load("coca.yaml"))
        ctx_args |= dict(task="vqa", id_set=("vqav2", data / "vqav2" / "val"),
                         answers_min_count=int(layer["data"]["answers_min_count"]))
        return pretrained, data / "vqav2", ctx_args, layer
    from grace_plugin.data.split import holdout_split

    from .quickstart import prepare_testbed

    data, pretrained = prepare_testbed(out, cfg.seed, cfg.size, cfg.pretrain_steps, progress, echo,
                                       ("[1/3]", "[2/3]"), pretrain_threads=cfg.pretrain_threads)
    train_data = out / "val_split"
    if not (train_data / "test" / "nshards.txt").is_file():
        counts = holdout_split(data / "id", train_data, float(proto["val_fraction"]), int(proto.get("seed", 0)))
        echo(f"      validation split held out of ID train: {counts['val']} samples (training on {counts['train']})")
    return pretrained, train_data, ctx_args | {"id_set": ("val", train_data)}, {}


def run_tuning(cfg: TuneConfig, progress: bool = False, echo=print) -> dict:
    from grace_plugin.config import ConfigError
    from grace_plugin.recipes import get_recipe_class
    from grace_plugin.runtime import resolve_device
    from grace_plugin.tensor_io import atomic_write_text

    from .quickstart import user_overrides
    from ..testbed.configs import load_methods, load_tuning, merge

    proto, methods = load_tuning(), load_methods()
    trials = int(cfg.trials or proto["trials"])
    steps = int(cfg.steps or proto["steps"])
    n_val_adv = int(cfg.n_val_adv if cfg.n_val_adv is not None else proto["n_val_adv"])
    for name in cfg.methods:
        if name not in methods or methods[name].recipe is None:
            raise ConfigError(f"unknown trainable method {name!r}; valid: "
                              f"{', '.join(n for n, m in methods.items() if m.recipe)}")
        if cfg.task not in get_recipe_class(methods[name].recipe).tasks:
            raise ConfigError(f"--methods {name}: its recipe {methods[name].recipe!r} trains only "
                              f"{', '.join(get_recipe_class(methods[name].recipe).tasks)}, not {cfg.task}")
        axes = parse_space(name, (proto.get("space") or {}).get(name))  # every space checked before any work
        if (proto.get("score") or {}).get(name, "hm") not in SCORES:
            raise ConfigError(f"tuning.yaml: score.{name}: {proto['score'][name]!r} is not one of {', '.join(SCORES)}")
        for point in (proto.get("anchors") or {}).get(name) or []:
            bad = [k for k in point if not any(a.key == k and a.contains(point[k]) for a in axes)]
            if bad:
                raise ConfigError(f"tuning.yaml: anchors.{name}: {', '.join(bad)} outside the method's space")
    t0 = time.time()
    out = Path(cfg.out)
    attack = proto.get("attack", "apgd-ce")
    device = str(resolve_device(cfg.device))
    pretrained, train_data, ctx_args, task_layer = _trial_data(cfg, proto, out, n_val_adv, device, progress, echo)
    prune_every = 0 if cfg.task == "vqa" else int(proto.get("prune_every", 0))  # rungs: robust checks (classification)
    recipes = sorted({methods[n].recipe for n in cfg.methods})
    user = user_overrides(cfg.overrides, recipes)
    threshold = float(proto["collapse_spread"])
    if prune_every >= steps:  # fewer than two rungs: nothing to halve
        echo(f"      pruning off: trials of {steps} steps are shorter than two rungs of {prune_every}")
        prune_every = 0
    what = "VQA accuracy (vqav2 val)" if cfg.task == "vqa" else "top-1"
    echo(f"[3/3] tuning {', '.join(cfg.methods)}: {trials} trials each (Optuna TPE), {steps} steps, score = HM of "
         f"validation clean and robust {what} ({n_val_adv} attacked), collapse at feature spread >= {threshold}")
    results, selected, notes = {}, {}, {}
    for name in cfg.methods:
        m = methods[name]

        def over(seed, m=m):
            # pruning rungs: robust validation checks on the held-out split every prune_every steps
            rungs = {"val_every": prune_every, "val_n": int(proto.get("prune_val_n", 128))} if prune_every else {}
            return merge({"train": {"seed": seed, "device": device, **rungs}}, user.get(m.recipe, {}))

        def run_trial(point, run_name, seed, m=m, name=name):
            return validation_trial(m, point, out / "trials" / name / run_name, pretrained, train_data, steps,
                                    over(seed), ctx_args, attack, progress, base=task_layer)

        def objective_for(axes_ref, m=m, name=name):
            return _objective(m, out / "trials" / name, pretrained, train_data, steps, over(cfg.seed), ctx_args,
                              attack, threshold, progress, echo, axes_ref, task_layer)

        study = open_study(out, name, cfg.seed, int(proto.get("startup_trials", 8)), prune_every)
        res = _tune_method(name, study, proto, cfg, trials, objective_for, run_trial, echo)
        results[name] = res
        c = res["compute"]
        echo(f"      {name}: {c['trials']} trials, {c['trial_steps']} trial-steps, {c['cpu_seconds']:.0f} CPU-s "
             f"(+{c['rescore_cpu_seconds']:.0f} re-scoring); {res['collapsed']} collapsed, {res['diverged']} diverged")
        if res["values"] is None:
            echo(f"      {name}: no selectable trial (every one diverged or collapsed); tuned.yaml left as it was")
            continue
        selected[name] = res["values"]
        b = res["best_row"]
        base = b["hm"] if res["score"] == "hm" else b["val_clean"]
        seed_mean = base if b.get("seed_mean") is None else b["seed_mean"]
        notes[name] = (f"{c['trials']} trials (Optuna TPE), {steps} steps, score {res['score']}, "
                       f"{'VQA world' if cfg.task == 'vqa' else 'world'} {cfg.size}"
                       + (f" ({cfg.backbone})" if cfg.backbone != "clip" else "") + ", "
                       f"seed {cfg.seed}: trial {res['selected']} val clean {b['val_clean']:.2f} robust "
                       f"{b['val_robust']:.2f}"
                       + ("" if b["feature_spread"] is None else f" spread {b['feature_spread']:.3f}")
                       + f", mean {res['score']} over "
                       f"{len(b.get('seed_scores') or [1])} seeds {seed_mean:.2f}; compute "
                       f"{c['cpu_seconds']:.0f} CPU-s ({time.strftime('%Y-%m-%d')})"
                       + (f"; edge: {', '.join(res['at_range_edge'])}" if res["at_range_edge"] else ""))
    doc = {"task": cfg.task, **({"backbone": cfg.backbone} if cfg.backbone != "clip" else {}),
           "protocol": {k: v for k, v in proto.items() if k not in ("space", "anchors")},
           "trials": trials,
           "steps": steps, "size": cfg.size, "seed": cfg.seed, "methods": results,
           "seconds": round(time.time() - t0, 1)}
    atomic_write_text(out / "tuning.json", json.dumps(doc, indent=2, default=str) + "\n")
    from .tuning_page import tuning_markdown

    atomic_write_text(out / "tuning.md", tuning_markdown(doc))
    paths = {"json": out / "tuning.json", "md": out / "tuning.md"}
    if cfg.write is not None and selected:
        paths["tuned"] = write_tuned(Path(cfg.write), selected, notes, cfg.task, cfg.backbone)
    return {"doc": doc, "paths": paths}
