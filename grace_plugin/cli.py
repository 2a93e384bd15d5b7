"""The ``grace`` command-line app: parse arguments, call library functions, print. Nothing else lives here.

This module is the one place allowed to import all three packages (grace_plugin, registry, eval_suites); it does
so lazily inside each command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _named_dir(text: str, default_name: str | None = None) -> tuple[str, str]:
    if "=" in text and not Path(text).exists():
        name, path = text.split("=", 1)
        if not name or not path:
            raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
        return name, path
    if default_name is None:
        return Path(text.rstrip("/")).name, text
    return default_name, text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grace", description="Robust fine-tuning of CLIP: GRACE and baselines, "
                                "timm/RobustBench registration, three-axis evaluation.")
    p.add_argument("--verbose", "-v", action="store_true", help="info-level logs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the synthetic testbed (WebDataset shards, CLIP_benchmark layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
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
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/train_state.pt")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="three-axis evaluation of a model on shard sets")
    e.add_argument("--model", required=True, help="run folder, weights file, CLIP folder or timm model name")
    e.add_argument("--data", metavar="[NAME=]DIR",
                   help="ID set: a shard set or an ImageNet val folder (named 'id' unless NAME=)")
    e.add_argument("--ood", action="append", default=[], metavar="NAME=DIR")
    e.add_argument("--attack", help="registered attack name (see `grace list attacks`)")
    e.add_argument("--eps", default="4/255", help="l_inf radius, e.g. 4/255 or 0.0157")
    e.add_argument("--norm", default="Linf")
    e.add_argument("--n-adv", type=int, default=500)
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--num-workers", type=int, default=0)
    e.add_argument("--decode", choices=["pil", "tensor"], default="pil",
                   help="shard image decoding: pil (timm's/RobustBench's preprocessing exactly) or tensor "
                        "(torchvision decode + tensor resize, about 2x faster, within 2 grey levels of PIL)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--strict", action="store_true", help="any skipped sample is an error")
    e.add_argument("--scoring", choices=["own", "subset", "mapping"],
                   help="override the catalogue's scoring of OOD sets (own head / ID head restricted / mapped)")
    e.add_argument("--mapping", action="append", default=[], metavar="NAME=FILE",
                   help="class mapping JSON for a set scored by 'mapping' (e.g. objectnet=objectnet_to_imagenet_1k.json)")
    e.add_argument("--out", required=True)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--suite", action="append", default=[], metavar="NAME",
                   help="run registered suites (repeatable; see `grace list suites`): id, ood:<set>, adv:<attack>, "
                        "transfer:<set>, corruptions, geometry, shift, robustbench")
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
    q.add_argument("--recipes", default="ft,grace", help="comma-separated recipe names, or 'all'")
    q.add_argument("--steps", type=int, default=300, help="fine-tuning steps per recipe")
    q.add_argument("--n-adv", type=int, default=200, help="ID images attacked per model")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every recipe run, e.g. --set train.batch_size=32")
    q.add_argument("--size", choices=["default", "small"], default="default", help="small: a smoke run")
    q.add_argument("--seeds", type=int, default=1, help="fine-tune and attack with this many seeds; mean and spread")
    q.add_argument("--pretrain-steps", type=int, help="tiny-CLIP pretraining steps (default 1500)")
    q.add_argument("--no-progress", action="store_true")

    sh = sub.add_parser("shards", help="shard utilities")
    shs = sh.add_subparsers(dest="shards_command", required=True)
    cv = shs.add_parser("convert", help="ImageFolder tree -> WebDataset shards (parallel, resumable, verified)")
    cv.add_argument("--imagefolder", required=True)
    cv.add_argument("--out", required=True)
    cv.add_argument("--layout", choices=["clip_benchmark", "timm"], default="clip_benchmark")
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
    w.add_argument("--device", default="cpu")
    w.add_argument("--out", required=True)

    ls = sub.add_parser("list", help="list registered names")
    ls.add_argument("kind", choices=["recipes", "attacks", "models", "suites"])

    r = sub.add_parser("register", help="publish a run under its timm and RobustBench names")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--name", required=True, help="RobustBench name, e.g. Grace2026Gram_ViT-B-32")
    r.add_argument("--dataset", default="imagenet", help="RobustBench dataset whose head is built (imagenet)")
    r.add_argument("--threat-model", default="Linf", help="Linf, L2, corruptions")
    r.add_argument("--weights-dir", help="registry folder (default $GRACE_WEIGHTS_DIR or ~/.cache/grace_plugin/weights)")
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
    return p


def _cmd_synth(a) -> int:
    from grace_plugin.data.synthetic import SyntheticWorldSpec, write_synthetic_world

    spec = SyntheticWorldSpec.small() if a.size == "small" else SyntheticWorldSpec()
    meta = write_synthetic_world(a.out, seed=a.seed, spec=spec, progress=True)
    for name, splits in meta["counts"].items():
        print(f"{name:10s} " + "  ".join(f"{k}={v}" for k, v in splits.items()))
    print(f"wrote {a.out}")
    return 0


def _cmd_train(a) -> int:
    from grace_plugin.finetune import build_config, fine_tune
    from grace_plugin.recipes import get_recipe_class

    get_recipe_class(a.recipe)
    cfg = build_config(a.recipe, config_file=a.config, overrides=a.overrides, steps=a.steps, epochs=a.epochs)
    out = fine_tune(a.recipe, a.init, a.data, a.out, cfg, progress=not a.no_progress, resume=a.resume)
    print(f"wrote {out / 'model.safetensors'} and {out / 'checkpoint.json'}")
    return 0


def _cmd_eval(a) -> int:
    from grace_plugin.runfolder import folder_lock

    with folder_lock(a.out, what="eval output folder"):  # one writer per --out (report, resume state)
        return _cmd_eval_locked(a)


def _cmd_eval_locked(a) -> int:
    from eval_suites.attacks import get_attack, parse_eps
    from eval_suites.report import report_markdown, write_report
    from eval_suites.runner import EvalRequest, evaluate_model
    from registry import load_model

    eps = parse_eps(a.eps)
    if a.attack:
        get_attack(a.attack)
    if a.suite:
        return _eval_suites(a, eps)
    if not a.data:
        raise ValueError("--data is required (or name suites with --suite)")
    from eval_suites.shardsets import get_shardset, resolve_set_dir

    def catalogued(text):
        if "=" not in text and not Path(text).exists() and get_shardset(text) is not None:
            if not a.data_root:
                raise ValueError(f"--ood {text}: a catalogued set name needs --data-root (or pass {text}=DIR)")
            return text, str(resolve_set_dir(text, a.data_root))
        return _named_dir(text)

    id_set = _named_dir(a.data, default_name="id") if "=" not in a.data else _named_dir(a.data)
    ood = [catalogued(o) for o in a.ood]
    mappings = dict(_named_dir(m) for m in a.mapping)
    req = EvalRequest(id_set=id_set, ood_sets=ood, attack=a.attack, eps=eps, norm=a.norm, n_adv=a.n_adv,
                      batch_size=a.batch_size, num_workers=a.num_workers, device=a.device, strict=a.strict,
                      scoring=a.scoring, mapping_files=mappings, decode=a.decode)
    report = evaluate_model(load_model(a.model, device=a.device), req, progress=not a.no_progress)
    path = write_report(a.out, report)
    print(report_markdown(report))
    print(f"wrote {path}")
    return 0


def _eval_suites(a, eps: float) -> int:
    from eval_suites.report import report_markdown, write_report
    from eval_suites.suites import SuiteContext, parse_suite, run_suites
    from registry import load_model

    for name in a.suite:
        parse_suite(name)
    id_set = None
    if a.data:
        id_set = _named_dir(a.data, default_name="id") if "=" not in a.data else _named_dir(a.data)
    ctx = SuiteContext(id_set=id_set, sets=dict(_named_dir(o) for o in a.ood), data_root=a.data_root, eps=eps,
                       norm=a.norm, n_adv=a.n_adv, batch_size=a.batch_size, num_workers=a.num_workers, decode=a.decode,
                       device=a.device, seed=a.seed, strict=a.strict, unit_input=a.unit_input, out_dir=a.out,
                       imagenet_dir=a.imagenet_dir, corruptions_dir=a.corruptions_dir, n_imagenet=a.n_imagenet,
                       reference=a.reference, model_info_name=a.model_info_name, progress=not a.no_progress)
    report = run_suites(load_model(a.model, device=a.device), a.suite, ctx)
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
    from eval_suites.study import QuickstartConfig, run_quickstart
    from grace_plugin.recipes import get_recipe_class, list_recipes

    recipes = list_recipes() if a.recipes == "all" else [r.strip() for r in a.recipes.split(",") if r.strip()]
    for r in recipes:
        get_recipe_class(r)
    cfg = QuickstartConfig(out=Path(a.out), seed=a.seed, recipes=recipes, steps=a.steps, n_adv=a.n_adv,
                           overrides=a.overrides, size=a.size, pretrain_steps=a.pretrain_steps,
                           seeds=a.seeds)
    res = run_quickstart(cfg, progress=not a.no_progress)
    print()
    print(summary_markdown(res["rows"]))
    print(f"wrote {res['paths']['json']}, {res['paths']['md']}, {res['paths']['png']} "
          f"({res['seconds']:.0f} s)")
    return 0


def _cmd_shards(a) -> int:
    from grace_plugin.data.convert import convert_imagefolder

    r = convert_imagefolder(a.imagefolder, a.out, layout=a.layout, split=a.split, maxcount=a.maxcount,
                            workers=a.workers, prefix=a.prefix, progress=True)
    print(f"{r.out}: {r.samples} samples from {r.classes} classes in {r.shards} shards ({r.layout}, split "
          f"{r.split}; {r.skipped_existing} complete shards reused); counts verified")
    return 0


def _parse_info(items: list[str]) -> dict:
    info = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--info {item!r}: expected FIELD=VALUE")
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
    from registry.publish import export_open_clip, export_timm_hub

    if a.format == "open_clip":
        res = export_open_clip(a.run_dir, a.out, name=a.name)
        print(f"wrote {res['config']} and {res['weights']}; load with open_clip.add_model_config(...) and "
              f"open_clip.create_model_and_transforms({res['name']!r}, pretrained=...)")
    else:
        if not a.name:
            raise ValueError("--format timm-hub needs --name RB_NAME (the timm architecture in config.json)")
        res = export_timm_hub(a.run_dir, a.out, a.name, dataset=a.dataset, threat_model=a.threat_model,
                              templates=a.templates)
        print(f"wrote {res['config']} and {res['weights']} (architecture {res['timm_name']})")
    return 0


def _cmd_wise_ft_sweep(a) -> int:
    from eval_suites.attacks import parse_eps
    from eval_suites.runner import EvalRequest
    from eval_suites.study import run_wise_ft_sweep

    try:
        alphas = [float(v) for v in a.alphas.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--alphas {a.alphas!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not alphas or any(not 0.0 <= v <= 1.0 for v in alphas):
        raise ValueError(f"--alphas {a.alphas!r}: every alpha must be in [0, 1]")
    id_set = _named_dir(a.data, default_name="id") if "=" not in a.data else _named_dir(a.data)
    req = EvalRequest(id_set=id_set, ood_sets=[_named_dir(o) for o in a.ood], attack=a.attack,
                      eps=parse_eps(a.eps), n_adv=a.n_adv, device=a.device)
    res = run_wise_ft_sweep(a.zero_shot, a.finetuned, req, alphas, out=a.out)
    for p in res["points"]:
        print(f"alpha={p['alpha']:.2f}  " + "  ".join(f"{k}={p[k]}" for k in ("id", "ood", "adv", "hm")))
    print("frontier: " + ", ".join(f"{p['alpha']:.2f}" for p in res["frontier"]))
    print(f"wrote {Path(a.out) / 'wise_ft_sweep.json'}")
    return 0


def _cmd_list(a) -> int:
    if a.kind == "recipes":
        from grace_plugin.recipes import list_recipes

        names = list_recipes()
    elif a.kind == "models":
        from registry import list_grace_models

        names = list_grace_models()
    elif a.kind == "suites":
        from eval_suites.suites import list_suites

        names = list_suites()
    else:
        from eval_suites.attacks import list_attacks

        names = list_attacks()
    print("\n".join(names))
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*")  # raised inside open_clip's import
    parser = _parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import grace_plugin  # noqa: F401  (autoattack shim)
    from grace_plugin.errors import GraceError

    handlers = {"synth": _cmd_synth, "train": _cmd_train, "eval": _cmd_eval, "quickstart": _cmd_quickstart,
                "list": _cmd_list, "shards": _cmd_shards, "register": _cmd_register, "export": _cmd_export,
                "wise-ft-sweep": _cmd_wise_ft_sweep, "report": _cmd_report}
    # GraceError is the user-mistake family (grace_plugin.errors). FileNotFoundError/ValueError are still caught here
    # while the library's remaining plain raises are moved into that family.
    expected = (GraceError, FileNotFoundError, ValueError)
    try:
        return handlers[a.command](a)
    except expected as e:
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
