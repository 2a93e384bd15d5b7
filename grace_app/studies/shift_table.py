"""The FRAMES-style shift table of ``grace study shift``: each OOD set's Mahalanobis distance from ID against each
method's accuracy drop on it, near/far (FRAMES-VQA, arXiv 2505.21755, Sec. 3: a single Gaussian fitted on ID
embeddings, a set's shift the mean distance of its samples).

Two distances per set: the *pre-trained* encoder's (the zero-shot row's, one measure of the data shared by every
method, as FRAMES measures shift with frozen pre-trained encoders) and each method's *own* encoder's (how fine-tuning
re-shapes the geometry). The suite itself (``eval_suites/shift.py``, suite ``shift``) computes one run's table; this
module keeps a run's record, averages over seeds and writes the study's section.
"""
from __future__ import annotations

from .verdicts import paired_difference, seed_mean

__all__ = ["shift_record", "aggregate_shift", "paired_drops", "shift_markdown", "REFERENCE_ROW"]

REFERENCE_ROW = "zero-shot"  # the pre-trained encoder: its distances are the method-independent shift of each set


def shift_record(suite: dict) -> dict:
    """One run's shift suite result, kept for the study: ID accuracy and each set's accuracy and drop (top-1 on the
    suite's first ``n`` images of each set), and per embedding space each set's mean distance, ID's own mean
    distance, and the Spearman correlation of distance with drop over the sets."""
    return {"n": suite["n"], "id_acc": suite["id_acc"], "acc": dict(suite["acc"]),
            "drop": dict(suite["accuracy_drop"]),
            "distance": {sp: dict(v["scores"]) for sp, v in suite["spaces"].items()},
            "id_self": {sp: v["id_self"] for sp, v in suite["spaces"].items()},
            "spearman": {sp: v.get("spearman") for sp, v in suite["spaces"].items()}}


def aggregate_shift(runs: list[dict]) -> dict:
    """Mean (and sample std over seeds) of each set's drop and of each space's distances; the near/far split of
    the mean image-space distances (``shift.near_far``: the largest gap); the mean of the runs' Spearman rho."""
    from eval_suites.shift import near_far

    recs = [r["shift"] for r in runs]
    sets = list(recs[0]["drop"])
    out: dict = {"n": recs[0]["n"], "drop": {}, "drop_std": {}, "distance": {}, "spearman": {}}
    for s in sets:
        out["drop"][s], out["drop_std"][s] = seed_mean([r["drop"].get(s) for r in recs])
    for sp in recs[0]["distance"]:
        out["distance"][sp] = {s: seed_mean([r["distance"][sp].get(s) for r in recs])[0] for s in sets}
        out["spearman"][sp] = seed_mean([r["spearman"].get(sp) for r in recs])[0]
    out["split"] = near_far(out["distance"]["image"])
    return out


def paired_drops(rows: dict, reference: str) -> dict:
    """Each row's paired difference from ``reference`` (row - reference, mean over the seeds both ran, 95% Student-t
    interval: ``verdicts.paired_difference``) of its ID top-1 (``id``) and of its accuracy drop on each set, from the
    runs' shift records; ``{row: {"id" | set: Spread | None}}``, {} when the reference has no shift record."""
    def by_seed(row: dict) -> dict[str, dict[int, float]]:
        """``{"id" | set: {seed: value}}`` over the row's runs with a shift record (a missing value left out)."""
        out: dict[str, dict[int, float]] = {}
        for run in row.get("runs", []):
            sh = run.get("shift")
            for k, v in ({"id": sh["id_acc"], **sh["drop"]} if sh else {}).items():
                if v is not None:
                    out.setdefault(k, {})[run["seed"]] = v
        return out

    ref = rows.get(reference)
    if not ref or not ref.get("shift"):
        return {}
    keys = ["id", *ref["shift"]["drop"]]
    ref_values = by_seed(ref)
    out = {}
    for name, row in rows.items():
        if name == reference or not row.get("shift"):
            continue
        values = by_seed(row)
        out[name] = {k: paired_difference(values.get(k, {}), ref_values.get(k, {})) for k in keys}
    return out


def _f(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _drop_vs_reference(row: dict, ref: dict) -> float | None:
    """Spearman rho, over the sets, of the reference (pre-trained) distance against this row's mean drop."""
    from eval_suites.shift import spearman

    sets = [s for s in ref["distance"]["image"] if row["drop"].get(s) is not None]
    return spearman([ref["distance"]["image"][s] for s in sets], [row["drop"][s] for s in sets])


def shift_markdown(rows: dict, reference: str | None = None) -> list[str]:
    """The study's shift section (rows: the study's rows, each with ``shift`` from ``aggregate_shift``); with a
    ``reference`` row (the study's ``shift_reference``) each row's paired differences from it (``paired_drops``)."""
    have = {k: r for k, r in rows.items() if r.get("shift")}
    if not have:
        return []
    ref = have.get(REFERENCE_ROW)
    sets = list(next(iter(have.values()))["shift"]["drop"])
    n = next(iter(have.values()))["shift"]["n"]
    lines = ["", "## Shift (FRAMES-style)", "",
             "Each OOD set's Mahalanobis distance from the ID test images (FRAMES-VQA, arXiv 2505.21755: one Gaussian "
             "fitted on the ID embeddings, float64, pseudo-inverse with a 1e-6 tr(Sigma)/d ridge; a set's distance is "
             f"the mean over its first {n} images), against each method's accuracy drop (ID top-1 minus the set's "
             "top-1 on the same images, mean ± std over seeds). Near/far: the sets split at the largest gap between "
             "consecutive distances. rho: Spearman over the sets of distance against drop (4 sets: rho is coarse, "
             "a step of 0.2 per rank swap).", ""]
    if ref:
        r0 = ref["shift"]
        split = r0["split"]
        lines += ["Distance in the pre-trained (zero-shot) image space, one measure of the data for every method; "
                  "each column after it is a method's accuracy drop on that set:", "",
                  "| set | distance (pre-trained) | near/far | " + " | ".join(r["label"] for r in have.values()) + " |",
                  "|---|---:|---|" + "---:|" * len(have)]
        for s in split["order"]:
            cells = [f"{_f(r['shift']['drop'][s])} ± {_f(r['shift']['drop_std'].get(s))}"
                     if r["shift"]["drop_std"].get(s) is not None else _f(r["shift"]["drop"][s]) for r in have.values()]
            lines.append(f"| {s} | {_f(r0['distance']['image'][s], 3)} | "
                         f"{'near' if s in split['near'] else 'far'} | " + " | ".join(cells) + " |")
        lines.append("| rho (pre-trained distance, drop) | | | " +
                     " | ".join(_f(_drop_vs_reference(r["shift"], r0)) for r in have.values()) + " |")
        lines.append("")
    lines += ["Distance in each method's own image space (its own ID fit; the ID set's own mean distance for "
              "scale), its near/far split and rho of its own distances against its drops (mean over seeds); "
              "joint: image and predicted class-prompt text embeddings together:", "",
              "| row | ID self | " + " | ".join(sets) + " | near | far | rho image | rho joint |",
              "|---|---:|" + "---:|" * len(sets) + "---|---|---:|---:|"]
    for r in have.values():
        sh = r["shift"]
        runs_self = [run["shift"]["id_self"]["image"] for run in r["runs"] if run.get("shift")]
        lines.append(f"| {r['label']} | {_f(seed_mean(runs_self)[0], 3)} | " +
                     " | ".join(_f(sh["distance"]["image"][s], 3) for s in sets) +
                     f" | {', '.join(sh['split']['near'])} | {', '.join(sh['split']['far'])} | "
                     f"{_f(sh['spearman'].get('image'))} | {_f(sh['spearman'].get('joint'))} |")
    paired = paired_drops(have, reference) if reference else {}
    if paired:
        label = have[reference]["label"]
        lines += ["", f"Each row's accuracy drop against {label}'s, paired by seed (same data order, initialisation "
                  f"and images): mean over the common seeds of (row - {label}) with its 95% Student-t interval over "
                  "seeds (the images are the same in every run, so it is narrower than a bootstrap that resamples "
                  "images too); ID: the same for the suite's ID top-1. Positive: the row drops more on that set.", "",
                  "| row | seeds | ID | " + " | ".join(f"drop {s}" for s in sets) + " |",
                  "|---|---:|---:|" + "---:|" * len(sets)]
        for name, per in paired.items():
            n = next((d.n for d in per.values() if d is not None), 0)
            cells = ["-" if per[k] is None else f"{per[k].mean:+.2f} [{per[k].lo:+.2f}, {per[k].hi:+.2f}]"
                     for k in ["id", *sets]]
            lines.append(f"| {have[name]['label']} | {n} | " + " | ".join(cells) + " |")
    return lines
