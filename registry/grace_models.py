"""timm entries for GRACE classifiers, named by the RobustBench rule (``registry.naming``), built from model cards.

A registered model is a folder ``<weights dir>/<timm name>/`` written by ``grace register``:

* ``model.safetensors``: the ``ClipClassifier`` state dict (timm key space, LoRA merged, dataset head included);
* ``text.safetensors``: the open_clip text side, so heads for other class sets can be rebuilt;
* ``card.json``: architecture (tower spec, embed dim, classes), the timm ``pretrained_cfg`` (CLIP preprocessing:
  crop_pct 1.0, bicubic, CLIP mean/std), class names and templates, RobustBench ``ModelInfo`` fields and the
  sha256 of both weight files.

The cards of the weights dir (``$GRACE_WEIGHTS_DIR``, default ``<grace cache>/weights``) are read lazily: the first
time a name is resolved or listed (``get_card``, ``list_grace_models``, ``registry.load_model``, and timm's own
``is_model``/``create_model``/``list_models``, whose name table this module wraps), the folder is scanned once and
one timm architecture is registered per card. So in a new process ``import registry`` (or ``import grace_plugin``
through its plugin hook, once timm is imported) makes ``timm.create_model(name, pretrained=True)`` and
``robustbench.utils.load_model(rb_name, dataset=..., threat_model=...)`` work. timm has no entry points of its own
(https://github.com/huggingface/pytorch-image-models/issues/1694). Weights resolve, in timm's order, from
``pretrained_cfg_overlay=dict(file=...)``, the card's local file, then the card's ``hf_hub_id``; they are read by
``GraceClassifier.load_pretrained`` (cfg ``custom_load``) through ``registry.weights.load_state_dict_safe`` and the
card's sha256.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from functools import partial
from pathlib import Path

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from grace_plugin.tensor_io import load_state_dict_checked
from grace_plugin.errors import GraceError, read_json
from grace_plugin.paths import cache_dir
from grace_plugin.models.classifier import ClipClassifier, ZeroShotHead
from grace_plugin.models.clip import build_tower

from .naming import NUM_CLASSES, timm_name
from .weights import WeightsError, load_state_dict_safe, verify_sha256

__all__ = ["GraceClassifier", "RegistryError", "HeadSizeError", "weights_dir", "register_card", "scan_weights_dir",
           "scan_once", "list_grace_models", "get_card", "card_pretrained_cfg", "CARD_FILE", "WEIGHTS_FILE",
           "TEXT_FILE", "CARD_FORMAT", "default_cfgs"]

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_FILE = "text.safetensors"
CARD_FORMAT = 1

# timm's register_model looks entries up here by architecture name (``register_model`` in
# https://github.com/huggingface/pytorch-image-models/blob/v1.0.9/timm/models/_registry.py); filled per card below.
default_cfgs: dict = {}
_CARDS: dict[str, tuple[dict, Path | None]] = {}


class RegistryError(GraceError, ValueError):
    """A bad model card or registry request; the message names the file or field."""


class HeadSizeError(RegistryError):
    """``num_classes`` (or a weights file's head) disagrees with the registered head."""


def weights_dir() -> Path:
    """``$GRACE_WEIGHTS_DIR``, else ``weights/`` under the grace cache (``grace_plugin.paths.cache_dir``)."""
    if os.environ.get("GRACE_WEIGHTS_DIR"):
        return Path(os.environ["GRACE_WEIGHTS_DIR"]).expanduser()
    return cache_dir("weights")


# ---------------------------------------------------------------------------------------------------- the model
class GraceClassifier(ClipClassifier):
    """A ``ClipClassifier`` built from a model card; loads its weights safely and knows its classes and text tower."""

    def __init__(self, visual, head, pretrained_cfg: dict, card: dict, card_dir: Path | None):
        super().__init__(visual, head, pretrained_cfg)
        self.num_features = head.weight.shape[1]  # timm convention: the pre-logits feature size
        self.card = card
        self.card_dir = card_dir
        self.classnames = list(card.get("classnames") or []) or None
        self.templates = list(card.get("templates") or [])

    def load_pretrained(self, path: str | Path) -> None:
        """Called by timm's ``load_pretrained`` (cfg ``custom_load``) with the resolved local file."""
        path = Path(path)
        name = self.card["timm_name"]
        # The card's sha256 covers the card's own source (local file, or its hub repo); an explicit
        # pretrained_cfg_overlay=dict(file=...) is the caller's file and is loaded as given.
        cfg_file = (getattr(self, "pretrained_cfg", None) or {}).get("file")
        own_file = self.card_dir is not None and path.resolve() == (self.card_dir / WEIGHTS_FILE).resolve()
        if own_file or not cfg_file:
            verify_sha256(path, self.card.get("weights_sha256"), what=f"registry entry {name}'s card")
        sd = load_state_dict_safe(path)
        head = sd.get("head.weight")
        if head is None:
            raise WeightsError(f"{path}: no 'head.weight' tensor; not a GRACE classifier state dict for {name}")
        if head.shape[0] != self.num_classes:
            raise HeadSizeError(f"{path}: its zero-shot head has {head.shape[0]} classes but {name} was built with "
                                f"num_classes={self.num_classes}")
        missing, unexpected = load_state_dict_checked(self, sd, path)
        if missing or unexpected:
            raise WeightsError(f"{path}: does not match {name}'s architecture (missing {missing[:3]}, unexpected "
                               f"{unexpected[:3]})")

    def text_bundle(self):
        """The open_clip text side (``ClipBundle``) from ``text.safetensors``, or None when the entry has none."""
        from grace_plugin.models.clip import bundle_from_text_state

        clip = self.card.get("clip")
        if not clip or self.card_dir is None:
            return None
        f = self.card_dir / TEXT_FILE
        if not f.is_file():
            return None
        verify_sha256(f, self.card.get("text_sha256"), what=f"registry entry {self.card['timm_name']}'s card")
        return bundle_from_text_state(clip["model_name"], clip["model_cfg"], load_state_dict_safe(f))


def _build(card: dict, card_dir: Path | None, num_classes: int | None = None, in_chans: int = 3,
           img_size=None, global_pool=None, **unknown) -> GraceClassifier:
    name = card["timm_name"]
    arch = card["architecture"]
    if unknown:
        raise TypeError(f"{name}: unexpected keyword arguments {sorted(unknown)}; GRACE entries take num_classes, "
                        "pretrained, pretrained_cfg_overlay")
    n = arch["num_classes"] if num_classes is None else int(num_classes)
    if n != arch["num_classes"]:
        raise HeadSizeError(f"{name}: its zero-shot head has {arch['num_classes']} classes "
                            f"({card.get('dataset', '?')}); num_classes={n} was requested. Build a head for other "
                            "classes with registry.load_model(name).for_classes(classnames, templates)")
    if in_chans != 3:
        raise ValueError(f"{name}: in_chans must be 3, got {in_chans}")
    size = tuple(card["pretrained_cfg"]["input_size"][-2:])
    if img_size is not None and tuple(img_size if not isinstance(img_size, int) else (img_size, img_size)) != size:
        raise ValueError(f"{name}: fixed input size {size}, got img_size={img_size}")
    tower = build_tower(arch["tower"])
    head = ZeroShotHead(torch.zeros(n, arch["embed_dim"]), card.get("logit_scale", 100.0))
    return GraceClassifier(tower, head, card["pretrained_cfg"], card, card_dir)


# ---------------------------------------------------------------------------------------------------- cards -> timm
def card_pretrained_cfg(card: dict, card_dir: Path | None) -> dict:
    """The timm ``PretrainedCfg`` fields of a card (weights source included)."""
    pc = card["pretrained_cfg"]
    info = card.get("model_info") or {}
    cfg = dict(
        input_size=tuple(pc["input_size"]), fixed_input_size=True, interpolation=pc.get("interpolation", "bicubic"),
        crop_pct=float(pc.get("crop_pct", 1.0)), crop_mode=pc.get("crop_mode", "center"),
        mean=tuple(pc["mean"]), std=tuple(pc["std"]), num_classes=int(card["architecture"]["num_classes"]),
        first_conv="visual.patch_embed.proj", classifier="head", license=card.get("license", "mit"),
        description=info.get("name") or f"GRACE classifier {card.get('rb_name', '')}",
        origin_url=info.get("link") or None, custom_load="hf",
    )
    local = card_dir / WEIGHTS_FILE if card_dir is not None else None
    if local is not None and local.is_file():
        cfg["file"] = str(local)
    elif card.get("hf_hub_id"):
        cfg["hf_hub_id"] = card["hf_hub_id"]
        cfg["hf_hub_filename"] = WEIGHTS_FILE
    return cfg


def _check_card(card: dict, where: str) -> dict:
    for key in ("timm_name", "architecture", "pretrained_cfg"):
        if key not in card:
            raise RegistryError(f"{where}: field {key!r} is missing")
    for section, keys in (("architecture", ("tower", "embed_dim", "num_classes")),
                          ("pretrained_cfg", ("input_size", "mean", "std"))):
        if not isinstance(card[section], dict):
            raise RegistryError(f"{where}: field {section!r} must be a mapping")
        for key in keys:
            if key not in card[section]:
                raise RegistryError(f"{where}: field '{section}.{key}' is missing")
    if card.get("rb_name"):
        expect = timm_name(card["rb_name"], card.get("dataset", "imagenet"), card.get("threat_model", "Linf"))
        if expect != card["timm_name"]:
            raise RegistryError(f"{where}: timm_name {card['timm_name']!r} is not the RobustBench name of "
                                f"{card['rb_name']!r} ({expect!r})")
    if "." in card["timm_name"]:
        raise RegistryError(f"{where}: timm_name {card['timm_name']!r} must not contain '.' (timm's tag separator)")
    return card


def register_card(card: dict | str | Path, card_dir: str | Path | None = None) -> str:
    """Register a card (dict, or a ``card.json`` path whose folder holds the weights) as a timm architecture."""
    if not isinstance(card, dict):
        path = Path(card)
        if path.is_dir():
            path = path / CARD_FILE
        card = read_json(path, RegistryError, "not a readable model card")
        where, card_dir = str(path), path.parent
    else:
        where = f"card {card.get('timm_name', '?')}"
    card = _check_card(card, where)
    card_dir = Path(card_dir) if card_dir is not None else None
    name = card["timm_name"]

    def entrypoint(pretrained: bool = False, **kwargs):
        return build_model_with_cfg(partial(_build, card, card_dir), name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"GRACE classifier {card.get('rb_name') or name} ({card['architecture']['tower']})."
    default_cfgs[name] = generate_default_cfgs({name: card_pretrained_cfg(card, card_dir)})[name]
    _CARDS[name] = (card, card_dir)
    with warnings.catch_warnings(), _LazyNames.registering():
        warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")  # re-registering a card
        register_model(entrypoint)
    return name


def scan_weights_dir(root: str | Path | None = None) -> list[str]:
    """Register every ``*/card.json`` under ``root`` (default ``weights_dir()``); bad cards are logged and skipped."""
    root = Path(root) if root is not None else weights_dir()
    names = []
    if not root.is_dir():
        return names
    for card in sorted(root.glob(f"*/{CARD_FILE}")):
        try:
            names.append(register_card(card))
        except (RegistryError, ValueError) as e:
            warnings.warn(f"grace registry: skipped {card}: {e}", stacklevel=2)
    return names


_SCANNED = False


def scan_once() -> None:
    """Scan the weights dir the first time a name is resolved or listed in this process (later cards: ``grace
    register`` registers its own, ``scan_weights_dir`` rescans)."""
    global _SCANNED
    if not _SCANNED:
        _SCANNED = True
        scan_weights_dir()


class _LazyNames(dict):
    """timm's name -> entrypoint table (``timm.models._registry._model_entrypoints``, a plain dict in timm 1.0.9)
    with a lookup miss or a listing triggering ``scan_once`` first: how ``timm.is_model``/``create_model`` (and
    RobustBench through them) see the weights dir's cards without a scan at import time."""

    _quiet = 0  # > 0 while register_model checks its own new name (no scan for that)

    @classmethod
    @contextlib.contextmanager
    def registering(cls):
        cls._quiet += 1
        try:
            yield
        finally:
            cls._quiet -= 1

    def _scan(self, key=None) -> None:
        if not _SCANNED and not _LazyNames._quiet and (key is None or not dict.__contains__(self, key)):
            scan_once()

    def __contains__(self, key) -> bool:
        self._scan(key)
        return dict.__contains__(self, key)

    def __getitem__(self, key):
        self._scan(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._scan(key)
        return dict.get(self, key, default)

    def keys(self):
        self._scan()
        return dict.keys(self)

    def __iter__(self):
        self._scan()
        return dict.__iter__(self)


def _install_lazy_names() -> None:
    import timm.models._registry as timm_registry

    if not isinstance(timm_registry._model_entrypoints, _LazyNames):
        timm_registry._model_entrypoints = _LazyNames(timm_registry._model_entrypoints)


def list_grace_models(pattern: str = "") -> list[str]:
    import timm

    scan_once()
    return timm.list_models(pattern or "*", module="grace_models")


def get_card(name: str) -> tuple[dict, Path | None]:
    scan_once()
    try:
        return _CARDS[name.split(".")[0]]
    except KeyError:
        raise RegistryError(f"{name!r}: not a registered GRACE model; registered: "
                            f"{', '.join(sorted(_CARDS))}") from None


# ---------------------------------------------------------------------------------------------------- built-ins
# A tiny architecture with no weights, for tests and smoke checks (test entries are named grace_test_*
# so listings of real models can skip them).
# Its RobustBench name resolves to it, but pretrained=True raises timm's "No pretrained weights exist".
_TINY_CLIP_CFG = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
BUILTIN_CARDS = [{
    "format_version": CARD_FORMAT,
    "timm_name": timm_name("Grace_Test_Tiny", "imagenet", "Linf"),
    "rb_name": "Grace_Test_Tiny", "dataset": "imagenet", "threat_model": "Linf",
    "architecture": {"tower": {"arch": None, "kwargs": {
        "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
        "pre_norm": True, "act_layer": "quick_gelu", "num_classes": 32, "global_pool": "token"}},
        "embed_dim": 32, "num_classes": NUM_CLASSES["imagenet"]},
    "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                       **_TINY_CLIP_CFG},
    "logit_scale": 100.0,
    "model_info": {"name": "tiny test architecture (random weights)", "architecture": "ViT-tiny (CLIP)"},
}]

for _card in BUILTIN_CARDS:
    register_card(_card)
_install_lazy_names()
