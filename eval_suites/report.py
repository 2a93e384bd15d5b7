"""Reports: ``report.json`` (schema below), a markdown table, ``grace report``'s comparison and a trade-off plot.

``report.json``::

    {"model": str,
     "axes": {"id", "ood", "adv", "hm"},                    # the `strict` definition's numbers (null: not measured)
     "definitions": {"strict" | "paper": {
         "description": str, "id", "ood", "adv", "hm": %,
         "ci95": {"id", "ood", "adv", "hm": [lo, hi]},
         "inputs": {"id": [set], "ood": [set], "adv": [attack or set]},   # what entered each column
         "missing": {"ood": [...], "adv": [...]}}},          # what the definition asks for and the run lacks
     "datasets": {NAME: {"top1", "correct", "n", "ci95", "skipped", "skipped_by_reason", "expected", "role",
                         "scoring", "head", "paper_column", "feature_spread"}},
     "adversarial": {"attack", "eps", "norm", "n", "clean_acc", "robust_acc", "clean_ci95", "robust_ci95",
                     "precision", ...} | null,
     "config": {...},
     "suites": {SUITE: {"kind": "id"|"ood"|"transfer"|"adv"|"robustbench"|"corruptions"|"geometry"|"shift", ...}}}

Two column definitions (``DEFINITIONS``): ``strict`` (OOD = mean of the OOD sets given, Adv = the attack's robust
accuracy) and ``paper`` (the paper's Table 6, arXiv 2603.27139 Sec. 4: OOD = mean of ImageNet-V2/-Sketch/-R, Adv =
mean of the attack's robust accuracy and the natural-adversarial sets present, ImageNet-A and -A-Plus; a set plays
a column through its catalogue ``paper`` field). HM is the harmonic mean of ID, OOD and Adv; null unless all three
exist.

Every accuracy carries its 95% Wilson score interval from its own n (``wilson``: closed form, equal to
``scipy.stats.binomtest``'s ``proportion_ci(method="wilson")``). A mean of several sets gets the mean of their
bounds and HM the HM of the bounds: both are conservative (wider than the interval of the combined estimate).
Files are written atomically.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["harmonic_mean", "build_report", "write_report", "report_markdown", "summary_markdown",
           "tradeoff_plot", "write_summary", "aggregate_reports", "references_markdown", "wilson", "summarise",
           "DEFINITIONS", "ReportError", "not_significant"]

from grace_plugin.errors import GraceError, read_json

from .plot import tradeoff_plot

DEFINITIONS = {
    "strict": "OOD = mean of the OOD sets given; Adv = the attack's robust accuracy",
    "paper": "the paper's Table 6: OOD = mean of ImageNet-V2/-Sketch/-R; Adv = mean of the attack's robust accuracy "
             "and ImageNet-A/-A-Plus",
}
PAPER_OOD = ("v2", "sketch", "r")
PAPER_ADV = ("a", "a-plus")
AXES = ("id", "ood", "adv", "hm")


class ReportError(GraceError, ValueError):
    """A report.json that cannot be read; the message names the file."""


def harmonic_mean(values) -> float | None:
    """Harmonic mean of percentages; 0 if any is 0; None if any is missing."""
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def wilson(correct: int | None, n: int | None, confidence: float = 0.95) -> list[float] | None:
    """The Wilson score interval of ``correct / n`` in percent (Wilson 1927; equal to ``scipy.stats.binomtest(...)
    .proportion_ci(method="wilson")``, tested). Closed form here because importing ``scipy.stats`` costs 1.5 s of
    every evaluation's start-up on a CPU (bench/eval_speed.py), once per rank."""
    if correct is None or not n:
        return None
    from statistics import NormalDist

    k, n = int(correct), int(n)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = k / n, z * z
    centre, half = p + z2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo, hi = (centre - half) / (1 + z2 / n), (centre + half) / (1 + z2 / n)
    return [100.0 * max(0.0, lo), 100.0 * min(1.0, hi)]


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _mean_ci(cis):
    if not cis or any(c is None for c in cis):
        return None
    return [sum(c[0] for c in cis) / len(cis), sum(c[1] for c in cis) / len(cis)]


def _hm_ci(cis):
    if any(c is None for c in cis):
        return None
    return [harmonic_mean([c[0] for c in cis]), harmonic_mean([c[1] for c in cis])]


def _column(members: list[tuple[str, float | None, list | None]]):
    present = [m for m in members if m[1] is not None]
    if not present:
        return None, None, []
    return _mean(v for _, v, _ in present), _mean_ci([c for _, _, c in present]), [n for n, _, _ in present]


def summarise(datasets: dict, id_name: str | None, ood_names: list[str], adversarial: dict | None) -> dict:
    """Both column definitions from per-set results (``datasets[NAME]``: top1, ci95, paper_column)."""
    adv_label = f"adv:{adversarial.get('attack') or 'autoattack'}" if adversarial else None
    adv_member = [(adv_label, adversarial.get("robust_acc"), adversarial.get("robust_ci95"))] if adversarial else []
    idm = [(id_name, datasets[id_name]["top1"], datasets[id_name].get("ci95"))] if id_name in datasets else []

    def entry(name, ood_members, adv_members, missing):
        out = {"description": DEFINITIONS[name]}
        cols = {"id": _column(idm), "ood": _column(ood_members), "adv": _column(adv_members)}
        for k, (v, _, _) in cols.items():
            out[k] = v
        out["hm"] = harmonic_mean([out["id"], out["ood"], out["adv"]])
        ci = {k: c for k, (_, c, _) in cols.items()}
        ci["hm"] = _hm_ci([ci["id"], ci["ood"], ci["adv"]]) if out["hm"] is not None else None
        out["ci95"] = ci
        out["inputs"] = {k: used for k, (_, _, used) in cols.items()}
        out["missing"] = missing
        return out

    strict_ood = [(n, datasets[n]["top1"], datasets[n].get("ci95")) for n in ood_names if n in datasets]
    strict = entry("strict", strict_ood, adv_member,
                   {"id": [] if idm else ["ID set"], "ood": [] if strict_ood else ["OOD sets"],
                    "adv": [] if adversarial else ["attack"]})
    by_col: dict[str, list] = {}
    for n, d in datasets.items():
        if d.get("paper_column") and d.get("role") in ("ood", None):
            by_col.setdefault(d["paper_column"], []).append((n, d["top1"], d.get("ci95")))
    paper_ood = [m for c in PAPER_OOD for m in by_col.get(c, [])]
    paper_adv = adv_member + [m for c in PAPER_ADV for m in by_col.get(c, [])]
    missing = {"id": [] if idm else ["ID set"], "ood": [c for c in PAPER_OOD if c not in by_col],
               "adv": ([] if adversarial else ["attack"]) + [c for c in PAPER_ADV if c not in by_col]}
    return {"strict": strict, "paper": entry("paper", paper_ood, paper_adv, missing)}


def build_report(model: str, datasets: dict, id_name: str | None, ood_names: list[str],
                 adversarial: dict | None, config: dict | None = None) -> dict:
    """Assemble the report from per-dataset results (``ClassificationResult.as_dict()`` plus ``role``, ``scoring``,
    ``head``, ``paper_column``) and the attack result; intervals and both column definitions are added here."""
    ds = {}
    for name, res in datasets.items():
        role = res.get("role") or ("id" if name == id_name else ("ood" if name in ood_names else "other"))
        d = dict(res, role=role)
        correct = d.get("correct")
        if correct is None and d.get("top1") is not None and d.get("n"):
            correct = round(d["top1"] * d["n"] / 100)
        d["ci95"] = wilson(correct, d.get("n"))
        ds[name] = d
    adv = None
    if adversarial:
        adv = dict(adversarial)
        for k in ("clean", "robust"):
            correct = adv.get(f"{k}_correct")
            if correct is None and adv.get(f"{k}_acc") is not None:
                correct = round(adv[f"{k}_acc"] * adv["n"] / 100)
            adv[f"{k}_ci95"] = wilson(correct, adv.get("n"))
    defs = summarise(ds, id_name, ood_names, adv)
    axes = {k: defs["strict"][k] for k in AXES}
    return {"model": model, "axes": axes, "definitions": defs, "datasets": ds, "adversarial": adv,
            "config": config or {}}


def _fmt(v, nd=2):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:.1f}, {ci[1]:.1f}]"


def _definitions(report: dict) -> dict:
    """The report's definitions; a report written before they existed has its ``axes`` as ``strict``."""
    return report.get("definitions") or {"strict": dict(report["axes"], description=DEFINITIONS["strict"])}


# what the brackets of a table cell are (the same on every page that prints the axes)
INTERVALS = ("[one accuracy (ID; our Adv): its 95% Wilson interval; a mean of accuracies (OOD; the paper's Adv): "
             "the mean of their Wilson bounds; HM: the HM of the axes' bounds; the last two are conservative, wider "
             "than a 95% interval of the combined estimate]")


def report_markdown(report: dict) -> str:
    lines = [f"# {report['model']}", "", f"Accuracies in %, {INTERVALS}.", "",
             "| definition | ID | OOD | Adv | HM |", "|---|---:|---:|---:|---:|"]
    defs = _definitions(report)
    for name, d in defs.items():
        ci = d.get("ci95") or {}
        lines.append(f"| {name} | " + " | ".join(_fmt(d.get(k)) + _ci(ci.get(k)) for k in AXES) + " |")
    for name, d in defs.items():
        inputs = d.get("inputs") or {}
        missing = {k: v for k, v in (d.get("missing") or {}).items() if v}
        lines.append(f"\n{name}: {d.get('description', '')}. Inputs: " +
                     "; ".join(f"{k.upper()} = {', '.join(v) or '-'}" for k, v in inputs.items()) +
                     (". Missing: " + "; ".join(f"{k.upper()} {', '.join(v)}" for k, v in missing.items())
                      if missing else ""))
    lines += ["", "| dataset | role | scoring | head | top-1 | n | skipped | feature spread |",
              "|---|---|---|---|---:|---:|---:|---:|"]
    for name, d in report["datasets"].items():
        head = (d.get("head") or {}).get("head", "")
        fs = d.get("feature_spread")
        lines.append(f"| {name} | {d.get('role', '')} | {d.get('scoring', '')} | {head} | {_fmt(d['top1'])}"
                     f"{_ci(d.get('ci95'))} | {d['n']} | {d['skipped']} | {'-' if fs is None else f'{fs:.3f}'} |")
    lines.append("\nFeature spread: the mean cosine between the features of different images of the set (near 1: "
                 "collapsed features).")
    notes = [f"{name}: {d['head']['reason']}" for name, d in report["datasets"].items()
             if (d.get("head") or {}).get("head") == "rebuilt"]
    if notes:
        lines += ["", "Heads: " + "; ".join(notes) + "."]
    adv = report.get("adversarial")
    if adv:
        lines += ["", f"Adversarial: {adv.get('attack', adv.get('runner'))} {adv.get('norm', adv.get('threat'))} "
                  f"eps={adv['eps']:.5f} on {adv['n']} images ({adv.get('precision', 'fp32')}): clean "
                  f"{_fmt(adv['clean_acc'])}{_ci(adv.get('clean_ci95'))}, robust {_fmt(adv['robust_acc'])}"
                  f"{_ci(adv.get('robust_ci95'))}"]
    lines += _suite_sections(report.get("suites") or {})
    if report.get("suites") is not None:
        lines += ["", "## Reference rows (shipped data, not measured here)", "",
                  references_markdown(_row_from_definition(report.get("model"), defs.get("paper") or defs["strict"]),
                                      robustbench=_robustbench_row(report))]
    return "\n".join(lines) + "\n"


def _row_from_definition(method, d: dict) -> dict:
    ci = d.get("ci95") or {}
    return {"method": method, **{k: d.get(k) for k in AXES}, **{f"{k}_ci": ci.get(k) for k in AXES}}


def _robustbench_row(report: dict) -> dict | None:
    """RobustBench's columns (clean and AutoAttack accuracy on its ImageNet subset) when the run measured them."""
    for name, r in (report.get("suites") or {}).items():
        if r.get("kind") == "robustbench" or (r.get("kind") == "adv" and r.get("attack") == "autoattack"):
            return {"method": report.get("model"), "clean": r.get("clean_acc"), "autoattack": r.get("robust_acc"),
                    "n": r.get("n"), "suite": name,
                    "subset": r.get("subset") or ("robustbench-imagenet-5000" if r["kind"] == "robustbench" else None),
                    "clean_ci": wilson(r.get("clean_correct"), r.get("n")),
                    "autoattack_ci": wilson(r.get("robust_correct"), r.get("n"))}
    return None


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


def references_markdown(row: dict | None = None, table: str = "Table 6", robustbench: dict | list | None = None
                        ) -> str:
    """The paper's table (compared under the ``paper`` definition) and the RobustBench ImageNet Linf 4/255 board
    (compared under RobustBench's: clean and AutoAttack accuracy on its 5000-image subset), with sources."""
    from .leaderboard import load_references, reference_rows

    refs = load_references()
    rows = [row] if row else []
    out = f"Paper {table}, `paper` definition ({DEFINITIONS['paper']}):\n\n"
    out += summary_markdown(rows, reference_rows(table))
    out += f"\nSource: {refs['paper']['source']}.\n\n"
    rb = refs["robustbench"]
    ours = [robustbench] if isinstance(robustbench, dict) else list(robustbench or [])
    lines = ["RobustBench's definition (clean and AutoAttack accuracy, ImageNet Linf 4/255, its 5000-image subset):",
             "", "| RobustBench # | model | clean | AutoAttack | external |", "|---:|---|---:|---:|---:|"]
    for r in ours:
        if r is None:
            continue
        note = "" if r.get("subset") == "robustbench-imagenet-5000" else " (not on RobustBench's subset)"
        lines.append(f"| - | {r['method']}{note} | {_fmt(r.get('clean'))}{_ci(r.get('clean_ci'))} | "
                     f"{_fmt(r.get('autoattack'))}{_ci(r.get('autoattack_ci'))} | |")
    for r in rb["rows"]:
        lines.append(f"| {r['rank']} | {r['model']} | {_fmt(r['clean_acc'])} | {_fmt(r['autoattack_acc'])} | "
                     f"{_fmt(r['external'])} |")
    return out + "\n".join(lines) + f"\n\nSource: {rb['source']}.\n"


def write_report(out_dir: str | Path, report: dict) -> Path:
    from grace_plugin.tensor_io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", report_markdown(report))
    return out / "report.json"


def not_significant(rows: list[dict]) -> dict[str, list[list[str]]]:
    """Per column, the pairs of rows whose 95% intervals (``<col>_ci``) overlap: their difference is not
    significant at that level (a conservative test: disjoint intervals imply a significant difference)."""
    out = {}
    for k in AXES:
        pairs = []
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                ca, cb = a.get(f"{k}_ci"), b.get(f"{k}_ci")
                if ca and cb and ca[0] <= cb[1] and cb[0] <= ca[1]:
                    pairs.append([a["method"], b["method"]])
        out[k] = pairs
    return out


def summary_markdown(rows: list[dict], references: list[dict] | None = None, definition: str | None = None) -> str:
    """Rows ``{"method", "id", "ood", "adv", "hm"}`` (plus optional ``*_std`` over seeds and ``*_ci``, the 95%
    interval of one run or the mean of the runs' bounds) -> markdown table. In each column the best row is bold and
    a row whose interval overlaps the best's is marked ``≈`` (not significantly different)."""
    has_std = any("id_std" in r for r in rows)
    best = {}
    for k in AXES:
        cands = [r for r in rows if r.get(k) is not None]
        best[k] = max(cands, key=lambda r: r[k]) if cands else None
    lines = []
    if definition:
        lines += [f"Columns: `{definition}` definition ({DEFINITIONS.get(definition, definition)}); % with "
                  f"{INTERVALS}" + ("; mean ± std over seeds (SD), brackets = the mean of the runs' bounds"
                                    if has_std else "") + ".", ""]
    lines += ["| method | ID | OOD | Adv | HM |", "|---|---:|---:|---:|---:|"]
    marked = False
    for r in rows:
        cells = []
        for k in AXES:
            cell = _fmt(r.get(k))
            if has_std and r.get(f"{k}_std") is not None:
                cell += f" ± {_fmt(r[f'{k}_std'])}"
            cell += _ci(r.get(f"{k}_ci"))
            b = best[k]
            if b is r and len(rows) > 1:
                cell = f"**{cell}**"
            elif b is not None and r.get(k) is not None:
                cb, cr = b.get(f"{k}_ci"), r.get(f"{k}_ci")
                if cb and cr and cr[1] >= cb[0] and cb[1] >= cr[0]:
                    cell += " ≈"
                    marked = True
            cells.append(cell)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    for ref in references or []:
        lines.append(f"| {ref['method']} ({ref['source']}) | " +
                     " | ".join(_fmt(ref.get(k)) for k in AXES) + " |")
    if marked:
        lines += ["", "≈: the row's interval overlaps the column's best (bold) run's. Overlap is not a test: the two "
                  "may still differ, and a tie is claimed only by an equivalence test (the studies' paired verdicts)."]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, rows: list[dict], extra: dict | None = None,
                  references: list[dict] | None = None, definition: str | None = "strict",
                  sections: list[str] | None = None) -> dict[str, Path]:
    """summary.json (rows, pairs not significantly different, ``extra``), summary.md (the rows' table under
    ``definition``, then ``sections``) and tradeoff.png."""
    from grace_plugin.tensor_io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps({"definition": definition, "rows": rows,
                                                        "not_significant": not_significant(rows), **(extra or {})},
                                                       indent=2) + "\n")
    md = summary_markdown(rows, references, definition=definition)
    for sec in sections or []:
        md += "\n" + sec
    atomic_write_text(out / "summary.md", md)
    png = tradeoff_plot(rows, out / "tradeoff.png", references=references)
    return {"json": out / "summary.json", "md": out / "summary.md", "png": png}


def _read_report(r: str | Path) -> tuple[Path, dict]:
    p = Path(r)
    f = p / "report.json" if p.is_dir() else p
    if not f.is_file():
        raise ReportError(f"{f}: no report.json (run `grace eval ... --out {p}` first)")
    rep = read_json(f, ReportError, "not a grace report.json")
    from .vqa_summary import is_vqa_report

    if is_vqa_report(rep):
        return p, rep
    if not isinstance(rep, dict) or "axes" not in rep:
        raise ReportError(f"{f}: not a grace report.json (KeyError: 'axes')")
    return p, rep


def aggregate_reports(runs: list[str | Path], out_dir: str | Path, table: str | None = "Table 6") -> dict:
    """``grace report RUN...``: each RUN is a folder holding ``report.json`` (or the file); one row per run. VQA
    reports get their own table (``vqa_summary.aggregate_vqa_reports``).

    The rows are compared with the paper's rows under the ``paper`` definition (its Table 6 columns) and with the
    RobustBench board under RobustBench's (clean and AutoAttack accuracy); the ``strict`` table follows. Writes
    summary.json/.md and tradeoff.png under ``out_dir``."""
    from .leaderboard import reference_rows

    from .vqa_summary import aggregate_vqa_reports, is_vqa_report

    reports = [_read_report(r) for r in runs]
    vqa = [is_vqa_report(rep) for _, rep in reports]
    if any(vqa):  # VQA evaluations: their own table (no paper or RobustBench rows: those are classification's)
        if not all(vqa):
            p = next(p for (p, _), v in zip(reports, vqa) if not v)
            raise ReportError(f"{p}: a classification report among VQA ones; report each task apart")
        return aggregate_vqa_reports(reports, out_dir)
    rows, paper_rows, rb_rows = [], [], []
    for p, rep in reports:
        method = rep.get("model") or p.name
        if any(row["method"] == method for row in rows):
            method = f"{method} ({p.name})"
        defs = _definitions(rep)
        strict = _row_from_definition(method, defs["strict"])
        paper = _row_from_definition(method, defs["paper"]) if "paper" in defs else None
        rows.append({**strict, "run": str(p), "paper": paper,
                     "missing": {k: d.get("missing") for k, d in defs.items()}})
        if paper is not None:
            paper_rows.append(paper)
        rb = _robustbench_row(rep)
        if rb is not None:
            rb_rows.append(dict(rb, method=method))
    refs = reference_rows(table) if table else None
    sections = ["Paper comparison, `paper` definition:\n\n" + summary_markdown(paper_rows, refs, definition="paper")
                + (f"\nSource: {load_paper_source()}.\n" if refs else "")]
    sections.append(_robustbench_section(rb_rows))
    paths = write_summary(out_dir, rows, extra={"paper_rows": paper_rows, "robustbench_rows": rb_rows,
                                                "references": refs,
                                                "paper_not_significant": not_significant(paper_rows)},
                          references=None, definition="strict", sections=sections)
    return {"rows": rows, "paper_rows": paper_rows, "robustbench_rows": rb_rows, "paths": paths}


def load_paper_source() -> str:
    from .leaderboard import load_references

    return load_references()["paper"]["source"]


def _robustbench_section(rb_rows: list[dict]) -> str:
    text = references_markdown(None, robustbench=rb_rows)
    return text[text.index("RobustBench's definition"):]
