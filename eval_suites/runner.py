"""Evaluate one model on an ID set, OOD sets and an attack; return the three-axis report (see ``report``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from grace_plugin.config import checked, validate

from .attacks import NORMS, check_eps_for_norm
from .evaluate import account, evaluate_adversarial, evaluate_clean
from .report import build_report
from .shardsets import apply_mapping, get_shardset, match_class_subset

log = logging.getLogger(__name__)

__all__ = ["EvalRequest", "evaluate_model"]


@dataclass
class EvalRequest:
    id_set: tuple[str, str | Path]
    ood_sets: list[tuple[str, str | Path]]
    attack: str | None = "apgd-ce"
    eps: float = checked(4 / 255, flag="--eps", ge=0)
    norm: str = checked("Linf", flag="--norm", choices=NORMS)
    n_adv: int = checked(500, flag="--n-adv", ge=0)
    batch_size: int = checked(128, flag="--batch-size", gt=0)
    num_workers: int = checked(0, flag="--num-workers", ge=0)
    device: str = "cpu"
    seed: int = 0
    strict: bool = False
    scoring: str | None = None  # override every catalogued set's scoring: own | subset | mapping
    mapping_files: dict | None = None  # set name -> mapping JSON (scoring "mapping")
    # "pil": timm's/RobustBench's PIL preprocessing exactly; "tensor": torchvision, ~2x faster
    decode: str = checked("pil", flag="--decode", choices=("pil", "tensor"))

    def __post_init__(self):
        validate(self)

    __validate__ = check_eps_for_norm


def evaluate_model(loaded, req: EvalRequest, progress: bool = False) -> dict:
    """``loaded`` is a ``registry.LoadedModel``. Clean top-1 on every set, attack on the ID set (fp32)."""
    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.data.transforms import eval_transform

    from .attacks import get_attack

    if req.attack is not None:
        get_attack(req.attack)  # unknown names fail before any work
    device = torch.device(req.device)
    transform = eval_transform(loaded.pretrained_cfg)
    sets = [req.id_set] + list(req.ood_sets)
    opened = {name: open_shard_set(path) for name, path in sets}  # bad folders fail before any work
    results, models = {}, {}
    id_shards = opened[req.id_set[0]]
    for name, _ in sets:
        shards = opened[name]
        entry = get_shardset(name)
        scoring = (req.scoring or (entry.scoring if entry else "own")) if name != req.id_set[0] else "own"
        subset = targets = None
        if scoring == "own":
            model = loaded.for_classes(shards.classnames, shards.templates, device=device)
        else:
            id_names = id_shards.require_classnames()
            model = loaded.for_classes(id_names, id_shards.templates, device=device)
            if scoring == "subset":
                subset = match_class_subset(shards.require_classnames(), id_names)
            else:
                mfile = (req.mapping_files or {}).get(name) or (entry.mapping_file if entry else None)
                if not mfile:
                    raise ValueError(f"{name}: scoring 'mapping' needs a mapping file (e.g. ObjectNet's "
                                     "objectnet_to_imagenet_1k.json); none given")
                targets = apply_mapping(mfile, shards.require_classnames(), id_names)
        model = model.to(device).eval()
        models[name] = model
        n_classes = shards.num_classes or getattr(model, "num_classes", None)
        loader = make_eval_loader(shards.urls, transform, req.batch_size, num_classes=n_classes,
                                  num_workers=req.num_workers, decode=req.decode)
        res = evaluate_clean(model, loader, device=device, progress=progress, desc=f"eval {name}",
                             class_subset=subset, label_targets=targets, model_name=loaded.name)
        res.expected = shards.expected
        account(res, f"set {name} ({shards.root})", shards.unlisted, req.strict)
        results[name] = dict(res.as_dict(), scoring=scoring)
    adversarial = None
    if req.attack is not None and req.n_adv > 0:
        id_name = req.id_set[0]
        shards = opened[id_name]
        loader = make_eval_loader(shards.urls, transform, req.batch_size, num_classes=shards.num_classes,
                                  decode=req.decode)
        adv = evaluate_adversarial(models[id_name], loader, req.attack, req.eps, n_max=req.n_adv, norm=req.norm,
                                   device=device, seed=req.seed, progress=progress, model_name=loaded.name)
        adversarial = adv.as_dict()
    config = {"id_set": [req.id_set[0], str(req.id_set[1])], "ood_sets": [[n, str(p)] for n, p in req.ood_sets],
              "attack": req.attack, "eps": req.eps, "norm": req.norm, "n_adv": req.n_adv,
              "batch_size": req.batch_size, "device": req.device, "seed": req.seed, "decode": req.decode}
    return build_report(loaded.name, results, req.id_set[0], [n for n, _ in req.ood_sets], adversarial, config)
