"""Pure state-dict operations: WiSE-FT interpolation and the alpha sweep that traces the ID/OOD frontier.

WiSE-FT (Wortsman et al., CVPR 2022, https://arxiv.org/abs/2109.01903): ``θ_α = (1-α) θ_zs + α θ_ft``
over *every* floating tensor, the zero-shot head included. ``interpolate_state_dicts`` is a pure function (tensors
in, new tensors out); ``wise_ft_sweep`` evaluates a list of alphas with a caller-given ``evaluate`` callable (the
library does not import the evaluation package: ``eval_suites`` sits above it) and returns the points and their
Pareto frontier.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from grace_plugin.errors import UsageError

__all__ = ["interpolate_state_dicts", "interpolated_model", "pareto_frontier", "wise_ft_sweep", "relative_drift"]


def interpolate_state_dicts(zero_shot: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                            alpha: float) -> dict[str, torch.Tensor]:
    """``(1-α) zs + α ft`` per key (floating tensors; integer buffers are taken from ``finetuned``).

    Raises:
        ValueError: the key sets or shapes differ (e.g. LoRA not merged, or a different class count in the head).
    """
    if set(zero_shot) != set(finetuned):
        diff = sorted(set(zero_shot) ^ set(finetuned))
        raise UsageError(f"state dicts have different keys (e.g. {diff[:3]}); merge LoRA and use the same classes")
    out = {}
    for k, ft in finetuned.items():
        zs = zero_shot[k]
        if zs.shape != ft.shape:
            raise UsageError(f"{k}: shape {tuple(zs.shape)} (zero-shot) vs {tuple(ft.shape)} (fine-tuned)")
        if ft.is_floating_point():
            z = zs.to(device=ft.device, dtype=torch.float32)
            out[k] = (z + alpha * (ft.float() - z)).to(ft.dtype) if alpha not in (0.0, 1.0) else (
                zs.to(device=ft.device, dtype=ft.dtype).clone() if alpha == 0.0 else ft.clone())
        else:
            out[k] = ft.clone()
    return out


def interpolated_model(zero_shot: Mapping[str, torch.Tensor], finetuned: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``finetuned`` holding the WiSE-FT weights at ``alpha``."""
    model = copy.deepcopy(finetuned)
    model.load_state_dict(interpolate_state_dicts(zero_shot, finetuned.state_dict(), alpha), strict=True)
    return model


def pareto_frontier(points: list[dict], x: str = "id", y: str = "ood") -> list[dict]:
    """Points not dominated in both ``x`` and ``y`` (higher is better), sorted by ``x``."""
    front = [p for p in points
             if not any(q[x] >= p[x] and q[y] >= p[y] and (q[x] > p[x] or q[y] > p[y]) for q in points)]
    return sorted(front, key=lambda p: p[x])


def wise_ft_sweep(zero_shot: Mapping[str, torch.Tensor] | nn.Module, finetuned: nn.Module, alphas: Iterable[float],
                  evaluate: Callable[[nn.Module], Mapping[str, float]], x: str = "id", y: str = "ood") -> dict:
    """Evaluate the WiSE-FT model at each alpha; return ``{"points": [...], "frontier": [...]}``.

    Args:
        zero_shot: the zero-shot classifier (or its state dict) with the same classes as ``finetuned``.
        finetuned: the fine-tuned classifier (alpha = 1), LoRA merged.
        evaluate: ``model -> {"id": ..., "ood": ..., ...}`` (e.g. a closure over ``eval_suites.engine.run_suites``).
    """
    zs = zero_shot.state_dict() if isinstance(zero_shot, nn.Module) else zero_shot
    points = []
    for a in alphas:
        metrics = dict(evaluate(interpolated_model(zs, finetuned, float(a)).eval()))
        points.append({"alpha": float(a), **metrics})
    have = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    return {"points": points, "frontier": pareto_frontier(have, x, y)}


def relative_drift(state: Mapping[str, torch.Tensor], state0: Mapping[str, torch.Tensor],
                   keys: Sequence[str] | None = None) -> float:
    """``||θ - θ0||_2 / ||θ0||_2`` over ``keys``, by default every floating tensor both state dicts share (same shape).

    The one definition (the geometry suite's ``parameter_drift`` uses it). Edge cases follow the ratio's limit:
    no change at all is 0.0 (also for a zero reference); a change away from an all-zero reference is ``inf`` (an
    unbounded relative change, not "no drift"). Computed in float64; no shared tensor is an error.
    """
    keys = list(keys) if keys is not None else [k for k in state if k in state0 and state[k].shape == state0[k].shape
                                                  and state[k].is_floating_point()]
    if not keys:
        raise ValueError("no shared floating-point parameters between the model and its reference")
    num = sum(float((state[k].double() - state0[k].double()).pow(2).sum()) for k in keys)
    den = sum(float(state0[k].double().pow(2).sum()) for k in keys)
    if num == 0.0:
        return 0.0
    return (num / den) ** 0.5 if den > 0 else float("inf")
