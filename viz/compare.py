"""Pictures for the Compare and Features views: labelled tile grids, per-patch colours,
and the fidelity-against-budget plot."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from .overlay import (
    Array,
    _base,
    _blend,
    _expand_rgb,
    cell_edges,
    display_size,
    font,
    palette,
    to_numpy,
)
from .plots import ACCENT, _figure, _styled


def patch_rgb_overlay(image: Image.Image, grid: tuple[int, int], rgb: Array, alpha: float = 0.85,
                      display: int | None = 336) -> Image.Image:
    """Each patch painted with its own colour ``rgb`` [N, 3] in [0, 1], blended over the image."""
    gh, gw = grid
    colours = (np.clip(to_numpy(rgb).reshape(gh, gw, 3), 0, 1) * 255).round().astype(np.uint8)
    base = _base(image, display)
    w, h = base.size
    layer = _expand_rgb(colours, cell_edges(gh, h), cell_edges(gw, w))
    return _blend(base, layer, alpha)


TITLE_PX = 30  # the band above a titled grid (the page's image toolbar sits over its right end)


def tile_grid(tiles: list[tuple[str, Image.Image]], cols: int = 4, cell: int = 260,
              caption_px: int = 34, gap: int = 6, background=(24, 24, 24),
              title: str | None = None) -> Image.Image:
    """Images in a grid, each scaled to fit ``cell`` px and captioned above. Returns one image.

    With a ``title``, a band of ``TITLE_PX`` above the tiles says it (the page
    puts its image buttons over a picture's top-right corner: over the band,
    not over a tile's caption). The tile boxes are laid out at fixed
    positions (``tile_box``), so a test can compare the same tile across two
    grids.
    """
    rows = max(1, -(-len(tiles) // cols))
    top = TITLE_PX if title else 0
    width = cols * cell + (cols + 1) * gap
    height = top + rows * (cell + caption_px) + (rows + 1) * gap
    out = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(out)
    f = font(max(11, caption_px // 2 - 1))
    if title:
        draw.text((gap + 4, gap + 2), title, fill=(200, 200, 200), font=f)
    for i, (label, img) in enumerate(tiles):
        x0, y0, x1, y1 = tile_box(i, cols, cell, caption_px, gap, top)
        w, h = display_size(img.size, cell)
        thumb = img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR)
        out.paste(thumb, (x0 + (cell - w) // 2, y0 + caption_px + (cell - h) // 2))
        draw.text((x0 + 4, y0 + 4), label, fill=(240, 240, 240), font=f)
    return out


def tile_box(i: int, cols: int = 4, cell: int = 260, caption_px: int = 34,
             gap: int = 6, top: int = 0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of tile ``i`` (caption included) in a ``tile_grid`` (``top``:
    ``TITLE_PX`` for a titled grid)."""
    r, c = divmod(i, cols)
    x0 = gap + c * (cell + gap)
    y0 = top + gap + r * (cell + caption_px + gap)
    return x0, y0, x0 + cell, y0 + caption_px + cell


@_styled
def fidelity_plot(curves: dict[str, list[tuple[int, float]]], labels: dict[str, str],
                  current: int, n: int) -> Figure:
    """Fidelity against output tokens M for every strategy, log x, current budget marked.

    ``curves`` maps a strategy name to [(M, fidelity), ...]; strategies with
    a single point (adaptive rules) are drawn as a marker only.
    """
    fig, (ax,) = _figure(1, width=9.0)
    fig.set_size_inches(9.0, 4.2)
    colours = palette(max(len(curves), 1)) / 255.0
    for (name, points), colour in zip(curves.items(), colours, strict=False):
        ms = [m for m, _ in points]
        fs = [f for _, f in points]
        style = {"marker": "o", "markersize": 4 if len(ms) > 1 else 8, "linewidth": 1.8}
        ax.plot(ms, fs, color=colour, label=labels.get(name, name), **style)
    ax.axvline(current, color=ACCENT, linewidth=1.5, linestyle="--")
    ax.text(current, ax.get_ylim()[0], f" M = {current}", color=ACCENT, va="bottom", fontsize=9)
    ax.set_xscale("log")
    ticks = [t for t in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if t <= 2 * n]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"output tokens M (of N = {n})")
    ax.set_ylabel("fidelity (mean best cosine)")
    ax.set_title("Which method loses least on this image?")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


@_styled
def curves_plot(fidelity: dict[str, list[tuple[int, float]]],
                agreement: dict[str, list[tuple[int, float]]] | None, labels: dict[str, str],
                current: int, n: int, note: str = "") -> Figure:
    """Fidelity and task agreement (saliency CC) against output tokens M, side by side.

    ``agreement`` None (no head, or not computed yet) leaves the right panel
    with ``note`` in it instead. Strategies with one point (adaptive rules) are
    a marker only. Log x; the current budget marked in both.
    """
    fig, (left, right) = _figure(2, width=13.0)
    fig.set_size_inches(13.0, 5.2)
    colours = palette(max(len(fidelity), 1)) / 255.0
    colour_of = dict(zip(fidelity, colours, strict=False))
    ticks = [t for t in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if t <= 2 * n]
    panels = ((left, fidelity, "fidelity (mean best cosine)", "the tokens: fidelity"),
              (right, agreement, "saliency CC (original vs compressed)", "the task: saliency CC"))
    for ax, curves, ylabel, title in panels:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(f"output tokens M (of N = {n})")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.axvline(current, color=ACCENT, linewidth=1.5, linestyle="--")
        if curves is None:
            ax.set_xlim(min(ticks), max(ticks))
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=11,
                    wrap=True)
            continue
        for name, points in curves.items():
            ms = [m for m, _ in points]
            ys = [y for _, y in points]
            style = {"marker": "o", "markersize": 4 if len(ms) > 1 else 8, "linewidth": 1.8}
            ax.plot(ms, ys, color=colour_of.get(name, (0.4, 0.4, 0.4)), label=labels.get(name, name),
                    **style)
    handles, names = left.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right center", frameon=False, fontsize=9)
    return fig
