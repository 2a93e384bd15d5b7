"""Suite registry (README "Evaluation suites"): a suite name -> a function ``(ctx, arg) -> result dict``.

Names: ``id``, ``ood:<set>``, ``transfer:<set>``, ``adv:<attack>``, ``corruptions``, ``geometry``, ``shift``,
``robustbench``. ``<set>`` is ``NAME=DIR``, a folder, or a name resolved by ``SuiteContext.resolve_set`` (``--ood
NAME=DIR`` sets, then ``<data_root>/<NAME>``; the shard-set catalogue of issue 3 plugs in there). The ID set is a
shard set or an ImageNet val folder (then RobustBench's fixed 5000-image subset is used:
``load_imagenet`` in https://github.com/RobustBench/robustbench/blob/master/robustbench/data.py).

``run_suites(loaded, names, ctx)`` runs them in order and returns the three-axis report (``report.build_report``)
with every suite's result under ``"suites"``. A new suite is one ``@register_suite`` function; ``grace eval
--suite NAME`` and ``tests/test_suites.py`` pick it up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch

from grace_plugin.config import checked, validate
from grace_plugin.errors import GraceError

from .attacks import NORMS, check_eps_for_norm

__all__ = ["register_suite", "list_suites", "get_suite", "parse_suite", "UnknownSuiteError", "SuiteContext",
           "EvalSet", "run_suites"]

log = logging.getLogger(__name__)


class UnknownSuiteError(GraceError, KeyError):
    pass


@dataclass(frozen=True)
class SuiteInfo:
    name: str
    fn: Callable
    takes_arg: bool
    description: str


_SUITES: dict[str, SuiteInfo] = {}


def register_suite(name: str, takes_arg: bool = False, description: str = ""):
    def deco(fn):
        if name in _SUITES:
            raise ValueError(f"suite {name!r} is already registered")
        _SUITES[name] = SuiteInfo(name, fn, takes_arg, description or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def list_suites() -> list[str]:
    """Registered names; those taking an argument are listed as ``name:<arg>``."""
    return sorted(f"{k}:<{'attack' if k == 'adv' else 'set'}>" if v.takes_arg else k for k, v in _SUITES.items())


def parse_suite(text: str) -> tuple[str, str | None]:
    """``"adv:apgd-ce"`` -> ``("adv", "apgd-ce")``; an unknown name or a missing/extra argument is an error."""
    base, _, arg = str(text).partition(":")
    info = _SUITES.get(base)
    if info is None:
        raise UnknownSuiteError(f"unknown suite {text!r}; valid suites: {', '.join(list_suites())}")
    if info.takes_arg and not arg:
        raise UnknownSuiteError(f"suite {base!r} needs an argument, e.g. {base}:<name>")
    if not info.takes_arg and arg:
        raise UnknownSuiteError(f"suite {base!r} takes no argument (got {text!r})")
    if base == "adv":
        from .attacks import get_attack

        get_attack(arg)
    return base, arg or None


def get_suite(name: str) -> SuiteInfo:
    return _SUITES[parse_suite(name)[0]]


@dataclass
class EvalSet:
    """A data set a suite reads: a shard set or an ImageNet folder (``kind``)."""

    name: str
    path: Path
    kind: str  # "shards" | "imagenet"
    classnames: list[str] | None
    templates: list[str] | None
    urls: list[str] | None = None
    unlisted: list[str] = field(default_factory=list)  # tars the layout does not list (counted as unaccounted)
    expected: int | None = None  # samples the layout promises

    def batches(self, transform, batch_size: int, n: int | None = None, num_workers: int = 0, decode: str = "pil"):
        if self.kind == "imagenet":
            from .imagenet import imagenet_batches

            return imagenet_batches(self.path, transform, n=min(n or 5000, 5000), batch_size=batch_size)
        from grace_plugin.data.loader import make_eval_loader

        return make_eval_loader(self.urls, transform, batch_size, num_classes=len(self.classnames or []) or None,
                                num_workers=num_workers, decode=decode)


def open_eval_set(name: str, path: str | Path) -> EvalSet:
    from grace_plugin.data.shards import open_shard_set

    from .imagenet import check_imagenet_folder, imagenet_classnames, is_imagenet_folder

    p = Path(path).expanduser()
    if is_imagenet_folder(p):
        check_imagenet_folder(p, n=0)  # classes now; subset files when read
        names, templates = imagenet_classnames()
        return EvalSet(name, p, "imagenet", names, templates)
    s = open_shard_set(p)
    return EvalSet(name, p, "shards", s.classnames, s.templates, urls=s.urls, unlisted=s.unlisted,
                   expected=s.expected)


@dataclass
class SuiteContext:
    """Everything a suite may need; each field is a `grace eval` flag (or a tox environment variable)."""

    id_set: tuple[str, str | Path] | None = None
    sets: dict[str, str | Path] = field(default_factory=dict)
    data_root: str | Path | None = None
    eps: float = checked(4 / 255, flag="--eps", ge=0)
    norm: str = checked("Linf", flag="--norm", choices=NORMS)
    n_adv: int = checked(500, flag="--n-adv", ge=0)
    batch_size: int = checked(128, flag="--batch-size", gt=0)
    num_workers: int = checked(0, flag="--num-workers", ge=0)
    # shard decoding: "pil" (timm's PIL preprocessing exactly) or "tensor" (torchvision, faster)
    decode: str = checked("pil", flag="--decode", choices=("pil", "tensor"))
    device: str = "cpu"
    seed: int = 0
    strict: bool = False
    unit_input: bool | None = None
    out_dir: str | Path | None = None  # resume state for adversarial suites lives under out_dir/state/
    imagenet_dir: str | Path | None = None
    corruptions_dir: str | Path | None = None
    n_imagenet: int = checked(5000, flag="--n-imagenet", gt=0)
    reference: str | None = None  # pretrained model spec for the parameter drift (geometry)
    n_geometry: int = 64
    geometry_iters: int = 20
    geometry_samples: int = 8
    geometry_attack: str = "apgd-ce"
    lid_k: int = 20
    n_shift: int = 1000
    shift_ridge: float | None = None
    model_info_name: str | None = None  # write RobustBench model_info JSON for adversarial results under this name
    progress: bool = False
    cache: dict = field(default_factory=dict)

    def __post_init__(self):
        validate(self)

    __validate__ = check_eps_for_norm

    def resolve_set(self, spec: str) -> tuple[str, Path]:
        """``NAME=DIR`` | a folder | a name in ``sets`` | the catalogued folder or ``<data_root>/<name>``."""
        if "=" in spec:
            name, path = spec.split("=", 1)
            return name, Path(path)
        if spec in self.sets:
            return spec, Path(self.sets[spec])
        p = Path(spec).expanduser()
        if p.exists():
            return p.name, p
        if self.data_root is not None:
            from .shardsets import get_shardset

            entry = get_shardset(spec)
            if entry is not None and (Path(self.data_root) / entry.folder).exists():
                return spec, Path(self.data_root) / entry.folder
            if (Path(self.data_root) / spec).exists():
                return spec, Path(self.data_root) / spec
        from grace_plugin.data.shards import ShardSetError

        known = sorted(self.sets) + ([f"<{self.data_root}>/*"] if self.data_root else [])
        raise ShardSetError(f"set {spec!r}: not a folder, not given with --ood NAME=DIR and not under --data-root "
                            f"(known: {', '.join(known) or 'none'})")

    def eval_set(self, name: str, path: str | Path) -> EvalSet:
        key = ("set", name, str(path))
        if key not in self.cache:
            self.cache[key] = open_eval_set(name, path)
        return self.cache[key]

    def id_eval_set(self) -> EvalSet:
        if self.id_set is None:
            raise ValueError("this suite needs an ID set: pass --data [NAME=]DIR")
        return self.eval_set(*self.id_set)


def _model_for(loaded, ctx: SuiteContext, es: EvalSet):
    key = ("model", tuple(es.classnames or ()))
    if key not in ctx.cache:
        ctx.cache[key] = loaded.for_classes(es.classnames, es.templates, device=ctx.device).to(ctx.device).eval()
    return ctx.cache[key]


def _read(es: EvalSet, transform, ctx: SuiteContext, n: int | None):
    """``es``'s batches with the context's batch size, workers and decoder."""
    return es.batches(transform, ctx.batch_size, n, ctx.num_workers, ctx.decode)


def _transform(loaded):
    from grace_plugin.data.transforms import eval_transform

    return eval_transform(loaded.pretrained_cfg)


def _clean(loaded, ctx: SuiteContext, es: EvalSet, role: str) -> dict:
    from .evaluate import account, evaluate_clean

    key = ("clean", es.name, str(es.path))
    if key not in ctx.cache:
        model = _model_for(loaded, ctx, es)
        n = ctx.n_imagenet if es.kind == "imagenet" else None
        res = evaluate_clean(model, _read(es, _transform(loaded), ctx, n),
                             device=ctx.device, progress=ctx.progress, desc=f"eval {es.name}", model_name=loaded.name)
        res.expected = es.expected
        account(res, f"set {es.name} ({es.path})", es.unlisted, ctx.strict)
        ctx.cache[key] = res.as_dict()
    return dict(ctx.cache[key], kind=role, dataset=es.name, path=str(es.path))


@register_suite("id")
def _suite_id(loaded, ctx: SuiteContext, arg=None) -> dict:
    """Clean top-1 on the ID set."""
    return _clean(loaded, ctx, ctx.id_eval_set(), "id")


@register_suite("ood", takes_arg=True)
def _suite_ood(loaded, ctx: SuiteContext, arg: str) -> dict:
    """Clean top-1 on an OOD set (counts in the OOD axis)."""
    return _clean(loaded, ctx, ctx.eval_set(*ctx.resolve_set(arg)), "ood")


@register_suite("transfer", takes_arg=True)
def _suite_transfer(loaded, ctx: SuiteContext, arg: str) -> dict:
    """Zero-shot top-1 on another set's classes (head rebuilt from its classnames; not in the OOD axis)."""
    return _clean(loaded, ctx, ctx.eval_set(*ctx.resolve_set(arg)), "transfer")


@register_suite("adv", takes_arg=True)
def _suite_adv(loaded, ctx: SuiteContext, arg: str) -> dict:
    """Robust accuracy under a registered attack on the ID set (fp32, [0,1] models, resumable per batch)."""
    from .evaluate import evaluate_adversarial

    es = ctx.id_eval_set()
    model = _model_for(loaded, ctx, es)
    n = min(ctx.n_adv, 5000) if es.kind == "imagenet" else ctx.n_adv
    state = None
    if ctx.out_dir is not None:
        state = Path(ctx.out_dir) / "state" / f"adv-{arg}-{ctx.norm}.json"
        state.parent.mkdir(parents=True, exist_ok=True)
    res = evaluate_adversarial(model, _read(es, _transform(loaded), ctx, n), arg,
                               ctx.eps, n_max=n, norm=ctx.norm, device=ctx.device, seed=ctx.seed,
                               progress=ctx.progress, state_path=state, unit_input=ctx.unit_input,
                               model_name=loaded.name)
    out = dict(res.as_dict(), kind="adv", dataset=es.name,
               subset="robustbench-imagenet-5000" if es.kind == "imagenet" else None)
    if ctx.model_info_name and ctx.out_dir is not None:
        from .leaderboard import write_model_info

        dataset = "imagenet" if es.kind == "imagenet" else es.name
        name = ctx.model_info_name if arg == "autoattack" else f"{ctx.model_info_name}_{arg}"
        out["model_info"] = str(write_model_info(ctx.out_dir, name, dataset, ctx.norm, clean_acc=res.clean_acc,
                                                 robust_acc=res.robust_acc, eps=ctx.eps))
    return out


@register_suite("robustbench")
def _suite_robustbench(loaded, ctx: SuiteContext, arg=None) -> dict:
    """robustbench.eval.benchmark (standard AutoAttack) on --imagenet-dir; writes RobustBench model_info JSON."""
    from .attacks import check_unit_input
    from .imagenet import imagenet_classnames
    from .leaderboard import run_robustbench, write_model_info

    if ctx.imagenet_dir is None:
        raise ValueError("suite 'robustbench' needs --imagenet-dir DIR (the folder holding val/<wnid>/...)")
    from .imagenet import check_imagenet_folder

    check_imagenet_folder(ctx.imagenet_dir, ctx.n_imagenet)  # before the 1000-class head is built
    names, templates = imagenet_classnames()
    model = loaded.for_classes(names, templates, device=ctx.device).to(ctx.device).eval()
    check_unit_input(model, ctx.unit_input, name=loaded.name)
    res = run_robustbench(model, ctx.imagenet_dir, _transform(loaded), eps=ctx.eps, threat=ctx.norm,
                          n=ctx.n_imagenet, batch_size=ctx.batch_size, device=ctx.device)
    out = dict(res.as_dict(), kind="robustbench", dataset="imagenet")
    if ctx.out_dir is not None:
        name = ctx.model_info_name or _rb_name(loaded.name)
        out["model_info"] = str(write_model_info(ctx.out_dir, name, "imagenet", ctx.norm, clean_acc=res.clean_acc,
                                                 robust_acc=res.robust_acc, eps=ctx.eps))
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
        raise ValueError("suite 'corruptions' needs --corruptions-dir DIR (holding ImageNet-C/<corruption>/<1-5>/)")
    root = Path(ctx.corruptions_dir)
    root = root / "ImageNet-C" if (root / "ImageNet-C").is_dir() else root
    missing = [f"{c}/{s}" for c in CORRUPTIONS for s in range(1, 6) if not (root / c / str(s)).is_dir()]
    if missing:
        raise ValueError(f"{root}: {len(missing)} of the 75 ImageNet-C corruption/severity folders are missing "
                         f"(first: {missing[0]})")
    names, templates = imagenet_classnames()
    model = loaded.for_classes(names, templates, device=ctx.device).to(ctx.device).eval()
    # RobustBench forces 'Res224' (a square resize) on ImageNet-C (https://github.com/RobustBench/robustbench/blob/master/robustbench/eval.py);
    # we resize to the model's input size, which is that exact transform for 224-px models.
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
        out["model_info"] = str(write_model_info(ctx.out_dir, ctx.model_info_name, "imagenet", "corruptions",
                                                 clean_acc=None, corruptions_acc=100 * mean_acc,
                                                 corruptions_mce=100 * mce))
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
        raise ValueError("no readable samples")
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
    model = _model_for(loaded, ctx, es).float()
    tf = _transform(loaded)
    x, y = _first_batches(_read(es, tf, ctx, ctx.n_geometry), ctx.n_geometry)
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
        m2 = _model_for(loaded, ctx, es2)
        x2, y2 = _first_batches(_read(es2, tf, ctx, ctx.n_geometry), ctx.n_geometry)
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
    x, y = _first_batches(_read(es, tf, ctx, ctx.n_shift), ctx.n_shift)
    e_id = _shift_embeddings(_model_for(loaded, ctx, es), x.to(ctx.device))
    id_acc = 100.0 * float((e_id.pop("pred") == y).float().mean())
    sets, drop, accs = {}, {}, {}
    for name, path in _shift_sets(ctx, ctx.cache.get("suite_names", [])):
        es2 = ctx.eval_set(name, path)
        x2, y2 = _first_batches(_read(es2, tf, ctx, ctx.n_shift), ctx.n_shift)
        e = _shift_embeddings(_model_for(loaded, ctx, es2), x2.to(ctx.device))
        accs[name] = 100.0 * float((e.pop("pred") == y2).float().mean())
        drop[name] = id_acc - accs[name]
        sets[name] = e
    if not sets:
        raise ValueError("suite 'shift' needs OOD sets: add ood:<set> suites or --ood NAME=DIR")
    return {"kind": "shift", "id_acc": id_acc, "acc": accs, "accuracy_drop": drop, "n": int(y.numel()),
            "spaces": shift_summary(e_id, sets, drop, ridge=ctx.shift_ridge)}


def run_suites(loaded, names: list[str], ctx: SuiteContext) -> dict:
    """Run suites in order (names validated first); return the report with every result under ``"suites"``."""
    from .report import build_report

    parsed = [parse_suite(n) for n in names]  # every name fails before any work
    ctx.cache["suite_names"] = list(names)
    results = {}
    for name, (base, arg) in zip(names, parsed):
        log.info("suite %s", name)
        results[name] = _SUITES[base].fn(loaded, ctx, arg)
    datasets = {r["dataset"]: {k: v for k, v in r.items() if k not in ("kind", "dataset", "path")}
                for r in results.values() if r["kind"] in ("id", "ood", "transfer")}
    id_name = next((r["dataset"] for r in results.values() if r["kind"] == "id"), None)
    ood_names = [r["dataset"] for r in results.values() if r["kind"] == "ood"]
    adv = next((r for r in results.values() if r["kind"] in ("adv", "robustbench")), None)
    config = {"suites": list(names), "id_set": [ctx.id_set[0], str(ctx.id_set[1])] if ctx.id_set else None,
              "eps": ctx.eps, "norm": ctx.norm, "n_adv": ctx.n_adv, "batch_size": ctx.batch_size,
              "device": ctx.device, "seed": ctx.seed}
    report = build_report(loaded.name, datasets, id_name, ood_names, adv, config)
    for name in datasets:
        report["datasets"][name]["role"] = next(x["kind"] for x in results.values()
                                                if x.get("dataset") == name and x["kind"] in ("id", "ood", "transfer"))
    report["suites"] = results
    return report
