"""The ``grace`` command-line app: parse arguments, call library functions, print. Nothing else lives here.

It sits on top of the library (grace_plugin, registry, eval_suites) and the experiments (grace_app.studies,
grace_app.testbed), importing each lazily inside the command that needs it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]


PRETRAIN_THREADS_HELP = ("torch threads the tiny CLIP is pretrained under (default 1; the thread count changes "
                         "the model, so it is pinned and part of the cache key)")
EVAL_DESCRIPTION = """Every evaluation is a list of suites, run in order into one report (--out/report.json).
The shorthands expand into suites, placed before the --suite names (duplicates dropped):

  --data [NAME=]DIR   the ID set, and suite `id`
  --ood SET           suite `ood:SET` (repeatable, or SET,SET,...); SET is NAME=DIR, a folder, or a
                      catalogued name (eval_suites/catalogue.yaml) resolved under --data-root
  --attack NAME       suite `adv:NAME` on the first --n-adv ID samples

so `--data D --ood imagenet-r --attack apgd-ce` is `--data D --suite id --suite ood:imagenet-r --suite
adv:apgd-ce`. A set is scored the same whichever way it is named: the catalogue's scoring (own head, the
ID head restricted to its class subset, or a class mapping), --scoring/--mapping overrides, expected and
unaccounted samples, --strict, --decode. Under `torchrun --nproc_per_node N -m grace_app eval ...` the
batches are split over the ranks, per-sample results gathered, and rank 0 writes the one-process report.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grace", description="Robust fine-tuning of CLIP: GRACE and baselines, "
                                "timm/RobustBench registration, three-axis evaluation.")
    p.add_argument("--verbose", "-v", action="store_true", help="info-level logs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the synthetic testbed (WebDataset shards, CLIP_benchmark layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--world", choices=["v1", "v2"], default="v2",
                   help="world version: v2 (calibrated on the baselines) or v1 (the first design, for comparison)")
    s.add_argument("--size", choices=["default", "small"], default="default",
                   help="small: a few hundred images, for smoke tests")

    t = sub.add_parser("train", help="fine-tune a CLIP with a recipe")
    t.add_argument("--recipe", required=True)
    t.add_argument("--init", required=True, help="CLIP folder (e.g. quickstart's pretrained/) or NAME:PRETRAINED")
    t.add_argument("--data", required=True, help="shard set folder with a train split")
    t.add_argument("--out", required=True, help="run folder to write")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int)
    g.add_argument("--epochs", type=float)
    t.add_argument("--config", help="YAML with train/data/recipe sections (deltas only)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-5 --set recipe.rho=0.1")
    t.add_argument("--resume", nargs="?", const="auto", choices=["auto"],
                   help="auto (also the bare flag): continue a killed or preempted run from its state, extend a "
                        "finished one to more --steps, start afresh on an empty RUN_DIR; a changed config is refused")
    t.add_argument("--requeue", action="store_true",
                   help="when preempted (train.preempt_signals), rank 0 also runs `scontrol requeue $SLURM_JOB_ID`")
    t.add_argument("--device", help="auto (CUDA when available, the default of train.device), cuda, cuda:1, cpu")
    t.add_argument("--task", choices=["classification", "vqa"], help="data.task (default classification): vqa "
                   "trains a CLIP VQA model on a VQA set (grace shards convert --format frames|coco-vqa)")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="evaluate a model: a list of suites (ID, OOD, adversarial, ...)",
                       description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", required=True, help="run folder, weights file, CLIP folder or timm model name")
    e.add_argument("--data", metavar="[NAME=]DIR",
                   help="ID set: a shard set or an ImageNet val folder (named 'id' unless NAME=); adds suite id")
    e.add_argument("--ood", action="append", default=[], metavar="SET[,SET...]",
                   help="adds suite ood:SET per set: NAME=DIR, a folder, or a catalogued name under --data-root")
    e.add_argument("--attack", help="adds suite adv:ATTACK (see `grace list attacks`)")
    e.add_argument("--eps", default="4/255", help="l_inf radius, e.g. 4/255 or 0.0157")
    e.add_argument("--norm", default="Linf")
    e.add_argument("--n-adv", type=int, default=500)
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--num-workers", type=int, default=0)
    e.add_argument("--decode", choices=["pil", "tensor"], default="pil",
                   help="shard image decoding: pil (timm's/RobustBench's preprocessing exactly) or tensor "
                        "(torchvision decode + tensor resize, about 2x faster, within 2 grey levels of PIL)")
    e.add_argument("--device", default="auto", help="auto (CUDA when available; each torchrun rank its GPU), cuda, cpu")
    e.add_argument("--strict", action="store_true", help="any skipped or unaccounted sample is an error")
    e.add_argument("--scoring", choices=["own", "subset", "mapping"],
                   help="override the catalogue's scoring of OOD sets (own head / ID head restricted / mapped)")
    e.add_argument("--mapping", action="append", default=[], metavar="NAME=FILE",
                   help="class mapping JSON for a set scored by 'mapping' "
                        "(e.g. objectnet=objectnet_to_imagenet_1k.json)")
    e.add_argument("--out", required=True)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--task", choices=["classification", "vqa"], default="classification",
                   help="vqa: VQA accuracy per set (--data NAME=DIR the ID set, --ood NAME=DIR each OOD set), "
                        "ID / near / far / OOD means, predictions/<set>.json in the VQA result format")
    e.add_argument("--predictions", action="append", default=[], metavar="[SET=]FILE",
                   help="vqa: score this result file ([{question_id, answer}]) instead of running --model")
    e.add_argument("--answers-min-count", type=int, default=9, help="vqa, zero-shot (a CLIP --model): answers")
    e.add_argument("--suite", action="append", default=[], metavar="NAME",
                   help="run registered suites after the shorthands' (repeatable; see `grace list suites`): id, "
                        "ood:<set>, adv:<attack>, transfer:<set>, corruptions, geometry, shift, robustbench")
    e.add_argument("--data-root", default=os.environ.get("GRACE_DATA"),
                   help="root of the data sets: `--ood imagenet-r` and ood:<name>/transfer:<name> resolve to its "
                        "catalogued folder (eval_suites/catalogue.yaml) or <root>/<name> (default $GRACE_DATA)")
    e.add_argument("--imagenet-dir", help="ImageNet folder holding val/<wnid>/ (suite robustbench)")
    e.add_argument("--corruptions-dir", help="folder holding ImageNet-C/<corruption>/<severity>/ (suite corruptions)")
    e.add_argument("--n-imagenet", type=int, default=5000, help="images of RobustBench's ImageNet subset")
    e.add_argument("--unit-input", action="store_true", default=None,
                   help="assert the model takes [0,1] input when it does not declare it")
    e.add_argument("--reference", help="pretrained model for the parameter drift (suite geometry)")
    e.add_argument("--model-info-name", help="write RobustBench model_info/<dataset>/<threat>/<NAME>.json")
    e.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("report", help="aggregate run folders' report.json into one table and plot")
    r.add_argument("runs", nargs="+", metavar="RUN", help="folders holding report.json (or the files)")
    r.add_argument("--out", required=True, help="folder for summary.json, summary.md, tradeoff.png")
    r.add_argument("--table", default="Table 6", help="paper reference table beside the runs ('none' to omit)")

    q = sub.add_parser("quickstart", help="the whole flow on the embedded testbed in minutes on a CPU")
    q.add_argument("--out", default="quickstart")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--recipes", default="ft,tecoa,grace", help="comma-separated recipe names, or 'all'")
    q.add_argument("--steps", type=int, default=300, help="fine-tuning steps per recipe")
    q.add_argument("--n-adv", type=int, default=200, help="ID images attacked per model")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every recipe run, e.g. --set train.batch_size=32")
    q.add_argument("--size", choices=["default", "small"], default="default", help="small: a smoke run")
    q.add_argument("--seeds", type=int, default=1, help="fine-tune and attack with this many seeds; mean and spread")
    q.add_argument("--pretrain-steps", type=int, help="tiny-CLIP pretraining steps (default 1500)")
    q.add_argument("--pretrain-threads", type=int, help=PRETRAIN_THREADS_HELP)
    q.add_argument("--world", choices=["v1", "v2"], default="v2", help="synthetic world version (see grace synth)")
    q.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cpu")
    q.add_argument("--no-progress", action="store_true")

    st = sub.add_parser("study", help="a named study on the testbed (configs/testbed/studies.yaml: table6, table7, "
                        "table8, geometry, shift, cost) with verdicts on the paper's claims; or `study tune`: the "
                        "tuning protocol (its own command path and flags)")
    st.add_argument("name", help="study name (table6, table7, table8, geometry, shift, cost) or 'tune'")
    st.add_argument("--out", help="output folder (default studies/NAME)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--steps", type=int, help="fine-tuning steps per run (study default 300; tune: tuning.yaml)")
    st.add_argument("--size", choices=["default", "small"], default="default", help="small: a smoke run")
    st.add_argument("--pretrain-steps", type=int, help="tiny-CLIP pretraining steps")
    st.add_argument("--pretrain-threads", type=int, help=PRETRAIN_THREADS_HELP)
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field of every run, e.g. --set train.batch_size=32")
    st.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cpu")
    st.add_argument("--methods", help="tune: comma-separated methods of configs/testbed/methods.yaml; a study: only "
                    "these of its rows (e.g. to add seeds to two rows; finished runs are reused)")
    st.add_argument("--no-progress", action="store_true")
    sg = st.add_argument_group("a named study only")
    sg.add_argument("--seeds", help="seeds per row: N (seeds seed..seed+N-1; default 1), or a list/range of run "
                    "seeds on --seed's world, e.g. 4-7 or 0,2,5 (to split a study over processes on one --out)")
    sg.add_argument("--n-adv", type=int, help="ID images attacked per model (default 600: the whole ID test split "
                    "of the default world)")
    tg = st.add_argument_group("study tune only")
    tg.add_argument("--trials", type=int, help="trials per method (default: tuning.yaml's)")
    tg.add_argument("--n-val-adv", type=int, help="validation images attacked per trial")
    tg.add_argument("--rescore-seeds", type=int, help="seeds the top trials are scored on (default: tuning.yaml's; "
                    "1: no re-scoring)")
    tg.add_argument("--write", help="tuned.yaml to update (default configs/testbed/tuned.yaml)")
    tg.add_argument("--no-write", action="store_true", default=None, help="do not write the selected values")

    sh = sub.add_parser("shards", help="shard utilities")
    shs = sh.add_subparsers(dest="shards_command", required=True)
    cv = shs.add_parser("convert", help="ImageFolder tree or VQA records -> WebDataset shards (verified)")
    cv.add_argument("--format", default="imagefolder", help="imagefolder (--imagefolder) or a VQA record format: "
                    "frames (--records), coco-vqa (--questions, --annotations, --image-pattern); VQA sets need "
                    "--images and are written in the vqa layout (grace_plugin.vqa.records.list_formats)")
    cv.add_argument("--imagefolder")
    cv.add_argument("--records", help="frames: the record list (question_id, question, image, answer)")
    cv.add_argument("--questions", help="coco-vqa: the questions JSON")
    cv.add_argument("--annotations", help="coco-vqa: the annotations JSON")
    cv.add_argument("--images", help="VQA formats: the folder image paths are relative to")
    cv.add_argument("--image-pattern", help="coco-vqa: image file name from image_id, e.g. "
                    "COCO_val2014_{image_id:012d}.jpg")
    cv.add_argument("--name", help="VQA formats: the set's name (default: the --out folder's name)")
    cv.add_argument("--group", choices=["id", "near", "far"], help="VQA formats: the set's FRAMES-VQA group")
    cv.add_argument("--strict", action="store_true", help="VQA formats: refuse the set on a missing or unreadable "
                    "image instead of skipping and counting the question")
    cv.add_argument("--out", required=True)
    cv.add_argument("--layout", default="clip_benchmark", help="a registered shard layout: clip_benchmark, timm "
                    "(grace_plugin.data.shards.list_layouts)")
    cv.add_argument("--split", help="split name (default: test for clip_benchmark, validation for timm)")
    cv.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    cv.add_argument("--workers", type=int, default=2)
    cv.add_argument("--prefix", default="imagenet1k", help="timm layout shard name prefix")

    w = sub.add_parser("wise-ft-sweep", help="WiSE-FT: evaluate (1-a) zero-shot + a fine-tuned for a list of alphas")
    w.add_argument("--zero-shot", required=True, help="the CLIP folder the run started from (its --init)")
    w.add_argument("--finetuned", required=True, help="run folder at alpha = 1 (e.g. an ft run)")
    w.add_argument("--data", required=True, metavar="[NAME=]DIR", help="ID shard set")
    w.add_argument("--ood", action="append", default=[], metavar="NAME=DIR")
    w.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated mixing coefficients in [0, 1]")
    w.add_argument("--attack", help="optional: also measure Adv (registered attack name)")
    w.add_argument("--eps", default="4/255")
    w.add_argument("--n-adv", type=int, default=500)
    w.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cpu")
    w.add_argument("--out", required=True)

    ls = sub.add_parser("list", help="list registered names")
    ls.add_argument("kind", choices=["recipes", "attacks", "models", "suites", "layouts"])

    r = sub.add_parser("register", help="publish a run under its timm and RobustBench names")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--name", required=True, help="RobustBench name, e.g. Grace2026Gram_ViT-B-32")
    r.add_argument("--dataset", default="imagenet", help="RobustBench dataset whose head is built (imagenet)")
    r.add_argument("--threat-model", default="Linf", help="Linf, L2, corruptions")
    r.add_argument("--weights-dir",
                   help="registry folder (default $GRACE_WEIGHTS_DIR or ~/.cache/grace_plugin/weights)")
    r.add_argument("--templates", default="openai", help="prompt set for the head: openai (80) or simple (7)")
    r.add_argument("--hub-id", help="Hugging Face repo id recorded in the card (weights fallback when not local)")
    r.add_argument("--info", action="append", default=[], metavar="FIELD=VALUE",
                   help="RobustBench ModelInfo field for the card, e.g. --info authors='A. B' --info venue=CVPR")

    x = sub.add_parser("export", help="export a run as an open_clip model or a timm hub folder")
    x.add_argument("run_dir", metavar="RUN_DIR")
    x.add_argument("--format", required=True, choices=["open_clip", "timm-hub"])
    x.add_argument("--out", required=True)
    x.add_argument("--name", help="open_clip: the model config name; timm-hub: the RobustBench name (required)")
    x.add_argument("--dataset", default="imagenet")
    x.add_argument("--threat-model", default="Linf")
    x.add_argument("--templates", default="openai")

    rs = sub.add_parser("results", help="regenerate docs/results/ from study and bench outputs (docs/results/data/)")
    rs.add_argument("--add", action="append", default=[], metavar="PATH",
                    help="first copy this output into --data: a quickstart or study folder, or a bench JSON")
    rs.add_argument("--data", default="docs/results/data", help="the sources (default docs/results/data)")
    rs.add_argument("--out", default="docs/results", help="where the pages go (default docs/results)")
    rs.add_argument("--mkdocs", default="mkdocs.yml", help="its Results nav block is rewritten ('' to leave it)")
    return p


def _cmd_synth(a) -> int:
    from grace_app.testbed.world import SyntheticWorldSpec, write_synthetic_world

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


def _cmd_eval_vqa(a) -> int:
    from eval_suites.vqa import run_vqa_eval

    md = run_vqa_eval(a.model, a.data, a.ood, a.out, predictions=a.predictions, device=a.device,
                      batch_size=a.batch_size, answers_min_count=a.answers_min_count)
    if int(os.environ.get("RANK", "0")) == 0:
        print(md)
    return 0


def _cmd_eval_locked(a) -> int:
    if a.task == "vqa":
        return _cmd_eval_vqa(a)
    from eval_suites.context import SuiteContext
    from eval_suites.engine import evaluate, expand_shorthands
    from eval_suites.report import report_markdown, write_report
    from grace_plugin.runtime import is_main

    names, sets = expand_shorthands(a.data, a.ood, a.attack, a.suite)
    ctx = SuiteContext(id_set=a.data, sets=sets, data_root=a.data_root, eps=a.eps, norm=a.norm, n_adv=a.n_adv,
                       batch_size=a.batch_size, num_workers=a.num_workers, decode=a.decode, device=a.device,
                       seed=a.seed, strict=a.strict, scoring=a.scoring, mapping_files=a.mapping,
                       unit_input=a.unit_input, out_dir=a.out, imagenet_dir=a.imagenet_dir,
                       corruptions_dir=a.corruptions_dir, n_imagenet=a.n_imagenet, reference=a.reference,
                       model_info_name=a.model_info_name, progress=not a.no_progress)
    report = evaluate(a.model, names, ctx)
    if is_main():
        path = write_report(a.out, report)
        print(report_markdown(report))
        print(f"wrote {path}")
    return 0


def _cmd_report(a) -> int:
    from eval_suites.report import aggregate_reports

    res = aggregate_reports(a.runs, a.out, table=None if a.table.lower() == "none" else a.table)
    print(Path(res["paths"]["md"]).read_text())
    print(f"wrote {res['paths']['json']}, {res['paths']['md']}, {res['paths']['png']}")
    return 0


def _cmd_quickstart(a) -> int:
    from eval_suites.report import summary_markdown
    from grace_app.studies.quickstart import QuickstartConfig, run_quickstart
    from grace_plugin.recipes import get_recipe_class, list_recipes

    recipes = list_recipes() if a.recipes == "all" else [r.strip() for r in a.recipes.split(",") if r.strip()]
    for r in recipes:
        get_recipe_class(r)
    cfg = QuickstartConfig(out=Path(a.out), seed=a.seed, recipes=recipes, steps=a.steps, n_adv=a.n_adv,
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


STUDY_ONLY, TUNE_ONLY = ("seeds", "n_adv"), ("trials", "n_val_adv", "rescore_seeds", "write", "no_write")


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


def _cmd_tune(a) -> int:
    """`grace study tune`: the tuning protocol (tuning.yaml) for --methods; writes the selection to tuned.yaml."""
    from grace_app.studies.tuning import TuneConfig, run_tuning
    from grace_app.testbed.configs import installed_copy, testbed_dir
    from grace_plugin.errors import UsageError

    _refuse_flags(a, STUDY_ONLY, "grace study tune")
    if not a.methods:
        raise UsageError("grace study tune needs --methods, e.g. --methods ft,tecoa,grace")
    if not (a.write or a.no_write) and installed_copy():
        raise UsageError("grace study tune: the testbed configs are the installed package's copy "
                         f"({testbed_dir()}); pass --write PATH/tuned.yaml (a copy of configs/testbed, then "
                         "GRACE_TESTBED_CONFIGS=PATH) or --no-write")
    write = None if a.no_write else Path(a.write) if a.write else testbed_dir() / "tuned.yaml"
    cfg = TuneConfig(methods=[m.strip() for m in a.methods.split(",") if m.strip()],
                     out=Path(a.out or Path("studies") / "tune"), trials=a.trials, steps=a.steps, seed=a.seed,
                     device=a.device, size=a.size, pretrain_steps=a.pretrain_steps,
                     pretrain_threads=a.pretrain_threads, n_val_adv=a.n_val_adv, overrides=a.overrides,
                     write=write, rescore_seeds=a.rescore_seeds)
    res = run_tuning(cfg, progress=not a.no_progress)
    print(Path(res["paths"]["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in res["paths"].values()))
    return 0


def _cmd_shards(a) -> int:
    from grace_plugin.data.convert import convert_imagefolder
    from grace_plugin.errors import UsageError

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
    from registry.publish import register_run

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
        from registry import list_grace_models

        names = list_grace_models()
    elif a.kind == "layouts":
        from grace_plugin.data.shards import list_layouts

        names = list_layouts()
    elif a.kind == "suites":
        from eval_suites.engine import list_suites

        names = list_suites()
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
