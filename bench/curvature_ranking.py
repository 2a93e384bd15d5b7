"""Is the curvature curriculum's premise there? The per-layer curvature ranking of GRACE runs, compared across seeds.

GRACE's curriculum (arXiv 2603.27139 §3.2) gives the weight perturbation more rank in the layers of higher loss
curvature, re-ranked every few steps from a per-layer curvature estimate; the run logs that estimate for every
layer (``curv/<layer>`` in ``log.jsonl``). The allocation carries information only if the ranking is a property of
the model and data rather than of the seed: this bench reads the runs' logs and reports, per run, the layers ranked
by their mean logged curvature over the run, and across the runs of one world the mean pairwise Spearman correlation
of the rankings and Kendall's coefficient of concordance W (Kendall & Babington Smith 1939: 1 = every run ranks the
layers alike, 0 = no agreement), with W's chi-square test of no agreement (m (n - 1) W ~ chi2(n - 1)); and how the
ranking moves within a run (Spearman between the first and the last logged estimate, mean over runs).

    PYTHONPATH=. python bench/curvature_ranking.py --world default=STUDY0/runs/grace --world world1=STUDY1/runs/grace \
        --json docs/results/data/bench-curvature_ranking.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path


def curvature_log(run: Path) -> dict[str, list[float]]:
    """Each layer's logged curvature estimates over the run, in step order."""
    out: dict[str, list[float]] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        for k, v in rec.items():
            if k.startswith("curv/") and v is not None:
                out.setdefault(k[5:], []).append(float(v))
    return out


def world_summary(runs: list[Path]) -> dict:
    from scipy import stats

    from grace_app.studies.verdicts import kendall_w

    logs = {r: curvature_log(r) for r in runs}
    layers = sorted(set.intersection(*(set(v) for v in logs.values())))
    means = {r: [statistics.fmean(logs[r][k]) for k in layers] for r in runs}
    ranks = {r: list(stats.rankdata([-v for v in means[r]])) for r in runs}  # rank 1 = highest curvature
    pairs = [float(stats.spearmanr(means[a], means[b]).statistic) for a, b in itertools.combinations(runs, 2)]
    within = [float(stats.spearmanr([logs[r][k][0] for k in layers], [logs[r][k][-1] for k in layers]).statistic)
              for r in runs]
    w, p = kendall_w(list(ranks.values()))
    top = {r.name: [layers[i] for i in sorted(range(len(layers)), key=lambda i: ranks[r][i])[:3]] for r in runs}
    return {"layers": layers, "runs": [str(r) for r in runs], "ranks": {r.name: ranks[r] for r in runs},
            "top3": top, "mean_pairwise_spearman": statistics.fmean(pairs) if pairs else None,
            "kendall_w": w, "kendall_w_p": p, "first_vs_last_spearman": statistics.fmean(within),
            "estimates_per_run": min(len(v) for lg in logs.values() for v in lg.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", action="append", required=True,
                    help="NAME=DIR: a folder of GRACE run folders (e.g. a study's runs/grace)")
    ap.add_argument("--json", default=None, help="write the table here (for `grace results --add`)")
    args = ap.parse_args()
    rows, notes = [], []
    for spec in args.world:
        name, folder = spec.split("=", 1)
        runs = sorted(p for p in Path(folder).iterdir() if (p / "log.jsonl").is_file())
        s = world_summary(runs)
        notes.append(f"{name}: {len(runs)} runs, {len(s['layers'])} layers, {s['estimates_per_run']}+ estimates per "
                     f"run; mean pairwise Spearman {s['mean_pairwise_spearman']:.3f}, Kendall's W {s['kendall_w']:.3f} "
                     f"(chi-square test of no agreement p = {s['kendall_w_p']:.2g}); first vs last estimate within a "
                     f"run: Spearman {s['first_vs_last_spearman']:.3f} (mean over runs)")
        print(notes[-1])
        for run, ranks in s["ranks"].items():
            rows.append({"world": name, "run": run, "top3 (highest curvature first)": ", ".join(s["top3"][run]),
                         **{layer: int(r) for layer, r in zip(s["layers"], ranks)}})
    if args.json:
        from grace_app.studies.publish import write_bench_table

        layers = [k for k in rows[0] if k not in ("world", "run", "top3 (highest curvature first)")]
        write_bench_table(
            args.json, "curvature_ranking",
            "The curvature curriculum's premise: per-layer curvature rankings across seeds",
            # the study folders by role, not by this machine's paths
            "PYTHONPATH=. python bench/curvature_ranking.py " + " ".join(
                f"--world {w.split('=', 1)[0]}=CORE_{w.split('=', 1)[0].upper()}/runs/grace" for w in args.world),
            ["CORE_<WORLD>: the folder of `grace study core --seeds 5` on that world (world1: `--seed 1 "
             "--pretrain-threads 2`).",
             "Each row: one GRACE run (the `core` study's runs at GRACE's tuned values, 300 steps); each layer's rank "
             "(1 = highest) by the mean over the run of the curvature estimate the curriculum logs "
             "(curv/<layer>).", *notes],
            ["world", "run", "top3 (highest curvature first)", *layers], rows)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
