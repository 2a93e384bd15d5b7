"""The page of ``grace study frames`` (``frames.md``), generated from its ``frames.json`` (``grace_app/studies/
frames.py``): per backbone the rows' ID / near / far / OOD / Adv (mean ± SD over seeds) and per-set accuracy, the
pre-trained model's shift per set and concept, each row's own shift and modality importance, then the verdicts with
their statistics."""
from __future__ import annotations

import statistics

__all__ = ["frames_markdown", "first_analysis", "AXES"]

AXES = ("id", "near", "far", "ood", "adv")


def first_analysis(rows: dict, label: str) -> dict | None:
    """A row's lowest seed with a shift analysis (the zero-shot model's first)."""
    recs = rows.get(label) or {}
    for k in sorted(recs, key=lambda s: (s != "zero", int(s) if s.isdigit() else -1)):
        if recs[k].get("analysis"):
            return recs[k]["analysis"]
    return None


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} SD"


def _stat(v: dict) -> str:
    if v.get("why"):
        return v["why"]
    if v.get("rho") is not None:
        return f"rho {v['rho']:+.2f}, p {v['p']:.3f}, {v['n']} sets"
    if v.get("ci95"):
        lo, hi = v["ci95"]
        return f"{v['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (f", n {v['n']}" if v.get("n") else "")
    return "-"


def frames_markdown(doc: dict) -> str:
    from .quickstart_vqa import OOD_SETS

    records, lines = doc["records"], []
    cpu = sum((r.get("cpu_seconds") or 0) + (r.get("eval_cpu_seconds") or 0)
              for rows in records.values() for recs in rows.values() for r in recs.values())
    seeds = sorted({k for rows in records.values() for recs in rows.values() for k in recs if k != "zero"}, key=int)
    lines += [f"# FRAMES-VQA study, VQA world seed {doc['world_seed']}", "",
              f"`grace study frames`: {doc['steps']} steps per run, seeds {', '.join(seeds) or '-'}; VQA accuracy "
              "(the official evaluator's), percent, mean ± SD over seeds; ID = vqav2 test, near = the mean of "
              f"{', '.join(OOD_SETS[:6])}, far = the mean of {', '.join(OOD_SETS[6:])}, OOD = all nine; Adv = "
              f"{doc['attack']} (l_inf {doc['eps']:.4f}) on the image of the first {doc['n_adv']} test questions. "
              f"Compute: {cpu / 3600:.2f} CPU-hours (training and evaluation)" + _pretrain_note(doc)
              + ". Rows tuned on a VQA world's validation split (`grace study tune --task vqa`): " + "; ".join(
                  f"{b}: {', '.join(_tuned_label(doc, b, x) for x in m) or 'none'}" for b, m in doc["tuned"].items()
                  if b in records)
              + ". Every other row runs at the VQA layer's learning rate, untuned.", ""]
    for backbone, rows in records.items():
        order = list(doc.get("rows") or {})  # the study's row order (FRAMES_ROWS, stored in frames.json)
        rows = {k: rows[k] for k in sorted(rows, key=lambda r: order.index(r) if r in order else 99)}
        lines += [f"## {backbone}", "", "| row | seeds | ID | near OOD | far OOD | OOD | Adv |",
                  "|---|---|---|---|---|---|---|"]
        for label, recs in rows.items():
            n = "-" if "zero" in recs else str(len(recs))
            lines.append(f"| {label} | {n} | " + " | ".join(_cell([r["axes"][a] for r in recs.values()
                                                             if r["axes"].get(a) is not None]) for a in AXES) + " |")
        sets = next(iter(next(iter(rows.values())).values()))["sets"]
        lines += ["", "| row | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
        for label, recs in rows.items():
            lines.append(f"| {label} | " + " | ".join(
                f"{statistics.fmean([r['sets'][n] for r in recs.values()]):.2f}" for n in sets) + " |")
        lines += ["", *_shift_lines(rows), ""]
    lines += ["## Verdicts", "", "| backbone | claim | test | statistic | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {v['backbone']} | {v['claim']} | {v['test']} | {_stat(v)} | {v['verdict']} |"
              for v in doc["verdicts"]]
    return "\n".join(lines) + "\n"


def _tuned_label(doc: dict, backbone: str, method: str) -> str:
    """A tuned method, with the world its values were selected on where that is not this study's world."""
    world = ((doc.get("tuned_on") or {}).get(backbone) or {}).get(method)
    return method if world is None or world == doc["world_seed"] else f"{method} (values selected on world seed " \
        f"{world}, reused here)"


def _pretrain_note(doc: dict) -> str:
    pre = doc.get("pretrain_seconds") or {}
    return (", plus " + " and ".join(f"{v / 3600:.2f} for pretraining the tiny {b.upper() if b == 'clip' else 'CoCa'}"
                                     for b, v in pre.items())) if pre else ""


def _shift_lines(rows: dict) -> list[str]:
    out = []
    zs = first_analysis(rows, "zero-shot")
    if zs:
        concepts = ["uni_image", "uni_question", "image", "joint", "question"]
        out += ["Shift of each set from ID train (mean Mahalanobis distance; the pre-trained model):", "",
                "| set | " + " | ".join(concepts) + " |", "|---" * (len(concepts) + 1) + "|"]
        out += [f"| {n} | " + " | ".join(f"{v[c]:.2f}" if v.get(c) is not None else "-" for c in concepts) + " |"
                for n, v in zs["shift"].items()]
        out.append("")
    out += ["Each row's own joint shift (first seed) and modality importance (median question share of the "
            "predicted answer's probability drop; CoCa: and the decoder's self/cross attention-output ratio), ID "
            "against the mean over the OOD sets:", "",
            "| row | joint shift ID | joint shift OOD | question share ID | question share OOD | self/cross ID | "
            "self/cross OOD |", "|---|---|---|---|---|---|---|"]
    for label in rows:
        an = first_analysis(rows, label)
        if an:
            out.append(_importance_row(label, an))
    return out + ["", *_own_shift_table(rows)]


def _own_shift_table(rows: dict) -> list[str]:
    """Each row's own distances (first seed) by concept, near-OOD and far-OOD means: the shift a method's own
    embeddings see, beside the pre-trained model's (FRAMES-VQA's shift table, arXiv 2505.21755 §4)."""
    from .quickstart_vqa import OOD_SETS

    concepts, groups = ("image", "question", "joint"), (("near", OOD_SETS[:6]), ("far", OOD_SETS[6:]))
    out = ["Each row's own shift (first seed; mean Mahalanobis distance to its ID train Gaussian), mean over the "
           "near-OOD and the far-OOD sets:", "",
           "| row | " + " | ".join(f"{c} {g}" for c in concepts for g, _ in groups) + " |",
           "|---" * (len(concepts) * len(groups) + 1) + "|"]
    for label in rows:
        an = first_analysis(rows, label)
        if not an:
            continue
        cells = []
        for c in concepts:
            for _, names in groups:
                vals = [an["shift"][n][c] for n in names if an["shift"].get(n, {}).get(c) is not None]
                cells.append(f"{statistics.fmean(vals):.2f}" if vals else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def _importance_row(label: str, an: dict) -> str:
    ood = [n for n in an["shift"] if n != "vqav2"]
    mi = an.get("modality_importance") or {}

    def mean_of(key: str, names: list[str]) -> str:
        if key == "joint":
            vals = [an["shift"][n].get("joint") for n in names]
        else:
            vals = [((mi.get(n) or {}).get(key) or {}).get("median") for n in names]
        vals = [v for v in vals if v is not None]
        return f"{statistics.fmean(vals):.3f}" if vals else "-"

    return f"| {label} | " + " | ".join(mean_of(k, names) for k in ("joint", "question_share", "self_over_cross")
                                        for names in (["vqav2"], ood)) + " |"
