"""Robust validation during training: a fixed held-out slice scored clean and under a cheap attack, checkpoint
selection over those checks, and a catastrophic-overfitting guard.

Single- and few-step adversarial training can overfit catastrophically: robust accuracy collapses within a few
hundred steps while clean accuracy rises (Wong, Rice, Kolter, "Fast is better than free", ICLR 2020,
https://arxiv.org/abs/2001.03994, Sec. 5.2, which stops early on a PGD check of a training mini-batch; Rice, Wong,
Kolter, "Overfitting in adversarially robust deep learning", ICML 2020, https://arxiv.org/abs/2002.11569, which
selects the checkpoint of best robust validation accuracy). ``select_check`` and ``co_guard_tripped`` are pure
functions of the list of checks; ``Validator`` computes one check.

A check is ``{"step", "val_clean", "val_robust"}`` with accuracies in percent.
"""
from __future__ import annotations

import time

import torch

from .config import SELECT_RULES

__all__ = ["select_check", "co_guard_tripped", "harmonic_mean", "Validator", "ValidatorSet"]

def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def select_check(checks: list[dict], rule: str) -> dict | None:
    """The check whose weights ``rule`` exports: ``last``; ``best_robust`` (highest robust accuracy); ``best_hm``
    (highest harmonic mean of clean and robust accuracy). Ties go to the earlier check (fewer steps, same score)."""
    if rule not in SELECT_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; valid: {', '.join(SELECT_RULES)}")
    if not checks:
        return None
    if rule == "last":
        return checks[-1]
    key = (lambda c: c["val_robust"]) if rule == "best_robust" else (
        lambda c: harmonic_mean(c["val_clean"], c["val_robust"]))
    best = checks[0]
    for c in checks[1:]:
        if key(c) > key(best):
            best = c
    return best


def co_guard_tripped(checks: list[dict], drop_points: float | None) -> bool:
    """True when, between the last two checks, robust accuracy fell by more than ``drop_points`` while clean
    accuracy rose: the signature of catastrophic overfitting (a robust drop with clean accuracy also falling is
    ordinary instability, not this failure)."""
    if drop_points is None or len(checks) < 2:
        return False
    prev, cur = checks[-2], checks[-1]
    return prev["val_robust"] - cur["val_robust"] > drop_points and cur["val_clean"] > prev["val_clean"]


class Validator:
    """Scores a model on fixed images clean and under l_inf PGD (``steps`` steps of ``2.5 eps / steps`` from the
    clean image, no random start: a deterministic check, Madry et al.'s step rule, https://arxiv.org/abs/1706.06083).

    With several processes each rank scores its slice ``rank::world`` and the correct counts are summed, so the
    numbers do not depend on the number of processes.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int, batch_size: int = 64):
        if images.shape[0] == 0:
            raise ValueError("validation set is empty")
        self.images, self.labels = images, labels
        self.eps, self.steps, self.batch_size = float(eps), int(steps), int(batch_size)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __call__(self, model, device, autocast, rank: int = 0, world: int = 1) -> dict:
        from .recipes.adversarial import pgd_attack

        t0 = time.time()
        was_training = model.training
        model.eval()
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        try:
            xs, ys = self.images[rank::world], self.labels[rank::world]
            for i in range(0, xs.shape[0], self.batch_size):
                x, y = xs[i:i + self.batch_size].to(device), ys[i:i + self.batch_size].to(device)
                with torch.no_grad(), autocast():
                    counts[0] += (model(x).argmax(-1) == y).sum()
                if self.steps and self.eps > 0:  # pgd_attack takes input gradients only: .grad stays as it is
                    x_adv = pgd_attack(model, x, y, self.eps, 2.5 * self.eps / self.steps, self.steps,
                                       random_start=False, autocast=autocast)
                    with torch.no_grad(), autocast():
                        counts[1] += (model(x_adv).argmax(-1) == y).sum()
            if not (self.steps and self.eps > 0):
                counts[1] = counts[0]
        finally:
            model.train(was_training)
        if world > 1:
            torch.distributed.all_reduce(counts)
        n = len(self)
        return {"val_clean": round(100.0 * float(counts[0]) / n, 4),
                "val_robust": round(100.0 * float(counts[1]) / n, 4), "val_seconds": time.time() - t0}


class ValidatorSet:
    """Several named slices scored at each check: ``{"val": ..., "train": ...}`` gives ``val_clean``/``val_robust``
    (the held-out slice, which selection and the guard read) and ``train_clean``/``train_robust`` (a slice of the
    training split: the train-test robust gap, Rice et al., arXiv 2002.11569, Fig. 1)."""

    def __init__(self, validators: dict[str, Validator]):
        if "val" not in validators:
            raise ValueError("a ValidatorSet needs the held-out slice 'val'")
        self.validators = dict(validators)

    def __len__(self) -> int:
        return len(self.validators["val"])

    def __call__(self, model, device, autocast, rank: int = 0, world: int = 1) -> dict:
        out, seconds = {}, 0.0
        for prefix, v in self.validators.items():
            res = v(model, device, autocast, rank, world)
            seconds += res.pop("val_seconds")
            out.update({f"{prefix}_{k.split('_', 1)[1]}": val for k, val in res.items()})
        return {**out, "val_seconds": seconds}
