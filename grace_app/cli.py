"""The ``grace`` command-line app: parse arguments, call library functions, print. Nothing else lives here.

It sits on top of the library (grace_plugin, registry, eval_suites) and the experiments (grace_app.studies,
grace_app.testbed), importing each lazily inside the command that needs it.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]


from .parser import build_parser as _parser  # noqa: F401 (tests read the parser through the cli)


def _cmd_synth(a) -> int:
    from grace_app.testbed.vqa_world import VqaWorldSpec, write_vqa_world
    from grace_app.testbed.world import SyntheticWorldSpec, write_synthetic_world

    if a.task == "vqa":
        meta = write_vqa_world(a.out, seed=a.seed, spec=VqaWorldSpec.small() if a.size == "small" else VqaWorldSpec())
    else:
        spec = SyntheticWorldSpec.small() if a.size == "small" else SyntheticWorldSpec()
        meta = write_synthetic_world(a.out, seed=a.seed, spec=spec, progress=True, world=a.world)
    for name, splits in meta["counts"].items():
        print(f"{name:10s} " + "  ".join(f"{k}={v}" for k, v in splits.items()))
    print(f"wrote {a.out}")
    return 0


def _cmd_train(a) -> int:
    from grace_plugin.finetune import build_config, fine_tune
    from grace_plugin.recipes import get_recipe_class

    get_recipe_class(a.recipe)
    overrides = (list(a.overrides) + ([f"train.device={a.device}"] if a.device else [])
                 + ([f"data.task={a.task}"] if a.task else []))
    cfg = build_config(a.recipe, config_file=a.config, overrides=overrides, steps=a.steps, epochs=a.epochs)
    out = fine_tune(a.recipe, a.init, a.data, a.out, cfg, progress=not a.no_progress, resume=bool(a.resume))
    print(f"wrote {out / 'model.safetensors'} and {out / 'checkpoint.json'}")
    return 0


def _cmd_eval(a) -> int:
    import contextlib

    from grace_plugin.runfolder import folder_lock

    # one writer per --out (report, resume state); under torchrun rank 0 holds the lock for every rank
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with folder_lock(a.out, what="eval output folder") if rank0 else contextlib.nullcontext():
        return _cmd_eval_locked(a)


def _cmd_eval_locked(a) -> int:
    from eval_suites.context import ShiftOptions, SuiteContext
    from eval_suites.engine import evaluate, evaluation_markdown, expand_shorthands, write_evaluation
    from grace_plugin.runtime import is_main

    names, sets = expand_shorthands(a.data, a.ood, a.attack, a.suite + (["shift"] if a.shift else []))
    ctx = SuiteContext(task=a.task, id_set=a.data, sets=sets, data_root=a.data_root, eps=a.eps, norm=a.norm,
                       n_adv=a.n_adv, batch_size=a.batch_size, num_workers=a.num_workers, decode=a.decode,
                       device=a.device, seed=a.seed, strict=a.strict, scoring=a.scoring, mapping_files=a.mapping,
                       unit_input=a.unit_input, out_dir=a.out, imagenet_dir=a.imagenet_dir,
                       corruptions_dir=a.corruptions_dir, n_imagenet=a.n_imagenet, reference=a.reference,
                       model_info_name=a.model_info_name, progress=not a.no_progress,
                       shift=ShiftOptions(n=a.n_shift), predictions=a.predictions,
                       answers_min_count=a.answers_min_count)
    report = evaluate(a.model, names, ctx)
    if is_main():
        path = write_evaluation(a.out, report, ctx)
        print(evaluation_markdown(report, a.task))
        print(f"wrote {path}")
    return 0


def _cmd_report(a) -> int:
    from eval_suites.report import aggregate_reports

    res = aggregate_reports(a.runs, a.out, table=None if a.table.lower() == "none" else a.table)
    print(Path(res["paths"]["md"]).read_text())
    print("wrote " + ", ".join(str(v) for v in res["paths"].values()))
    return 0


def _cmd_quickstart(a) -> int:
    from eval_suites.report import summary_markdown
    from grace_app.studies.quickstart import QuickstartConfig, run_quickstart
    from grace_plugin.recipes import get_recipe_class, list_recipes

    if a.task == "vqa":
        return _quickstart_vqa(a)
    if a.backbone != "clip":
        from grace_plugin.errors import UsageError

        raise UsageError("--backbone: a flag of `grace quickstart --task vqa` (classification runs a CLIP)")
    recipes = ("ft,tecoa,grace" if a.recipes is None else a.recipes).split(",")
    recipes = list_recipes() if recipes == ["all"] else [r.strip() for r in recipes if r.strip()]
    for r in recipes:
        get_recipe_class(r)
    cfg = QuickstartConfig(out=Path(a.out), seed=a.seed, recipes=recipes, steps=a.steps, n_adv=a.n_adv or 200,
                           overrides=a.overrides, size=a.size, pretrain_steps=a.pretrain_steps,
                           pretrain_threads=a.pretrain_threads, seeds=a.seeds, world=a.world, device=a.device)
    res = run_quickstart(cfg, progress=not a.no_progress)
    print()
    print(summary_markdown(res["rows"], definition="strict"))
    print(summary_markdown([r["paper"] for r in res["rows"]], definition="paper"))
    print(res["legend"] + "\n")
    print(res["origin"] + "\n")
    print(f"wrote {res['paths']['json']}, {res['paths']['md']}, {res['paths']['png']} "
          f"({res['seconds']:.0f} s)")
    return 0


def _quickstart_vqa(a) -> int:
    from grace_app.studies.quickstart_vqa import VQA_METHODS, VqaQuickstartConfig, run_vqa_quickstart

    from grace_plugin.errors import UsageError

    for flag, given in (("--set", a.overrides), ("--seeds", a.seeds != 1), ("--world", a.world != "v2"),
                        ("--pretrain-threads", a.pretrain_threads)):
        if given:
            raise UsageError(f"{flag}: not a flag of `grace quickstart --task vqa`")
    rows = list(VQA_METHODS) if a.recipes in (None, "all") else [r.strip() for r in a.recipes.split(",")]
    cfg = VqaQuickstartConfig(out=Path(a.out), seed=a.seed, methods=rows, steps=a.steps, device=a.device,
                              n_adv=100 if a.n_adv is None else a.n_adv, size=a.size, pretrain_steps=a.pretrain_steps,
                              backbone=a.backbone)
    res = run_vqa_quickstart(cfg, progress=not a.no_progress)
    print("\n" + res["md"] + f"\nwrote {res['paths']['md']} ({res['seconds']:.0f} s)")
    return 0


def _parse_seeds(text: str) -> tuple[int, list[int] | None]:
    """``--seeds``: ``N`` -> (N, None); ``4-7`` / ``0,2,5`` / ``0-2,5`` -> (count, the listed seeds)."""
    import re

    from grace_plugin.errors import UsageError

    text = str(text).strip()
    if text.isdigit():
        if int(text) < 1:
            raise UsageError(f"--seeds {text}: expected at least 1")
        return int(text), None
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise UsageError(f"--seeds {text!r}: expected a count (3) or run seeds (4-7, 0,2,5)")
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if hi and int(hi) < int(lo):
            raise UsageError(f"--seeds {text!r}: range {part} runs backwards")
        seeds += [s for s in range(int(lo), int(hi or lo) + 1) if s not in seeds]
    return len(seeds), seeds


STUDY_ONLY, TUNE_ONLY = ("seeds", "n_adv"), ("trials", "n_val_adv", "rescore_seeds", "write", "no_write", "task")
CONTROLS_ONLY = ("control", "arms")
FRAMES_ONLY = ("n_shift", "no_judge", "status")


def _refuse_flags(a, names: tuple[str, ...], command: str) -> None:
    from grace_plugin.errors import UsageError

    given = [n for n in names if getattr(a, n) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag}: not a flag of `{command}` (see `grace study --help`)")


def _cmd_study(a) -> int:
    """A named study (studies.yaml): its rows trained, evaluated and judged; `study tune` goes to ``_cmd_tune``."""
    from grace_app.studies.runner import StudyConfig, run_study

    _refuse_flags(a, TUNE_ONLY, f"grace study {a.name}")
    if a.name == "frames":
        return _cmd_frames(a)
    _refuse_flags(a, FRAMES_ONLY + ("backbones",), f"grace study {a.name}")
    if a.name == "controls":
        return _cmd_controls(a)
    _refuse_flags(a, CONTROLS_ONLY, f"grace study {a.name}")
    count, run_seeds = _parse_seeds(a.seeds or "1")
    cfg = StudyConfig(name=a.name, out=Path(a.out or Path("studies") / a.name), seed=a.seed, seeds=count,
                      run_seeds=run_seeds, steps=a.steps or 300, n_adv=600 if a.n_adv is None else a.n_adv,
                      device=a.device, size=a.size, pretrain_steps=a.pretrain_steps,
                      pretrain_threads=a.pretrain_threads, overrides=a.overrides,
                      methods=[m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None)
    res = run_study(cfg, progress=not a.no_progress)
    print(Path(res["paths"]["md"]).read_text())
    print(f"wrote {res['paths']['json']}, {res['paths']['md']}, {res['paths']['png']} ({res['doc']['seconds']:.0f} s)")
    return 0


def _comma_list(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


def _cmd_controls(a) -> int:
    """`grace study controls`: the positive controls (grace_app/studies/controls.py), judged and written as a page."""
    from grace_app.studies.controls import CONTROLS, ControlsConfig, run_controls

    count, run_seeds = _parse_seeds(a.seeds or "3")
    cfg = ControlsConfig(out=Path(a.out or Path("studies") / "controls"),
                         controls=_comma_list(a.control) or list(CONTROLS), seed=a.seed,
                         run_seeds=run_seeds or list(range(count)), steps=a.steps, arms=_comma_list(a.arms),
                         n_adv=200 if a.n_adv is None else a.n_adv, device=a.device, size=a.size,
                         pretrain_steps=a.pretrain_steps, pretrain_threads=a.pretrain_threads)
    if a.methods or a.overrides:
        from grace_plugin.errors import UsageError

        raise UsageError(f"{'--methods' if a.methods else '--set'}: not a flag of `grace study controls` (its arms "
                         "are fixed by each control; --arms picks some)")
    doc = run_controls(cfg)
    print((cfg.out / "controls.md").read_text())
    print(f"wrote {cfg.out / 'controls.json'}, {cfg.out / 'controls.md'} ({len(doc['controls'])} controls)")
    return 0


def _cmd_frames(a) -> int:
    """`grace study frames` (grace_app/studies/frames.py): rows x backbones x seeds on the VQA world, judged."""
    from grace_app.studies.frames import BACKBONES, FRAMES_ROWS, FramesConfig, frames_status, run_frames
    from grace_plugin.errors import UsageError

    _refuse_flags(a, CONTROLS_ONLY, "grace study frames")
    if a.overrides or a.pretrain_threads:
        raise UsageError(f"{'--set' if a.overrides else '--pretrain-threads'}: not a flag of `grace study frames`")
    count, run_seeds = _parse_seeds(a.seeds or "5")
    cfg = FramesConfig(out=Path(a.out or Path("studies") / "frames"), seed=a.seed,
                       seeds=run_seeds or list(range(count)), backbones=_comma_list(a.backbones) or list(BACKBONES),
                       methods=_comma_list(a.methods) or list(FRAMES_ROWS), steps=a.steps or 300,
                       n_adv=100 if a.n_adv is None else a.n_adv, n_shift=a.n_shift or 200, size=a.size,
                       pretrain_steps=a.pretrain_steps, device=a.device, judge=not a.no_judge)
    if a.status:
        print(frames_status(cfg))
        return 0
    res = run_frames(cfg, progress=not a.no_progress)
    if res["doc"] is not None:
        print((cfg.out / "frames.md").read_text())
        print(f"wrote {cfg.out / 'frames.json'}, {cfg.out / 'frames.md'} ({res['seconds']:.0f} s)")
    else:
        print(f"lane done ({res['seconds']:.0f} s); the page is written by an invocation without --no-judge")
    return 0


def _cmd_tune(a) -> int:
    """`grace study tune`: the tuning protocol (tuning.yaml) for --methods; writes the selection to tuned.yaml."""
    from grace_app.studies.tuning import TuneConfig, run_tuning
    from grace_app.testbed.configs import installed_copy, testbed_dir
    from grace_plugin.errors import UsageError

    _refuse_flags(a, STUDY_ONLY + CONTROLS_ONLY + FRAMES_ONLY, "grace study tune")
    if not a.methods:
        raise UsageError("grace study tune needs --methods, e.g. --methods ft,tecoa,grace")
    if not (a.write or a.no_write) and installed_copy():
        raise UsageError("grace study tune: the testbed configs are the installed package's copy "
                         f"({testbed_dir()}); pass --write PATH/tuned.yaml (a copy of configs/testbed, then "
                         "GRACE_TESTBED_CONFIGS=PATH) or --no-write")
    task = a.task or "classification"
    backbone = (_comma_list(a.backbones) or ["clip"])
    if len(backbone) != 1 or backbone[0] not in ("clip", "coca") or (task != "vqa" and backbone != ["clip"]):
        raise UsageError(f"--backbones {a.backbones}: `grace study tune` takes one, clip or coca (coca: --task vqa)")
    backbone = backbone[0]
    # the VQA world's selection never moves the other's, nor one backbone's the other's
    tuned = "tuned.yaml" if task != "vqa" else "tuned-vqa.yaml" if backbone == "clip" else f"tuned-vqa-{backbone}.yaml"
    write = None if a.no_write else Path(a.write) if a.write else testbed_dir() / tuned
    cfg = TuneConfig(methods=[m.strip() for m in a.methods.split(",") if m.strip()],
                     out=Path(a.out or Path("studies") / "tune"), trials=a.trials, steps=a.steps, seed=a.seed,
                     device=a.device, size=a.size, pretrain_steps=a.pretrain_steps,
                     pretrain_threads=a.pretrain_threads, n_val_adv=a.n_val_adv, overrides=a.overrides,
                     write=write, rescore_seeds=a.rescore_seeds, task=task, backbone=backbone)
    res = run_tuning(cfg, progress=not a.no_progress)
    print(Path(res["paths"]["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in res["paths"].values()))
    return 0


def _cmd_shards(a) -> int:
    from grace_plugin.data.convert import convert_imagefolder
    from grace_plugin.errors import UsageError

    if a.format == "classification":
        from grace_plugin.vqa.classification import classification_to_vqa

        if not a.source_set:
            raise UsageError("--format classification needs --source-set (a classification shard set)")
        print(classification_to_vqa(a.source_set, a.out, split=a.split, name=a.name, group=a.group,
                                    maxcount=a.maxcount).summary())
        return 0
    if a.format != "imagefolder":
        from grace_plugin.vqa.convert import convert_vqa

        if not a.images:
            raise UsageError(f"--format {a.format} needs --images (the folder its image paths are relative to)")
        r = convert_vqa(a.format, {"records": a.records, "questions": a.questions, "annotations": a.annotations,
                                   "image_pattern": a.image_pattern}, a.images, a.out, split=a.split or "test",
                        name=a.name, group=a.group, maxcount=a.maxcount, strict=a.strict)
        print(r.summary())
        return 0
    if not a.imagefolder:
        raise UsageError("--format imagefolder needs --imagefolder")
    r = convert_imagefolder(a.imagefolder, a.out, layout=a.layout, split=a.split, maxcount=a.maxcount,
                            workers=a.workers, prefix=a.prefix, progress=True)
    print(f"{r.out}: {r.samples} samples from {r.classes} classes in {r.shards} shards ({r.layout}, split "
          f"{r.split}; {r.skipped_existing} complete shards reused); counts verified")
    return 0


def _parse_info(items: list[str]) -> dict:
    from grace_plugin.errors import UsageError

    info = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--info {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        info[k.strip()] = v
    return info


def _cmd_register(a) -> int:
    from grace_plugin.checkpoint import load_run_meta
    from grace_plugin.errors import UsageError
    from registry.publish import register_run

    if load_run_meta(a.run_dir).get("task") == "vqa":
        from registry.vqa_entries import register_vqa_run

        folder = register_vqa_run(a.run_dir, a.name, out_dir=a.weights_dir, report=a.report)
        print(f"wrote {folder} (card.json, README.md); evaluate with grace eval --task vqa --model {a.name}",
              file=sys.stderr)
        print(a.name)
        return 0
    if a.report:
        raise UsageError("--report: a VQA run's card carries a VQA report; a classifier's card takes --info")
    res = register_run(a.run_dir, a.name, dataset=a.dataset, threat_model=a.threat_model, out_dir=a.weights_dir,
                       templates=a.templates, model_info=_parse_info(a.info), hf_hub_id=a.hub_id)
    print(f"wrote {res.folder}", file=sys.stderr)
    if a.weights_dir:
        print(f"(set GRACE_WEIGHTS_DIR={a.weights_dir} so that `import registry` finds it)", file=sys.stderr)
    print(res.timm_name)
    return 0


def _cmd_export(a) -> int:
    from grace_plugin.errors import UsageError
    from registry.publish import export_open_clip, export_timm_hub

    if a.format == "open_clip":
        res = export_open_clip(a.run_dir, a.out, name=a.name)
        print(f"wrote {res['config']} and {res['weights']}; load with open_clip.add_model_config(...) and "
              f"open_clip.create_model_and_transforms({res['name']!r}, pretrained=...)")
    else:
        if not a.name:
            raise UsageError("--format timm-hub needs --name RB_NAME (the timm architecture in config.json)")
        res = export_timm_hub(a.run_dir, a.out, a.name, dataset=a.dataset, threat_model=a.threat_model,
                              templates=a.templates)
        print(f"wrote {res['config']} and {res['weights']} (architecture {res['timm_name']})")
    return 0


def _cmd_wise_ft_sweep(a) -> int:
    from eval_suites.context import SuiteContext
    from eval_suites.engine import expand_shorthands
    from grace_app.studies.quickstart import run_wise_ft_sweep
    from grace_plugin.errors import UsageError

    try:
        alphas = [float(v) for v in a.alphas.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--alphas {a.alphas!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not alphas or any(not 0.0 <= v <= 1.0 for v in alphas):
        raise UsageError(f"--alphas {a.alphas!r}: every alpha must be in [0, 1]")
    names, sets = expand_shorthands(a.data, a.ood, a.attack)
    ctx = SuiteContext(id_set=a.data, sets=sets, eps=a.eps, n_adv=a.n_adv, device=a.device)
    res = run_wise_ft_sweep(a.zero_shot, a.finetuned, names, ctx, alphas, out=a.out)
    for p in res["points"]:
        print(f"alpha={p['alpha']:.2f}  " + "  ".join(f"{k}={p[k]}" for k in ("id", "ood", "adv", "hm")))
    print("frontier: " + ", ".join(f"{p['alpha']:.2f}" for p in res["frontier"]))
    print(f"wrote {Path(a.out) / 'wise_ft_sweep.json'}")
    return 0


def _cmd_results(a) -> int:
    from grace_app.studies.publish import add_source, regenerate

    for path in a.add:
        print(f"added {add_source(path, a.data)}")
    for page in regenerate(a.data, a.out, a.mkdocs or None):
        print(f"wrote {page}")
    return 0


def _cmd_list(a) -> int:
    if a.kind == "recipes":
        from grace_plugin.recipes import list_recipes

        names = list_recipes()
    elif a.kind == "models":
        from registry import list_grace_models, list_vqa_models

        names = list_vqa_models() if a.task == "vqa" else list_grace_models()
    elif a.kind == "layouts":
        from grace_plugin.data.shards import list_layouts

        names = list_layouts()
    elif a.kind == "suites":
        from eval_suites.engine import list_suites

        names = list_suites(a.task)
    else:
        from eval_suites.attacks import list_attacks

        names = list_attacks()
    print("\n".join(names))
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    # raised inside open_clip's import
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*")
    parser = _parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import grace_plugin  # noqa: F401  (autoattack shim)
    from grace_plugin.errors import GraceError
    from grace_plugin.preemption import PREEMPTED_EXIT, Preempted

    handlers = {"synth": _cmd_synth, "train": _cmd_train, "eval": _cmd_eval, "quickstart": _cmd_quickstart,
                "list": _cmd_list, "shards": _cmd_shards, "register": _cmd_register, "export": _cmd_export,
                "wise-ft-sweep": _cmd_wise_ft_sweep, "report": _cmd_report,
                "study": lambda a: (_cmd_tune if a.name == "tune" else _cmd_study)(a), "results": _cmd_results}
    # GraceError is the user-mistake family (grace_plugin.errors): one line, exit 2. Anything else is a bug in this
    # package: its traceback is printed and the exit status is 1.
    from grace_plugin.runtime import close_distributed

    in_step = False  # every torchrun rank is known to be at the same place (a finished command, agreed preemption)
    try:
        rc = handlers[a.command](a)
        in_step = True
        return rc
    except Preempted as e:  # a training run's state is saved (train, or one inside quickstart or a study)
        from grace_plugin.preemption import requeue_slurm_job
        from grace_plugin.runtime import is_main

        in_step = True
        if is_main():  # under torchrun every rank stops after the same step; rank 0 speaks
            how = "continue with --resume" if a.command == "train" else "run the same command again to continue"
            print(f"grace {a.command}: {e}; {how} (exit {PREEMPTED_EXIT})", file=sys.stderr)
            if getattr(a, "requeue", False):
                print(f"grace {a.command}: {requeue_slurm_job()}", file=sys.stderr)
        return PREEMPTED_EXIT
    except GraceError as e:
        if os.environ.get("GRACE_DEBUG"):
            raise
        print(f"grace {a.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk is one line wherever the write happened (log, report, state)
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("GRACE_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"grace {a.command}: error: {where}no space left on the device", file=sys.stderr)
        return 2
    finally:
        close_distributed(sync=in_step)


def _one_line(e: BaseException) -> str:
    """The error's message; one raised inside a DataLoader worker arrives wrapped in the worker's traceback, whose
    last line is the original message."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
