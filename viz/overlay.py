"""Overlays on the image: clusters, pruned patches, heatmaps, latent maps.

Every function takes the encoding's image and its patch ``grid=(gh, gw)`` and
returns a new RGB ``PIL.Image``. ``display`` is the longest side of the output
in pixels (``None`` keeps the image's own size); the aspect ratio is kept. The
patch grid is mapped onto the output with integer arithmetic: column ``j``
starts at pixel ``round(j * W / gw)`` (row ``i`` at ``round(i * H / gh)``), so
every patch is a whole block of pixels, exactly equal blocks when the output
side is a multiple of the grid side (576 px for a 24 x 24 grid).

All per-patch work is vectorised: per-patch values are expanded to pixels with
``np.repeat`` over the cell widths, never a Python loop over patches.
"""

from __future__ import annotations

import colorsys
import math
import weakref
from functools import lru_cache
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # for annotations only: drawing needs neither at run time
    import torch

    from compress import Compression, Encoding

Array = Union[np.ndarray, "torch.Tensor"]
"""Per-patch data: a numpy array or a torch tensor (any device, any float dtype)."""

DEFAULT_DISPLAY = 576  # the overlay box is 560 px high: 576 = 24 px per patch of a 24 x 24 grid
BORDER_COLOR = (255, 255, 255)
OUTLINE_COLOR = (255, 214, 10)  # the kept-patch outline: amber, reads on light and dark
QUERY_COLOR = (0, 229, 255)  # the query marker: cyan
HIGHLIGHT_COLOR = (0, 229, 255)
PRUNED_GREY = (90, 90, 90)  # label -1 (pruned) in cluster and latent overlays

FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf",
    "DejaVuSans-Bold.ttf",
)


# ---------------------------------------------------------------- helpers


def to_numpy(x: Array) -> np.ndarray:
    """A numpy array from a torch tensor (any device, with or without grad) or array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.element_size() < 4:
            x = x.float()  # bfloat16 has no numpy equivalent
        return x.numpy()
    return np.asarray(x)


def _flat(x: Array, n: int, name: str) -> np.ndarray:
    arr = to_numpy(x).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but the grid has {n} patches")
    return arr


def _check_grid(grid) -> tuple[int, int]:
    gh, gw = (int(g) for g in grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be (gh, gw) with both >= 1, got {grid!r}")
    return gh, gw


def display_size(size: tuple[int, int], display: int | None) -> tuple[int, int]:
    """(width, height) with the longest side equal to ``display``, aspect kept.

    ``None`` returns ``size`` unchanged. The short side is rounded and is at
    least 1 px.
    """
    w, h = size
    if display is None:
        return w, h
    display = int(display)
    if display < 1:
        raise ValueError(f"display must be a positive number of pixels, got {display}")
    if w >= h:
        return display, max(1, (2 * h * display + w) // (2 * w))
    return max(1, (2 * w * display + h) // (2 * h)), display


def cell_edges(cells: int, pixels: int) -> np.ndarray:
    """Pixel boundaries of ``cells`` cells over ``pixels`` pixels, [cells + 1] int.

    Boundary ``j`` is ``round(j * pixels / cells)`` (half up), in integers.
    """
    j = np.arange(cells + 1, dtype=np.int64)
    return (2 * j * pixels + cells) // (2 * cells)


def _expand(cell_values: np.ndarray, ey: np.ndarray, ex: np.ndarray) -> np.ndarray:
    """Per-cell array [gh, gw, ...] -> per-pixel array [H, W, ...]."""
    return np.repeat(np.repeat(cell_values, np.diff(ey), axis=0), np.diff(ex), axis=1)


def _expand_rgb(cell_rgb: np.ndarray, ey: np.ndarray, ex: np.ndarray) -> Image.Image:
    """Per-cell colours [gh, gw, 3] uint8 -> an RGB image with one flat block per cell.

    Each colour is packed into one uint32 before ``np.repeat``, which is
    about 15x faster than repeating three uint8 channels.
    """
    gh, gw = cell_rgb.shape[:2]
    packed = np.zeros((gh, gw, 4), dtype=np.uint8)
    packed[..., :3] = cell_rgb
    px = _expand(packed.view(np.uint32)[..., 0], ey, ex)
    return Image.frombytes("RGB", (px.shape[1], px.shape[0]), px, "raw", "RGBX")


_DERIVED: dict[tuple, tuple[weakref.ref, object]] = {}


# Things drawn from an image and kept: per (image, what, size...), one per image a session is
# drawing, so 48 serve a class of 16 in two or three tabs (the largest, a pruning pair of 672 x
# 672 RGBA arrays, is 3.6 MB; each resized image 1.35 MB); with 8, sixteen sessions resized
# on every update.
DERIVED_KEPT = 48


def _derived(image: Image.Image, key: tuple, make):
    """``make()``, kept for later calls with the same ``image`` (by identity, held weakly) and
    ``key``. Slider moves redraw the same encoding image at the same size, so what depends only
    on the image (its resized copy, its dimmed copy, its cell colour sums) is made once. Images
    are treated as immutable, as they are here."""
    full = (id(image), *key)
    hit = _DERIVED.get(full)
    if hit is not None and hit[0]() is image:
        return hit[1]
    out = make()
    while len(_DERIVED) >= DERIVED_KEPT:  # requests draw side by side: tolerate a race
        try:
            _DERIVED.pop(next(iter(_DERIVED)), None)
        except (StopIteration, RuntimeError):
            break
    _DERIVED[full] = (weakref.ref(image), out)
    return out


def _base(image: Image.Image, display: int | None) -> Image.Image:
    """The image as RGB at its display size (bilinear), kept per image and size."""
    size = display_size(image.size, display)
    if size == image.size and image.mode == "RGB":
        return image

    def make() -> Image.Image:
        out = image if image.mode == "RGB" else image.convert("RGB")
        return out.resize(size, Image.BILINEAR) if size != out.size else out

    return _derived(image, ("base", size), make)


def _packed(img: Image.Image) -> np.ndarray:
    """An RGB image as one uint32 per pixel (R, G, B, 255 in memory order), [H, W]."""
    return np.asarray(img.convert("RGBA")).view(np.uint32)[..., 0]


def _unpacked(px: np.ndarray) -> Image.Image:
    """The inverse of ``_packed``: [H, W] uint32 -> an RGB image."""
    px = np.ascontiguousarray(px)
    return Image.frombuffer("RGBA", (px.shape[1], px.shape[0]), px, "raw", "RGBA", 0, 1).convert("RGB")


def _colour32(colour: tuple[int, int, int]) -> np.uint32:
    return np.array([*colour, 255], dtype=np.uint8).view(np.uint32)[0]


def _border_width(ey: np.ndarray, ex: np.ndarray) -> int:
    """1 px for small cells, 2 px once cells are at least 16 px."""
    smallest = int(min(np.diff(ey).min(), np.diff(ex).min()))
    return 2 if smallest >= 16 else 1


def _lines(
    cross_x: np.ndarray,
    cross_y: np.ndarray,
    ey: np.ndarray,
    ex: np.ndarray,
    before: int,
    after: int,
) -> np.ndarray:
    """Bool [H, W]: line pixels along chosen cell boundaries.

    ``cross_x`` [gh, gw - 1] picks the vertical boundary between cells
    (i, j) and (i, j + 1); ``cross_y`` [gh - 1, gw] the horizontal one between
    (i, j) and (i + 1, j). Each picked boundary is drawn ``before`` pixels
    into the first cell and ``after`` pixels into the second, over the length
    of the cell. Built per cell row/column and expanded with ``np.repeat``.
    """
    h, w = int(ey[-1]), int(ex[-1])
    gh, gw = len(ey) - 1, len(ex) - 1
    cols = np.zeros((gh, w), dtype=bool)
    rows = np.zeros((h, gw), dtype=bool)
    bx, by = ex[1:-1], ey[1:-1]
    for off in range(-before, after):
        cx, cy = bx + off, by + off
        ok_x, ok_y = (cx >= 0) & (cx < w), (cy >= 0) & (cy < h)
        cols[:, cx[ok_x]] |= cross_x[:, ok_x]
        rows[cy[ok_y], :] |= cross_y[ok_y, :]
    return np.repeat(cols, np.diff(ey), axis=0) | np.repeat(rows, np.diff(ex), axis=1)


def _label_borders(ids: np.ndarray, ey: np.ndarray, ex: np.ndarray, width: int) -> np.ndarray:
    """Bool [H, W]: lines where neighbouring cells (left/right, up/down) differ in label.

    1 px lines start the second cell; 2 px lines straddle the boundary. Where
    lines turn a corner, the ``width`` x ``width`` block at the grid corner is
    filled too, so outlines are closed.
    """
    before, after = width // 2, width - width // 2
    cross_x = ids[:, 1:] != ids[:, :-1]
    cross_y = ids[1:, :] != ids[:-1, :]
    mask = _lines(cross_x, cross_y, ey, ex, before, after)
    # A grid corner needs its block when the four cells around it are not one label.
    ci, cj = np.nonzero(cross_x[:-1] | cross_x[1:] | cross_y[:, :-1] | cross_y[:, 1:])
    if ci.size:
        h, w = mask.shape
        for dy in range(-before, after):
            for dx in range(-before, after):
                y, x = ey[ci + 1] + dy, ex[cj + 1] + dx
                ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
                mask[y[ok], x[ok]] = True
    return mask


def _kept_edges(keep_px: np.ndarray, width: int) -> np.ndarray:
    """Bool [H, W]: kept pixels within ``width`` px (square neighbourhood) of a pruned one.

    That is a ``width`` px outline on the kept side of every kept/pruned
    boundary, corners included.
    """
    pruned = ~keep_px
    near = pruned.copy()
    for d in range(1, width + 1):
        near[:, :-d] |= pruned[:, d:]
        near[:, d:] |= pruned[:, :-d]
    rows = near.copy()
    for d in range(1, width + 1):
        near[:-d] |= rows[d:]
        near[d:] |= rows[:-d]
    return near & keep_px


def palette(n: int) -> np.ndarray:
    """``n`` distinct, deterministic RGB colours, [n, 3] uint8.

    Hues step by the golden ratio so that consecutive ids (neighbouring
    clusters, usually) get far-apart hues; saturation and value alternate in
    a short cycle so that colours whose hues come close still differ.
    """
    golden = 0.618033988749895
    sats = (0.85, 0.55, 0.95)
    vals = (0.95, 0.85, 0.70)
    out = np.empty((max(n, 0), 3), dtype=np.uint8)
    for k in range(n):  # n is the cluster count (tens), and the result is cached per call site
        r, g, b = colorsys.hsv_to_rgb((0.08 + k * golden) % 1.0, sats[k % 3], vals[(k // 3) % 3])
        out[k] = (round(r * 255), round(g * 255), round(b * 255))
    return out


@lru_cache(maxsize=8)
def _palette_cached(n: int) -> np.ndarray:
    return palette(n)


@lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    """A matplotlib colormap as a [256, 3] uint8 lookup table."""
    import matplotlib

    table = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.round(table * 255).astype(np.uint8)


def normalise(values: Array) -> np.ndarray:
    """Min-max normalisation to [0, 1] as float32; constant (or empty) input gives zeros.

    Non-finite entries (NaN, inf) count as the minimum, so they never poison the scale.
    """
    v = to_numpy(values).astype(np.float64, copy=True)  # float64: tiny spreads on big offsets
    if v.size == 0:
        return v.astype(np.float32)
    v[~np.isfinite(v)] = np.nan
    if np.isnan(v).all():
        return np.zeros(v.shape, dtype=np.float32)
    lo, hi = np.nanmin(v), np.nanmax(v)
    v = np.nan_to_num(v, nan=lo)
    if not hi > lo:
        return np.zeros(v.shape, dtype=np.float32)
    return ((v - lo) / (hi - lo)).astype(np.float32)


@lru_cache(maxsize=4)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans Bold at ``size`` px when installed, else PIL's default font."""
    for path in FONT_PATHS:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _cell_sums(image: Image.Image, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    """Colour sums [gh * gw, 3] and pixel counts [gh * gw] of every grid cell of ``image``.

    Cells are cut at the image's own size with ``cell_edges``, so a cluster's
    mean colour is its summed colour over its summed pixel count.
    """
    return _derived(image, ("cell_sums", gh, gw), lambda: _make_cell_sums(image, gh, gw))


def _make_cell_sums(image: Image.Image, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = arr.shape[:2]
    ey, ex = cell_edges(gh, h), cell_edges(gw, w)
    # Cells can be empty when the grid is finer than the image; reduceat needs
    # strictly valid starts, so sum over (clipped) starts and zero empty cells.
    rows = np.add.reduceat(arr, np.minimum(ey[:-1], h - 1), axis=0)
    sums = np.add.reduceat(rows, np.minimum(ex[:-1], w - 1), axis=1)
    counts = np.outer(np.diff(ey), np.diff(ex)).astype(np.float64)
    sums[counts == 0] = 0.0
    return sums.reshape(gh * gw, 3), counts.reshape(gh * gw)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique label values [K], index of each entry's label in them [N])."""
    uniq, inv = np.unique(labels, return_inverse=True)
    return uniq, inv.reshape(-1)


def _patch_centre(
    index: int, gh: int, gw: int, ey: np.ndarray, ex: np.ndarray
) -> tuple[float, float]:
    """Pixel centre (x, y) of patch ``index``."""
    i, j = divmod(int(index), gw)
    if not 0 <= i < gh:
        raise ValueError(f"query patch {index} is outside the {gh} x {gw} grid")
    return (ex[j] + ex[j + 1] - 1) / 2.0, (ey[i] + ey[i + 1] - 1) / 2.0


def _draw_marker(img: Image.Image, cx: float, cy: float, cell: float) -> None:
    """A cyan ring with a crosshair, outlined in black, centred on (cx, cy), radius ~0.9 cell."""
    draw = ImageDraw.Draw(img)
    r = max(5.0, 0.9 * cell)
    lw = max(2, round(cell / 10))
    for colour, width, pad in (((0, 0, 0), lw + 2, 1), (QUERY_COLOR, lw, 0)):
        draw.ellipse((cx - r - pad, cy - r - pad, cx + r + pad, cy + r + pad),
                     outline=colour, width=width)
        inner, outer = 0.35 * r, 1.35 * r
        for sx, sy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            draw.line((cx + sx * inner, cy + sy * inner, cx + sx * outer, cy + sy * outer),
                      fill=colour, width=width)


@lru_cache(maxsize=16)
def _solid(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    """A plain image of one colour (kept: pasting an image through a mask is ~3x faster in PIL
    than pasting a colour through it, 2 ms against 6 ms at 672 px)."""
    return Image.new("RGB", size, colour)


def _mask_image(mask: np.ndarray) -> Image.Image:
    """A bool [H, W] mask as an "L" image (255 where True), for paste and composite."""
    return Image.fromarray(mask.view(np.uint8) * np.uint8(255))


def _blend(base: Image.Image, colour: Image.Image, alpha: float) -> Image.Image:
    """base * (1 - alpha) + colour * alpha, in PIL's C code."""
    return Image.blend(base, colour, float(np.clip(alpha, 0.0, 1.0)))


# ---------------------------------------------------------------- overlays


def cluster_overlay(
    image: Image.Image,
    grid: tuple[int, int],
    labels: Array,
    fill: str = "mean",
    alpha: float | None = None,
    borders: bool = True,
    display: int | None = DEFAULT_DISPLAY,
    border_color: tuple[int, int, int] = BORDER_COLOR,
) -> Image.Image:
    """Clusters of patches, each filled with one colour, on the image.

    ``labels`` [N] (row-major grid order, torch or numpy) gives each patch's
    cluster id; label -1 means "no cluster" and is shown grey. ``fill="mean"``
    paints each cluster with its mean image colour (over the cluster's
    pixels): roughly what one merged token "sees". ``fill="distinct"`` uses
    ``palette`` colours. ``alpha`` is the fill opacity (default 0.8 for mean,
    0.55 for distinct). With ``borders``, a 1 px (cells under 16 px) or 2 px
    line in ``border_color`` is drawn wherever neighbouring patches (left/right
    or up/down) have different labels, and nowhere inside a cluster.

    Returns an RGB image whose longest side is ``display`` (aspect kept).
    """
    if fill not in ("mean", "distinct"):
        raise ValueError(f"fill must be 'mean' or 'distinct', got {fill!r}")
    gh, gw = _check_grid(grid)
    lab = _flat(labels, gh * gw, "labels").astype(np.int64)
    if alpha is None:
        alpha = 0.8 if fill == "mean" else 0.55
    uniq, inv = _compact(lab)
    if fill == "mean":
        sums, counts = _cell_sums(image, gh, gw)
        k = len(uniq)
        csum = np.stack([np.bincount(inv, sums[:, c], minlength=k) for c in range(3)], axis=1)
        ccount = np.bincount(inv, counts, minlength=k)
        colours = np.round(csum / np.maximum(ccount, 1)[:, None]).clip(0, 255).astype(np.uint8)
    else:
        colours = _palette_cached(len(uniq)).copy()
    colours[uniq < 0] = PRUNED_GREY
    return _paint(image, gh, gw, inv, colours, alpha, borders, display, border_color)


def _paint(image, gh, gw, inv, colours, alpha, borders, display, border_color) -> Image.Image:
    """Cells coloured ``colours[inv]`` blended over the image, plus label borders."""
    base = _base(image, display)
    w, h = base.size
    ey, ex = cell_edges(gh, h), cell_edges(gw, w)
    ids = inv.reshape(gh, gw)
    out = _blend(base, _expand_rgb(colours[ids], ey, ex), alpha)
    if borders:
        lines = _label_borders(ids, ey, ex, _border_width(ey, ex))
        out.paste(_solid(out.size, tuple(border_color)), mask=_mask_image(lines))
    return out


def latent_overlay(
    image: Image.Image,
    grid: tuple[int, int],
    assign: Array,
    display: int | None = DEFAULT_DISPLAY,
    alpha: float = 0.55,
    borders: bool = True,
) -> Image.Image:
    """Each patch coloured by the output (latent) that attends to it most.

    ``assign`` [M, N]: the winner of patch n is ``argmax_m assign[m, n]``;
    latent m gets ``palette(M)[m]`` (the same colours as ``resampler_plot``).
    Borders as in ``cluster_overlay``. Returns an RGB image whose longest side
    is ``display``.
    """
    gh, gw = _check_grid(grid)
    a = to_numpy(assign)
    if a.ndim != 2 or a.shape[1] != gh * gw:
        raise ValueError(f"assign must be [M, {gh * gw}], got {tuple(a.shape)}")
    winner = a.argmax(axis=0).astype(np.int64)
    colours = _palette_cached(a.shape[0])
    return _paint(image, gh, gw, winner, colours, alpha, borders, display, BORDER_COLOR)


def _heat_colours(values: np.ndarray, cmap: str) -> np.ndarray:
    return _lut(cmap)[np.round(values * 255).astype(np.int64)]


def heatmap_overlay(
    image: Image.Image,
    grid: tuple[int, int],
    values: Array,
    cmap: str = "inferno",
    alpha: float = 0.55,
    display: int | None = DEFAULT_DISPLAY,
    smooth: bool = False,
) -> Image.Image:
    """A per-patch value [N] as a colour map blended over the image.

    Values are min-max normalised to [0, 1] (constant input -> all 0, the
    colormap's low end; NaN or inf counts as the minimum). Blocky by default: every
    patch is one flat block of its value's colour, so one block is one token.
    ``smooth=True`` upsamples the value grid bilinearly instead.

    Returns an RGB image whose longest side is ``display``.
    """
    gh, gw = _check_grid(grid)
    v = normalise(_flat(values, gh * gw, "values")).reshape(gh, gw)
    base = _base(image, display)
    w, h = base.size
    if smooth:
        # Interpolate the 8-bit colormap index in PIL, then colour it through a palette.
        idx = Image.fromarray(np.round(v * 255).astype(np.uint8), mode="L")
        idx = idx.resize((w, h), Image.BILINEAR)
        colour = Image.frombytes("P", (w, h), idx.tobytes())
        colour.putpalette(_lut(cmap).tobytes())
        colour = colour.convert("RGB")
    else:
        colour = _expand_rgb(_heat_colours(v, cmap), cell_edges(gh, h), cell_edges(gw, w))
    return _blend(base, colour, alpha)


def prune_overlay(
    image: Image.Image,
    grid: tuple[int, int],
    kept_mask: Array,
    scores: Array | None = None,
    heatmap: bool = False,
    query: int | None = None,
    display: int | None = DEFAULT_DISPLAY,
    dim: float = 0.35,
    desaturate: float = 0.85,
    cmap: str = "inferno",
) -> Image.Image:
    """Kept patches clear, pruned patches darkened and desaturated.

    ``kept_mask`` [N] bool. Pruned pixels become ``dim * (grey mix)``: mixed
    ``desaturate`` of the way to their luminance, then scaled by ``dim``.
    Kept patches keep their pixels; a thin amber outline (1-2 px, on the kept
    side) runs along every edge between a kept and a pruned patch. With
    ``heatmap=True`` and ``scores`` [N] given, the score (min-max
    normalised) is blended over the whole image with ``cmap`` first, so the
    kept patches show their score and the pruned ones a dimmed one. ``query``
    (a patch index) gets a cyan ring-and-crosshair at the patch centre
    (radius about one cell).

    Returns an RGB image whose longest side is ``display``.
    """
    gh, gw = _check_grid(grid)
    keep = _flat(kept_mask, gh * gw, "kept_mask").astype(bool).reshape(gh, gw)
    base = _base(image, display)
    w, h = base.size
    ey, ex = cell_edges(gh, h), cell_edges(gw, w)
    desaturate, dim = float(np.clip(desaturate, 0.0, 1.0)), float(dim)
    if heatmap and scores is not None:
        v = normalise(_flat(scores, gh * gw, "scores")).reshape(gh, gw)
        base = _blend(base, _expand_rgb(_heat_colours(v, cmap), ey, ex), 0.5)
        clear, dark = _clear_and_dark(base, desaturate, dim)
    else:  # the image alone: its clear and dark versions are kept with it
        clear, dark = _derived(image, ("dark", (w, h), desaturate, dim),
                               lambda: _clear_and_dark(base, desaturate, dim))
    keep_px = _expand(keep, ey, ex)
    px = np.where(keep_px, clear, dark)
    np.copyto(px, _colour32(OUTLINE_COLOR), where=_kept_edges(keep_px, _border_width(ey, ex)))
    img = _unpacked(px)
    if query is not None:
        cx, cy = _patch_centre(query, gh, gw, ey, ex)
        _draw_marker(img, cx, cy, min(w / gw, h / gh))
    return img


def token_overlay(
    image: Image.Image,
    grid: tuple[int, int],
    weights: Array,
    patch: int,
    display: int | None = DEFAULT_DISPLAY,
) -> Image.Image:
    """One output token on the image, for the inspector: its patches clear, the rest dimmed,
    and a ring on the inspected ``patch``.

    ``weights`` [N] is the token's ``assign`` row. A token drawing on most of
    the image (a soft row, e.g. a resampler latent) is shown as a heat map of
    its weights instead.
    Returns an RGB image whose longest side is ``display``.
    """
    gh, gw = _check_grid(grid)
    w_ = _flat(weights, gh * gw, "weights")
    support = w_ > 0
    if support.mean() > 0.5:
        img = heatmap_overlay(image, grid, w_, display=display)
        ey, ex = cell_edges(gh, img.height), cell_edges(gw, img.width)
        cx, cy = _patch_centre(patch, gh, gw, ey, ex)
        _draw_marker(img, cx, cy, min(img.width / gw, img.height / gh))
        return img
    return prune_overlay(image, grid, support, query=patch, display=display)


def _clear_and_dark(base: Image.Image, desaturate: float, dim: float) -> tuple[np.ndarray, np.ndarray]:
    """``base`` and its pruned look (mixed ``desaturate`` of the way to grey, scaled by
    ``dim``), both packed (``_packed``). The per-pixel work is PIL's C code."""
    grey = base.convert("L").convert("RGB")
    dark = Image.blend(base, grey, desaturate).point(_dim_lut(dim))
    return _packed(base), _packed(dark)


@lru_cache(maxsize=4)
def _dim_lut(dim: float) -> list[int]:
    """A per-band point() table that multiplies every channel by ``dim``."""
    return [min(255, max(0, round(v * dim))) for v in range(256)] * 3


def heatmap_grid(
    image: Image.Image,
    grid: tuple[int, int],
    maps: Array,
    cols: int = 8,
    cell: int = 96,
    labels: bool = True,
    title: str | None = None,
    highlight: int | None = None,
    cmap: str = "inferno",
    alpha: float = 0.6,
    gap: int = 4,
) -> Image.Image:
    """Small multiples: one heatmap-on-image tile per row of ``maps`` [M, N].

    Each map is min-max normalised on its own (so a diffuse map still shows
    its shape). Tiles are ``cell`` px on their longest side (aspect kept),
    laid out in ``c = min(cols, M)`` columns and ``r = ceil(M / c)`` rows,
    with ``gap`` px around every tile. With ``labels`` each tile shows its
    index in the top-left corner; ``highlight`` outlines that tile in cyan;
    ``title`` adds a banner across the top.

    Returns an RGB image of width ``c * tile_w + (c + 1) * gap`` and height
    ``banner + r * tile_h + (r + 1) * gap`` (``banner`` is 0 without title).
    """
    gh, gw = _check_grid(grid)
    m_all = to_numpy(maps)
    if m_all.ndim == 1:
        m_all = m_all[None]
    if m_all.ndim != 2 or m_all.shape[1] != gh * gw:
        raise ValueError(f"maps must be [M, {gh * gw}], got {tuple(m_all.shape)}")
    m = m_all.shape[0]
    if m == 0:
        raise ValueError("maps is empty: nothing to draw")
    cols = max(1, min(int(cols), m))
    rows = math.ceil(m / cols)
    base = _base(image, int(cell))
    tw, th = base.size
    ey, ex = cell_edges(gh, th), cell_edges(gw, tw)
    norm = np.stack([normalise(row) for row in m_all]).reshape(m, gh, gw)
    # All M tiles as one tall strip: colour blocks over the base image repeated M times.
    colours = _heat_colours(norm, cmap).reshape(m * gh, gw, 3)
    strip_ey = np.concatenate([[0], np.cumsum(np.tile(np.diff(ey), m))])
    strip = _blend(Image.fromarray(np.tile(np.asarray(base), (m, 1, 1))),
                   _expand_rgb(colours, strip_ey, ex), alpha)
    tiles = np.asarray(strip).reshape(m, th, tw, 3)

    width = cols * tw + (cols + 1) * gap
    banner = 0
    title_font = None
    if title:
        size = max(12, min(28, width // 32))
        title_font = font(size)
        while size > 9 and _text_width(title_font, title) > width - 2 * gap:
            size -= 1
            title_font = font(size)
        banner = round(size * 1.8)
    height = banner + rows * th + (rows + 1) * gap
    canvas = np.full((height, width, 3), 24, dtype=np.uint8)
    for idx in range(m):  # one slice copy per tile; the colour work above is vectorised
        r, c = divmod(idx, cols)
        y0 = banner + gap + r * (th + gap)
        x0 = gap + c * (tw + gap)
        canvas[y0 : y0 + th, x0 : x0 + tw] = tiles[idx]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    if title_font is not None:
        draw.text((width / 2, banner / 2), title, fill=(255, 255, 255), font=title_font,
                  anchor="mm")
    if labels:
        label_font = font(max(9, min(20, tw // 6)))
        for idx in range(m):
            r, c = divmod(idx, cols)
            x0 = gap + c * (tw + gap)
            y0 = banner + gap + r * (th + gap)
            text = str(idx)
            box = draw.textbbox((x0 + 3, y0 + 2), text, font=label_font)
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
            draw.text((x0 + 3, y0 + 2), text, fill=(255, 255, 255), font=label_font)
    if highlight is not None:
        if not 0 <= int(highlight) < m:
            raise ValueError(f"highlight {highlight} is outside 0..{m - 1}")
        r, c = divmod(int(highlight), cols)
        x0 = gap + c * (tw + gap)
        y0 = banner + gap + r * (th + gap)
        lw = max(2, gap)
        draw.rectangle((x0 - lw, y0 - lw, x0 + tw + lw - 1, y0 + th + lw - 1),
                       outline=HIGHLIGHT_COLOR, width=lw)
    return img


def _text_width(f, text: str) -> float:
    left, _, right, _ = f.getbbox(text)
    return right - left


# ---------------------------------------------------------------- dispatch


def assign_kind(assign: Array) -> str:
    """``Compression.kind`` computed in numpy from ``assign`` [M, N].

    ``"prune"`` (every row has one non-zero), ``"merge"`` (every column has at
    most one) or ``"soft"``. The same rule as the library's; done in numpy
    because a handful of tiny torch ops can stall for tens of milliseconds
    when torch's thread pool shares a small CPU with another busy process.
    """
    support = to_numpy(assign) > 0
    if bool((support.sum(axis=1) == 1).all()):
        return "prune"
    if bool((support.sum(axis=0) <= 1).all()):
        return "merge"
    return "soft"


def draw_compression(
    enc: Encoding, comp: Compression, display: int | None = DEFAULT_DISPLAY, **kwargs
) -> Image.Image:
    """The natural overlay for a ``Compression`` on its ``Encoding``.

    Dispatch by kind (``assign_kind``, equal to ``comp.kind``): ``"merge"``
    -> ``cluster_overlay`` of the cluster labels; ``"prune"`` ->
    ``prune_overlay`` of the kept mask, with ``comp.extra["scores"]`` and the
    query patch from ``comp.params`` when present; ``"soft"`` ->
    ``latent_overlay`` of ``comp.assign``. A merge that merged nothing has
    one-hot rows and so reads as ``"prune"``; a merging rule (``comp.form ==
    "merge"``) is drawn as a merge anyway, so the picture does not change style at the end of a
    slider. ``kwargs`` go to the overlay (e.g. ``fill="distinct"``,
    ``heatmap=True``).

    Returns an RGB image whose longest side is ``display``.
    """
    assign = to_numpy(comp.assign)
    kind = assign_kind(assign)
    if kind == "prune" and getattr(comp, "form", "") == "merge":
        kind = "merge"
    if kind == "merge":
        # Compression.labels(): the output that draws most on a patch, -1 where none does.
        labels = np.where(assign.max(axis=0) > 0, assign.argmax(axis=0), -1)
        return cluster_overlay(enc.image, enc.grid, labels, display=display, **kwargs)
    if kind == "prune":
        kwargs.setdefault("scores", comp.extra.get("scores"))
        kwargs.setdefault("query", comp.params.get("query"))
        kept = (assign > 0).any(axis=0)
        return prune_overlay(enc.image, enc.grid, kept, display=display, **kwargs)
    return latent_overlay(enc.image, enc.grid, assign, display=display, **kwargs)
