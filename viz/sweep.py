"""A dataset sweep's summary drawn: metric against M per strategy, with confidence bands.

``summary_figure`` draws ``compress.results.summarise``'s table (fidelity and
saliency CC against the mean M, the 95 % interval of the metric as a band;
adaptive strategies, which pick their own M, as one point with error bars on
both axes); ``write_summary`` saves the table as CSV and the figure as PNG.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from compress.registry import STRATEGIES
from compress.results import ADAPTIVE_BUDGET

from .overlay import palette
from .plots import _figure, _styled

LABELS = {"fidelity": "fidelity (mean best cosine)", "cc": "task agreement: saliency CC",
          "attention_kept": "CLS attention kept", "kl": "saliency KL (lower is better)",
          "sim": "saliency SIM", "top_iou": "top-10% IoU", "strategy_ms": "strategy time (ms)"}


def _has(summary: pd.DataFrame, metric: str) -> bool:
    col = f"{metric}_mean"
    return col in summary and bool(np.isfinite(summary[col].to_numpy(dtype=float)).any())


@_styled
def summary_figure(summary: pd.DataFrame, metrics: tuple[str, ...] = ("cc", "fidelity"),
                   title: str = "") -> Figure:
    """One panel per metric of ``metrics`` that has values: mean against M, one line per strategy.

    ``summary``: ``summarise``'s table. x is the mean M at each budget (log
    scale), y the metric's mean, the shaded band its low..high interval;
    strategies are labelled by ``Strategy.short``. A metric without any value
    (no trained head) is left out; with none at all ``ValueError``.
    """
    shown = [m for m in metrics if _has(summary, m)]
    if not shown:
        raise ValueError(f"the summary has no values for {', '.join(metrics)}: nothing to draw")
    fig, axes = _figure(len(shown), width=5.2 * len(shown) + 1.8)
    fig.set_size_inches(5.2 * len(shown) + 1.8, 4.0)
    names = list(dict.fromkeys(summary["strategy"]))
    colours = palette(max(len(names), 1)) / 255.0
    for ax, metric in zip(axes, shown, strict=True):
        for name, colour in zip(names, colours, strict=False):
            rows = summary[summary["strategy"] == name].sort_values("M_mean")
            label = STRATEGIES[name].short if name in STRATEGIES else name
            x = rows["M_mean"].to_numpy(float)
            y, lo, hi = (rows[f"{metric}_{s}"].to_numpy(float) for s in ("mean", "lo", "hi"))
            if len(rows) == 1 and int(rows["budget"].iloc[0]) == ADAPTIVE_BUDGET:
                # M >= 1: a t-interval reaching below that would vanish on the log axis
                m_lo = np.maximum(rows["M_lo"].to_numpy(float), 1.0)
                xerr = _err(x, m_lo, rows["M_hi"].to_numpy(float))
                ax.errorbar(x, y, yerr=_err(y, lo, hi), xerr=xerr, color=colour, marker="D",
                            markersize=6, capsize=3, linewidth=1.2, label=f"{label} (own M)")
                continue
            ax.plot(x, y, color=colour, marker="o", markersize=4, linewidth=1.8, label=label)
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                ax.fill_between(x[ok], lo[ok], hi[ok], color=colour, alpha=0.18, linewidth=0)
        ax.set_xscale("log")
        m_max = float(np.nanmax(summary["M_mean"].to_numpy(float)))
        ticks = [t for t in (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if t <= 2 * m_max]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("output tokens M (mean over images)")
        ax.set_ylabel(LABELS.get(metric, metric))
    n = int(summary["n"].max()) if len(summary) else 0
    fig.suptitle(title or f"Mean over {n} images, 95% confidence bands")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def _err(mid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """matplotlib's [[below], [above]] error extents, or None when the interval is undefined."""
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None
    return np.vstack([mid - lo, hi - mid])


def write_summary(summary: pd.DataFrame, csv_path: str | os.PathLike | None,
                  png_path: str | os.PathLike | None, dpi: int = 110) -> list[str]:
    """Save ``summary`` as CSV at ``csv_path`` and its ``summary_figure`` as PNG at ``png_path``.

    Either path may be None. Returns the paths written. The PNG is skipped
    (not an error) when the summary has nothing to draw.
    """
    written = []
    if csv_path is not None:
        summary.to_csv(csv_path, index=False, float_format="%.6g")
        written.append(os.fspath(csv_path))
    if png_path is not None and len(summary) and any(_has(summary, m) for m in ("cc", "fidelity")):
        fig = summary_figure(summary)
        fig.savefig(png_path, dpi=dpi)
        written.append(os.fspath(png_path))
    return written

