"""Matplotlib figures that explain a strategy's knob.

Every function returns a new ``matplotlib.figure.Figure`` (Agg canvas, not
registered with pyplot, so nothing needs closing and nothing leaks between
calls), about 6 x 3.2 in at 100 dpi with fonts sized for a projector.
"""

from __future__ import annotations

import functools
import math

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .overlay import Array, palette, to_numpy

FIGSIZE = (6.0, 3.2)
DPI = 100
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 12,
}
ACCENT = "#d62728"  # the current setting, in every plot
MAIN = "#1f77b4"


def _styled(fn):
    """Run a plot function under ``STYLE``: text sizes are read when artists are made."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _figure(ncols: int, width: float | None = None) -> tuple[Figure, list]:
    fig = Figure(figsize=(width or FIGSIZE[0], FIGSIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.grid(alpha=0.25, linewidth=0.6)
    return fig, axes


@_styled
def similarity_plot(
    sims: Array,
    threshold: float,
    thresholds: Array,
    tokens_left: Array,
    current_tokens: int,
) -> Figure:
    """Threshold merging explained, two panels.

    Left: histogram of the neighbour cosine similarities ``sims`` [E], with
    the edges at or above ``threshold`` (the ones that merge) shaded and a
    vertical line at the threshold. Right: ``tokens_left`` [T] against
    ``thresholds`` [T], with the current setting
    (``threshold``, ``current_tokens``) marked.

    Returns a 6 x 3.2 in Figure with 2 axes.
    """
    s = to_numpy(sims).astype(np.float64).reshape(-1)
    t = to_numpy(thresholds).astype(np.float64).reshape(-1)
    left = to_numpy(tokens_left).astype(np.float64).reshape(-1)
    if t.shape != left.shape:
        raise ValueError(f"thresholds {t.shape} and tokens_left {left.shape} differ in length")
    fig, (ax1, ax2) = _figure(2)

    lo = min(float(s.min()) if s.size else 0.0, threshold)
    hi = max(float(s.max()) if s.size else 1.0, threshold)
    width = (hi - lo) / 40 if hi > lo else 0.01
    # Bin edges on a lattice through the threshold, so no bin straddles it.
    first = threshold - math.ceil((threshold - lo) / width + 1e-9) * width
    bins = first + width * np.arange(math.ceil((hi - first) / width + 1e-9) + 2)
    counts, edges, patches = ax1.hist(s, bins=bins, color="#9aa5b1", edgecolor="white",
                                      linewidth=0.4)
    for patch, start in zip(patches, edges[:-1], strict=True):
        if start >= threshold - 1e-9 * width:
            patch.set_facecolor(MAIN)
    merged = int((s >= threshold).sum())
    ax1.axvline(threshold, color=ACCENT, linewidth=2)
    ax1.set_title(f"{merged} of {s.size} neighbour pairs merge")
    ax1.set_xlabel("cosine similarity of neighbours")
    ax1.set_ylabel("pairs")

    order = np.argsort(t)
    ax2.plot(t[order], left[order], color=MAIN, linewidth=2)
    ax2.plot([threshold], [current_tokens], "o", color=ACCENT, markersize=9, zorder=3)
    ax2.axvline(threshold, color=ACCENT, linewidth=1, alpha=0.5)
    # The curve rises to the right: left of the point is free, except near the left edge.
    span = (t.max() - t.min()) if t.size and t.max() > t.min() else 1.0
    near_left = t.size and (threshold - t.min()) / span < 0.3
    ax2.annotate(f"{int(current_tokens)} tokens", (threshold, current_tokens),
                 textcoords="offset points", xytext=(10, 10) if near_left else (-10, 6),
                 ha="left" if near_left else "right", color=ACCENT,
                 fontsize=STYLE["axes.labelsize"], fontweight="bold")
    ax2.set_title("tokens left vs threshold")
    ax2.set_xlabel("threshold")
    ax2.set_ylabel("tokens left")
    top = max(float(left.max()) if left.size else 0.0, float(current_tokens), 1.0)
    ax2.set_ylim(0, top * 1.15)  # headroom for the label above the current point
    return fig


def _keep_count(keep: float | int, n: int) -> int:
    """``keep`` as a token count: an int is a count, a float in [0, 1] a ratio."""
    if isinstance(keep, (bool, np.bool_)):
        raise ValueError("keep must be a ratio in [0, 1] or a token count, not a bool")
    if isinstance(keep, (int, np.integer)):
        return int(min(max(keep, 1), n))
    keep = float(keep)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep ratio must lie in [0, 1], got {keep}")
    return max(1, min(n, round(keep * n)))


@_styled
def pruning_plot(scores: Array, keep: float | int) -> Figure:
    """Attention pruning explained, two panels.

    ``scores`` [N] per-patch scores; ``keep`` a keep ratio (float in [0, 1])
    or a token count (int). Left: scores sorted in descending order with the
    kept part shaded and the cut marked. Right: the share of the total score
    kept by the top-k patches against k / N, with the current ratio marked
    (and the uniform diagonal for reference).

    Returns a 6 x 3.2 in Figure with 2 axes.
    """
    s = to_numpy(scores).astype(np.float64).reshape(-1)
    n = s.size
    if n == 0:
        raise ValueError("scores is empty")
    k = _keep_count(keep, n)
    ranked = np.sort(s)[::-1]
    fig, (ax1, ax2) = _figure(2)

    rank = np.arange(1, n + 1)
    ax1.fill_between(rank[:k], ranked[:k], color=MAIN, alpha=0.35, linewidth=0)
    ax1.plot(rank, ranked, color=MAIN, linewidth=2)
    ax1.axvline(k, color=ACCENT, linewidth=2)
    ax1.set_title(f"keep the top {k} of {n}")
    ax1.set_xlabel("patch rank")
    ax1.set_ylabel("score")

    total = ranked.sum()
    mass = np.cumsum(ranked) / total if total > 0 else rank / n
    ratio = rank / n
    ax2.plot(np.r_[0.0, ratio], np.r_[0.0, mass], color=MAIN, linewidth=2)
    ax2.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="uniform")
    kept_mass = float(mass[k - 1])
    ax2.plot([k / n], [kept_mass], "o", color=ACCENT, markersize=9, zorder=3)
    # The top-k share is never below k / N, so the triangle under the diagonal is always free.
    shown = f"{kept_mass:.0%}" if kept_mass < 0.995 or kept_mass == 1 else f"{kept_mass:.1%}"
    ax2.text(0.97, 0.16, f"{k / n:.0%} of tokens\nkeep {shown} of score",
             transform=ax2.transAxes, ha="right", va="center", color=ACCENT,
             fontsize=STYLE["axes.labelsize"], fontweight="bold")
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 1.02)
    ax2.set_title("score mass kept")
    ax2.set_xlabel("keep ratio")
    ax2.set_ylabel("share of total score")
    ax2.legend(loc="center right", frameon=False)
    return fig


@_styled
def resampler_plot(assign: Array, loss: list[float] | None = None, trained: bool = False) -> Figure:
    """Perceiver Resampler latents explained.

    ``assign`` [M, N] (each latent's attention over the patches). Panel 1:
    coverage, the number of patches each latent wins by argmax, one bar per
    latent in the latent's ``latent_overlay`` colour. Panel 2: each latent's
    attention entropy normalised by log N (1 = spread evenly over all
    patches, 0 = on one patch). Panel 3, only when ``loss`` is non-empty: the
    fitting loss per step. The figure title says "untrained", or "fitted on this image" with
    ``trained``.

    Returns a Figure with 2 axes (6 x 3.2 in), or 3 axes (9 x 3.2 in) with a loss.
    """
    a = to_numpy(assign).astype(np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"assign must be a non-empty [M, N] matrix, got {tuple(a.shape)}")
    m, n = a.shape
    losses = [float(x) for x in (loss or [])]
    fig, axes = _figure(3 if losses else 2, width=9.0 if losses else None)

    coverage = np.bincount(a.argmax(axis=0), minlength=m)
    p = a / np.clip(a.sum(axis=1, keepdims=True), 1e-30, None)
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1) / math.log(max(n, 2))
    colours = palette(m) / 255.0
    idx = np.arange(m)

    ax = axes[0]
    edge = {"edgecolor": "black", "linewidth": 0.3} if m <= 24 else {"linewidth": 0}
    ax.bar(idx, coverage, color=colours, **edge)
    ax.axhline(n / m, color="grey", linestyle="--", linewidth=1, label=f"even share ({n / m:.0f})")
    ax.set_ylim(0, max(float(coverage.max()), n / m) * 1.3)
    idle = int((coverage == 0).sum())
    ax.set_title("patches won per latent" + (f" ({idle} win none)" if idle else ""))
    ax.set_xlabel("latent")
    ax.set_ylabel("patches (argmax)")
    ax.legend(loc="upper right", frameon=False)

    ax = axes[1]
    ax.bar(idx, entropy, color=colours, **edge)
    ax.set_ylim(0, 1.05)
    ax.set_title("attention spread")
    ax.set_xlabel("latent")
    ax.set_ylabel("entropy / log N")
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.set_xlim(-0.7, m - 0.3)
        ax.grid(axis="x", visible=False)

    if losses:
        ax = axes[2]
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color=MAIN, linewidth=2)
        ax.plot([steps[-1]], [losses[-1]], "o", color=ACCENT, markersize=7)
        ax.set_title(f"fit loss (last {losses[-1]:.3g})")
        ax.set_xlabel("step")
        ax.set_ylabel("reconstruction loss")
    state = "fitted on this image" if trained else "untrained"
    fig.suptitle(f"Perceiver Resampler, {m} latents ({state})",
                 fontsize=STYLE["figure.titlesize"], fontweight="bold")
    return fig
