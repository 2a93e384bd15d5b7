"""Tensor files: atomic writes (temp file + ``os.replace``, fsync), safetensors reads, ``weights_only`` torch reads,
finiteness checks, and one-line errors for a file that is missing, corrupt, unsafe or does not fit.

Everything that reads or writes tensors goes through here; the run-folder protocol (``checkpoint.py``) and model
loading (``models/clip.py``) sit on top of it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from collections.abc import Iterator

import torch

from .errors import GraceError

__all__ = ["atomic_path", "atomic_write_text", "sha256_file", "save_tensors", "CheckpointError", "DiskFullError",
           "NonFiniteError", "check_finite", "read_tensors", "torch_load_tensors", "check_outputs_finite",
           "raise_disk_full", "current_umask", "load_state_dict_checked"]


class CheckpointError(GraceError, ValueError):
    """A run folder or weights file that cannot be loaded; the message names the file."""


class NonFiniteError(CheckpointError):
    """Weights or outputs holding NaN/Inf; the message names the file (or model) and the tensor."""


def check_finite(sd: dict, where: str | Path) -> dict:
    """Refuse a state dict holding NaN/Inf in any floating tensor (a NaN model evaluates at chance, silently)."""
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            finite = torch.isfinite(v)
            if not bool(finite.all()):
                nan = int(torch.isnan(v).sum())
                raise NonFiniteError(f"{where}: tensor {k!r} holds non-finite values ({nan} NaN, "
                                     f"{int((~finite).sum()) - nan} Inf of {v.numel()}); refusing to load it")
    return sd


def torch_load_tensors(path: str | Path, device: str | torch.device = "cpu", what: str = "weights file"):
    """``torch.load(weights_only=True)`` with one-line errors: a pickle that would import or call code is refused
    (torch's own message suggests turning ``weights_only`` off, which must never be followed for untrusted files)."""
    import pickle

    path = Path(path)
    try:
        return torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln), "")
        detail = detail.split(". ")[0].split(" To allowlist")[0][:160]
        raise CheckpointError(f"{path}: refused: this {what} is a pickle that would import or call code"
                              f"{' (' + detail + ')' if detail else ''}; only safetensors files or plain tensor "
                              "dicts are loaded") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a readable {what} ({first})") from None


def read_tensors(path: str | Path, device: str | torch.device = "cpu", what: str = "weights file") -> dict:
    """A ``.safetensors`` file (or a tensors-only pickle) as a dict of tensors, refused if any is non-finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        sd = torch_load_tensors(path, device, what)
    if isinstance(sd, dict):
        check_finite(sd, path)
    return sd


@torch.no_grad()
def check_outputs_finite(model, images: torch.Tensor, where: str) -> None:
    """Refuse a model whose logits on ``images`` are non-finite (finite weights can still give NaN logits)."""
    was_training = model.training
    model.eval()
    try:
        logits = model(images)
    finally:
        model.train(was_training)
    bad = int((~torch.isfinite(logits)).any(-1).sum()) if logits.ndim > 1 else int((~torch.isfinite(logits)).sum())
    if bad:
        raise NonFiniteError(f"{where}: the model gives non-finite logits on {bad} of {images.shape[0]} images; "
                             "it is not saved (lower train.lr, or check the data)")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success it replaces ``final`` in one step, on error it is removed.

    The file gets the permissions a plain ``open`` would give it (``0666 & ~umask``, not ``mkstemp``'s 0600). A
    write that fails because the disk is full raises :class:`DiskFullError` (one line naming the file)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as e:
        raise_disk_full(e, final)
        raise CheckpointError(f"{final}: cannot write here ({e.strerror or e})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, Exception):
            raise_disk_full(e, final)
        raise


def current_umask() -> int:
    """The process umask (read from /proc where possible: ``os.umask`` can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DiskFullError(CheckpointError):
    """No space left on the device while writing; the message names the file."""


_DISK_FULL_TEXT = ("No space left on device", "code: 28", "StorageFull", "Disk quota exceeded")


def raise_disk_full(e: BaseException, path: str | Path) -> None:
    """Re-raise a failed write as one :class:`DiskFullError` line when the disk (or quota) is full.

    ``OSError`` carries ``errno``; safetensors and ``torch.save`` wrap it in their own errors (text only), so their
    message is matched and, for torch's "file write failed", the free space of the folder is checked."""
    import errno

    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    full = full or any(t in text for t in _DISK_FULL_TEXT)
    if not full and "write" in text.lower():
        with contextlib.suppress(OSError):
            st = os.statvfs(Path(path).parent)
            full = st.f_bavail * st.f_frsize < (1 << 20)
    if full:
        raise DiskFullError(f"{path}: no space left on the device while writing it; free some space and re-run "
                            "(the previous complete files are untouched)") from None


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


def load_state_dict_checked(module, sd: dict, where: str | Path, strict: bool = False):
    """``module.load_state_dict`` with a tensor of the wrong shape reported as one line naming the file and tensor
    (torch raises a multi-line RuntimeError)."""
    own = module.state_dict()
    for k, v in sd.items():
        if k in own and hasattr(v, "shape") and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(v.shape)} but the architecture expects "
                                  f"{tuple(own[k].shape)}")
    return module.load_state_dict(sd, strict=strict)
