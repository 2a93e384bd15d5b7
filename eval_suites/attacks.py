"""Attack registry: a name -> a factory ``(model, eps, norm, seed) -> attack(x, y) -> x_adv``.

Models take [0,1] input with normalisation inside (RobustBench's convention), so no attack here is ever told a
mean/std (torchattacks' ``set_normalization_used`` would make it expect and return normalised images). ``apgd-ce``
is pyautoattack's APGD-CE with the settings of AutoAttack's standard version (100 iterations, 1 restart): the
paper's test protocol (arXiv 2603.27139 Sec. 6.1). ``apgd-dlr`` and ``square`` are the same pyautoattack
components; ``autoattack`` is pyautoattack's ``version='standard'`` (APGD-CE, APGD-T with 9 targets, FAB-T with 9
targets, Square 5000 queries, 100 iterations), exactly what ``robustbench.eval.benchmark`` runs
(https://github.com/RobustBench/robustbench/blob/master/robustbench/eval.py; torchattacks' AutoAttack is
weaker: its APGD/FAB default to 10 steps). ``pgd`` and ``fgsm`` are torchattacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch

from grace_plugin.registries import Registry, first_doc_line
from grace_plugin.errors import GraceError, UsageError

__all__ = ["register_attack", "list_attacks", "create_attack", "get_attack", "UnknownAttackError", "AttackInfo",
           "parse_eps", "format_eps", "InputRangeError", "check_unit_input"]


class UnknownAttackError(GraceError, KeyError):
    pass


@dataclass(frozen=True)
class AttackInfo:
    name: str
    factory: Callable
    norms: tuple[str, ...]
    description: str


_ATTACKS: Registry[AttackInfo] = Registry("attack", UnknownAttackError)


def register_attack(name: str, norms: tuple[str, ...] = ("Linf",), description: str = ""):
    return _ATTACKS.register(name, lambda fn: AttackInfo(name, fn, norms, description or first_doc_line(fn)))


def list_attacks() -> list[str]:
    return _ATTACKS.names()


def get_attack(name: str) -> AttackInfo:
    return _ATTACKS.get(name)


def create_attack(name: str, model: torch.nn.Module, eps: float, norm: str = "Linf", seed: int = 0,
                  **kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    info = get_attack(name)
    if norm not in info.norms:
        raise UsageError(f"attack {name!r} supports norms {', '.join(info.norms)}, not {norm!r}")
    if eps < 0:
        raise UsageError(f"--eps must be >= 0, got {eps}")
    return info.factory(model, eps=eps, norm=norm, seed=seed, **kwargs)


NORMS = ("Linf", "L2")


def check_eps_for_norm(obj) -> None:
    """Cross-field rule for a request with ``eps`` and ``norm`` (``--eps``, ``--norm``): images live in [0,1], so an
    Linf radius above 1 (e.g. ``--eps 300`` for 300/255) covers every image and is refused."""
    from grace_plugin.config import ConfigError

    if obj.norm == "Linf" and obj.eps > 1:
        raise ConfigError(f"--eps {obj.eps:g}: an Linf radius on [0,1] images must be <= 1 (write 4/255, not 4)")


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
            raise UsageError(f"bad eps {text!r}: expected a number or a fraction like 4/255") from None
    if not (val >= 0 and val == val and val != float("inf")):
        raise UsageError(f"bad eps {text!r}: must be a finite number >= 0")
    return val


def format_eps(eps: float) -> str:
    """``4/255`` for multiples of 1/255 (RobustBench's spelling), else the shortest float text."""
    k = round(eps * 255)
    return f"{k}/255" if abs(eps * 255 - k) < 1e-6 else repr(float(eps))


class InputRangeError(GraceError, ValueError):
    """An attack was asked to run on a model that does not declare [0,1] input."""


def check_unit_input(model: torch.nn.Module, unit_input: bool | None = None, name: str = "model") -> None:
    """Refuse a model that does not take [0,1] pixels: an attack on normalised input has the wrong eps-ball (B8).

    Evidence, in order: an explicit ``unit_input`` flag; a ``model.input_range`` attribute; a ``normalize`` child
    module holding ``mean``/``std`` (our ``ClipClassifier`` and RobustBench's ``normalize_model`` both have one);
    a timm ``pretrained_cfg`` with identity mean/std. A plain timm model expects normalised input and is refused.
    """
    if unit_input is not None:
        ok = bool(unit_input)
    elif getattr(model, "input_range", None) is not None:
        ok = tuple(float(v) for v in model.input_range) == (0.0, 1.0)
    else:
        norm = getattr(model, "normalize", None)
        ok = norm is not None and hasattr(norm, "mean") and hasattr(norm, "std")
        if not ok:
            cfg = getattr(model, "pretrained_cfg", None) or {}
            ok = (tuple(cfg.get("mean", ())) == (0.0, 0.0, 0.0) and tuple(cfg.get("std", ())) == (1.0, 1.0, 1.0))
    if not ok:
        raise InputRangeError(
            f"{name} ({type(model).__name__}) does not take [0,1] input: adversarial suites need the normalisation "
            "inside the model (a `normalize` module, as in ClipClassifier or RobustBench's normalize_model), an "
            "`input_range = (0, 1)` attribute, or an explicit --unit-input flag if you know it takes [0,1] pixels")


def _register_pyautoattack(name: str, description: str, attacks: list[str] | None = None, version: str = "custom",
                           **options: tuple[str, str, int]) -> None:
    """Register one pyautoattack-backed entry: ``AutoAttack(attacks=attacks, version=version)`` run on the batch.

    ``options``: ``option=(component, attribute, default)``; ``create_attack(name, ..., option=v)`` sets
    ``AutoAttack.<component>.<attribute> = v`` before the run (e.g. ``n_iter=("apgd", "n_iter", 100)``).
    """

    def factory(model, eps, norm, seed, **given):
        unknown = sorted(set(given) - set(options))
        if unknown:
            raise TypeError(f"attack {name!r}: unknown option(s) {unknown}; valid: {', '.join(options) or 'none'}")
        values = {k: given.get(k, default) for k, (_, _, default) in options.items()}

        def run(x, y):
            if eps == 0:
                return x.detach().clone()
            import pyautoattack

            aa = pyautoattack.AutoAttack(model, attacks=attacks, device=x.device, eps=eps, norm=norm, seed=seed,
                                         version=version)
            aa.verbose = False
            for key, (component, attribute, _) in options.items():
                setattr(getattr(aa, component), attribute, values[key])
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
            return x_adv.detach()

        return run

    register_attack(name, norms=("Linf", "L2"), description=description)(factory)


_register_pyautoattack("apgd-ce", "APGD-CE (Croce & Hein 2020) via pyautoattack, AutoAttack-standard settings.",
                       ["apgd-ce"], n_iter=("apgd", "n_iter", 100), n_restarts=("apgd", "n_restarts", 1))
_register_pyautoattack("apgd-dlr", "APGD-DLR (Croce & Hein 2020) via pyautoattack, 100 iterations, 1 restart (needs "
                       ">= 3 classes).", ["apgd-dlr"], n_iter=("apgd", "n_iter", 100),
                       n_restarts=("apgd", "n_restarts", 1))
_register_pyautoattack("square", "Square Attack (Andriushchenko et al. 2020) via pyautoattack, 5000 queries as in "
                       "AutoAttack standard.", ["square"], n_queries=("square", "n_queries", 5000))
# version='standard' fixes APGD-CE (1 restart), APGD-T and FAB-T (9 targets), Square (5000 queries), 100 iterations.
_register_pyautoattack("autoattack", "Standard AutoAttack (pyautoattack version='standard'): what "
                       "robustbench.eval.benchmark runs.", version="standard")


@register_attack("pgd", norms=("Linf", "L2"))
def _pgd(model, eps, norm, seed, steps: int = 10, alpha: float | None = None):
    """PGD with random start (torchattacks PGD / PGDL2), step eps/4 unless given."""
    import torchattacks

    def run(x, y):
        if eps == 0:
            return x.detach().clone()
        torch.manual_seed(seed)
        cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
        atk = cls(model, eps=eps, alpha=alpha if alpha is not None else eps / 4, steps=steps, random_start=True)
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
