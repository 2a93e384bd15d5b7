"""Safe weight loading: safetensors, or ``torch.load(weights_only=True)``; never a pickle that can run code.

timm's own ``load_state_dict`` calls ``torch.load(weights_only=False)`` for non-safetensors files (timm 1.0.9
``_helpers.load_state_dict``), so our timm entries load through ``load_state_dict_safe`` (cfg ``custom_load``).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from grace_plugin.tensor_io import check_finite
from grace_plugin.errors import GraceError

__all__ = ["WeightsError", "UnsafeWeightsError", "load_state_dict_safe", "verify_sha256"]


class WeightsError(GraceError, ValueError):
    """A weights file that cannot be used; the message names the file."""


class UnsafeWeightsError(WeightsError):
    """A pickle that would import or call arbitrary objects (refused)."""


def load_state_dict_safe(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a tensors-only pickle; unwrap ``state_dict``/``model`` keys."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return check_finite(load_file(str(path), device=str(device)), path)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "Unsupported global" in line or "GLOBAL" in line), "")
        detail = detail.strip().split(". ")[0].split(" To allowlist")[0][:160]  # never torch's weights_only advice
        raise UnsafeWeightsError(f"{path}: refused: this pickle would import or call code ({detail.strip()}); only "
                                 "safetensors files or plain tensor state dicts (torch.load weights_only=True) are "
                                 "loaded") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"{path}: not a readable weights file ({first})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):  # the wrappers timm's load_state_dict and open_clip also unwrap
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return check_finite({k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}, path)


def verify_sha256(path: str | Path, expected: str | None, what: str = "registry entry") -> None:
    """Raise if ``path``'s sha256 differs from ``expected`` (no-op when ``expected`` is empty)."""
    if not expected:
        return
    from grace_plugin.tensor_io import sha256_file

    got = sha256_file(path)
    if got != expected:
        raise WeightsError(f"{path}: sha256 {got[:16]}... differs from the {what}'s {expected[:16]}...; the file is "
                           "corrupt or was replaced (re-run `grace register`)")
