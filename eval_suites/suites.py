"""The suite bodies registered with the evaluation engine (``eval_suites.engine``): ``id``, ``ood:<set>``,
``transfer:<set>``, ``adv:<attack>``, ``robustbench``, ``corruptions``, ``geometry``, ``shift``.

The ID set is a shard set or an ImageNet val folder (then RobustBench's fixed 5000-image subset is used:
``load_imagenet`` in https://github.com/RobustBench/robustbench/blob/master/robustbench/data.py). Whichever way a set
is named, it is scored the same way: the catalogue's scoring (``own`` head from its class names, the ID head
restricted to its ``subset`` of classes, or a ``mapping``), ``--scoring``/``--mapping`` overrides,
``expected``/``unaccounted`` counts and ``--strict``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from grace_plugin.errors import UsageError

from .context import EvalSet, SetScoringError, SuiteContext
from .engine import parse_suite, register_suite

__all__: list[str] = []  # the suites are reached through the engine's registry

log = logging.getLogger(__name__)


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
        ctx.stats.heads += time.perf_counter() - t0
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
    """Samples whose label lies beyond the class list: a value that many samples carry means the class list and the
    labels disagree (a bad set: refused in one line); rare values are corrupt labels on single samples (bad
    samples: skipped, counted as ``label_out_of_range``, said on stderr; ``--strict`` refuses them in ``account``).
    The rule: ``grace_plugin.data.shards.labels_beyond``; the label values are counted from the shards' ``cls``
    members only when some sample fell outside."""
    from grace_plugin.data.shards import label_counts, labels_beyond

    bad = res.skipped.get("label_out_of_range", 0)
    if not bad:
        return
    counts = label_counts(es.urls or []) if es.kind == "shards" else {}
    refused, corrupt = labels_beyond(counts, classes)
    if refused or not counts:
        values = ", ".join(f"{v} ({c} samples)" for v, c in refused.items()) or f"{bad} samples"
        if es.classnames:
            raise SetScoringError(f"{es.path}/classnames.txt: {len(es.classnames)} names, but labels beyond them "
                                  f"are carried by many samples: {values}; the class list and the labels disagree")
        raise SetScoringError(f"{es.path}: labels beyond the model's {classes}-class head are carried by many "
                              f"samples ({values}), and the set has no classnames.txt to build a head for them")
    log.warning("%s: %d sample(s) skipped with a label beyond the %d classes (label_out_of_range; values: %s)",
                es.path, bad, classes, ", ".join(str(v) for v in corrupt))


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

            ctx.stats.rank_split[es.name] = rank_split(len(es.urls), world_info()[1])
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
        state = Path(ctx.out_dir) / "state" / f"{state_name}.json"  # its folder made by evaluate.BatchState
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
    x, y = _first_batches(_read(es, tf, ctx, ctx.geometry.n, whole=True), ctx.geometry.n)
    x, y = x.to(ctx.device), y.to(ctx.device)
    check_unit_input(model, ctx.unit_input, name=loaded.name)
    # the adversarial images, found once at the model's weights: the Adv centroid's, and with hessian_loss
    # "adversarial" the inputs of the loss whose curvature is measured (held fixed while the HVPs run)
    x_adv = create_attack(ctx.geometry.attack, model, eps=ctx.eps, norm=ctx.norm, seed=ctx.seed)(x, y)
    x_h = x_adv if ctx.geometry.hessian_loss == "adversarial" else x
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
            return F.cross_entropy(model(x_h), y)

    try:
        power = G.power_iteration(loss_fn, params, iters=ctx.geometry.iters, seed=ctx.seed)
        out = {"kind": "geometry", "n": int(y.numel()), "params": sum(p.numel() for p in params),
               "hessian_loss": ctx.geometry.hessian_loss, "hessian_top_eigenvalue": power["eigenvalue"],
               "power_iteration": {k: power[k] for k in ("iterations", "rel_change", "tol", "converged")},
               "hessian_trace": G.hutchinson_trace(loss_fn, params, ctx.geometry.samples, seed=ctx.seed),
               "hessian_frobenius_normalised": G.hessian_frobenius_normalised(loss_fn, params,
                                                                              ctx.geometry.samples, seed=ctx.seed),
               "layerwise_curvature": G.layerwise_curvature(loss_fn, groups, max(1, ctx.geometry.samples // 4),
                                                            seed=ctx.seed)}
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
    with torch.no_grad():
        z_id = model.encode(x)
    k = min(ctx.geometry.lid_k, int(y.numel()) - 1)
    out["centroid_cosine"], out["delta_lid"] = {}, {}
    for name, path in _shift_sets(ctx, ctx.suite_names):
        es2 = ctx.eval_set(name, path)
        m2 = _model_for(loaded, ctx, es2.classnames, es2.templates, es2.name)[0]
        x2, y2 = _first_batches(_read(es2, tf, ctx, ctx.geometry.n, whole=True), ctx.geometry.n)
        with torch.no_grad():
            z2 = m2.encode(x2.to(ctx.device))
        out["centroid_cosine"][name] = G.class_centroid_cosine(z_id, y, z2, y2.to(ctx.device))
        out["delta_lid"][name] = G.delta_lid(z_id, z2, k=min(k, len(y2) - 1))
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
    x, y = _first_batches(_read(es, tf, ctx, ctx.shift.n, whole=True), ctx.shift.n)
    e_id = _shift_embeddings(_model_for(loaded, ctx, es.classnames, es.templates, es.name)[0], x.to(ctx.device))
    id_acc = 100.0 * float((e_id.pop("pred") == y).float().mean())
    sets, drop, accs = {}, {}, {}
    for name, path in _shift_sets(ctx, ctx.suite_names):
        es2 = ctx.eval_set(name, path)
        x2, y2 = _first_batches(_read(es2, tf, ctx, ctx.shift.n, whole=True), ctx.shift.n)
        e = _shift_embeddings(_model_for(loaded, ctx, es2.classnames, es2.templates, es2.name)[0],
                              x2.to(ctx.device))
        accs[name] = 100.0 * float((e.pop("pred") == y2).float().mean())
        drop[name] = id_acc - accs[name]
        sets[name] = e
    if not sets:
        raise UsageError("suite 'shift' needs OOD sets: add ood:<set> suites or --ood NAME=DIR")
    return {"kind": "shift", "id_acc": id_acc, "acc": accs, "accuracy_drop": drop, "n": int(y.numel()),
            "spaces": shift_summary(e_id, sets, drop, ridge=ctx.shift.ridge)}
