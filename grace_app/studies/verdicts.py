"""Verdicts on the paper's claims from measured rows: holds / fails / inconclusive, as pure functions.

A measured quantity is a ``Spread``: its mean and the interval that expresses our uncertainty about it (mean ± the
sample standard deviation over seeds, or one run's own interval when there is a single seed). A claim
``a > b + margin`` **holds** when the whole of ``a``'s interval lies above the whole of ``b``'s (shifted by the
margin), **fails** when the whole of ``a``'s interval lies at or below ``b``'s, and is **inconclusive** when the
intervals overlap. Compound claims: ``all_of`` holds when every part holds, fails when any part fails, else is
inconclusive.

A non-inferiority claim ``a >= fraction * b`` (``at_least``) is a question about a mean difference, which a spread
rule cannot settle however many seeds are run (the sample std does not shrink with n). When both rows were measured
on the same seeds (the same data order and initialisation), it is decided on the paired differences
``d_s = a_s - fraction * b_s``: **holds** when the two-sided 95% Student-t interval of their mean lies at or above 0,
**fails** when it lies below 0, else **inconclusive** (a paired t-test, e.g. Wasserman, *All of Statistics*, 10.1;
the seed is the pairing unit). Without two common seeds it falls back to the spread rule.

``greater`` / ``less`` claims are paired too: on per-sample results (same seeds, same images) by the bootstrap
interval of the difference (``paired_samples_bootstrap``); on a metric without per-sample results (a geometry
metric) by the same Student-t interval over common seeds; by spreads only with fewer than two common seeds.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from ..testbed.configs import CLAIM_KEYS

__all__ = ["CLAIM_KEYS", "Spread", "spread", "seed_mean", "greater", "less", "at_least", "paired", "paired_difference",
           "paired_bootstrap", "paired_verdict", "overlaps", "all_of", "HOLDS", "FAILS", "INCONCLUSIVE",
           "evaluate_claim", "wilson_interval", "equivalence", "EQUIVALENCE_MARGIN", "DEFINITIONS",
           "paper_roles", "kendall_w"]

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"
# "level" or "tie" is said only of a paired difference whose 90% interval lies within +-EQUIVALENCE_MARGIN points:
# two one-sided tests at the 5% level (Schuirmann, J. Pharmacokinet. Biopharm. 15(6), 1987); otherwise an interval
# that holds 0 is "inconclusive"
EQUIVALENCE_MARGIN = 1.0
# the column definitions a verdict is computed under: ours (OOD = every OOD set, Adv = the attack) and the paper's
# Table 6 (OOD = the v2/sketch/r sets, Adv = mean of the attack and the natural-adversarial a/a-plus sets)
DEFINITIONS = ("ours", "paper")


@dataclass(frozen=True)
class Spread:
    mean: float
    lo: float
    hi: float
    n: int = 1
    by_seed: tuple[tuple[int, float], ...] = ()  # (seed, value) of each run, for paired claims
    # (seed, {"id": str, "ood": {set: str}, "adv": str}) per-sample results of each run, for paired bootstraps
    samples: tuple = ()
    kind: str = "spread"  # what [lo, hi] is: "spread" (mean ± std / a run's Wilson 95%) or a named 95% interval
    definition: str = "ours"  # the column definition of id/ood/adv/hm (``DEFINITIONS``), for paired bootstraps
    ci90: tuple[float, float] | None = None  # a paired difference's 90% interval (the equivalence test's)

    def record(self) -> dict:
        """``{"mean", "interval": [lo, hi], "interval_kind", "n"}`` for study.json (the 95% intervals are
        ``ci95``-named where they are one: a paired difference's t or bootstrap interval)."""
        key = "ci95" if self.kind != "spread" else "interval"
        out = {"mean": self.mean, key: [self.lo, self.hi], "interval_kind": self.kind, "n": self.n}
        if self.ci90 is not None:
            out["ci90"] = list(self.ci90)
        return out

    def text(self, nd: int = 2) -> str:
        """The value with what its spread is: ``m ± s SD`` over seeds, ``m [lo, hi] (Wilson 95%)`` for one run, a
        named interval otherwise; never a standard deviation in the brackets of an interval."""
        if self.lo == self.hi:
            return f"{self.mean:.{nd}f}"
        if self.kind == "spread" and self.n > 1:
            return f"{self.mean:.{nd}f} ± {(self.hi - self.lo) / 2:.{nd}f} SD"
        name = "Wilson 95%" if self.kind == "spread" else self.kind
        return f"{self.mean:.{nd}f} [{self.lo:.{nd}f}, {self.hi:.{nd}f}] ({name})"


def _measured(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def seed_mean(values: list) -> tuple[float | None, float | None]:
    """Mean and sample std of a metric over a row's seeds (std None with one seed); both None when any seed did not
    measure it, so a missing run never shrinks the denominator silently. The one aggregation of the quickstart's
    and the studies' rows."""
    if not values or not all(_measured(v) for v in values):
        return None, None
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def spread(values: list[float], interval: tuple[float, float] | None = None,
           seeds: list[int] | None = None) -> Spread | None:
    """Mean ± sample std over ``values`` (several seeds, named by ``seeds`` for paired claims); one value takes
    ``interval`` (its own, e.g. Wilson) or none. None when nothing was measured."""
    pairs = [(s, float(v)) for s, v in zip(seeds if seeds is not None else range(len(values)), values)
             if _measured(v)]
    by_seed = tuple(pairs) if seeds is not None else ()
    vals = [v for _, v in pairs]
    if not vals:
        return None
    m = statistics.fmean(vals)
    if len(vals) > 1:
        s = statistics.stdev(vals)
        return Spread(m, m - s, m + s, len(vals), by_seed)
    if interval is not None:
        return Spread(m, min(interval[0], m), max(interval[1], m), 1, by_seed)
    return Spread(m, m, m, 1, by_seed)


def paper_roles(sets) -> dict[str, str]:
    """Each OOD set's place under the paper's Table 6 definitions, from the shard-set catalogue's ``paper`` column:
    ``ood`` (v2, sketch, r: "OOD Avg"), ``adv`` (a, a-plus: "Adv Avg" beside the attack) or ``none``."""
    from eval_suites.shardsets import get_shardset

    def role(name):
        entry = get_shardset(name)
        paper = getattr(entry, "paper", None)
        return "ood" if paper in ("v2", "sketch", "r") else "adv" if paper in ("a", "a-plus") else "none"

    return {s: role(s) for s in sets}


def _axis_values(data: dict, cols: dict, definition: str = "ours") -> dict:
    """Per-seed axes from per-sample arrays: ``data[axis]`` is ``(rows, images)`` (``ood``: a dict of sets), ``cols``
    the resampled image indices of each set (``None``: all), under a column definition (``DEFINITIONS``): ours, or
    the paper's (``paper_roles``), as the report computes them."""
    def mean(a, c):
        return (a if c is None else a[..., c]).mean(axis=-1)

    return _axes_from_means({"id": mean(data["id"], cols.get("id")), "adv": mean(data["adv"], cols.get("adv")),
                             "ood": {k: mean(v, cols.get(("ood", k))) for k, v in data["ood"].items()}}, definition)


def _axes_from_means(m: dict, definition: str) -> dict:
    """The axes (in %) from each set's accuracy (a fraction, any array shape): ``m = {"id", "adv", "ood": {set}}``."""
    import numpy as np

    out, sets = {"id": m["id"], "adv": m["adv"]}, m["ood"]
    if definition == "paper":
        roles = paper_roles(sets)
        out["ood"] = np.mean([v for k, v in sets.items() if roles[k] == "ood"], axis=0)
        out["adv"] = np.mean([out["adv"], *(v for k, v in sets.items() if roles[k] == "adv")], axis=0)
    elif definition == "ours":
        out["ood"] = np.mean(list(sets.values()), axis=0)
    else:
        raise ValueError(f"column definition {definition!r}; valid: {', '.join(DEFINITIONS)}")
    return {k: 100.0 * v for k, v in out.items()}


def equivalence(d: Spread | None, margin: float = EQUIVALENCE_MARGIN) -> bool | None:
    """Two one-sided tests at the 5% level on a paired difference: True when its 90% interval lies within
    ``(-margin, margin)`` (equivalent: "level"), False when not, None without a 90% interval."""
    if d is None or d.ci90 is None:
        return None
    return -margin < d.ci90[0] and d.ci90[1] < margin


def _metric(axes: dict, metric: str):
    import numpy as np

    if metric != "hm":
        return axes[metric]
    vals = np.stack([axes["id"], axes["ood"], axes["adv"]])
    with np.errstate(divide="ignore"):
        hm = 3.0 / (1.0 / vals).sum(axis=0)
    return np.where((vals <= 0).any(axis=0), 0.0, hm)  # the report's HM: 0 when an axis is 0


def paired_samples_bootstrap(a: Spread | None, b: Spread | None, metric: str, margin: float = 0.0,
                             n_boot: int = 2000, seed: int = 0) -> Spread | None:
    """The paired difference ``metric(a) - metric(b) - margin`` (metric ``id``, ``ood``, ``adv`` or ``hm``, each a
    mean over seeds of the per-seed value, as the study reports it) with its 95% percentile bootstrap interval,
    from both rows' per-sample results on their common seeds: every replicate resamples the seeds and, per image
    set, the images, the same draws for both rows (``paired_bootstrap``'s design applied to the axes). None when
    the rows carry no per-sample results on a common seed (evaluations cached before they were recorded)."""
    import numpy as np

    if a is None or b is None or metric not in AXES_PAIRED:
        return None
    sa, sb = dict(a.samples), dict(b.samples)
    common = sorted(set(sa) & set(sb))
    if not common or any(not _has_samples(sa[s]) or not _has_samples(sb[s]) for s in common):
        return None

    def arrays(src):  # (seeds, images) 0/1 arrays of each axis's sets
        def arr(strings):
            return np.array([[c == "1" for c in x] for x in strings], dtype=float)
        return {"id": arr(src[s]["id"] for s in common), "adv": arr(src[s]["adv"] for s in common),
                "ood": {k: arr(src[s]["ood"][k] for s in common) for k in sorted(src[common[0]]["ood"])}}

    da, db = arrays(sa), arrays(sb)

    if a.definition != b.definition:
        raise ValueError(f"paired rows under two column definitions: {a.definition}, {b.definition}")

    def value(d, rows, cols):  # the metric, mean over the resampled seeds, on the resampled images
        d = {"id": d["id"][rows], "adv": d["adv"][rows], "ood": {k: v[rows] for k, v in d["ood"].items()}}
        return _metric(_axis_values(d, cols, a.definition), metric).mean()

    every = np.arange(len(common))
    point = float(value(da, every, {}) - value(db, every, {})) - margin
    sizes = {"id": da["id"].shape[1], "adv": da["adv"].shape[1],
             **{("ood", k): v.shape[1] for k, v in da["ood"].items()}}
    rng, S = np.random.default_rng(seed), len(common)
    rows = np.empty((n_boot, S), dtype=np.int64)  # each replicate's draws, in the order one loop would draw them
    cols = {k: np.empty((n_boot, n), dtype=np.int64) for k, n in sizes.items()}
    for i in range(n_boot):
        rows[i] = rng.integers(0, S, size=S)
        for k, n in sizes.items():
            cols[k][i] = rng.integers(0, n, size=n)

    def values(d, r, counts):  # every replicate of a block at once: (replicates,) of the metric
        def acc(x, key):  # (replicates, seeds): each resampled seed's accuracy on its resampled images, as the
            n = x.shape[1]  # resampled images' multiplicities times the 0/1 results (exact: sums of integers)
            return (x @ counts[key].T / n).T[np.arange(len(r))[:, None], r]
        m = {"id": acc(d["id"], "id"), "adv": acc(d["adv"], "adv"),
             "ood": {k: acc(v, ("ood", k)) for k, v in d["ood"].items()}}
        return _metric(_axes_from_means(m, a.definition), metric).mean(axis=-1)

    stats = np.empty(n_boot)
    for i in range(0, n_boot, 250):  # blocks of replicates: memory bounded
        r = rows[i:i + 250]
        counts = {k: np.bincount((v[i:i + 250] + sizes[k] * np.arange(len(r))[:, None]).ravel(),
                                 minlength=len(r) * sizes[k]).reshape(len(r), sizes[k]).astype(float)
                  for k, v in cols.items()}
        stats[i:i + len(r)] = values(da, r, counts) - values(db, r, counts)
    lo5, lo, hi, hi95 = np.percentile(stats - margin, [2.5, 5.0, 95.0, 97.5])
    return Spread(point, float(lo5), float(hi95), S, kind="paired bootstrap 95%", definition=a.definition,
                  ci90=(float(lo), float(hi)))


AXES_PAIRED = ("id", "ood", "adv", "hm")


def _has_samples(d: dict) -> bool:
    return bool(d.get("id")) and bool(d.get("adv")) and bool(d.get("ood")) and all(d["ood"].values())


def greater(a: Spread | None, b: Spread | None, margin: float = 0.0, metric: str | None = None) -> str:
    """Claim ``a > b + margin``. With ``metric`` and per-sample results on common seeds: decided on the paired
    bootstrap interval of ``a - b - margin`` (``paired_samples_bootstrap``, ``paired_verdict``); otherwise by
    spreads (below)."""
    return _greater(a, b, margin, metric)[0]


def _greater(a, b, margin: float = 0.0, metric: str | None = None) -> tuple[str, Spread | None]:
    if a is None or b is None:
        return INCONCLUSIVE, None
    d = paired_samples_bootstrap(a, b, metric, margin) if metric else None
    if d is None:  # no per-sample results (e.g. a geometry metric): the per-seed values, paired by seed
        t = paired(a, b)
        d = t if t is None else replace(t, mean=t.mean - margin, lo=t.lo - margin, hi=t.hi - margin,
                                        ci90=(t.ci90[0] - margin, t.ci90[1] - margin))
    if d is not None:
        return paired_verdict(d, "greater"), d
    return _by_spreads(a, b, margin), None


def _by_spreads(a: Spread, b: Spread, margin: float) -> str:
    if a.lo > b.hi + margin:
        return HOLDS
    if a.hi <= b.lo + margin:
        return FAILS
    return INCONCLUSIVE


def less(a: Spread | None, b: Spread | None, margin: float = 0.0, metric: str | None = None) -> str:
    """Claim ``a < b - margin`` (``b > a + margin``)."""
    return greater(b, a, margin, metric)


def paired_difference(a: dict[int, float], b: dict[int, float], fraction: float = 1.0) -> Spread | None:
    """Mean of ``a_s - fraction * b_s`` over the seeds both measured, with its two-sided 95% Student-t interval
    (``n`` = the common seeds); None with fewer than two."""
    from scipy import stats

    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    d = [a[s] - fraction * b[s] for s in common]
    m, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    h, h90 = (float(stats.t.ppf(q, len(d) - 1)) * se for q in (0.975, 0.95))
    return Spread(m, m - h, m + h, len(d), tuple(zip(common, d)), kind="paired t 95%", ci90=(m - h90, m + h90))


def paired_bootstrap(a, b, n_boot: int = 10000, seed: int = 0, confidence: float = 0.95) -> Spread:
    """Mean paired difference ``a - b`` in points and its percentile bootstrap interval, from per-sample results of
    two methods on the same images and seeds: ``a``, ``b`` are ``(seeds, images)`` arrays (or the reports'
    ``per_sample`` strings, one per seed) of 0/1 (or any scores). Each bootstrap replicate resamples the images
    (columns, jointly for every seed: an image is the same image under every seed) and the seeds (rows) with
    replacement, so both sources of variation are in the interval (Efron & Tibshirani, *An Introduction to the
    Bootstrap*, 1993, ch. 13, percentile interval; the two-level resampling of crossed designs: Owen, Ann. Appl. Stat.
    1(2), 2007). Values in percent when the inputs are 0/1."""
    import numpy as np

    def arr(x):
        rows = [x] if isinstance(x, str) else list(x)
        return np.array([[float(c) for c in r] if isinstance(r, str) else list(map(float, r)) for r in rows])

    d = 100.0 * (arr(a) - arr(b))
    if d.ndim != 2 or d.size == 0:
        raise ValueError("paired_bootstrap: need equal-shape (seeds, images) results")
    seeds, images = d.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for i in range(0, n_boot, 500):  # blocks of replicates: memory bounded for 50,000-image sets
        k = min(500, n_boot - i)
        rows = rng.integers(0, seeds, size=(k, seeds)) if seeds > 1 else np.zeros((k, 1), dtype=int)
        cols = rng.integers(0, images, size=(k, images))
        row_means = d[rows[:, :, None], cols[:, None, :]].mean(axis=2)  # (k, seeds): each seed on resampled images
        stats[i:i + k] = row_means.mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return Spread(float(d.mean()), float(lo), float(hi), int(d.size), kind="paired bootstrap 95%")


def paired_verdict(d: Spread | None, direction: str = "greater") -> str:
    """The verdict on "``a`` > ``b``" (``direction="greater"``) or "``a`` < ``b``" (``"less"``) from the paired
    difference ``a - b`` and its 95% interval: holds when the interval excludes 0 in the claimed direction, fails
    when it excludes 0 in the other, else inconclusive."""
    if direction not in ("greater", "less"):
        raise ValueError(f"direction must be greater or less, got {direction!r}")
    if d is None:
        return INCONCLUSIVE
    lo, hi = (d.lo, d.hi) if direction == "greater" else (-d.hi, -d.lo)
    return HOLDS if lo > 0 else FAILS if hi < 0 else INCONCLUSIVE


def paired(a: Spread | None, b: Spread | None, fraction: float = 1.0) -> Spread | None:
    """``paired_difference`` of two measured rows' per-seed values; None when either is missing or they share fewer
    than two seeds."""
    if a is None or b is None:
        return None
    return paired_difference(dict(a.by_seed), dict(b.by_seed), fraction)


def _at_least(a: Spread | None, b: Spread | None, fraction: float) -> tuple[str, Spread | None]:
    """``at_least``'s verdict and the paired difference it was decided on (None: decided by spreads)."""
    if a is None or b is None:
        return INCONCLUSIVE, None
    d = paired(a, b, fraction)
    if d is not None:
        return (HOLDS if d.lo >= 0 else FAILS if d.hi < 0 else INCONCLUSIVE), d
    if a.lo >= fraction * b.hi:
        return HOLDS, None
    if a.hi < fraction * b.lo:
        return FAILS, None
    return INCONCLUSIVE, None


def at_least(a: Spread | None, b: Spread | None, fraction: float) -> str:
    """Claim ``a >= fraction * b`` (e.g. a cheaper recipe keeps 95% of another's robust accuracy). Paired by seed
    when both carry two or more common seeds: holds when the 95% interval of the mean of ``a_s - fraction * b_s`` is
    at or above 0, fails when it is below 0. Otherwise by spreads: holds when the whole of ``a``'s interval is at or
    above ``fraction`` times the whole of ``b``'s, fails when it is wholly below."""
    return _at_least(a, b, fraction)[0]


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
    from eval_suites.report import wilson

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

    def part(x, y):  # "x > y + margin", paired on per-sample results where both rows have them
        v, d = _greater(get(x), get(y), margin, metric)
        out = {"a": x, "b": y, "verdict": v}
        if d is not None:
            out["paired"] = dict(d.record(), difference=f"{x} - {y}")  # "less": b - a
            if v == INCONCLUSIVE and d.ci90 is not None:  # is it a tie? only an equivalence test says so
                plain = replace(d, ci90=(d.ci90[0] + margin, d.ci90[1] + margin))
                out["equivalent"] = equivalence(plain)
        return out

    def why(p):
        if "paired" in p:
            lo, hi = p["paired"]["ci95"]
            boot = "bootstrap" in p["paired"]["interval_kind"]
            where = " and the images" if boot else ""
            eq = ""
            if "equivalent" in p:
                l90, h90 = (v + margin for v in p["paired"]["ci90"])
                eq = (f"; {'equivalent' if p['equivalent'] else 'not shown equivalent'} within "
                      f"±{EQUIVALENCE_MARGIN:g} (TOST: 90% interval [{l90:.2f}, {h90:.2f}])")
            return (f"paired over {p['paired']['n']} seed(s){where}: {p['paired']['difference']}"
                    f"{f' - ({margin:+g})' if margin else ''} = {p['paired']['mean']:.2f} [{lo:.2f}, {hi:.2f}] "
                    f"({'95% bootstrap' if boot else '95% t interval over seeds'}){eq}")
        return "by spreads (fewer than two common seeds, no per-sample results)"

    if kind in ("greater", "less"):
        x, y = (claim["a"], claim["b"]) if kind == "greater" else (claim["b"], claim["a"])
        parts = [dict(part(x, y), a=claim["a"], b=claim["b"])]
        v = parts[0]["verdict"]
        evidence = f"{fmt(claim['a'])} vs {fmt(claim['b'])}" + (f" (margin {margin:+g})" if margin else "") + \
            f"; {why(parts[0])}"
    elif kind == "greater_all":
        others = [m for m in rows if m != claim["a"]] if claim["b"] == "all" else list(claim["b"])
        parts = [part(claim["a"], m) for m in others]
        v = all_of([p["verdict"] for p in parts])
        evidence = f"{fmt(claim['a'])} vs " + "; ".join(f"{fmt(m)} ({p['verdict']}; {why(p)})"
                                                         for m, p in zip(others, parts))
    elif kind == "steps":
        parts = [part(x, y) for x, y in claim["pairs"]]
        v = all_of([p["verdict"] for p in parts])
        evidence = "; ".join(f"{fmt(p['a'])} > {fmt(p['b'])}: {p['verdict']} ({why(p)})" for p in parts)
    elif kind == "at_least":
        fraction = float(claim["fraction"])
        v, d = _at_least(get(claim["a"]), get(claim["b"]), fraction)
        parts = [{"a": claim["a"], "b": claim["b"], "verdict": v}]
        evidence = f"{fmt(claim['a'])} vs {fraction:g} x {fmt(claim['b'])}"
        if d is not None:
            parts[0]["paired"] = d.record()
            evidence += (f"; paired over {d.n} seeds: mean of {claim['a']} - {fraction:g} x {claim['b']} = "
                         f"{d.text()} (95% t interval)")
    elif kind == "within":
        v = overlaps(get(claim["a"]), get(claim["b"]))
        parts = [{"a": claim["a"], "b": claim["b"], "verdict": v}]
        evidence = f"{fmt(claim['a'])} vs {fmt(claim['b'])}"
    else:
        raise ValueError(f"unknown claim kind {kind!r}; valid: {', '.join(CLAIM_KEYS)}")
    return {"claim": claim["claim"], "metric": metric, "verdict": v, "evidence": evidence, "parts": parts}


def kendall_w(rankings) -> tuple[float, float]:
    """Kendall's coefficient of concordance W of m rankings of the same n items (each a list of ranks 1..n, no ties;
    Kendall & Babington Smith 1939): 1 = every ranking alike, 0 = no agreement; and the p-value of its chi-square
    test of no agreement, m (n - 1) W ~ chi2(n - 1) (Friedman's statistic)."""
    from scipy import stats

    m, n = len(rankings), len(rankings[0])
    if any(sorted(r) != list(range(1, n + 1)) for r in rankings):  # the formula has no tie correction
        raise ValueError(f"kendall_w: each ranking must be the ranks 1..{n} without ties")
    sums = [sum(r[i] for r in rankings) for i in range(n)]
    mean = m * (n + 1) / 2
    w = 12 * sum((x - mean) ** 2 for x in sums) / (m ** 2 * (n ** 3 - n))
    return w, float(stats.chi2.sf(m * (n - 1) * w, n - 1))
