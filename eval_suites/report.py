"""Three-axis reports: ``report.json`` (schema below), a markdown table and a trade-off plot.

``report.json``::

    {"model": str,
     "axes": {"id": %, "ood": %, "adv": %, "hm": %},          # null where not measured
     "datasets": {NAME: {"top1", "n", "skipped", "skipped_by_reason", "expected", "role"}},
     "adversarial": {"attack", "eps", "norm", "n", "clean_acc", "robust_acc", "precision"} | null,
     "config": {...}}

``hm`` is the harmonic mean of ID, OOD and Adv, the paper's summary (spec §2); it is null unless all three exist.
Files are written atomically.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["harmonic_mean", "build_report", "write_report", "report_markdown", "summary_markdown",
           "tradeoff_plot", "write_summary"]


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
        lines += ["", f"Adversarial: {adv['attack']} {adv['norm']} eps={adv['eps']:.5f} on {adv['n']} images "
                  f"({adv.get('precision', 'fp32')}): clean {_fmt(adv['clean_acc'])}, robust {_fmt(adv['robust_acc'])}"]
    return "\n".join(lines) + "\n"


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


def tradeoff_plot(rows: list[dict], path: str | Path, title: str = "ID / OOD / Adv trade-off") -> Path:
    """Two panels: OOD vs ID and Adv vs ID, one labelled point per method (marker size ~ HM)."""
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
            ax.scatter(r["id"], r[key], s=size, alpha=0.8)
            ax.annotate(r["method"], (r["id"], r[key]), textcoords="offset points", xytext=(5, 5), fontsize=9)
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


def write_summary(out_dir: str | Path, rows: list[dict], extra: dict | None = None) -> dict[str, Path]:
    from grace_plugin.checkpoint import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "summary.json", json.dumps({"rows": rows, **(extra or {})}, indent=2) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(rows))
    png = tradeoff_plot(rows, out / "tradeoff.png")
    return {"json": out / "summary.json", "md": out / "summary.md", "png": png}
