"""Attack registry: a name -> a factory ``(model, eps, norm, seed) -> attack(x, y) -> x_adv``.

Models take [0,1] input with normalisation inside (RobustBench's convention), so no attack here is ever told a
mean/std (ecosystem.md B8). ``apgd-ce`` is pyautoattack's APGD-CE with the settings of AutoAttack's standard
version (100 iterations, 1 restart): the paper's test protocol (spec §1.c). ``pgd`` and ``fgsm`` are torchattacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["register_attack", "list_attacks", "create_attack", "UnknownAttackError", "AttackInfo", "parse_eps"]


class UnknownAttackError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class AttackInfo:
    name: str
    factory: Callable
    norms: tuple[str, ...]
    description: str


_ATTACKS: dict[str, AttackInfo] = {}


def register_attack(name: str, norms: tuple[str, ...] = ("Linf",), description: str = ""):
    def deco(fn):
        if name in _ATTACKS:
            raise ValueError(f"attack {name!r} is already registered")
        _ATTACKS[name] = AttackInfo(name, fn, norms, description or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def list_attacks() -> list[str]:
    return sorted(_ATTACKS)


def get_attack(name: str) -> AttackInfo:
    try:
        return _ATTACKS[name]
    except KeyError:
        raise UnknownAttackError(f"unknown attack {name!r}; valid attacks: {', '.join(list_attacks())}") from None


def create_attack(name: str, model: torch.nn.Module, eps: float, norm: str = "Linf", seed: int = 0,
                  **kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    info = get_attack(name)
    if norm not in info.norms:
        raise ValueError(f"attack {name!r} supports norms {', '.join(info.norms)}, not {norm!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return info.factory(model, eps=eps, norm=norm, seed=seed, **kwargs)


def parse_eps(text: str | float) -> float:
    """``"4/255"``, ``"0.0157"`` or a number -> float; a clear error otherwise."""
    if isinstance(text, (int, float)):
        val = float(text)
    else:
        s = str(text).strip()
        try:
            if "/" in s:
                num, den = s.split("/", 1)
                val = float(num) / float(den)
            else:
                val = float(s)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"bad eps {text!r}: expected a number or a fraction like 4/255") from None
    if not (val >= 0 and val == val and val != float("inf")):
        raise ValueError(f"bad eps {text!r}: must be a finite number >= 0")
    return val


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@register_attack("apgd-ce", norms=("Linf", "L2"))
def _apgd_ce(model, eps, norm, seed, n_iter: int = 100, n_restarts: int = 1):
    """APGD-CE (Croce & Hein 2020) via pyautoattack, AutoAttack-standard settings."""
    import pyautoattack

    def run(x, y):
        if eps == 0:
            return x.detach().clone()
        aa = pyautoattack.AutoAttack(model, attacks=["apgd-ce"], device=x.device, eps=eps, norm=norm, seed=seed,
                                     version="custom")
        aa.apgd.n_restarts, aa.apgd.n_iter = n_restarts, n_iter
        aa.verbose = False
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
        return x_adv.detach()

    return run


@register_attack("pgd", norms=("Linf",))
def _pgd(model, eps, norm, seed, steps: int = 10, alpha: float | None = None):
    """PGD-l_inf with random start (torchattacks), step eps/4 unless given."""
    import torchattacks

    def run(x, y):
        if eps == 0:
            return x.detach().clone()
        torch.manual_seed(seed)
        atk = torchattacks.PGD(model, eps=eps, alpha=alpha if alpha is not None else eps / 4, steps=steps,
                               random_start=True)
        atk.set_device(x.device)
        return atk(x, y).detach()

    return run


@register_attack("fgsm", norms=("Linf",))
def _fgsm(model, eps, norm, seed):
    """FGSM (torchattacks)."""
    import torchattacks

    def run(x, y):
        if eps == 0:
            return x.detach().clone()
        atk = torchattacks.FGSM(model, eps=eps)
        atk.set_device(x.device)
        return atk(x, y).detach()

    return run
