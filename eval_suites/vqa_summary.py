"""VQA evaluations side by side: one row per report (ID / near-OOD / far-OOD / OOD and pixel robustness, each with
its interval, and every set's accuracy) and the table of them; ``grace report`` over VQA run folders
(``aggregate_vqa_reports``: ``summary.json`` and ``summary.md``); one report as markdown (``report_markdown``: a
``grace eval --task vqa`` report.md). FRAMES-VQA's groups: arXiv 2505.21755."""
from __future__ import annotations

import json
from pathlib import Path

from grace_plugin.tensor_io import atomic_write_text

__all__ = ["vqa_row", "vqa_table", "aggregate_vqa_reports", "is_vqa_report", "report_markdown"]

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


def report_markdown(rep: dict) -> str:
    """One `grace eval --task vqa` report as markdown (report.md): per-set accuracy, the group means, pixel robustness,
    classification-as-VQA scores and the shift analysis where present."""
    from grace_plugin.vqa.accuracy import accuracy_cell

    lines = [f"# VQA evaluation: {rep['model']}", "", rep["metric"], "", "| set | group | n | VQA accuracy [95%] |",
             "|---|---|---:|---|"]
    for name, s in rep["sets"].items():
        lines.append(f"| {name} | {s['group']} | {s['n']} | {accuracy_cell(s)} |")
    adv = rep.get("adversarial")
    head, cells = "| ID | near OOD | far OOD | OOD |", [accuracy_cell(rep[g]) for g in ("id", "near", "far", "ood")]
    if adv:
        head += f" Adv ({adv['attack']}, eps {adv['eps']:.4g}, first {adv['n']} of {adv['set']}) |"
        cells.append(accuracy_cell(adv))
    lines += ["", head, "|---" * len(cells) + "|", "| " + " | ".join(cells) + " |", ""]
    cls = {n: v["classification"] for n, v in rep["sets"].items() if v.get("classification")}
    if cls:
        lines += ["Classification recast as VQA (percent): exact match, ClipMatch@1, @5", "",
                  "| set | n | exact match | ClipMatch@1 | ClipMatch@5 |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {v['n']} | " + " | ".join("-" if v.get(k) is None else f"{v[k]:.2f}" for k in
                                                      ("exact_match", "clip_match_1", "clip_match_5")) + " |"
                  for n, v in cls.items()] + [""]
    if rep.get("analysis"):
        lines += _analysis_markdown(rep["analysis"])
    return "\n".join(lines)


def _analysis_markdown(an: dict) -> list[str]:
    from .vqa_analysis import CONCEPTS

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["## Shift per modality", "", f"Mean Mahalanobis distance to ID train ({an['n_fit']} questions; "
             f"uni-modal concepts from {an['reference']}); higher is farther.", "",
             "| set | " + " | ".join(CONCEPTS) + " |", "|---" * (len(CONCEPTS) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f(v.get(c)) for c in CONCEPTS) + " |" for n, v in an["shift"].items()]
    lines += ["", "| concept | Pearson (shift, accuracy) | Spearman | sets |", "|---|---|---|---|"]
    lines += [f"| {c} | {f(v['pearson'])} | {f(v['spearman'])} | {v['sets']} |"
              for c, v in an["shift_vs_accuracy"].items()]
    pairs = sorted({p for v in an["concept_pairs"].values() for p in v})
    lines += ["", "Per-sample Pearson between concept distances:", "", "| set | " + " | ".join(pairs) + " |",
              "|---" * (len(pairs) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f(v.get(p)) for p in pairs) + " |" for n, v in an["concept_pairs"].items()]
    keys = [k for k in ("image", "question", "question_share", "self_over_cross")
            if any(k in v for v in an["modality_importance"].values())]
    lines += ["", "## Modality importance", "", "Drop of the predicted answer's probability without the image "
              "(the ID mean image) and without the question (empty), and the question's share (median [quartiles])"
              + ("; self/cross: the decoder's self-attention over cross-attention output norm at the prompt "
                 "positions (larger = more from the question)" if "self_over_cross" in keys else "") + ".",
              "", "| set | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for n, v in an["modality_importance"].items():
        lines.append(f"| {n} | " + " | ".join(f"{v[k]['median']:.3f} [{v[k]['q25']:.3f}, {v[k]['q75']:.3f}]"
                                              for k in keys) + " |")
    return lines + [""]
