"""Verdicts on the paper's claims from measured rows: holds / fails / inconclusive, as pure functions.

A measured quantity is a ``Spread``: its mean and the interval that expresses our uncertainty about it (mean ± the
sample standard deviation over seeds, or one run's own interval when there is a single seed). A claim
``a > b + margin`` **holds** when the whole of ``a``'s interval lies above the whole of ``b``'s (shifted by the
margin), **fails** when the whole of ``a``'s interval lies at or below ``b``'s, and is **inconclusive** when the
intervals overlap. Compound claims: ``all_of`` holds when every part holds, fails when any part fails, else is
inconclusive.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["Spread", "spread", "greater", "less", "at_least", "overlaps", "all_of", "HOLDS", "FAILS", "INCONCLUSIVE",
           "evaluate_claim", "wilson_interval"]

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"


@dataclass(frozen=True)
class Spread:
    mean: float
    lo: float
    hi: float
    n: int = 1

    def text(self, nd: int = 2) -> str:
        if self.lo == self.hi:
            return f"{self.mean:.{nd}f}"
        return f"{self.mean:.{nd}f} [{self.lo:.{nd}f}, {self.hi:.{nd}f}]"


def spread(values: list[float], interval: tuple[float, float] | None = None) -> Spread | None:
    """Mean ± sample std over ``values`` (several seeds); one value takes ``interval`` (its own, e.g. Wilson) or
    none. None when nothing was measured."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    m = statistics.fmean(vals)
    if len(vals) > 1:
        s = statistics.stdev(vals)
        return Spread(m, m - s, m + s, len(vals))
    if interval is not None:
        return Spread(m, min(interval[0], m), max(interval[1], m), 1)
    return Spread(m, m, m, 1)


def greater(a: Spread | None, b: Spread | None, margin: float = 0.0) -> str:
    """Claim ``a > b + margin``."""
    if a is None or b is None:
        return INCONCLUSIVE
    if a.lo > b.hi + margin:
        return HOLDS
    if a.hi <= b.lo + margin:
        return FAILS
    return INCONCLUSIVE


def less(a: Spread | None, b: Spread | None, margin: float = 0.0) -> str:
    """Claim ``a < b - margin`` (``b > a + margin``)."""
    return greater(b, a, margin)


def at_least(a: Spread | None, b: Spread | None, fraction: float) -> str:
    """Claim ``a >= fraction * b`` (e.g. a cheaper recipe keeps 95% of another's robust accuracy): holds when the
    whole of ``a``'s interval is at or above ``fraction`` times the whole of ``b``'s, fails when it is wholly below."""
    if a is None or b is None:
        return INCONCLUSIVE
    if a.lo >= fraction * b.hi:
        return HOLDS
    if a.hi < fraction * b.lo:
        return FAILS
    return INCONCLUSIVE


def overlaps(a: Spread | None, b: Spread | None) -> str:
    """Claim "``a`` is within ``b``'s spread": holds when the two intervals overlap, fails when they are disjoint."""
    if a is None or b is None:
        return INCONCLUSIVE
    return HOLDS if a.lo <= b.hi and b.lo <= a.hi else FAILS


def all_of(verdicts: list[str]) -> str:
    if not verdicts:
        return INCONCLUSIVE
    if any(v == FAILS for v in verdicts):
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE


def wilson_interval(correct: int, n: int) -> tuple[float, float] | None:
    """95% Wilson score interval in percent: the evaluation engine's (``report.wilson``), as a tuple."""
    from .report import wilson

    ci = wilson(correct, n)
    return None if ci is None else (ci[0], ci[1])


def evaluate_claim(claim: dict, rows: dict[str, dict[str, Spread | None]]) -> dict:
    """One claim of studies.yaml on ``rows`` (method -> metric -> Spread): ``{claim, verdict, evidence}``.

    Kinds: ``greater`` / ``less`` (``a`` vs ``b`` on ``metric``, optional ``margin``), ``greater_all`` (``a`` above
    every method in ``b``; ``b: all`` = every other row), ``steps`` (each ``[x, y]`` of ``pairs``: ``x > y``),
    ``at_least`` (``a >= fraction * b``) and ``within`` (``a``'s interval overlaps ``b``'s).
    """
    kind, metric = claim["kind"], claim["metric"]
    margin = float(claim.get("margin", 0.0))

    def get(m):
        return (rows.get(m) or {}).get(metric)

    def fmt(m):
        s = get(m)
        return f"{m} {s.text()}" if s is not None else f"{m} not measured"

    if kind in ("greater", "less"):
        fn = greater if kind == "greater" else less
        v = fn(get(claim["a"]), get(claim["b"]), margin)
        parts = [{"a": claim["a"], "b": claim["b"], "verdict": v}]
        evidence = f"{fmt(claim['a'])} vs {fmt(claim['b'])}" + (f" (margin {margin:+g})" if margin else "")
    elif kind == "greater_all":
        others = [m for m in rows if m != claim["a"]] if claim["b"] == "all" else list(claim["b"])
        parts = [{"a": claim["a"], "b": m, "verdict": greater(get(claim["a"]), get(m), margin)} for m in others]
        v = all_of([p["verdict"] for p in parts])
        evidence = f"{fmt(claim['a'])} vs " + "; ".join(f"{fmt(m)} ({p['verdict']})" for m, p in zip(others, parts))
    elif kind == "steps":
        parts = [{"a": x, "b": y, "verdict": greater(get(x), get(y), margin)} for x, y in claim["pairs"]]
        v = all_of([p["verdict"] for p in parts])
        evidence = "; ".join(f"{fmt(p['a'])} > {fmt(p['b'])}: {p['verdict']}" for p in parts)
    elif kind == "at_least":
        fraction = float(claim["fraction"])
        v = at_least(get(claim["a"]), get(claim["b"]), fraction)
        parts = [{"a": claim["a"], "b": claim["b"], "verdict": v}]
        evidence = f"{fmt(claim['a'])} vs {fraction:g} x {fmt(claim['b'])}"
    elif kind == "within":
        v = overlaps(get(claim["a"]), get(claim["b"]))
        parts = [{"a": claim["a"], "b": claim["b"], "verdict": v}]
        evidence = f"{fmt(claim['a'])} vs {fmt(claim['b'])}"
    else:
        raise ValueError(f"unknown claim kind {kind!r}; valid: greater, less, greater_all, steps, at_least, within")
    return {"claim": claim["claim"], "metric": metric, "verdict": v, "evidence": evidence, "parts": parts}
