"""Three-axis reports: ``report.json`` (schema below), a markdown table and a trade-off plot.

``report.json``::

    {"model": str,
     "axes": {"id": %, "ood": %, "adv": %, "hm": %},          # null where not measured
     "datasets": {NAME: {"top1", "n", "skipped", "skipped_by_reason", "expected", "role"}},
     "adversarial": {"attack", "eps", "norm", "n", "clean_acc", "robust_acc", "precision"} | null,
     "config": {...},
     "suites": {SUITE: {"kind": "id"|"ood"|"transfer"|"adv"|"robustbench"|"corruptions"|"geometry"|"shift", ...}}}
                                                            # present when run through suites.run_suites

``hm`` is the harmonic mean of ID, OOD and Adv, the paper's summary (arXiv 2603.27139,
Tables 6-8); it is null unless all three exist.
Files are written atomically.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["harmonic_mean", "build_report", "write_report", "report_markdown", "summary_markdown",
           "tradeoff_plot", "write_summary", "aggregate_reports", "references_markdown"]


def harmonic_mean(values) -> float | None:
    """Harmonic mean of percentages; 0 if any is 0; None if any is missing."""
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def build_report(model: str, datasets: dict, id_name: str | None, ood_names: list[str],
                 adversarial: dict | None, config: dict | None = None) -> dict:
    """Assemble the report from per-dataset results (``ClassificationResult.as_dict()``) and the attack result."""
    ds = {}
    for name, res in datasets.items():
        role = "id" if name == id_name else ("ood" if name in ood_names else "other")
        ds[name] = dict(res, role=role)
    id_acc = ds[id_name]["top1"] if id_name in ds else None
    ood_acc = _mean(ds[n]["top1"] for n in ood_names if n in ds) if ood_names else None
    adv_acc = adversarial["robust_acc"] if adversarial else None
    axes = {"id": id_acc, "ood": ood_acc, "adv": adv_acc, "hm": harmonic_mean([id_acc, ood_acc, adv_acc])}
    return {"model": model, "axes": axes, "datasets": ds, "adversarial": adversarial, "config": config or {}}


def _fmt(v, nd=2):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def report_markdown(report: dict) -> str:
    a = report["axes"]
    lines = [f"# {report['model']}", "", "| ID | OOD | Adv | HM |", "|---:|---:|---:|---:|",
             f"| {_fmt(a['id'])} | {_fmt(a['ood'])} | {_fmt(a['adv'])} | {_fmt(a['hm'])} |", "",
             "| dataset | role | top-1 | n | skipped |", "|---|---|---:|---:|---:|"]
    for name, d in report["datasets"].items():
        lines.append(f"| {name} | {d.get('role', '')} | {_fmt(d['top1'])} | {d['n']} | {d['skipped']} |")
    adv = report.get("adversarial")
    if adv:
        lines += ["", f"Adversarial: {adv.get('attack', adv.get('runner'))} {adv.get('norm', adv.get('threat'))} "
                  f"eps={adv['eps']:.5f} on {adv['n']} images "
                  f"({adv.get('precision', 'fp32')}): clean {_fmt(adv['clean_acc'])}, robust {_fmt(adv['robust_acc'])}"]
    lines += _suite_sections(report.get("suites") or {})
    if report.get("suites") is not None:
        lines += ["", "## Reference rows (shipped data, not measured here)", "", references_markdown(a)]
    return "\n".join(lines) + "\n"


def _suite_sections(suites: dict) -> list[str]:
    lines = []
    advs = {k: v for k, v in suites.items() if v.get("kind") in ("adv", "robustbench")}
    if advs:
        lines += ["", "| suite | norm | eps | n | clean | robust | runner |", "|---|---|---|---:|---:|---:|---|"]
        for k, v in advs.items():
            from .attacks import format_eps

            lines.append(f"| {k} | {v.get('norm', v.get('threat'))} | {format_eps(v['eps'])} | {v['n']} | "
                         f"{_fmt(v['clean_acc'])} | {_fmt(v['robust_acc'])} | {v.get('runner', 'grace')} |")
    for k, v in suites.items():
        if v.get("kind") == "corruptions":
            lines += ["", f"Corruptions ({k}): accuracy {_fmt(v['corruptions_acc'])}, mCE {_fmt(v['corruptions_mce'])} "
                      "(AlexNet = 100)"]
        elif v.get("kind") == "geometry":
            lines += ["", f"## Geometry ({v['n']} ID images, {v['params']} visual parameters)", "",
                      "| metric | value |", "|---|---:|",
                      f"| top Hessian eigenvalue | {v['hessian_top_eigenvalue']:.4g} |",
                      f"| Hutchinson trace | {v['hessian_trace']:.4g} |",
                      f"| normalised Frobenius norm | {v['hessian_frobenius_normalised']:.4g} |",
                      f"| parameter drift | {_fmt(v.get('parameter_drift'), 4)} |"]
            for s, c in v["centroid_cosine"].items():
                lines.append(f"| centroid cosine ID->{s} | {_fmt(c, 4)} |")
            for s, c in v["delta_lid"].items():
                lines.append(f"| dLID {s} | {_fmt(c, 3)} |")
        elif v.get("kind") == "shift":
            lines += ["", f"## Shift (Mahalanobis from ID, {v['n']} images per set)", "",
                      "| set | acc. drop | " + " | ".join(v["spaces"]) + " |",
                      "|---|---:|" + "---:|" * len(v["spaces"])]
            for s in v["accuracy_drop"]:
                lines.append(f"| {s} | {_fmt(v['accuracy_drop'][s])} | " +
                             " | ".join(_fmt(sp["scores"][s], 3) for sp in v["spaces"].values()) + " |")
            for name, sp in v["spaces"].items():
                lines.append(f"\n{name}: near {', '.join(sp['near']) or '-'}; far {', '.join(sp['far']) or '-'}; "
                             f"Pearson {_fmt(sp.get('pearson'), 3)}, Spearman {_fmt(sp.get('spearman'), 3)}")
    return lines


def references_markdown(axes: dict | None = None, table: str = "Table 6") -> str:
    """The paper's table and the RobustBench ImageNet Linf 4/255 board, with sources (eval_suites/data)."""
    from .leaderboard import load_references, reference_rows

    refs = load_references()
    rows = ([{"method": "this model", **axes}] if axes else [])
    out = summary_markdown(rows, reference_rows(table))
    out += f"\nSource: {refs['paper']['source']}.\n\n"
    rb = refs["robustbench"]
    lines = ["| RobustBench # | model | clean | AutoAttack | external |", "|---:|---|---:|---:|---:|"]
    if axes and axes.get("adv") is not None:
        lines.append(f"| - | this model | {_fmt(axes.get('id'))} | {_fmt(axes.get('adv'))} | |")
    for r in rb["rows"]:
        lines.append(f"| {r['rank']} | {r['model']} | {_fmt(r['clean_acc'])} | {_fmt(r['autoattack_acc'])} | "
                     f"{_fmt(r['external'])} |")
    return out + "\n".join(lines) + f"\n\nSource: {rb['source']}.\n"


def write_report(out_dir: str | Path, report: dict) -> Path:
    from grace_plugin.checkpoint import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", report_markdown(report))
    return out / "report.json"


def summary_markdown(rows: list[dict], references: list[dict] | None = None) -> str:
    """Rows ``{"method", "id", "ood", "adv", "hm"}`` (plus optional ``*_std``) -> markdown table."""
    has_std = any("id_std" in r for r in rows)
    lines = ["| method | ID | OOD | Adv | HM |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = []
        for k in ("id", "ood", "adv", "hm"):
            cell = _fmt(r.get(k))
            if has_std and r.get(f"{k}_std") is not None:
                cell += f" ± {_fmt(r[f'{k}_std'])}"
            cells.append(cell)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    for ref in references or []:
        lines.append(f"| {ref['method']} ({ref['source']}) | " +
                     " | ".join(_fmt(ref.get(k)) for k in ("id", "ood", "adv", "hm")) + " |")
    return "\n".join(lines) + "\n"


def tradeoff_plot(rows: list[dict], path: str | Path, title: str = "ID / OOD / Adv trade-off",
                  references: list[dict] | None = None) -> Path:
    """Two panels: OOD vs ID and Adv vs ID, one labelled point per method (marker size ~ HM) with error bars: +-1 std
    where the row has ``*_std`` (several seeds), else +-``*_ci`` (one run's 95% interval) where it has that; reference rows (e.g. the paper's Table 6) as grey crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from grace_plugin.checkpoint import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "ood", "OOD top-1 (%)"), (axes[1], "adv", "Adversarial robust acc. (%)")):
        for r in rows:
            if r.get("id") is None or r.get(key) is None:
                continue
            size = 40 + 4 * (r.get("hm") or 0)
            dots = ax.scatter(r["id"], r[key], s=size, alpha=0.8)
            # +-1 std over seeds, else the run's 95% sampling interval half-width (``*_ci``) where the row has one
            xerr = r.get("id_std") if r.get("id_std") is not None else r.get("id_ci")
            yerr = r.get(f"{key}_std") if r.get(f"{key}_std") is not None else r.get(f"{key}_ci")
            if xerr is not None or yerr is not None:
                ax.errorbar(r["id"], r[key], xerr=xerr, yerr=yerr, fmt="none", ecolor=dots.get_facecolor()[0],
                            capsize=3, alpha=0.8)
            ax.annotate(r["method"], (r["id"], r[key]), textcoords="offset points", xytext=(5, 5), fontsize=9)
        for r in references or []:
            if r.get("id") is None or r.get(key) is None:
                continue
            ax.scatter(r["id"], r[key], marker="x", color="grey", alpha=0.7)
            ax.annotate(f"{r['method']} ({r.get('source', 'ref')})", (r["id"], r[key]), textcoords="offset points",
                        xytext=(4, -9), fontsize=7, color="grey")
        ax.set_xlabel("ID top-1 (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title + " (marker size ~ harmonic mean)")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path.with_suffix(".png")


def write_summary(out_dir: str | Path, rows: list[dict], extra: dict | None = None,
                  references: list[dict] | None = None) -> dict[str, Path]:
    from grace_plugin.checkpoint import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps({"rows": rows, **(extra or {})}, indent=2) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(rows, references))
    png = tradeoff_plot(rows, out / "tradeoff.png", references=references)
    return {"json": out / "summary.json", "md": out / "summary.md", "png": png}


def aggregate_reports(runs: list[str | Path], out_dir: str | Path, table: str | None = "Table 6") -> dict:
    """``grace report RUN...``: each RUN is a folder holding ``report.json`` (or the file); one row per run,
    the paper's reference rows beside them; writes summary.json/.md and tradeoff.png under ``out_dir``."""
    from .leaderboard import reference_rows

    rows = []
    for r in runs:
        p = Path(r)
        f = p / "report.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no report.json (run `grace eval ... --out {p}` first)")
        try:
            rep = json.loads(f.read_text())
            axes = rep["axes"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not a grace report.json ({type(e).__name__}: {e})") from None
        method = rep.get("model") or p.name
        if any(row["method"] == method for row in rows):
            method = f"{method} ({p.name})"
        rows.append({"method": method, "run": str(p), **{k: axes.get(k) for k in ("id", "ood", "adv", "hm")}})
    refs = reference_rows(table) if table else None
    paths = write_summary(out_dir, rows, extra={"references": refs}, references=refs)
    return {"rows": rows, "paths": paths}
