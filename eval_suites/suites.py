"""The evaluation engine: a suite registry (README "Evaluation suites"), a suite name -> ``(loaded, ctx, arg) -> dict``.

Every evaluation is a list of suites. Names: ``id``, ``ood:<set>``, ``transfer:<set>``, ``adv:<attack>``,
``corruptions``, ``geometry``, ``shift``, ``robustbench``. ``<set>`` is ``NAME=DIR``, a folder, or a name resolved by
``SuiteContext.resolve_set`` (``--ood NAME=DIR`` sets, then the catalogue's folder or ``<data_root>/<NAME>``). The
ID set is a shard set or an ImageNet val folder (then RobustBench's fixed 5000-image subset is used:
``load_imagenet`` in https://github.com/RobustBench/robustbench/blob/master/robustbench/data.py). ``grace eval``'s
``--data/--ood/--attack`` are shorthands (``expand_shorthands``):

    --data [NAME=]DIR   -> the ID set, and the suite ``id``
    --ood SET           -> the suite ``ood:SET`` (SET as above; NAME=DIR also names the set for other suites)
    --attack NAME       -> the suite ``adv:NAME`` (on the ID set)

placed before the ``--suite`` names, duplicates dropped. Whichever way a set is named, it is scored the same way:
the catalogue's scoring (``own`` head from its class names, the ID head restricted to its ``subset`` of classes, or
a ``mapping``), ``--scoring``/``--mapping`` overrides, ``expected``/``unaccounted`` counts and ``--strict``.

``run_suites(loaded, names, ctx)`` runs them in order and returns the report (``report.build_report``) with every
suite's result under ``"suites"``. Under ``torchrun`` every suite splits its batches over the ranks and gathers the
per-batch records (``eval_suites.distributed``): each rank returns the one-process report. A new suite is one
``@register_suite`` function; ``grace eval --suite NAME`` and ``tests/test_suites.py`` pick it up.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch

from grace_plugin.registries import Registry, first_doc_line
from grace_plugin.errors import GraceError, UsageError

from .context import EvalSet, SetScoringError, SuiteContext

__all__ = ["register_suite", "list_suites", "get_suite", "parse_suite", "UnknownSuiteError", "run_suites",
           "expand_shorthands"]

log = logging.getLogger(__name__)


class UnknownSuiteError(GraceError, KeyError):
    pass



@dataclass(frozen=True)
class SuiteInfo:
    name: str
    fn: Callable
    takes_arg: bool
    description: str


_SUITES: Registry[SuiteInfo] = Registry("suite", UnknownSuiteError)


def register_suite(name: str, takes_arg: bool = False, description: str = ""):
    return _SUITES.register(name, lambda fn: SuiteInfo(name, fn, takes_arg, description or first_doc_line(fn)))


def list_suites() -> list[str]:
    """Registered names; those taking an argument are listed as ``name:<arg>``."""
    return sorted(f"{k}:<{'attack' if k == 'adv' else 'set'}>" if v.takes_arg else k for k, v in _SUITES.items())


def parse_suite(text: str) -> tuple[str, str | None]:
    """``"adv:apgd-ce"`` -> ``("adv", "apgd-ce")``; an unknown name or a missing/extra argument is an error."""
    base, _, arg = str(text).partition(":")
    if base not in _SUITES:
        raise UnknownSuiteError(f"unknown suite {text!r}; valid suites: {', '.join(list_suites())}")
    info = _SUITES.get(base)
    if info.takes_arg and not arg:
        raise UnknownSuiteError(f"suite {base!r} needs an argument, e.g. {base}:<name>")
    if not info.takes_arg and arg:
        raise UnknownSuiteError(f"suite {base!r} takes no argument (got {text!r})")
    if base == "adv":
        from .attacks import get_attack

        get_attack(arg)
    return base, arg or None


def get_suite(name: str) -> SuiteInfo:
    return _SUITES.get(parse_suite(name)[0])


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
            if "=" in item and not Path(item).exists():
                name, path = item.split("=", 1)
                if not name or not path:
                    raise UsageError(f"--ood {item!r}: expected NAME=DIR, a folder or a catalogued set name")
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


def _say_head(name: str, head: dict) -> None:
    """A head other than the model's own, or its own head kept without names, is said on stderr (and in the
    report): a fine-tuned head is never replaced silently."""
    if head["head"] == "rebuilt" or "no class names" in head["reason"]:
        log.warning("%s: %s head (%d classes): %s", name, head["head"], head["classes"], head["reason"])


def _model_for(loaded, ctx: SuiteContext, classnames, templates, set_name: str = ""):
    """``(classifier, head)`` for a class list, cached; the head's notice is printed once per class list."""
    key = ("model", tuple(classnames or ()))
    if key not in ctx.cache:
        t0 = time.perf_counter()
        model, head = loaded.head_for(classnames, templates, device=ctx.device, share_ranks=True)  # every rank
        ctx.cache[key] = (model.to(ctx.device).eval(), head)
        ctx.cache["head_seconds"] = ctx.cache.get("head_seconds", 0.0) + time.perf_counter() - t0
        if set_name:
            _say_head(set_name, head)
    return ctx.cache[key]


def _read(es: EvalSet, transform, ctx: SuiteContext, n: int | None, limit: int | None = None, whole: bool = False,
          num_classes: int | None = None):
    """``es``'s batches (this rank's, unless ``whole``) with the context's batch size, workers and decoder; labels
    at or above ``num_classes`` (default: the set's class names) are counted as ``label_out_of_range``."""
    return es.batches(transform, ctx.batch_size, n, ctx.num_workers, ctx.decode, limit=limit, whole=whole,
                      num_classes=num_classes)


def _own_head(loaded, ctx: SuiteContext, es: EvalSet):
    """``(classifier, head, classes)`` scoring ``es`` by its own class names; a set without names (e.g. timm's
    wds layout: ``_info.json`` and ``.cls``) is scored with the model's own head, its labels taken as head indices,
    which the report's ``head`` and stderr say; labels beyond that head are then refused."""
    if es.classnames:
        model, head = _model_for(loaded, ctx, es.classnames, es.templates, es.name)
        return model, head, len(es.classnames)
    if loaded.clip is not None:  # a bare CLIP has no head of its own
        from grace_plugin.data.shards import ShardSetError

        raise ShardSetError(f"{es.path}/classnames.txt: missing or empty; a CLIP zero-shot head needs one class name "
                            "per line in label order")
    model, head = _model_for(loaded, ctx, None, None, es.name)
    return model, head, head["classes"]


def _labels_fit(res, es: EvalSet, classes: int) -> None:
    bad = res.skipped.get("label_out_of_range", 0)
    if not bad:
        return
    if es.classnames:
        raise SetScoringError(f"{es.path}: {bad} samples have labels beyond the {classes} names of its "
                              "classnames.txt; the class list and the labels disagree")
    raise SetScoringError(f"{es.path}: {bad} samples have labels beyond the model's {classes}-class head, and the set "
                          "has no classnames.txt to build a head for them")


def _transform(loaded):
    from grace_plugin.data.transforms import eval_transform

    return eval_transform(loaded.pretrained_cfg)


def _id_head_names(loaded, ctx: SuiteContext, es: EvalSet) -> tuple[list[str], list[str] | None]:
    """The ID head's class names (subset and mapping scoring): the ID set's, else the model's own."""
    if ctx.id_set is not None:
        ids = ctx.id_eval_set()
        if ids.classnames:
            return ids.classnames, ids.templates
    if loaded.classnames:
        return loaded.classnames, loaded.meta.get("templates") or None
    raise SetScoringError(f"{es.name}: scoring through the ID head needs the ID class names: pass --data (the ID "
                          "set) or use a model that records its class names")


def _scoring_for(ctx: SuiteContext, es: EvalSet, role: str) -> str:
    if role != "ood":
        return "own"  # id: its own head; transfer: by definition a head built from the set's names
    from .shardsets import SCORINGS

    scoring = ctx.scoring or (es.entry.scoring if es.entry is not None else "own")
    if scoring not in SCORINGS:
        raise UsageError(f"--scoring {scoring!r}: valid: {', '.join(SCORINGS)}")
    return scoring


def _clean(loaded, ctx: SuiteContext, es: EvalSet, role: str) -> dict:
    """Clean top-1 of a set, scored by the catalogue's rule (or ``--scoring``), with every sample accounted for."""
    from .evaluate import account, evaluate_clean
    from .shardsets import apply_mapping, match_class_subset

    scoring = _scoring_for(ctx, es, role)
    key = ("clean", es.name, str(es.path), scoring)
    if key not in ctx.cache:
        subset = targets = None
        classes = None
        if scoring == "own":
            model, head, classes = _own_head(loaded, ctx, es)
        else:
            if not es.classnames:
                raise SetScoringError(f"{es.path}: scoring {scoring!r} needs the set's classnames.txt")
            id_names, id_templates = _id_head_names(loaded, ctx, es)
            model, head = _model_for(loaded, ctx, id_names, id_templates, es.name)
            if scoring == "subset":
                subset = match_class_subset(es.classnames, id_names)
            else:
                mfile = ctx.mapping_files.get(es.name) or (es.entry.mapping_file if es.entry is not None else None)
                if not mfile:
                    raise SetScoringError(f"{es.name}: scoring 'mapping' needs a mapping file: --mapping "
                                          f"{es.name}=FILE (e.g. ObjectNet's objectnet_to_imagenet_1k.json)")
                targets = apply_mapping(mfile, es.classnames, id_names)
        n = ctx.n_imagenet if es.kind == "imagenet" else None
        if es.kind == "shards":  # how the ranks share this set (the report's config.rank_split)
            from grace_plugin.data.loader import rank_split
            from grace_plugin.runtime import world_info

            ctx.cache.setdefault("rank_split", {})[es.name] = rank_split(len(es.urls), world_info()[1])
        res = evaluate_clean(model, _read(es, _transform(loaded), ctx, n, num_classes=classes), device=ctx.device,
                             progress=ctx.progress, desc=f"eval {es.name}", class_subset=subset,
                             label_targets=targets, model_name=loaded.name)
        res.expected = es.expected
        _labels_fit(res, es, classes or len(es.classnames or []))
        account(res, f"set {es.name} ({es.path})", es.unlisted, ctx.strict)
        paper = es.entry.paper if es.entry is not None else None
        ctx.cache[key] = dict(res.as_dict(), scoring=scoring, head=head, paper_column=paper)
    return dict(ctx.cache[key], kind=role, dataset=es.name, path=str(es.path))


@register_suite("id")
def _suite_id(loaded, ctx: SuiteContext, arg=None) -> dict:
    """Clean top-1 on the ID set."""
    return _clean(loaded, ctx, ctx.id_eval_set(), "id")


@register_suite("ood", takes_arg=True)
def _suite_ood(loaded, ctx: SuiteContext, arg: str) -> dict:
    """Clean top-1 on an OOD set, scored by the catalogue (own / subset / mapping) or --scoring."""
    return _clean(loaded, ctx, ctx.eval_set(*ctx.resolve_set(arg)), "ood")


@register_suite("transfer", takes_arg=True)
def _suite_transfer(loaded, ctx: SuiteContext, arg: str) -> dict:
    """Zero-shot top-1 on another set's classes (head built from its classnames; not in the OOD axis)."""
    return _clean(loaded, ctx, ctx.eval_set(*ctx.resolve_set(arg)), "transfer")


def _adv_signature(loaded, model, es: EvalSet, ctx: SuiteContext, n: int) -> dict:
    """What an adversarial result was computed from: a resume state must match all of it."""
    from .evaluate import model_sha256

    return {"weights_sha256": model_sha256(model), "data": es.files_signature(n),
            "batch_size": ctx.batch_size, "decode": ctx.decode, "order": "shard order; batch (s, k) = records "
            "k*B..k*B+B-1 of shard s"}


def _run_adv(loaded, ctx: SuiteContext, es: EvalSet, model, attack: str, n: int, state_name: str | None,
             classes: int | None = None):
    from .evaluate import evaluate_adversarial

    state = None
    if ctx.out_dir is not None and state_name:
        state = Path(ctx.out_dir) / "state" / f"{state_name}.json"
        state.parent.mkdir(parents=True, exist_ok=True)
    return evaluate_adversarial(model, _read(es, _transform(loaded), ctx, n, limit=n, num_classes=classes), attack,
                                ctx.eps, n_max=n,
                                norm=ctx.norm, device=ctx.device, seed=ctx.seed, progress=ctx.progress,
                                state_path=state, unit_input=ctx.unit_input, model_name=loaded.name,
                                # the signature (a sha256 over the weights) is only needed to match a resume state
                                signature=_adv_signature(loaded, model, es, ctx, n) if state is not None else None)


@register_suite("adv", takes_arg=True)
def _suite_adv(loaded, ctx: SuiteContext, arg: str) -> dict:
    """Robust accuracy under a registered attack on the first --n-adv ID samples (fp32, [0,1] models, resumable)."""
    es = ctx.id_eval_set()
    model, head, classes = _own_head(loaded, ctx, es)
    n = min(ctx.n_adv, 5000) if es.kind == "imagenet" else ctx.n_adv
    res = _run_adv(loaded, ctx, es, model, arg, n, f"adv-{arg}-{ctx.norm}", classes)
    out = dict(res.as_dict(), kind="adv", dataset=es.name, head=head,
               subset="robustbench-imagenet-5000" if es.kind == "imagenet" else None)
    if ctx.model_info_name and ctx.out_dir is not None:
        from grace_plugin.runtime import is_main
        from .leaderboard import write_model_info

        dataset = "imagenet" if es.kind == "imagenet" else es.name
        name = ctx.model_info_name if arg == "autoattack" else f"{ctx.model_info_name}_{arg}"
        if is_main():
            write_model_info(ctx.out_dir, name, dataset, ctx.norm, clean_acc=res.clean_acc,
                             robust_acc=res.robust_acc, eps=ctx.eps)
        out["model_info"] = str(Path(ctx.out_dir) / "model_info" / dataset / ctx.norm / f"{name}.json")
    return out


@register_suite("robustbench")
def _suite_robustbench(loaded, ctx: SuiteContext, arg=None) -> dict:
    """robustbench.eval.benchmark (standard AutoAttack) on --imagenet-dir; writes RobustBench model_info JSON."""
    from .attacks import check_unit_input
    from grace_plugin.runtime import is_main, world_info
    from .imagenet import check_imagenet_folder, imagenet_classnames
    from .leaderboard import run_robustbench, write_model_info

    if ctx.imagenet_dir is None:
        raise UsageError("suite 'robustbench' needs --imagenet-dir DIR (the folder holding val/<wnid>/...)")
    check_imagenet_folder(ctx.imagenet_dir, ctx.n_imagenet)  # before the 1000-class head is built
    names, templates = imagenet_classnames()
    model, head = _model_for(loaded, ctx, names, templates, "imagenet")
    check_unit_input(model, ctx.unit_input, name=loaded.name)
    if world_info()[1] > 1:
        # robustbench.eval.benchmark reads the whole subset in one process; over ranks, each attacks its batches of
        # the same subset with the same standard AutoAttack (pyautoattack version='standard', what benchmark runs)
        es = ctx.eval_set("imagenet", ctx.imagenet_dir)
        res = _run_adv(loaded, ctx, es, model, "autoattack", min(ctx.n_imagenet, 5000), f"robustbench-{ctx.norm}")
        out = dict(clean_acc=res.clean_acc, robust_acc=res.robust_acc, n=res.n, eps=ctx.eps, threat=ctx.norm,
                   clean_correct=res.clean_correct, robust_correct=res.robust_correct, precision="fp32",
                   runner=f"pyautoattack standard, {world_info()[1]} ranks (batches of the RobustBench subset)")
    else:
        res = run_robustbench(model, ctx.imagenet_dir, _transform(loaded), eps=ctx.eps, threat=ctx.norm,
                              n=ctx.n_imagenet, batch_size=ctx.batch_size, device=ctx.device)
        out = res.as_dict()
        out.update(clean_correct=round(res.clean_acc * res.n / 100), robust_correct=round(res.robust_acc * res.n / 100))
    out = dict(out, kind="robustbench", dataset="imagenet", head=head)
    if ctx.out_dir is not None:
        name = ctx.model_info_name or _rb_name(loaded.name)
        if is_main():
            write_model_info(ctx.out_dir, name, "imagenet", ctx.norm, clean_acc=out["clean_acc"],
                             robust_acc=out["robust_acc"], eps=ctx.eps)
        out["model_info"] = str(Path(ctx.out_dir) / "model_info" / "imagenet" / ctx.norm / f"{name}.json")
    return out


def _rb_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(str(name).rstrip("/")).name) or "model"


@register_suite("corruptions")
def _suite_corruptions(loaded, ctx: SuiteContext, arg=None) -> dict:
    """ImageNet-C accuracy (15 corruptions x 5 severities, RobustBench subset) and mCE vs the shipped AlexNet row."""
    from torchvision import transforms

    from .evaluate import evaluate_clean
    from .imagenet import CORRUPTIONS, imagenet_c_batches, imagenet_classnames
    from .leaderboard import corruption_scores, write_model_info

    if ctx.corruptions_dir is None:
        raise UsageError("suite 'corruptions' needs --corruptions-dir DIR (holding ImageNet-C/<corruption>/<1-5>/)")
    root = Path(ctx.corruptions_dir)
    root = root / "ImageNet-C" if (root / "ImageNet-C").is_dir() else root
    missing = [f"{c}/{s}" for c in CORRUPTIONS for s in range(1, 6) if not (root / c / str(s)).is_dir()]
    if missing:
        raise UsageError(f"{root}: {len(missing)} of the 75 ImageNet-C corruption/severity folders are missing "
                         f"(first: {missing[0]})")
    names, templates = imagenet_classnames()
    model = _model_for(loaded, ctx, names, templates, "imagenet")[0]
    # RobustBench forces 'Res224' (a square resize) on ImageNet-C (robustbench/eval.py,
    # https://github.com/RobustBench/robustbench/blob/master/robustbench/eval.py); we resize to the model's input
    # size, which is that exact transform for 224-px models.
    size = tuple(loaded.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
    prep = transforms.Compose([transforms.Resize(list(size)), transforms.ToTensor()])
    acc = {}
    for c in CORRUPTIONS:
        for s in range(1, 6):
            res = evaluate_clean(model, imagenet_c_batches(ctx.corruptions_dir, c, s, prep, ctx.n_imagenet,
                                                           ctx.batch_size), device=ctx.device)
            acc[(c, s)] = res.correct / res.n
    mean_acc, mce = corruption_scores(acc)
    out = {"kind": "corruptions", "corruptions_acc": 100 * mean_acc, "corruptions_mce": 100 * mce,
           "per_corruption": {f"{c}/{s}": 100 * a for (c, s), a in acc.items()}, "n": ctx.n_imagenet}
    if ctx.out_dir is not None and ctx.model_info_name:
        from grace_plugin.runtime import is_main

        if is_main():
            write_model_info(ctx.out_dir, ctx.model_info_name, "imagenet", "corruptions", clean_acc=None,
                             corruptions_acc=100 * mean_acc, corruptions_mce=100 * mce)
        out["model_info"] = str(Path(ctx.out_dir) / "model_info" / "imagenet" / "corruptions" /
                                f"{ctx.model_info_name}.json")
    return out


def _first_batches(batches, n: int):
    xs, ys = [], []
    for b in batches:
        if b["image"].numel() == 0:
            continue
        xs.append(b["image"])
        ys.append(b["label"])
        if sum(len(y) for y in ys) >= n:
            break
    if not xs:
        raise SetScoringError("no readable samples")
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _shift_sets(ctx: SuiteContext, names: list[str]) -> list[tuple[str, Path]]:
    req = [ctx.resolve_set(a) for b, a in (parse_suite(n) for n in names) if b == "ood"]
    return req or [(k, Path(v)) for k, v in ctx.sets.items()]


@register_suite("geometry")
def _suite_geometry(loaded, ctx: SuiteContext, arg=None) -> dict:
    """Hessian top eigenvalue/trace/Frobenius, layer-wise curvature, centroid cosine, dLID, drift (arXiv 2603.27139
    Tables 2-3, Fig. 7)."""
    import re

    import torch.nn.functional as F

    from . import geometry as G
    from .attacks import check_unit_input, create_attack

    es = ctx.id_eval_set()
    model = _model_for(loaded, ctx, es.classnames, es.templates, es.name)[0].float()
    tf = _transform(loaded)
    x, y = _first_batches(_read(es, tf, ctx, ctx.n_geometry, whole=True), ctx.n_geometry)
    x, y = x.to(ctx.device), y.to(ctx.device)
    # the paper (Table 3) does not state which parameters its Hessian is taken over; we use the whole visual tower.
    named = [(n, p) for n, p in model.named_parameters() if n.startswith("visual.")]
    params = [p for _, p in named]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    groups: dict[str, list] = {}
    for n, p in named:
        m = re.match(r"visual\.(blocks\.\d+)", n)
        groups.setdefault(m.group(1) if m else n.split(".")[1], []).append(p)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def loss_fn():
        # HVPs need double backward; fused attention kernels (flash/efficient) do not implement it, math does
        with sdpa_kernel([SDPBackend.MATH]):
            return F.cross_entropy(model(x), y)

    try:
        out = {"kind": "geometry", "n": int(y.numel()), "params": sum(p.numel() for p in params),
               "hessian_top_eigenvalue": G.top_hessian_eigenvalue(loss_fn, params, iters=ctx.geometry_iters,
                                                                  seed=ctx.seed),
               "hessian_trace": G.hutchinson_trace(loss_fn, params, ctx.geometry_samples, seed=ctx.seed),
               "hessian_frobenius_normalised": G.hessian_frobenius_normalised(loss_fn, params,
                                                                              ctx.geometry_samples, seed=ctx.seed),
               "layerwise_curvature": G.layerwise_curvature(loss_fn, groups, max(1, ctx.geometry_samples // 4),
                                                            seed=ctx.seed)}
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
    with torch.no_grad():
        z_id = model.encode(x)
    k = min(ctx.lid_k, int(y.numel()) - 1)
    out["centroid_cosine"], out["delta_lid"] = {}, {}
    for name, path in _shift_sets(ctx, ctx.cache.get("suite_names", [])):
        es2 = ctx.eval_set(name, path)
        m2 = _model_for(loaded, ctx, es2.classnames, es2.templates, es2.name)[0]
        x2, y2 = _first_batches(_read(es2, tf, ctx, ctx.n_geometry, whole=True), ctx.n_geometry)
        with torch.no_grad():
            z2 = m2.encode(x2.to(ctx.device))
        out["centroid_cosine"][name] = G.class_centroid_cosine(z_id, y, z2, y2.to(ctx.device))
        out["delta_lid"][name] = G.delta_lid(z_id, z2, k=min(k, len(y2) - 1))
    check_unit_input(model, ctx.unit_input, name=loaded.name)
    x_adv = create_attack(ctx.geometry_attack, model, eps=ctx.eps, norm=ctx.norm, seed=ctx.seed)(x, y)
    with torch.no_grad():
        z_adv = model.encode(x_adv)
    out["centroid_cosine"]["adv"] = G.class_centroid_cosine(z_id, y, z_adv, y)
    out["delta_lid"]["adv"] = G.delta_lid(z_id, z_adv, k=k)
    out["parameter_drift"] = None
    if ctx.reference:
        from registry import load_model

        ref = load_model(ctx.reference, device=ctx.device).for_classes(es.classnames, es.templates, ctx.device)
        out["parameter_drift"] = G.relative_drift(model.visual.state_dict(), ref.visual.state_dict())
        out["reference"] = str(ctx.reference)
    return out


def _shift_embeddings(model, x) -> dict:
    with torch.no_grad():
        img = model.encode(x)
        logits = model.head(img)
        txt = torch.nn.functional.normalize(logits.softmax(-1) @ model.head.weight, dim=-1)
    return {"image": img.double().cpu().numpy(), "text": txt.double().cpu().numpy(),
            "joint": torch.cat([img, txt], -1).double().cpu().numpy(), "pred": logits.argmax(-1).cpu()}


@register_suite("shift")
def _suite_shift(loaded, ctx: SuiteContext, arg=None) -> dict:
    """Mahalanobis shift of each OOD set from ID on image, class-prompt text and joint embeddings (FRAMES-VQA)."""
    from .shift import shift_summary

    es = ctx.id_eval_set()
    tf = _transform(loaded)
    x, y = _first_batches(_read(es, tf, ctx, ctx.n_shift, whole=True), ctx.n_shift)
    e_id = _shift_embeddings(_model_for(loaded, ctx, es.classnames, es.templates, es.name)[0], x.to(ctx.device))
    id_acc = 100.0 * float((e_id.pop("pred") == y).float().mean())
    sets, drop, accs = {}, {}, {}
    for name, path in _shift_sets(ctx, ctx.cache.get("suite_names", [])):
        es2 = ctx.eval_set(name, path)
        x2, y2 = _first_batches(_read(es2, tf, ctx, ctx.n_shift, whole=True), ctx.n_shift)
        e = _shift_embeddings(_model_for(loaded, ctx, es2.classnames, es2.templates, es2.name)[0],
                              x2.to(ctx.device))
        accs[name] = 100.0 * float((e.pop("pred") == y2).float().mean())
        drop[name] = id_acc - accs[name]
        sets[name] = e
    if not sets:
        raise UsageError("suite 'shift' needs OOD sets: add ood:<set> suites or --ood NAME=DIR")
    return {"kind": "shift", "id_acc": id_acc, "acc": accs, "accuracy_drop": drop, "n": int(y.numel()),
            "spaces": shift_summary(e_id, sets, drop, ridge=ctx.shift_ridge)}


def run_suites(loaded, names: list[str], ctx: SuiteContext) -> dict:
    """Run suites in order (names validated first); return the report with every result under ``"suites"``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is joined here; every rank returns the same report,
    and callers write it on rank 0 (``runtime.is_main``). ``ctx.device`` ``auto`` becomes this rank's GPU, else
    the CPU."""
    from grace_plugin.runtime import barrier, init_distributed, resolve_device, world_info

    from .report import build_report

    parsed = [parse_suite(n) for n in names]  # every name fails before any work
    if not names:
        raise UsageError("nothing to evaluate: pass --data/--ood/--attack or --suite NAME (see `grace list suites`)")
    init_distributed()
    ctx.device = str(resolve_device(ctx.device))
    ctx.cache["suite_names"] = list(names)
    t0 = time.perf_counter()
    barrier()  # ranks start apart (imports, model load): that wait is start-up, not the suites' per-image work
    waited = time.perf_counter() - t0

    results, seconds = {}, {}
    for name, (base, arg) in zip(names, parsed):
        log.info("suite %s", name)
        t0 = time.perf_counter()
        results[name] = _SUITES.get(base).fn(loaded, ctx, arg)
        seconds[name] = round(time.perf_counter() - t0, 3)
    roles = ("id", "ood", "transfer")
    datasets = {r["dataset"]: {k: v for k, v in r.items() if k not in ("kind", "dataset", "path")} | {"role": r["kind"]}
                for r in results.values() if r["kind"] in roles}
    id_name = next((r["dataset"] for r in results.values() if r["kind"] == "id"), None)
    ood_names = [r["dataset"] for r in results.values() if r["kind"] == "ood"]
    attacked = [r for r in results.values() if r["kind"] == "adv"]
    if len(attacked) > 1:  # several attacks on the same first --n-adv samples: the Adv axis is their worst case
        from .evaluate import worst_case

        adv = worst_case(attacked)
    else:
        adv = next((r for r in results.values() if r["kind"] in ("adv", "robustbench")), None)
    config = {"suites": list(names), "id_set": [ctx.id_set[0], str(ctx.id_set[1])] if ctx.id_set else None,
              "sets": {k: str(v) for k, v in ctx.sets.items()}, "data_root": str(ctx.data_root or "") or None,
              "eps": ctx.eps, "norm": ctx.norm, "n_adv": ctx.n_adv, "batch_size": ctx.batch_size,
              "scoring": ctx.scoring, "mapping": {k: str(v) for k, v in ctx.mapping_files.items()},
              "strict": ctx.strict, "decode": ctx.decode, "device": ctx.device, "seed": ctx.seed,
              "world_size": world_info()[1], "rank_split": dict(ctx.cache.get("rank_split", {}))}
    report = build_report(loaded.name, datasets, id_name, ood_names, adv, config)
    report["suites"] = results
    report["seconds"] = seconds  # wall time per suite on this rank (not a result: excluded from comparisons)
    # fixed costs on this rank (the CLI adds imports, process group and model load): building heads (text tower
    # forwards, shared by the ranks) happens inside the suites' seconds above
    report["startup"] = {"wait_for_ranks": round(waited, 3), "heads": round(ctx.cache.get("head_seconds", 0.0), 3)}
    return report
