"""A study's page: ``study.md`` (its tables, the paper's rows beside ours, the verdicts, the paired differences) and
``study.png`` (the trade-off, or the geometry metrics), both from ``study.json`` alone, so ``grace results`` draws
the same page from a published study.json as ``grace study`` did."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

__all__ = ["AXES", "GEOMETRY_METRICS", "study_title", "study_markdown", "study_plot"]

AXES = ("id", "ood", "adv", "hm")
GEOMETRY_METRICS = ("lambda_max", "centroid_ood", "centroid_adv", "dlid_ood", "dlid_adv", "drift")


def _f(v, nd=2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _cell(agg: dict, k: str, nd=2) -> str:
    c = _f(agg.get(k), nd)
    if agg.get(f"{k}_std") is not None:
        c += f" ± {_f(agg[f'{k}_std'], nd)}"
    return c


def _label(row: dict, seeds: list[int]) -> str:
    """A row's label, with 'k of n seeds' when some of its runs diverged."""
    n = len(row["runs"])
    return row["label"] if not row.get("diverged") else f"{row['label']} ({n} of {len(seeds)} seeds)"


def _counts_text(doc: dict) -> str:
    c = doc.get("run_counts") or {}
    return ", ".join(f"{c.get(k, 0)} run(s) {k}" for k in ("trained", "resumed", "reused"))


def _tiny_clip_text(doc: dict) -> str:
    tc = doc.get("tiny_clip")
    if not tc:
        return ""
    threads = tc["pretrain"].get("threads")
    return f"tiny CLIP {tc['sha256'][:12]} (pretrained on {threads or 'unrecorded'} thread(s)), "


def study_title(doc: dict) -> str:
    """A study page's title: the paper's table it reproduces, or the study's name, and its world."""
    name = f"{doc['paper_table']} on the testbed" if doc.get("paper_table") else \
        f"{str(doc['study']).capitalize()} study"
    world = doc.get("world_seed") or 0
    return name + (f", world seed {world}" if world else ", default world")


def study_markdown(doc: dict) -> str:
    rows, seeds = doc["rows"], doc["seeds"]
    lines = [f"# {study_title(doc)}", "",
             f"{len(seeds)} seed(s) {seeds}, {doc['steps']} steps per run, world size {doc['size']} "
             f"(seed {doc.get('world_seed', 0)}), {_tiny_clip_text(doc)}"
             f"{doc['seconds']:.0f} s for this invocation ({_counts_text(doc)}). Values: mean ± sample std over "
             "seeds.", "",
             "## Ours (our column definitions)", "",
             f"Columns: {doc['column_definitions']['ours']}. Feature spread: the mean cosine between the features of "
             "different ID test images (1: collapsed, every image alike; the zero-shot CLIP about 0.35).", "",
             "| row | ID | OOD | Adv | HM | feature spread |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        lines.append(f"| {_label(r, seeds)} | " + " | ".join(_cell(r["axes"], k) for k in AXES) + " | "
                     + _cell(r, "feature_spread", 3) + " |")
    gone = [(r["label"], d) for r in rows.values() for d in r.get("diverged") or []]
    if gone:
        lines += ["", "**Diverged runs** (no numbers; a row's values are over its other seeds, and a row marked "
                  "'k of n seeds' is compared on those):", ""]
        lines += [f"- {label} seed {d['seed']}: {d['error']}" for label, d in gone]
    if doc.get("paper_rows") is not None and doc.get("paper_table"):
        refs = {p["method"]: p for p in doc["paper_rows"]}
        lines += ["", f"## Beside the paper ({doc['paper_table']}, the paper's column definitions)", "",
                  f"Columns: {doc['column_definitions']['paper']}. Paper: CLIP ViT-B/32 on ImageNet.", "",
                  "| row | ours ID | ours OOD | ours Adv | ours HM | paper row | paper ID | paper OOD | paper Adv | "
                  "paper HM |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in rows.values():
            p = refs.get(r.get("paper") or "", {})
            lines.append(f"| {_label(r, seeds)} | " + " | ".join(_cell(r["paper_axes"], k) for k in AXES) +
                         f" | {r.get('paper') or '-'} | " + " | ".join(_f(p.get(k)) for k in AXES) + " |")
    if any("geometry" in r for r in rows.values()):
        lines += ["", "## Geometry", "",
                  "| row | lambda_max | centroid cos ID->OOD | centroid cos ID->Adv | dLID OOD | dLID Adv | drift |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows.values():
            g = r.get("geometry") or {}
            lines.append(f"| {r['label']} | " + " | ".join(_cell(g, k, 4) for k in GEOMETRY_METRICS) + " |")
    from .shift_table import shift_markdown

    lines += shift_markdown(rows, doc.get("shift_reference"))
    lines += ["", "## Verdicts", "",
              "A comparison of two rows with per-sample results (same seeds, same images) is decided on the 95% "
              "percentile bootstrap interval of their paired difference (minus the claim's margin), resampling "
              "seeds and images: holds when it excludes 0 on the claimed side, fails when it excludes 0 on the "
              "other, else inconclusive. Without per-sample results (a geometry metric) the same rule on the 95% "
              "Student-t interval of the per-seed differences over the common seeds; with fewer than two common "
              "seeds: holds when the whole interval (mean ± std over seeds; one run: its Wilson 95% interval) is on "
              "the claimed side, fails when wholly on the other, else inconclusive. A claim 'keeps F of' (at_least) "
              "on rows measured on the same seeds is a "
              "paired test: the 95% Student-t interval of the mean of a - F x b over the seeds, holds at or above "
              "0, fails below 0. The numbers column says which rule decided each comparison.", "",
              "| claim | verdict | numbers |", "|---|---|---|"]
    for v in doc["verdicts"]:
        lines.append(f"| {v['claim']} | **{v['verdict']}** | {v['evidence']} |")
    lines += _attack_lines(rows)
    lines += _paper_verdict_lines(doc)
    if doc.get("claims_omitted"):
        lines += ["", f"{doc['claims_omitted']} claim(s) of this study compare rows that --methods left out; not "
                  "evaluated here."]
    if doc.get("paired"):
        ref = doc["paired_reference"]
        lines += ["", f"## Paired differences from {ref}", "",
                  f"Mean over the seeds both rows measured of (row - {ref}), with its 95% Student-t interval "
                  "(a seed is the same data order and initialisation in every row).", "",
                  "| row | seeds | ID | OOD | Adv | HM |", "|---|---:|---:|---:|---:|---:|"]
        for name, per in doc["paired"].items():
            n = next((v["n"] for v in per.values() if v), 0)
            cells = [("-" if v is None else f"{v['mean']:+.2f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]")
                     for v in (per.get(k) for k in AXES)]
            lines.append(f"| {rows[name]['label']} | {n} | " + " | ".join(cells) + " |")
    parts = []
    for r in rows.values():
        for run in r["runs"]:
            t = run.get("training") or {}
            if "awp_rank_updates" in t or "gv_share_mean" in t:
                counts = " | ".join(str(t.get(k, "-")) for k in ("awp", "awp_rank_updates", "awp_rank_change_events",
                                                                   "awp_rank_changes"))
                parts.append(f"| {r['label']} | {run['seed']} | {counts} | {_f(t.get('gv_share_mean'), 4)} |")
    if parts:
        lines += ["", "## GRACE's parts at work", "",
                  "Curriculum: allocations made, allocations that changed a rank, layer ranks changed (after the "
                  "first allocation). GV share: mean over steps of lambda_GV L_GV / L.", "",
                  "| row | seed | awp | rank updates | updates with a change | layer changes | GV share |",
                  "|---|---:|---|---:|---:|---:|---:|"] + parts
    lines += _compute_lines(rows)
    lines += ["", "## Runs (each run's interval: Wilson 95%)", "",
              "| row | seed | ID [interval] | OOD | Adv [interval] | HM |", "|---|---:|---|---:|---|---:|"]
    for r in rows.values():
        for run in r["runs"]:
            a, iv = run["axes"], run["intervals"]

            def wi(k, a=a, iv=iv):
                return f"{_f(a.get(k))} [{_f(iv[k][0])}, {_f(iv[k][1])}]" if iv.get(k) else _f(a.get(k))

            lines.append(f"| {r['label']} | {run['seed']} | {wi('id')} | {_f(a.get('ood'))} | {wi('adv')} | "
                         f"{_f(a.get('hm'))} |")
    return "\n".join(lines) + "\n"


def _compute_lines(rows: dict) -> list[str]:
    """Each row's training compute (runs that recorded their CPU time): what a compute-matched control is matched
    on."""
    rec = {r["label"]: [run.get("training") or {} for run in r["runs"]] for r in rows.values()}
    rec = {k: [t for t in v if t.get("train_cpu_seconds") is not None] for k, v in rec.items()}
    if not any(rec.values()):
        return []
    lines = ["", "## Training compute", "",
             "Per run, mean over seeds: training steps, the training process's CPU-seconds (all its threads) and "
             "wall-clock seconds (lanes may have shared the machine). Rows without a record trained nothing.", "",
             "| row | steps | CPU-s | wall s |", "|---|---:|---:|---:|"]
    for label, ts in rec.items():
        if ts:
            mean = {k: statistics.fmean(t[k] for t in ts) for k in ("train_steps", "train_cpu_seconds",
                                                                    "train_seconds")}
            lines.append(f"| {label} | {mean['train_steps']:.0f} | {mean['train_cpu_seconds']:.1f} | "
                         f"{mean['train_seconds']:.1f} |")
    return lines


def _attack_lines(rows: dict) -> list[str]:
    """Each attack's own robust accuracy beside the worst case the Adv axis takes (rows that recorded them)."""
    with_attacks = [r for r in rows.values() if r.get("adv_by_attack")]
    if not with_attacks:
        return []
    names = sorted(k for k in with_attacks[0]["adv_by_attack"] if not k.endswith("_std"))
    lines = ["", "## Each attack beside the worst case", "",
             "Robust top-1 under each attack alone, and Adv: the per-sample worst case (an image counts as robust only "
             "if every attack fails on it). Mean ± SD over seeds.", "",
             "| row | " + " | ".join(names) + " | Adv (worst case) |", "|---|" + "---:|" * (len(names) + 1)]
    for r in with_attacks:
        lines.append(f"| {r['label']} | " + " | ".join(_cell(r["adv_by_attack"], k) for k in names) + " | "
                     + _cell(r["axes"], "adv") + " |")
    return lines


def _paper_verdict_lines(doc: dict) -> list[str]:
    """The verdicts on the paper's column definitions beside ours (when the study.json has them)."""
    lines: list[str] = []
    paper = doc.get("verdicts_paper")
    if paper:
        lines += ["", "## Verdicts on the paper's column definitions", "",
                  "The same claims and the same paired statistics, with OOD and Adv as the paper's Table 6 defines "
                  "them (OOD = mean of the v2, sketch and rendition sets; Adv = mean of the attack's robust accuracy "
                  "and the natural-adversarial set), recomputed from the same per-sample results. Where the two "
                  "definitions disagree, the page reports both.", "",
                  "| claim | verdict (paper's columns) | verdict (ours) | numbers (paper's columns) |",
                  "|---|---|---|---|"]
        ours = {v["claim"]: v["verdict"] for v in doc["verdicts"]}
        for v in paper:
            lines.append(f"| {v['claim']} | **{v['verdict']}** | {ours.get(v['claim'], '-')} | {v['evidence']} |")
    return lines


def study_plot(doc: dict, path: Path) -> Path:
    """OOD vs ID and Adv vs ID with error bars (std over seeds), the paper's rows as grey crosses; the geometry
    study: its metrics per row as bars with error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    if any("geometry" in r for r in rows.values()):
        keys = ("lambda_max", "centroid_ood", "centroid_adv", "drift")
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
        for ax, k in zip(axes, keys):
            labels = [r["label"] for r in rows.values()]
            vals = [(r.get("geometry") or {}).get(k) or 0.0 for r in rows.values()]
            errs = [(r.get("geometry") or {}).get(f"{k}_std") or 0.0 for r in rows.values()]
            ax.bar(labels, vals, yerr=errs, capsize=3, alpha=0.8)
            ax.set_title(k)
            ax.tick_params(axis="x", rotation=45)
    else:  # the trade-off panels: the report's plot (one implementation), the paper's rows as references
        from eval_suites.plot import tradeoff_plot

        ours = [{"method": r["label"], **r["axes"]} for r in rows.values()]
        paper = [dict(p, source="paper") for p in doc.get("paper_rows") or []]
        return tradeoff_plot(ours, path, title=f"grace study {doc['study']} ({len(doc['seeds'])} seed(s); bars: "
                             "std over seeds, else a run's 95% interval)", references=paper)
    from eval_suites.plot import save_figure

    return save_figure(fig, path, f"grace study {doc['study']} ({len(doc['seeds'])} seed(s); bars: std over seeds)")
