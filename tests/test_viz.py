"""Drawing: overlays have the right size, colour where they should, nothing where they should not.

Most tests use small synthetic images and grids whose answers can be worked
out by hand; one module-scoped real encoding checks ``draw_compression``
against every strategy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import viz
from viz.overlay import OUTLINE_COLOR, PRUNED_GREY, QUERY_COLOR

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MAGENTA = (255, 0, 255)


def grey_image(size=(64, 64), value=128) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def colourful_image(size=160) -> Image.Image:
    """Saturated, varied colours everywhere (so darkening/desaturation is measurable)."""
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([60 + 180 * x / size, 200 - 150 * y / size, 90 + 60 * ((x + y) % 7) / 7], -1)
    return Image.fromarray(arr.round().astype(np.uint8))


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


def luminance(arr: np.ndarray) -> np.ndarray:
    return arr[..., :3] @ np.array([0.299, 0.587, 0.114])


def saturation(arr: np.ndarray) -> np.ndarray:
    return arr.max(axis=-1) - arr.min(axis=-1)


# ---------------------------------------------------------------- geometry


def test_cell_edges_are_rounded_integer_boundaries():
    assert viz.cell_edges(3, 10).tolist() == [0, 3, 7, 10]
    assert viz.cell_edges(4, 10).tolist() == [0, 3, 5, 8, 10]  # 2.5 and 7.5 round half up
    assert viz.cell_edges(24, 672).tolist() == list(range(0, 673, 28))


@pytest.mark.parametrize(
    ("size", "display", "expected"),
    [((336, 336), 672, (672, 672)), ((600, 400), 300, (300, 200)), ((400, 600), 300, (200, 300)),
     ((600, 400), None, (600, 400)), ((1000, 3), 100, (100, 1))],
)
def test_display_size_keeps_aspect(size, display, expected):
    assert viz.display_size(size, display) == expected


def _all_overlays(image, grid, display):
    n = grid[0] * grid[1]
    values = np.arange(n, dtype=np.float32)
    mask = values % 3 == 0
    assign = np.eye(4, n) + 0.01
    return [
        viz.cluster_overlay(image, grid, values // 2, display=display),
        viz.cluster_overlay(image, grid, values // 2, fill="distinct", display=display),
        viz.prune_overlay(image, grid, mask, scores=values, heatmap=True, query=n - 1,
                          display=display),
        viz.heatmap_overlay(image, grid, values, display=display),
        viz.heatmap_overlay(image, grid, values, smooth=True, display=display),
        viz.latent_overlay(image, grid, assign, display=display),
    ]


@pytest.mark.parametrize("display", [672, 100, 37])
def test_overlays_square_grid_size_is_exact(display):
    for out in _all_overlays(grey_image((64, 64)), (4, 4), display):
        assert out.mode == "RGB"
        assert out.size == (display, display)


def test_overlays_keep_aspect_and_native_size():
    image = colourful_image(160).resize((300, 200))
    for out in _all_overlays(image, (4, 6), 240):
        assert out.size == (240, 160)
    for out in _all_overlays(image, (4, 6), None):
        assert out.size == (300, 200)


def test_overlays_do_not_touch_the_input_image():
    image = colourful_image(64)
    before = image.tobytes()
    _all_overlays(image, (4, 4), 64)  # display == own size: no resize copy in between
    assert image.tobytes() == before


# ---------------------------------------------------------------- cluster_overlay


def test_cluster_borders_exactly_where_labels_change():
    # 4 x 4 grid at 160 px: 40 px cells, 2 px borders straddling each boundary.
    labels = np.array([[0, 0, 1, 1]] * 4).reshape(-1)
    out = px(viz.cluster_overlay(grey_image(), (4, 4), labels, fill="distinct",
                                 display=160, border_color=MAGENTA))
    is_border = (out == MAGENTA).all(axis=-1)
    assert is_border[:, 79].all() and is_border[:, 80].all()  # left | right clusters
    assert is_border.sum() == 2 * 160  # nothing else: no line inside a cluster
    for x in (39, 40, 119, 120):  # cell boundaries inside one cluster
        assert not is_border[:, x].any()
    for y in (39, 40, 79, 80, 119, 120):
        assert not is_border[y, :79].any()


def test_cluster_borders_horizontal_and_closed_corners():
    labels = np.zeros((4, 4), dtype=int)
    labels[2:, 2:] = 7  # bottom-right 2 x 2 block
    out = px(viz.cluster_overlay(grey_image(), (4, 4), labels.reshape(-1), display=160,
                                 border_color=MAGENTA))
    is_border = (out == MAGENTA).all(axis=-1)
    assert is_border[79:81, 80:].all()  # horizontal line over the block
    assert is_border[80:, 79:81].all()  # vertical line left of it
    assert is_border[79:81, 79:81].all()  # the corner where they meet
    assert is_border.sum() == 2 * 80 + 2 * 80 + 4 - 4  # two L arms overlap in the 2x2 corner
    assert not is_border[:79, :].any() and not is_border[:, :79].any()


def test_cluster_borders_one_pixel_on_small_cells():
    labels = np.array([[0, 0, 1, 1]] * 4).reshape(-1)
    out = px(viz.cluster_overlay(grey_image(), (4, 4), labels, display=48,
                                 border_color=MAGENTA))
    is_border = (out == MAGENTA).all(axis=-1)
    assert is_border[:, 24].all() and not is_border[:, 23].any()
    assert is_border.sum() == 48


def test_cluster_mean_fill_is_the_cluster_mean_colour():
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    image = Image.fromarray(arr)
    one = px(viz.cluster_overlay(image, (4, 4), np.zeros(16), alpha=1.0, borders=False,
                                 display=160))
    assert np.abs(one - np.array([128, 0, 128])).max() <= 1
    halves = torch.tensor([[0, 0, 1, 1]] * 4).flatten()  # torch labels work too
    two = px(viz.cluster_overlay(image, (4, 4), halves, alpha=1.0, borders=False, display=160))
    assert (two[:, :80] == (255, 0, 0)).all() and (two[:, 80:] == (0, 0, 255)).all()


def test_cluster_alpha_blends_over_the_image():
    image = grey_image(value=100)
    out = px(viz.cluster_overlay(image, (4, 4), np.zeros(16), fill="mean", alpha=0.5,
                                 borders=False, display=64))
    assert (np.abs(out - 100) <= 1).all()  # mean of a uniform image is itself


def test_cluster_distinct_colours_are_distinct_and_deterministic():
    labels = np.arange(16)
    a = px(viz.cluster_overlay(grey_image(), (4, 4), labels, fill="distinct", alpha=1.0,
                               borders=False, display=64))
    b = px(viz.cluster_overlay(grey_image(), (4, 4), labels, fill="distinct", alpha=1.0,
                               borders=False, display=64))
    assert (a == b).all()
    centres = a[8::16, 8::16].reshape(16, 3)
    assert len({tuple(c) for c in centres}) == 16
    pal = viz.palette(64)
    assert pal.shape == (64, 3) and len({tuple(c) for c in pal}) == 64


def test_cluster_unassigned_patches_are_grey():
    labels = np.array([-1] * 8 + [0] * 8)
    out = px(viz.cluster_overlay(grey_image(value=0), (4, 4), labels, fill="distinct",
                                 alpha=1.0, borders=False, display=64))
    assert (out[:32] == PRUNED_GREY).all() and not (out[32:] == PRUNED_GREY).all()


def test_cluster_rejects_wrong_label_count():
    with pytest.raises(ValueError, match="16 patches"):
        viz.cluster_overlay(grey_image(), (4, 4), np.zeros(15))
    with pytest.raises(ValueError, match="fill"):
        viz.cluster_overlay(grey_image(), (4, 4), np.zeros(16), fill="rainbow")


# ---------------------------------------------------------------- prune_overlay


def _checker_mask() -> np.ndarray:
    return (np.add.outer(np.arange(4), np.arange(4)) % 2 == 0).reshape(-1)


def test_prune_darkens_and_desaturates_pruned_keeps_kept():
    image = colourful_image(160)
    mask = _checker_mask()
    out = px(viz.prune_overlay(image, (4, 4), mask, display=None))
    ref = px(image)
    for idx in range(16):
        i, j = divmod(idx, 4)
        cell = (slice(40 * i + 3, 40 * i + 37), slice(40 * j + 3, 40 * j + 37))  # interior
        if mask[idx]:
            assert (out[cell] == ref[cell]).all()
        else:
            assert luminance(out[cell]).mean() < 0.5 * luminance(ref[cell]).mean()
            assert saturation(out[cell]).mean() < 0.3 * saturation(ref[cell]).mean()


def test_prune_outline_on_kept_side_of_boundaries():
    mask = np.zeros(16, dtype=bool)
    mask[5] = True  # row 1, col 1: pixels 40..79 at 160 px
    out = px(viz.prune_overlay(grey_image(value=200), (4, 4), mask, display=160))
    is_line = (out == OUTLINE_COLOR).all(axis=-1)
    ring = np.zeros((160, 160), dtype=bool)
    ring[40:80, 40:80] = True
    ring[42:78, 42:78] = False  # a closed 2 px ring inside the kept cell
    assert (is_line == ring).all()
    assert (out[45:75, 45:75] == 200).all()


def test_prune_heatmap_colours_by_score():
    scores = np.arange(16, dtype=np.float32)
    mask = np.ones(16, dtype=bool)
    plain = px(viz.prune_overlay(grey_image(), (4, 4), mask, scores=scores, display=160))
    heat = px(viz.prune_overlay(grey_image(), (4, 4), mask, scores=scores, heatmap=True,
                                display=160))
    assert (plain == 128).all()  # scores without heatmap=True draw nothing
    lum = [luminance(heat[40 * (k // 4) + 20, 40 * (k % 4) + 20]) for k in range(16)]
    assert all(b > a for a, b in zip(lum, lum[1:], strict=False))  # inferno brightens


def test_prune_query_marker_only_near_its_patch():
    mask = np.ones(64, dtype=bool)
    image = grey_image(value=90)
    plain = px(viz.prune_overlay(image, (8, 8), mask, display=320))
    marked = px(viz.prune_overlay(image, (8, 8), mask, query=27, display=320))  # row 3, col 3
    changed = (plain != marked).any(axis=-1)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 200
    centre = 3 * 40 + 19.5
    assert np.abs(ys - centre).max() <= 60 and np.abs(xs - centre).max() <= 60  # 1.5 cells
    assert (marked[changed] == QUERY_COLOR).all(axis=-1).sum() > 100
    assert (marked[int(centre), int(centre)] == 90).all()  # the patch centre itself stays visible


def test_kept_drawings_follow_the_image_and_the_settings():
    """What is drawn from an image alone is kept with it (resized, dimmed, cell colours): a
    second image, another dim or another size must never be served the first one's."""
    mask = _checker_mask()
    first, second = colourful_image(160), grey_image((160, 160), 200)
    viz.prune_overlay(first, (4, 4), mask, display=160)
    viz.cluster_overlay(first, (4, 4), np.zeros(16, dtype=int), display=160)
    assert (px(viz.prune_overlay(second, (4, 4), np.ones(16, bool), display=160)) == 200).all()
    mean = px(viz.cluster_overlay(second, (4, 4), np.zeros(16, dtype=int), borders=False,
                                  display=160))
    assert (mean == 200).all()  # the mean colour of the grey image, not of the first one
    dark = px(viz.prune_overlay(second, (4, 4), ~np.ones(16, bool), display=160, dim=0.35))
    darker = px(viz.prune_overlay(second, (4, 4), ~np.ones(16, bool), display=160, dim=0.2))
    assert dark[80, 80, 0] == 70 and darker[80, 80, 0] == 40  # 200 * dim, per call
    small = viz.prune_overlay(second, (4, 4), mask, display=80)
    assert small.size == (80, 80) and small.mode == "RGB"


def test_prune_accepts_tensors():
    mask = torch.from_numpy(_checker_mask())
    scores = torch.arange(16, dtype=torch.bfloat16)
    a = viz.prune_overlay(grey_image(), (4, 4), mask, scores=scores, heatmap=True, display=64)
    b = viz.prune_overlay(grey_image(), (4, 4), _checker_mask(), scores=np.arange(16.0),
                          heatmap=True, display=64)
    assert a.tobytes() == b.tobytes()


# ---------------------------------------------------------------- heatmaps


def test_normalise_range_and_edge_cases():
    v = viz.normalise(torch.tensor([2.0, 4.0, 6.0]))
    assert v.tolist() == [0.0, 0.5, 1.0]
    const = viz.normalise(np.full(9, 3.5))
    assert (const == 0).all() and not np.isnan(const).any()
    with_nan = viz.normalise(np.array([np.nan, 1.0, 3.0]))
    assert with_nan.tolist() == [0.0, 0.0, 1.0]


def test_heatmap_higher_value_more_high_end_colour():
    values = np.random.default_rng(0).permutation(16).astype(np.float32)
    out = px(viz.heatmap_overlay(grey_image(), (4, 4), values, alpha=1.0, display=160))
    top = np.array(viz.overlay._lut("inferno")[-1])
    centres = np.array([out[40 * (k // 4) + 20, 40 * (k % 4) + 20] for k in range(16)])
    dist = np.linalg.norm(centres - top, axis=1)
    order = np.argsort(values)
    assert (np.diff(dist[order]) < 0).all()  # closer to the top colour as the value rises
    assert (centres[np.argmax(values)] == top).all()


def test_heatmap_is_blocky_per_patch():
    out = px(viz.heatmap_overlay(grey_image(), (4, 4), np.arange(16), display=160))
    blocks = out.reshape(4, 40, 4, 40, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # every 40 px block is one colour


def test_heatmap_constant_input_gives_low_end_everywhere():
    out = px(viz.heatmap_overlay(grey_image(), (4, 4), np.full(16, 7.0), alpha=1.0,
                                 display=64))
    assert (out == viz.overlay._lut("inferno")[0]).all()


def test_heatmap_smooth_interpolates():
    values = np.zeros(16)
    values[5] = 1.0
    out = px(viz.heatmap_overlay(grey_image(), (4, 4), values, smooth=True, alpha=1.0,
                                 display=160))
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 20  # gradients, not 2 flat colours
    assert luminance(out[60, 60]) > luminance(out[60, 75]) > luminance(out[60, 140])


# ---------------------------------------------------------------- latent_overlay


def test_latent_overlay_colours_by_argmax_with_borders():
    winner = np.array([[0, 0, 1, 1]] * 2 + [[2, 2, 2, 2]] * 2).reshape(-1)
    assign = np.full((3, 16), 0.1)
    assign[winner, np.arange(16)] = 0.8
    out = px(viz.latent_overlay(grey_image(value=0), (4, 4), assign, alpha=1.0, display=160))
    pal = viz.palette(3)
    assert (out[20, 20] == pal[0]).all() and (out[20, 140] == pal[1]).all()
    assert (out[140, 20] == pal[2]).all()
    white = (out == 255).all(axis=-1)
    assert white[:80, 79:81].all() and white[79:81, :].all()
    assert not white[82:, 79:81].any()  # no line inside latent 2's block


# ---------------------------------------------------------------- heatmap_grid


def test_heatmap_grid_size_follows_cols_and_cell():
    maps = np.random.default_rng(1).random((10, 16))
    out = viz.heatmap_grid(grey_image(), (4, 4), maps, cols=4, cell=50, gap=4)
    assert out.size == (4 * 50 + 5 * 4, 3 * 50 + 4 * 4)
    few = viz.heatmap_grid(grey_image(), (4, 4), maps[:3], cols=8, cell=50, gap=4)
    assert few.size == (3 * 50 + 4 * 4, 50 + 2 * 4)  # cols shrink to M
    wide = viz.heatmap_grid(grey_image((120, 60)), (2, 4), maps[:, :8], cols=5, cell=60, gap=2)
    assert wide.size == (5 * 60 + 6 * 2, 2 * 30 + 3 * 2)


def test_heatmap_grid_title_labels_and_highlight():
    maps = torch.rand(6, 16)
    plain = viz.heatmap_grid(grey_image(), (4, 4), maps, cols=3, cell=64, labels=False)
    titled = viz.heatmap_grid(grey_image(), (4, 4), maps, cols=3, cell=64, labels=False,
                              title="UNTRAINED resampler (k-means init)")
    assert titled.width == plain.width and titled.height > plain.height + 15
    banner = px(titled)[: titled.height - plain.height]
    assert (banner == 255).all(axis=-1).sum() > 50  # white title text on the dark banner
    labelled = px(viz.heatmap_grid(grey_image(), (4, 4), maps, cols=3, cell=64))
    assert (labelled != px(plain)).any(axis=-1)[4:30, 4:30].any()  # index in the corner
    hi = px(viz.heatmap_grid(grey_image(), (4, 4), maps, cols=3, cell=64, labels=False,
                             highlight=4))
    x0, y0 = 4 + 1 * (64 + 4), 4 + 1 * (64 + 4)  # tile 4 is row 1, col 1
    assert (hi[y0 - 2, x0 + 10 : x0 + 54] == viz.overlay.HIGHLIGHT_COLOR).all()
    assert (hi[y0 + 10 : y0 + 54, x0 - 2] == viz.overlay.HIGHLIGHT_COLOR).all()
    with pytest.raises(ValueError, match="highlight"):
        viz.heatmap_grid(grey_image(), (4, 4), maps, highlight=6)


def test_heatmap_grid_normalises_each_map():
    maps = np.stack([np.arange(16.0), 1000 + 0.001 * np.arange(16.0)])
    out = px(viz.heatmap_grid(grey_image(), (4, 4), maps, cols=2, cell=40, labels=False,
                              alpha=1.0, gap=0))
    assert (out[:, :40] == out[:, 40:]).all()  # same shape, very different scale


# ---------------------------------------------------------------- real encoding


@pytest.fixture(scope="module")
def real():
    from compress import Encoder, merge_bipartite, merge_threshold, prune_attention, resample

    enc = Encoder().encode(Image.open(ASSETS / "coffee.jpg"), size=336)
    comps = {
        "merge_threshold": merge_threshold(enc, 0.9),
        "merge_bipartite": merge_bipartite(enc, target=64),
        "prune_attention": prune_attention(enc, 0.25),
        "resample": resample(enc, num_latents=16, init="kmeans"),
    }
    return enc, comps


def test_draw_compression_dispatches_every_kind(real):
    enc, comps = real
    kinds = {name: c.kind for name, c in comps.items()}
    assert kinds == {"merge_threshold": "merge", "merge_bipartite": "merge",
                     "prune_attention": "prune", "resample": "soft"}
    for name, comp in comps.items():
        assert viz.assign_kind(comp.assign) == comp.kind, name
        out = viz.draw_compression(enc, comp, display=672)
        assert out.size == (672, 672) and out.mode == "RGB"
        if comp.kind == "merge":
            ref = viz.cluster_overlay(enc.image, enc.grid, comp.labels(), display=672)
        elif comp.kind == "prune":
            ref = viz.prune_overlay(enc.image, enc.grid, comp.kept_mask(),
                                    scores=comp.extra["scores"], display=672)
        else:
            ref = viz.latent_overlay(enc.image, enc.grid, comp.assign, display=672)
        assert out.tobytes() == ref.tobytes(), name


def test_draw_compression_real_pictures_make_sense(real):
    enc, comps = real
    prune = comps["prune_attention"]
    out = px(viz.draw_compression(enc, prune, display=672, heatmap=True))
    kept = prune.kept_mask().numpy().reshape(24, 24)
    lum = luminance(out.reshape(24, 28, 24, 28, 3)[:, 4:24, :, 4:24]).mean(axis=(1, 3))
    assert lum[kept].mean() > 2 * lum[~kept].mean()
    # A merge that merged nothing reads as "prune" but is still drawn as clusters.
    from compress import merge_threshold

    none = merge_threshold(enc, 1.01)
    assert none.kind == "prune"
    drawn = viz.draw_compression(enc, none, display=672)
    ref = viz.cluster_overlay(enc.image, enc.grid, np.arange(576), display=672)
    assert drawn.tobytes() == ref.tobytes()
    grid = viz.heatmap_grid(enc.image, enc.grid, comps["resample"].assign,
                            title="UNTRAINED resampler (k-means init)")
    assert grid.width == 8 * 96 + 9 * 4


# ---------------------------------------------------------------- plots


def test_similarity_plot():
    sims = torch.rand(1104) * 0.6 + 0.4
    ths = np.linspace(0.5, 1.0, 11)
    fig = viz.similarity_plot(sims, 0.9, ths, np.linspace(5, 576, 11), 58)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert fig.get_size_inches().tolist() == pytest.approx([6.0, 3.2])
    fig.canvas.draw()
    hist = fig.axes[0]
    edges = sorted({round(p.get_x(), 9) for p in hist.patches})
    assert any(abs(e - 0.9) < 1e-9 for e in edges)  # a bin edge sits on the threshold
    assert all(ax.get_xlabel() and ax.get_title() for ax in fig.axes)


def test_pruning_plot_ratio_and_count():
    scores = torch.rand(576)
    fig = viz.pruning_plot(scores, 0.25)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert "144" in fig.axes[0].get_title()
    fig.canvas.draw()
    assert "144" in viz.pruning_plot(scores.numpy(), 144).axes[0].get_title()
    with pytest.raises(ValueError):
        viz.pruning_plot(scores, 1.5)


def test_resampler_plot_axes_and_title():
    assign = torch.softmax(torch.randn(16, 576), dim=1)
    fig = viz.resampler_plot(assign, None, trained=False)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert "untrained" in fig._suptitle.get_text()
    fig.canvas.draw()
    fit = viz.resampler_plot(assign.numpy(), [0.3, 0.2, 0.1], trained=True)
    assert len(fit.axes) == 3
    assert "untrained" not in fit._suptitle.get_text()
    coverage = sum(p.get_height() for p in fig.axes[0].patches)
    assert coverage == 576  # every patch is won by exactly one latent


# ---------------------------------------------------------------- edges and layering


def test_edge_cases_one_patch_and_nothing_kept():
    image = colourful_image(32)
    for out in _all_overlays(image, (1, 1), 50):
        assert out.size == (50, 50)
    dark = px(viz.prune_overlay(image, (4, 4), np.zeros(16, bool), display=None))
    assert not (dark == OUTLINE_COLOR).all(axis=-1).any()
    assert luminance(dark).mean() < 0.5 * luminance(px(image)).mean()
    clear = px(viz.prune_overlay(image, (4, 4), np.ones(16, bool), display=None))
    assert (clear == px(image)).all()


def test_viz_does_not_import_gradio():
    import subprocess
    import sys

    code = "import sys, viz; print('gradio' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_fitted_resamplers_kept_per_encoding_are_bounded():
    from conftest import make_encoding

    from viz import panels

    torch.manual_seed(0)
    enc = make_encoding(torch.randn(16, 8), grid=(4, 4), cls_attn=torch.rand(1, 16))
    for latents in (2, 3, 4, 5, 6, 7):
        panels.resampler_panel(enc, latents, depth=1, init="fit", with_figure=False, display=64)
    kept = [k for k in enc.memo if str(k).startswith("fit_")]
    assert len(kept) == panels.FITS_KEPT
    assert panels.has_fit(enc, 7, 1) and not panels.has_fit(enc, 2, 1)
