"""The three-axis trade-off plot (OOD vs ID, Adv vs ID) that reports, summaries and study pages draw."""
from __future__ import annotations

from pathlib import Path

__all__ = ["tradeoff_plot", "save_figure"]


def _err(row: dict, axis: str):
    """Error bar of ``row[axis]`` for matplotlib: +-1 std over seeds (``*_std``), else the run's 95% interval
    ``*_ci`` ([lo, hi], asymmetric about the value), else None."""
    if row.get(f"{axis}_std") is not None:
        return row[f"{axis}_std"]
    ci, v = row.get(f"{axis}_ci"), row.get(axis)
    if ci is None or v is None:
        return None
    if isinstance(ci, (int, float)):  # a half-width
        return ci
    return [[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]]


def tradeoff_plot(rows: list[dict], path: str | Path, title: str = "ID / OOD / Adv trade-off",
                  references: list[dict] | None = None) -> Path:
    """Two panels: OOD vs ID and Adv vs ID, one labelled point per method (marker size ~ HM) with error bars
    (:func:`_err`: +-1 std over seeds, else the run's 95% interval); reference rows (e.g. the paper's Table 6) as
    grey crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "ood", "OOD top-1 (%)"), (axes[1], "adv", "Adversarial robust acc. (%)")):
        for r in rows:
            if r.get("id") is None or r.get(key) is None:
                continue
            size = 40 + 4 * (r.get("hm") or 0)
            dots = ax.scatter(r["id"], r[key], s=size, alpha=0.8)
            # +-1 std over seeds, else the run's 95% sampling interval half-width (``*_ci``) where the row has one
            xerr, yerr = _err(r, "id"), _err(r, key)
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
    return save_figure(fig, Path(path).with_suffix(".png"), title + " (marker size ~ harmonic mean)")


def save_figure(fig, path: str | Path, title: str) -> Path:
    """Title, lay out and write a matplotlib figure as a PNG atomically (a reader never sees half a file), then
    close it; the one way every plot of the project is saved."""
    import matplotlib.pyplot as plt

    from grace_plugin.tensor_io import atomic_path

    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
