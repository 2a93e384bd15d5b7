"""VQA evaluations side by side: one row per report (ID / near-OOD / far-OOD / OOD and pixel robustness, each with
its interval, and every set's accuracy) and the table of them; ``grace report`` over VQA run folders
(``aggregate_vqa_reports``: ``summary.json`` and ``summary.md``). FRAMES-VQA's groups: arXiv 2505.21755."""
from __future__ import annotations

import json
from pathlib import Path

from grace_plugin.tensor_io import atomic_write_text

__all__ = ["vqa_row", "vqa_table", "aggregate_vqa_reports", "is_vqa_report"]

GROUPS = ("id", "near", "far", "ood")


def is_vqa_report(rep: dict) -> bool:
    """A ``grace eval --task vqa`` report.json (its per-set VQA accuracy under ``sets``)."""
    return isinstance(rep, dict) and isinstance(rep.get("sets"), dict) and "metric" in rep and "id" in rep


def vqa_row(method: str, rep: dict) -> dict:
    """A report as a row: each group mean and the pixel robustness with their 95% intervals, and every set."""
    row = {"method": method}
    for g in GROUPS:
        row[g], row[f"{g}_ci95"] = rep[g]["accuracy"], rep[g]["ci95"]
    adv = rep.get("adversarial") or {}
    row["adv"], row["adv_ci95"] = adv.get("accuracy"), adv.get("ci95")
    row["sets"] = {k: v["accuracy"] for k, v in rep["sets"].items()}
    row["set_ci95"] = {k: v["ci95"] for k, v in rep["sets"].items()}
    return row


def _cell(v, ci) -> str:
    return "-" if v is None else f"{v:.2f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def vqa_table(rows: list[dict]) -> str:
    """The group table (with intervals), then one column per set (the sets of every row, in first-seen order)."""
    lines = ["| method | ID | near OOD | far OOD | OOD | Adv |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(_cell(r[g], r[f"{g}_ci95"]) for g in (*GROUPS, "adv"))
                     + " |")
    sets = list(dict.fromkeys(s for r in rows for s in r["sets"]))
    lines += ["", "| method | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join("-" if r["sets"].get(s) is None else f"{r['sets'][s]:.2f}"
                                                        for s in sets) + " |")
    return "\n".join(lines)


def aggregate_vqa_reports(reports: list[tuple[Path, dict]], out_dir: str | Path) -> dict:
    """``grace report`` over VQA reports ``[(folder, report)]``: ``summary.json`` (the rows, each with its run) and
    ``summary.md`` (the table and what its numbers are)."""
    rows, metric = [], None
    for p, rep in reports:
        method = rep.get("model") or p.name
        if any(r["method"] == method for r in rows):
            method = f"{method} ({p.name})"
        rows.append(vqa_row(method, rep) | {"run": str(p)})
        metric = metric or rep["metric"]
    adv = {f"{a['attack']} l_inf {a['eps']:.4g} on the first {a['n']} questions of {a['set']}"
           for _, rep in reports if (a := rep.get("adversarial"))}
    legend = (f"{metric}. near / far / OOD: unweighted means of the per-set accuracies of FRAMES-VQA's groups. Adv: "
              + ("; ".join(sorted(adv)) if adv else "not measured") + ".")
    out = Path(out_dir)
    md = "# VQA evaluations\n\n" + vqa_table(rows) + "\n\n" + legend + "\n"
    atomic_write_text(out / "summary.json", json.dumps({"task": "vqa", "rows": rows, "legend": legend}, indent=2)
                      + "\n")
    atomic_write_text(out / "summary.md", md)
    return {"rows": rows, "paths": {"json": out / "summary.json", "md": out / "summary.md"}}
