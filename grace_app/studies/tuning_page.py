"""A tuning study's page: ``tuning.md`` (per method its score, compute, selection, re-scored seeds and best-so-far
summary, then every trial) and its plot of the best-so-far curves, both from ``tuning.json`` alone, so
``grace results`` draws the same page from a published tuning.json as ``grace study tune`` did."""
from __future__ import annotations

from pathlib import Path

from .search import best_so_far, late_gain, score_key

__all__ = ["tuning_markdown", "tuning_plot"]


def _values(point: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def _best_so_far_lines(doc: dict, threshold: float) -> list[str]:
    from .search import CONVERGE_DELTA

    delta = float(doc["protocol"].get("converge_delta", CONVERGE_DELTA))
    lines = ["", "## Best so far", "",
             "The best selectable score after each trial (trial order; the plot draws the curves). `gain, last "
             "third` is how much the best rose over the last third of the trials; the protocol's convergence rule "
             f"(`converge_delta` {delta:g}) extends a budget whose gain is above it by `converge_trials` more "
             "trials, at most `max_extensions` times; `converged` says whether the final curve meets the rule.", "",
             "| method | score | trials | extensions | best | first reached at trial | gain, last third | converged |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, res in doc["methods"].items():
        key = score_key(res.get("score", "hm"))
        curve = best_so_far(res["trials"], threshold, key)
        ext = res.get("extensions", "-")
        if not curve or curve[-1] is None:
            lines.append(f"| {name} | {key} | {len(curve)} | {ext} | - | - | - | - |")
            continue
        first = next(i for i, v in enumerate(curve) if v == curve[-1])
        gain = late_gain(curve)
        done = "-" if gain is None else "yes" if gain <= delta else "no"
        lines.append(f"| {name} | {key} | {len(curve)} | {ext} | {curve[-1]:.2f} | {first} | "
                     f"{'-' if gain is None else f'{gain:+.2f}'} | {done} |")
    return lines


def tuning_plot(doc: dict, path: Path) -> Path:
    """Best-so-far curves per method (``best_so_far``): HM-scored methods on the left, clean-scored on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threshold = doc["protocol"]["collapse_spread"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "hm", "validation HM (%)"), (axes[1], "val_clean", "validation clean top-1 (%)")):
        for name, res in doc["methods"].items():
            if (score_key(res.get("score", "hm"))) != key:
                continue
            curve = best_so_far(res["trials"], threshold, key)
            ax.step(range(len(curve)), [float("nan") if v is None else v for v in curve], where="post", label=name)
        ax.set_xlabel("trial")
        ax.set_ylabel(f"best so far: {label}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    from eval_suites.plot import save_figure

    return save_figure(fig, path, f"Tuning, world seed {doc['seed']}: best selectable score after each trial")


def tuning_markdown(doc: dict) -> str:
    """A tuning.json as a page: per method its score, compute, selection and re-scored seeds; then every trial."""
    threshold, top = doc["protocol"]["collapse_spread"], int(doc["protocol"].get("rescore_top", 3))

    def f(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

    vqa = doc.get("task") == "vqa"
    where = ("Every trial trains on the VQA world's vqav2 train split and is scored on its val split (never test "
             "or OOD), by the official VQA accuracy. Score: HM of validation VQA accuracy clean and with the image "
             f"attacked (APGD-CE 4/255 on {doc['protocol'].get('n_val_adv')} questions), or clean accuracy"
             if vqa else "Every trial trains on ID train minus a validation split held out of it and is scored "
             "there. Score: HM of validation clean and robust top-1 (APGD-CE 4/255 on "
             f"{doc['protocol'].get('n_val_adv')} images), or clean top-1")
    lines = [f"# Tuning, {'VQA world' if vqa else 'world'} seed {doc['seed']} ({doc['size']} size; Optuna TPE, "
             f"{doc['trials']} trials per method, {doc['steps']} steps)", "",
             "`grace study tune` (protocol: `configs/testbed/tuning.yaml`, docs/studies.md). " + where + " for a "
             "method scored on it (`score` column). A trial whose feature spread is >= "
             f"{threshold} is collapsed; collapsed and diverged trials are recorded and never selected; a pruned trial "
             "was stopped by successive halving at the step it shows. `selected` is chosen on the mean over the "
             f"re-scored seeds; `re-scored` lists the trials trained again on more seeds: the top "
             f"{top} selectable ones, fewer (said so) when fewer trials finished unpruned and uncollapsed.", "",
             "| method | score | trials | trial-steps | CPU-s (+ re-scoring) | collapsed | diverged | selected | "
             "values | re-scored seeds (score) | re-scored | edge |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for name, res in doc["methods"].items():
        c = res["compute"]
        vals = _values(res["values"] or {})
        best = next((r for r in res.get("rescored") or [] if r["trial"] == res["selected"]), None)
        key = score_key(res.get("score", "hm"))
        seeds = "-" if best is None or not best.get("seed_results") else ", ".join(
            f(v.get(key)) for v in best["seed_results"].values())
        rescored = [r["trial"] for r in res.get("rescored") or []]
        short = f" (only {len(rescored)} selectable of {top})" if len(rescored) < top else ""
        wid = res.get("widenings") or 0  # each widening of a range adds tuning.yaml's widen_trials to the budget
        trials = f"{c['trials']}" + (f" ({doc['trials']} + {wid} widening(s))" if wid else "")
        lines.append(f"| {name} | {res.get('score', 'hm')} | {trials} | {c['trial_steps']} | "
                     f"{c['cpu_seconds']:.0f} (+{c.get('rescore_cpu_seconds', 0):.0f}) | {res['collapsed']} | "
                     f"{res['diverged']} | {'-' if res['selected'] is None else res['selected']} | {vals} | {seeds} | "
                     f"{', '.join(map(str, rescored)) or '-'}{short} | {', '.join(res['at_range_edge']) or 'none'} |")
    lines += _best_so_far_lines(doc, threshold)
    lines += ["", "## Every trial", "",
              "| method | trial | state | values | val clean | val robust | HM | spread | selected |",
              "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for name, res in doc["methods"].items():
        for r in res["trials"]:
            vals = _values(r["point"])
            state = "diverged" if r.get("diverged") else "collapsed" if r.get("collapsed") else r["state"]
            if r.get("pruned_at"):
                state += f" at {r['pruned_at']}"
            lines.append(f"| {name} | {r['trial']} | {state}{' (anchor)' if r.get('anchor') else ''} | {vals} | "
                         f"{f(r.get('val_clean'))} | {f(r.get('val_robust'))} | {f(r.get('hm'))} | "
                         f"{f(r.get('feature_spread'), 3)} | {'yes' if r['trial'] == res['selected'] else ''} |")
    return "\n".join(lines) + "\n"
