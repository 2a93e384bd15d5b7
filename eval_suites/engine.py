"""The evaluation engine (docs/evaluation.md): a suite registry, suite name -> ``(loaded, ctx, arg) -> dict``, and
the runs over it.

Every evaluation is a list of suites. Names: ``id``, ``ood:<set>``, ``transfer:<set>``, ``adv:<attack>``,
``corruptions``, ``geometry``, ``shift``, ``robustbench`` (their bodies: ``eval_suites.suites``). ``<set>`` is
``NAME=DIR``, a folder, or a name resolved by ``SuiteContext.resolve_set`` (``--ood NAME=DIR`` sets, then the
catalogue's folder or ``<data_root>/<NAME>``). ``grace eval``'s ``--data/--ood/--attack`` are shorthands
(``expand_shorthands``):

    --data [NAME=]DIR   -> the ID set, and the suite ``id``
    --ood SET           -> the suite ``ood:SET`` (SET as above; NAME=DIR also names the set for other suites)
    --attack NAME       -> the suite ``adv:NAME`` (on the ID set)

placed before the ``--suite`` names, duplicates dropped.

Suites are registered per task (``register_suite(..., task="vqa")``; ``grace_plugin.tasks``): the same names mean
the task's own measure (``id`` is top-1 for classification, the official VQA accuracy for VQA) and a task's
evaluation (``register_eval_task``: how its model is loaded, how its report is built and written) is one entry. The
classification task is below; VQA's is ``eval_suites.vqa``.

``run_suites(loaded, names, ctx)`` runs them in order and returns the report (``report.build_report``) with every
suite's result under ``"suites"``; ``evaluate(model, names, ctx)`` is the whole of ``grace eval``: the runtime
(process group, device) set up once by ``ctx.prepare``, the model loaded by name, the suites run, the fixed costs
recorded under ``"startup"``. Under ``torchrun`` every suite splits its batches over the ranks and gathers the
per-batch records (``eval_suites.distributed``): each rank returns the one-process report. A new suite is one
``@register_suite`` function; ``grace eval --suite NAME`` and ``tests/test_suites.py`` pick it up.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from grace_plugin.errors import GraceError, UsageError
from grace_plugin.registries import Registry, first_doc_line

from .context import SuiteContext, split_named

__all__ = ["register_suite", "list_suites", "parse_suite", "UnknownSuiteError", "run_suites", "expand_shorthands",
           "evaluate", "EvalTask", "register_eval_task", "write_evaluation", "evaluation_markdown", "id_scores"]

log = logging.getLogger(__name__)


class UnknownSuiteError(GraceError, KeyError):
    pass


@dataclass(frozen=True)
class SuiteInfo:
    name: str
    fn: Callable
    takes_arg: bool
    description: str


@dataclass(frozen=True)
class EvalTask:
    """How the engine evaluates a task (``grace_plugin.tasks``' names): ``load(spec, ctx)`` -> what the suites take
    (``spec`` may be None where the task scores files made elsewhere); ``report(loaded, results, ctx)`` -> the report
    from the suites' results (name -> dict, in run order); ``write(out, report, ctx)`` -> the path of what was
    written; ``markdown(report)`` -> the report as a table; ``id_scores(report, set name)`` -> ``(clean, robust,
    feature spread)`` of the ID set, percent (None where not measured): what tuning scores a trial on."""

    name: str
    load: Callable
    report: Callable
    write: Callable
    markdown: Callable
    id_scores: Callable


class UnknownEvalTaskError(UsageError, KeyError):
    pass


_EVAL_TASKS: Registry[EvalTask] = Registry("evaluation task", UnknownEvalTaskError)
_SUITES: dict[str, Registry[SuiteInfo]] = {}


def register_eval_task(task: EvalTask) -> EvalTask:
    return _EVAL_TASKS.register(task.name)(task)


def _suites_of(task: str) -> Registry[SuiteInfo]:
    _EVAL_TASKS.get(task)  # an unknown task names the valid ones
    return _SUITES.get(task) or Registry(f"{task} suite", UnknownSuiteError)


def register_suite(name: str, takes_arg: bool = False, description: str = "", task: str = "classification"):
    """A decorator: the suite ``name`` of ``task`` (its ``EvalTask`` may be registered after its suites)."""
    suites = _SUITES.setdefault(task, Registry(f"{task} suite", UnknownSuiteError))
    return suites.register(name, lambda fn: SuiteInfo(name, fn, takes_arg, description or first_doc_line(fn)))


def list_suites(task: str = "classification") -> list[str]:
    """Registered names of a task's suites; those taking an argument are listed as ``name:<arg>``."""
    return sorted(f"{k}:<{'attack' if k == 'adv' else 'set'}>" if v.takes_arg else k
                  for k, v in _suites_of(task).items())


def parse_suite(text: str, task: str = "classification") -> tuple[str, str | None]:
    """``"adv:apgd-ce"`` -> ``("adv", "apgd-ce")``; an unknown name or a missing/extra argument is an error."""
    base, _, arg = str(text).partition(":")
    suites = _suites_of(task)
    if base not in suites:
        which = "" if task == "classification" else f" for --task {task}"
        raise UnknownSuiteError(f"unknown suite {text!r}{which}; valid suites: {', '.join(list_suites(task))}")
    info = suites.get(base)
    if info.takes_arg and not arg:
        raise UnknownSuiteError(f"suite {base!r} needs an argument, e.g. {base}:<name>")
    if not info.takes_arg and arg:
        raise UnknownSuiteError(f"suite {base!r} takes no argument (got {text!r})")
    if base == "adv":
        from .attacks import get_attack

        get_attack(arg)
    return base, arg or None


def _checked(names: list[str], task: str) -> list[tuple[str, str | None]]:
    """Every suite name parsed before any work (an unknown one is one line); none at all is refused."""
    if not names:
        raise UsageError("nothing to evaluate: pass --data/--ood/--attack or --suite NAME (see `grace list suites`)")
    return [parse_suite(n, task) for n in names]


def expand_shorthands(data: str | None = None, ood: list[str] = (), attack: str | None = None,
                      suites: list[str] = ()) -> tuple[list[str], dict[str, str]]:
    """``grace eval``'s shorthands -> ``(suite names, {NAME: DIR} sets)``: ``--data`` adds ``id``, each ``--ood SET``
    adds ``ood:SET`` (a ``NAME=DIR`` also registers NAME), ``--attack A`` adds ``adv:A``; then the ``--suite``
    names; duplicates are dropped, order kept."""
    names, sets = [], {}
    if data:
        names.append("id")
    for o in ood:
        for item in (x.strip() for x in str(o).split(",")):
            if not item:
                continue
            name, path = split_named(item, "--ood")
            if name is not None:
                sets[name] = path
                item = name
            names.append(f"ood:{item}")
    if attack:
        names.append(f"adv:{attack}")
    names += list(suites)
    out = []
    for n in names:
        if n not in out:
            out.append(n)
    return out, sets


def run_suites(loaded, names: list[str], ctx: SuiteContext) -> dict:
    """Run the suites of ``ctx.task`` in order (names validated first); return the task's report with every result
    under ``"suites"``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is joined by ``ctx.prepare`` (once; a no-op when
    ``evaluate`` already did); every rank returns the same report, and callers write it on rank 0
    (``runtime.is_main``). ``ctx.device`` ``auto`` becomes this rank's GPU, else the CPU."""
    from grace_plugin.runtime import barrier

    parsed = _checked(names, ctx.task)
    suites = _suites_of(ctx.task)
    ctx.prepare()
    ctx.suite_names = list(names)
    t0 = time.perf_counter()
    barrier()  # ranks start apart (imports, model load): that wait is start-up, not the suites' per-image work
    waited = time.perf_counter() - t0

    results, seconds = {}, {}
    for name, (base, arg) in zip(names, parsed):
        log.info("suite %s", name)
        t0 = time.perf_counter()
        results[name] = suites.get(base).fn(loaded, ctx, arg)
        seconds[name] = round(time.perf_counter() - t0, 3)
    report = _EVAL_TASKS.get(ctx.task).report(loaded, results, ctx)
    report["suites"] = results
    report["seconds"] = seconds  # wall time per suite on this rank (not a result: excluded from comparisons)
    # fixed costs on this rank (``evaluate`` adds imports and model load): building heads (text tower forwards,
    # shared by the ranks) happens inside the suites' seconds above
    report["startup"] = {"process_group": round(ctx.stats.process_group, 3), "wait_for_ranks": round(waited, 3),
                         "heads": round(ctx.stats.heads, 3)}
    return report


def context_config(ctx: SuiteContext) -> dict:
    """What every report records of the evaluation's settings (``config``)."""
    from grace_plugin.runtime import world_info

    return {"task": ctx.task, "suites": list(ctx.suite_names),
            "id_set": [ctx.id_set[0], str(ctx.id_set[1])] if ctx.id_set else None,
            "sets": {k: str(v) for k, v in ctx.sets.items()}, "data_root": str(ctx.data_root or "") or None,
            "eps": ctx.eps, "norm": ctx.norm, "n_adv": ctx.n_adv, "batch_size": ctx.batch_size,
            "scoring": ctx.scoring, "mapping": {k: str(v) for k, v in ctx.mapping_files.items()},
            "strict": ctx.strict, "decode": ctx.decode, "device": ctx.device, "seed": ctx.seed,
            "world_size": world_info()[1], "rank_split": dict(ctx.stats.rank_split)}


def _classification_report(loaded, results: dict, ctx: SuiteContext) -> dict:
    """The three-axis report (``report.build_report``): ID, the OOD sets, and the Adv axis (the worst case over the
    attacks when several ran on the same first --n-adv samples)."""
    from .report import build_report

    roles = ("id", "ood", "transfer")
    datasets = {r["dataset"]: {k: v for k, v in r.items() if k not in ("kind", "dataset", "path")} | {"role": r["kind"]}
                for r in results.values() if r["kind"] in roles}
    id_name = next((r["dataset"] for r in results.values() if r["kind"] == "id"), None)
    ood_names = [r["dataset"] for r in results.values() if r["kind"] == "ood"]
    attacked = [r for r in results.values() if r["kind"] == "adv"]
    if len(attacked) > 1:
        from .evaluate import worst_case

        adv = worst_case(attacked)
    else:
        adv = next((r for r in results.values() if r["kind"] in ("adv", "robustbench")), None)
    return build_report(loaded.name, datasets, id_name, ood_names, adv, context_config(ctx))


def _load_classifier(spec, ctx: SuiteContext):
    from registry import load_model

    if spec is None:
        raise UsageError("--model is required (only --task vqa --predictions scores result files without one)")
    return load_model(spec, device=ctx.device)


def _write_classification(out, report: dict, ctx: SuiteContext):
    from .report import write_report

    return write_report(out, report)


def _classification_markdown(report: dict) -> str:
    from .report import report_markdown

    return report_markdown(report)


def _classification_id_scores(report: dict, name: str) -> tuple:
    """Top-1 and robust top-1 (the Adv axis) of the ID set, and its feature spread."""
    return (report["datasets"][name]["top1"], (report.get("adversarial") or {}).get("robust_acc"),
            report["datasets"][name].get("feature_spread"))


register_eval_task(EvalTask("classification", _load_classifier, _classification_report, _write_classification,
                            _classification_markdown, _classification_id_scores))


def id_scores(report: dict, ctx: SuiteContext) -> tuple:
    """``(clean, robust, feature spread)`` of ``ctx``'s ID set in ``report``, read by its task (``EvalTask``)."""
    return _EVAL_TASKS.get(ctx.task).id_scores(report, ctx.id_set[0])


def write_evaluation(out, report: dict, ctx: SuiteContext):
    """Write ``report`` (and what the task writes beside it) to the folder ``out``; the path of the report."""
    return _EVAL_TASKS.get(ctx.task).write(out, report, ctx)


def evaluation_markdown(report: dict, task: str = "classification") -> str:
    return _EVAL_TASKS.get(task).markdown(report)


def evaluate(model, names: list[str], ctx: SuiteContext) -> dict:
    """``grace eval``: every suite name checked before any work, the runtime set up once (``ctx.prepare``), the
    model loaded by the task's loader (classification: a run folder, weights file, CLIP folder, timm name; VQA:
    ``eval_suites.vqa``), or given loaded, the suites run. The report's ``startup`` gives the fixed costs (imports,
    process group, model load, waiting for ranks, heads) apart from the suites' per-image seconds."""
    from grace_plugin.runtime import process_age

    imports = process_age()
    _checked(names, ctx.task)  # before the model loads
    ctx.suite_names = list(names)  # (a task's loader may refuse what it cannot run, e.g. an attack on result files)
    ctx.prepare()
    t0 = time.perf_counter()
    loaded = _EVAL_TASKS.get(ctx.task).load(model, ctx) if model is None or isinstance(model, str) else model
    model_load = time.perf_counter() - t0
    report = run_suites(loaded, names, ctx)
    report["startup"] = {"imports": None if imports is None else round(imports, 3),
                         "model_load": round(model_load, 3)} | report["startup"]
    return report
