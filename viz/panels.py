"""What each tab of the app shows, computed without Gradio.

Each ``*_panel`` function runs one strategy on an ``Encoding`` and returns a
``Panel``: the overlay (PIL), an optional figure, the numbers, and the time
split (strategy / drawing). The app only wires these to widgets, so the same
views can be produced from a notebook or a test.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compress import (
    Compression,
    Encoding,
    merge_bipartite,
    merge_threshold,
    prune_attention,
    resample,
    summary,
)
from compress.merge import neighbour_similarity
from compress.prune import query_index

from .overlay import DEFAULT_DISPLAY, cluster_overlay, heatmap_grid, heatmap_overlay, latent_overlay
from .overlay import prune_overlay as draw_prune
from .plots import pruning_plot, resampler_plot, similarity_plot

CURVE_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 51), 3)


@dataclass
class Panel:
    """One tab's view: ``overlay`` image, ``figure`` (or None), ``stats``, the ``comp``."""

    overlay: Any
    comp: Compression
    stats: dict
    figure: Any = None
    extra_images: dict = field(default_factory=dict)
    strategy_ms: float = 0.0
    draw_ms: float = 0.0


def _memo(enc: Encoding, key: str, make):
    cache = enc._attn_cache
    if key not in cache:
        cache[key] = make()
    return cache[key]


def threshold_curve(enc: Encoding, connectivity: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds [T], tokens left [T]) for adjacent merging, computed once per encoding."""
    def make():
        left = [merge_threshold(enc, float(t), connectivity).num_out for t in CURVE_THRESHOLDS]
        return CURVE_THRESHOLDS, np.array(left)
    return _memo(enc, f"threshold_curve_{connectivity}", make)


def _stats(enc: Encoding, comp: Compression, strategy_ms: float) -> dict:
    s = summary(enc, comp)
    s["ms"] = round(strategy_ms, 1)
    return s


def merge_panel(enc: Encoding, method: str = "threshold", threshold: float = 0.9,
                target: int = 144, fill: str = "mean", connectivity: int = 4,
                with_figure: bool = True, display: int = DEFAULT_DISPLAY) -> Panel:
    """Token merging: clusters filled with their mean (or a distinct) colour, with borders."""
    t0 = time.perf_counter()
    if method == "threshold":
        comp = merge_threshold(enc, threshold, connectivity)
    elif method == "tome":
        comp = merge_bipartite(enc, target=min(max(1, int(target)), enc.num_patches))
    else:
        raise ValueError(f"merge method must be 'threshold' or 'tome', got {method!r}")
    t1 = time.perf_counter()
    overlay = cluster_overlay(enc.image, enc.grid, comp.labels(), fill=fill, display=display)
    figure = None
    if with_figure:
        _, sims = neighbour_similarity(enc.tokens, enc.grid, connectivity)
        ts, left = threshold_curve(enc, connectivity)
        figure = similarity_plot(sims, threshold, ts, left, comp.num_out)
    t2 = time.perf_counter()
    return Panel(overlay, comp, _stats(enc, comp, (t1 - t0) * 1e3), figure,
                 strategy_ms=(t1 - t0) * 1e3, draw_ms=(t2 - t1) * 1e3)


def prune_panel(enc: Encoding, keep_ratio: float = 0.25, score: str = "cls",
                head: int | None = None, query: int | None = None, heatmap: bool = False,
                with_figure: bool = True, display: int = DEFAULT_DISPLAY) -> Panel:
    """Attention pruning: pruned patches darkened, kept ones outlined, query marked."""
    t0 = time.perf_counter()
    if score == "cls" and enc.cls_attn is None:
        score = "received"  # models without a CLS token: the documented fallback
    if score == "query" and query is None:
        query = enc.num_patches // 2 + enc.grid[1] // 2  # the centre until the user clicks
    comp = prune_attention(enc, keep_ratio, score=score, head=head,
                           query=query if score == "query" else None)
    t1 = time.perf_counter()
    scores = comp.extra["scores"]
    marker = query_index(enc, query) if query is not None and score == "query" else None
    overlay = draw_prune(enc.image, enc.grid, comp.kept_mask(), scores=scores, heatmap=heatmap,
                         query=marker, display=display)
    figure = pruning_plot(scores, keep_ratio) if with_figure else None
    t2 = time.perf_counter()
    return Panel(overlay, comp, _stats(enc, comp, (t1 - t0) * 1e3), figure,
                 strategy_ms=(t1 - t0) * 1e3, draw_ms=(t2 - t1) * 1e3)


def resampler_title(comp: Compression) -> str:
    """The label every resampler picture carries: trained or not, and from what."""
    init = comp.params["init"]
    if comp.extra["trained"]:
        return f"fitted on this image ({comp.params['steps']} steps): not a VLM's trained resampler"
    what = "k-means init" if init == "kmeans" else "random init"
    return f"UNTRAINED resampler ({what})"


def resampler_panel(enc: Encoding, num_latents: int = 64, depth: int = 2, init: str = "kmeans",
                    seed: int = 0, selected: int = 0, progress=None, with_figure: bool = True,
                    display: int = DEFAULT_DISPLAY) -> Panel:
    """Perceiver Resampler: patches coloured by their strongest latent, plus per-latent maps."""
    t0 = time.perf_counter()
    key = f"resample_{num_latents}_{depth}_{init}_{seed}"
    if init == "fit":  # seconds of work: keep the result for this encoding
        comp = _memo(enc, key, lambda: resample(enc, num_latents, depth=depth, init=init,
                                                seed=seed, progress=progress))
    else:
        comp = resample(enc, num_latents, depth=depth, init=init, seed=seed)
    t1 = time.perf_counter()
    selected = min(max(0, int(selected)), comp.num_out - 1)
    title = resampler_title(comp)
    overlay = latent_overlay(enc.image, enc.grid, comp.assign, display=display)
    shown = comp.assign[:64]
    if comp.num_out > 64:
        title += f" - first 64 of {comp.num_out}"
    grid_img = heatmap_grid(enc.image, enc.grid, shown, cols=8, cell=84, title=title,
                            highlight=selected if selected < 64 else None)
    single = heatmap_overlay(enc.image, enc.grid, comp.assign[selected], display=display // 2)
    figure = None
    if with_figure:
        figure = resampler_plot(comp.assign, comp.extra["loss"], comp.extra["trained"])
    t2 = time.perf_counter()
    stats = _stats(enc, comp, (t1 - t0) * 1e3)
    stats["trained"] = comp.extra["trained"]
    stats["latent_mass"] = round(float(comp.extra["latent_mass"][-1].mean()), 4)
    return Panel(overlay, comp, stats, figure, {"grid": grid_img, "single": single},
                 strategy_ms=(t1 - t0) * 1e3, draw_ms=(t2 - t1) * 1e3)


def export_json(enc: Encoding, comp: Compression, stats: dict) -> str:
    """The current result as JSON: setting, parameters, per-patch result and metrics."""
    labels = comp.labels().cpu().tolist()
    result: dict[str, Any] = {"patch_labels": labels}
    if comp.kind == "prune":
        result = {"kept_indices": comp.kept_indices().cpu().tolist()}
    elif comp.kind == "soft":
        result = {"latent_of_patch": labels,
                  "assign_top_weight": comp.assign.max(dim=0).values.cpu().tolist()}
    params = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in comp.params.items()}
    doc = {
        "model": enc.model,
        "weights": enc.weights,
        "size": enc.size,
        "layer": enc.layer,  # 0-based block index (the app shows block layer + 1)
        "grid": list(enc.grid),
        "patch_size": enc.patch_size,
        "strategy": comp.strategy,
        "params": params,
        "metrics": stats,
        "result": result,
    }
    return json.dumps(doc, indent=1)
