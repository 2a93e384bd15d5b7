"""The search space and the rules of ``grace study tune``, as pure functions (Optuna drives the search itself).

An axis is a dotted config key searched log-uniformly between ``low`` and ``high`` (Optuna's
``suggest_float(log=True)``) or over a list of ``choices``. Two rules keep a selection honest:

* **Edge rule.** A selected value in the outer tenth of its log range (``position <= 0.1`` or ``>= 0.9`` of
  ``log(v / low) / log(high / low)``) may have its optimum outside the range: that side is widened by a decade and
  the search goes on (``edge_side``, ``widen``). A categorical axis has no edge.
* **Collapse rule.** A trial whose model's feature spread (the mean cosine between the features of different
  validation images, ``grace_plugin.losses.feature_spread``) is at or above a threshold, or not finite, has collapsed:
  every image looks alike to it, and a high score there is an artefact of the attack failing on a degenerate model.
  It is recorded and never selected (``collapsed``). On the testbed the zero-shot CLIP sits at 0.35, full TeCoA at
  0.70 and a collapsed GRACE at 0.998 (docs/results/quickstart.md), so tuning.yaml's threshold is 0.9.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["Axis", "parse_space", "edge_side", "widen", "collapsed", "selectable"]


@dataclass(frozen=True)
class Axis:
    key: str  # a dotted config key (as for --set)
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None  # a categorical axis instead of a log-uniform range

    @property
    def categorical(self) -> bool:
        return self.choices is not None

    def contains(self, value) -> bool:
        if self.categorical:
            return value in self.choices
        return self.low <= float(value) <= self.high

    def record(self) -> dict | list:
        return list(self.choices) if self.categorical else {"low": self.low, "high": self.high, "log": True}


def parse_space(method: str, spec: dict) -> list[Axis]:
    """tuning.yaml's ``space: {method: {key: {low, high} | [choices]}}`` entry of one method; a bad axis is one
    ConfigError naming it."""
    from grace_plugin.config import ConfigError

    axes = []
    for key, v in (spec or {}).items():
        where = f"tuning.yaml: space.{method}.{key}"
        if isinstance(v, list):
            if not v:
                raise ConfigError(f"{where}: an empty list of choices")
            axes.append(Axis(str(key), choices=tuple(v)))
            continue
        if not isinstance(v, dict) or set(v) - {"low", "high", "log"} or not {"low", "high"} <= set(v):
            raise ConfigError(f"{where}: expected {{low, high}} (log-uniform) or a list of choices")
        if v.get("log", True) is not True:
            raise ConfigError(f"{where}: only log-uniform ranges are searched (log: true)")
        low, high = float(v["low"]), float(v["high"])
        if not 0 < low < high:
            raise ConfigError(f"{where}: need 0 < low < high, got low {low:g}, high {high:g}")
        axes.append(Axis(str(key), low, high))
    if not axes:
        raise ConfigError(f"tuning.yaml: space.{method} has no axis")
    return axes


def edge_side(axis: Axis, value, tenth: float = 0.1) -> str | None:
    """``"low"`` or ``"high"`` when ``value`` lies in that outer ``tenth`` of the axis's log range, else None."""
    if axis.categorical:
        return None
    pos = math.log(float(value) / axis.low) / math.log(axis.high / axis.low)
    if pos <= tenth:
        return "low"
    if pos >= 1 - tenth:
        return "high"
    return None


def widen(axis: Axis, side: str) -> Axis:
    """The axis with its ``side`` moved out by a decade (low / 10 or high x 10)."""
    if side == "low":
        return replace(axis, low=axis.low / 10)
    if side == "high":
        return replace(axis, high=axis.high * 10)
    raise ValueError(f"side must be low or high, got {side!r}")


def collapsed(feature_spread: float | None, threshold: float) -> bool:
    """The collapse rule: a spread at or above ``threshold`` or not finite. None (a model without features to
    measure) is not collapsed: nothing says so."""
    if feature_spread is None:
        return False
    return not math.isfinite(feature_spread) or feature_spread >= threshold


def selectable(row: dict, threshold: float) -> bool:
    """A trial may be selected: it finished, its score is finite and it has not collapsed."""
    score = row.get("score")
    return (row.get("state") == "complete" and score is not None and math.isfinite(score)
            and not collapsed(row.get("feature_spread"), threshold))


# the convergence rule's default (tuning.yaml ``converge_delta``): score points the best may still gain over the
# last third of the trials before the budget counts as converged
CONVERGE_DELTA = 0.5


def score_key(score: str) -> str:
    """The trial field a method's tuning score reads: ``hm`` (validation HM), else ``val_clean`` (``score: clean``)."""
    return "hm" if score == "hm" else "val_clean"


def best_so_far(trials: list[dict], threshold: float, key: str) -> list[float | None]:
    """After each trial, in trial order, the best plain score (``key``: ``hm`` or ``val_clean``) among the
    selectable trials so far (pruned, collapsed and diverged trials never count); None before the first."""
    best, out = None, []
    for r in sorted(trials, key=lambda r: r["trial"]):
        if selectable(r, threshold) and r.get(key) is not None:
            best = r[key] if best is None else max(best, r[key])
        out.append(best)
    return out


def late_gain(curve: list[float | None]) -> float | None:
    """How much a best-so-far curve rose over its last third: ``curve[-1] - curve[floor(2n/3) - 1]`` (the best after
    the first two thirds of the trials); None with fewer than 3 trials or no selectable trial by then. A budget has
    converged when this is at most ``converge_delta``."""
    n = len(curve)
    if n < 3 or curve[-1] is None:
        return None
    before = curve[(2 * n) // 3 - 1]
    return None if before is None else curve[-1] - before
