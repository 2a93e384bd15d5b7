"""Run folders: ``model.safetensors`` (timm key space, LoRA merged, head included) + ``checkpoint.json``.

``checkpoint.json`` holds everything needed to rebuild the classifier without the training code: the tower spec,
the pretrained cfg, class names and templates, the open_clip config of the text side (whose weights sit in
``text.safetensors`` so heads for new class sets can be built), the resolved config, the recipe and metrics.
Every file is written atomically (temp file + ``os.replace``). Weights are read with safetensors only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

from .errors import GraceError

__all__ = ["atomic_path", "atomic_write_text", "save_run", "load_run", "load_run_meta", "sha256_file",
           "save_tensors", "CheckpointError", "FORMAT_VERSION"]

FORMAT_VERSION = 1


class CheckpointError(GraceError, ValueError):
    """A run folder or weights file that cannot be loaded; the message names the file."""


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success it replaces ``final`` in one step, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(sd: dict, path: str | Path) -> None:
    """Write a tensor dict as safetensors atomically (detached, contiguous, on CPU): every weights file we write."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp))


def save_run(out: str | Path, model, *, tower: dict, clip_meta: dict | None, text_state: dict | None,
             classnames: list[str], templates: list[str] | None, recipe: str, config: dict,
             metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write a loadable run folder for a ``ClipClassifier`` (LoRA must already be merged)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    stray = [k for k in sd if "lora_" in k or "awp_" in k]
    if stray:
        raise CheckpointError(f"refusing to save un-merged adapter weights ({stray[0]}); merge LoRA first")
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"refusing to save non-finite weights in {k}")
    save_tensors(sd, out / "model.safetensors")
    if text_state is not None:
        save_tensors(text_state, out / "text.safetensors")
    meta = {
        "format_version": FORMAT_VERSION,
        "recipe": recipe,
        "architecture": {"tower": tower, "embed_dim": int(model.head.weight.shape[1]),
                         "num_classes": int(model.num_classes)},
        "pretrained_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in model.pretrained_cfg.items()},
        "classnames": list(classnames),
        "templates": list(templates or []),
        "clip": clip_meta,
        "config": config,
        "metrics": metrics or {},
        "weights_sha256": sha256_file(out / "model.safetensors"),
        **(extra or {}),
    }
    atomic_write_text(out / "checkpoint.json", json.dumps(meta, indent=2, default=str) + "\n")
    return out


def load_run_meta(run: str | Path) -> dict:
    p = Path(run)
    meta_file = p / "checkpoint.json" if p.is_dir() else p.with_name("checkpoint.json")
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing; not a grace run folder")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None
    for key in ("architecture", "pretrained_cfg", "classnames"):
        if key not in meta:
            raise CheckpointError(f"{meta_file}: field {key!r} is missing")
    return meta


def load_run(run: str | Path, device: str | torch.device = "cpu", check_sha256: bool = True):
    """Rebuild the ``ClipClassifier`` of a run folder (or its ``model.safetensors``); returns ``(model, meta)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models.classifier import ClipClassifier, ZeroShotHead
    from .models.clip import build_tower

    p = Path(run)
    weights = p / "model.safetensors" if p.is_dir() else p
    meta = load_run_meta(p)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    if check_sha256 and meta.get("weights_sha256") and sha256_file(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: sha256 differs from checkpoint.json; the file is corrupt or replaced")
    try:
        sd = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    arch = meta["architecture"]
    tower = build_tower(arch["tower"])
    head_w = sd.get("head.weight")
    if head_w is None:
        raise CheckpointError(f"{weights}: no 'head.weight' tensor")
    if head_w.shape[0] != arch["num_classes"]:
        raise CheckpointError(f"{weights}: head has {head_w.shape[0]} classes but checkpoint.json says "
                              f"{arch['num_classes']}")
    model = ClipClassifier(tower, ZeroShotHead(head_w, 1.0), meta["pretrained_cfg"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: does not match the architecture in checkpoint.json "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), meta


def json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))
