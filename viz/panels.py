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
from compress.merge import encoding_neighbours
from compress.prune import query_index

from .overlay import DEFAULT_DISPLAY, cluster_overlay, heatmap_grid, heatmap_overlay, latent_overlay
from .overlay import prune_overlay as draw_prune
from .plots import pruning_plot, resampler_plot, similarity_plot

CURVE_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 51), 3)


@dataclass
class Panel:
    """One tab's view: ``overlay`` image, ``figure`` (or None), ``stats``, the ``comp``.

    ``extra`` holds what a view adds: more pictures (the resampler's ``grid``
    and ``single`` map), or the Compare view's per-strategy ``comps`` and
    ``total_ms``.
    """

    overlay: Any
    comp: Compression
    stats: dict
    figure: Any = None
    extra: dict = field(default_factory=dict)
    strategy_ms: float = 0.0
    draw_ms: float = 0.0


def _memo(enc: Encoding, key: str, make, keep: int | None = None, family: str = ""):
    """``enc.memo[key]``, made once; with ``keep``, at most that many keys of ``family`` stay."""
    cache = enc.memo
    if key not in cache:
        cache[key] = make()
        if keep is not None:
            same = [k for k in cache if isinstance(k, str) and k.startswith(family)]
            for old in same[:-keep]:  # oldest first (dicts keep insertion order)
                cache.pop(old, None)
    return cache[key]


FITS_KEPT = 4  # fitted resamplers kept per encoding (each holds its maps)


def fit_key(num_latents: int, depth: int, seed: int = 0) -> str:
    return f"fit_{int(num_latents)}_{int(depth)}_{int(seed)}"


def has_fit(enc: Encoding, num_latents: int, depth: int, seed: int = 0) -> bool:
    """Whether a fitted resampler for this setting is already kept with the encoding."""
    return fit_key(num_latents, depth, seed) in enc.memo


def threshold_curve(enc: Encoding, connectivity: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds [T], tokens left [T]) for adjacent merging, computed once per encoding."""
    def make():
        left = [merge_threshold(enc, float(t), connectivity).num_out for t in CURVE_THRESHOLDS]
        return CURVE_THRESHOLDS, np.array(left)
    return _memo(enc, f"threshold_curve_{connectivity}", make)


def _stats(enc: Encoding, comp: Compression, strategy_ms: float, numbers: bool = True) -> dict:
    s = summary(enc, comp, with_fidelity=numbers)
    s["ms"] = round(strategy_ms, 1)
    return s


def complete(enc: Encoding, p: Panel) -> Panel:
    """``p`` with the numbers a dragged slider left out (fidelity) filled in."""
    if "fidelity" in p.stats and p.stats["fidelity"] is None:
        p.stats["fidelity"] = summary(enc, p.comp)["fidelity"]
    return p


def merge_panel(enc: Encoding, method: str = "threshold", threshold: float = 0.9,
                target: int = 144, fill: str = "mean", connectivity: int = 4,
                with_figure: bool = True, display: int = DEFAULT_DISPLAY,
                numbers: bool = True) -> Panel:
    """Token merging: clusters filled with their mean (or a distinct) colour, with borders.

    ``numbers=False`` (a slider being dragged): fidelity is left out (``complete`` adds it)."""
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
        _, sims = encoding_neighbours(enc, connectivity)
        ts, left = threshold_curve(enc, connectivity)
        figure = similarity_plot(sims, threshold, ts, left, comp.num_out)
    t2 = time.perf_counter()
    return Panel(overlay, comp, _stats(enc, comp, (t1 - t0) * 1e3, numbers), figure,
                 strategy_ms=(t1 - t0) * 1e3, draw_ms=(t2 - t1) * 1e3)


def prune_panel(enc: Encoding, keep_ratio: float = 0.25, score: str = "cls",
                head: int | None = None, query: int | None = None, heatmap: bool = False,
                with_figure: bool = True, display: int = DEFAULT_DISPLAY,
                numbers: bool = True) -> Panel:
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
    return Panel(overlay, comp, _stats(enc, comp, (t1 - t0) * 1e3, numbers), figure,
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
                    display: int = DEFAULT_DISPLAY, with_maps: bool = True,
                    numbers: bool = True) -> Panel:
    """Perceiver Resampler: patches coloured by their strongest latent, plus per-latent maps
    (``extra["grid"]``, ``extra["single"]``; None without ``with_maps``: a slider being dragged)."""
    t0 = time.perf_counter()
    if init == "fit":  # seconds of work: keep the last few results for this encoding
        comp = _memo(enc, fit_key(num_latents, depth, seed),
                     lambda: resample(enc, num_latents, depth=depth, init=init, seed=seed,
                                      progress=progress), keep=FITS_KEPT, family="fit_")
    else:
        comp = resample(enc, num_latents, depth=depth, init=init, seed=seed)
    t1 = time.perf_counter()
    selected = min(max(0, int(selected)), comp.num_out - 1)
    title = resampler_title(comp)
    overlay = latent_overlay(enc.image, enc.grid, comp.assign, display=display)
    grid_img = single = None
    if with_maps:
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
    stats = _stats(enc, comp, (t1 - t0) * 1e3, numbers)
    stats["trained"] = comp.extra["trained"]
    stats["latent_mass"] = round(float(comp.extra["latent_mass"][-1].mean()), 4)
    return Panel(overlay, comp, stats, figure, {"grid": grid_img, "single": single},
                 strategy_ms=(t1 - t0) * 1e3, draw_ms=(t2 - t1) * 1e3)


def export_json(enc: Encoding, comp: Compression, stats: dict, inspected: dict | None = None) -> str:
    """The current result as JSON: setting, parameters, per-patch result and metrics, and the
    inspector's report for the selected patch when there is one."""
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
    if inspected is not None:
        doc["inspected"] = inspected
    return json.dumps(doc, indent=1)


def inspector_view(enc: Encoding, comp: Compression, patch: int,
                   display: int = DEFAULT_DISPLAY // 2) -> tuple[dict, str, Any]:
    """(report, Markdown, picture) for the inspector: why the token holding ``patch`` is what
    it is (``compress.inspector.inspect_patch``), and that token drawn on the image."""
    from compress.inspector import describe, inspect_patch

    from .overlay import token_overlay

    report = inspect_patch(enc, comp, patch)
    picture = token_overlay(enc.image, enc.grid, comp.assign[report["token"]], report["patch"],
                            display=display)
    return report, describe(report, enc.num_patches), picture


# --- every strategy at one budget ---------------------------------------------------------

COMPARE_COLS = 5
COMPARE_CELL = 240


def strategy_panel(enc: Encoding, name: str, budget: int, display: int = DEFAULT_DISPLAY,
                   numbers: bool = True, **settings) -> Panel:
    """Any registered strategy at about ``budget`` tokens, drawn by the form of its ``assign``.

    ``settings`` are the strategy's knobs by name (``Strategy.knobs``: VisionZip's
    ``dominant_ratio``, random keep's ``seed``, ...); unset ones take their defaults.
    ``numbers=False`` (a slider being dragged): fidelity is left out (``complete`` adds it).
    """
    from compress import STRATEGIES, run_at_budget

    from .overlay import draw_compression

    t0 = time.perf_counter()
    budget = min(max(1, int(budget)), enc.num_patches)
    comp = run_at_budget(name, enc, budget, **settings)
    t1 = time.perf_counter()
    overlay = draw_compression(enc, comp, display=display)
    t2 = time.perf_counter()
    stats = _stats(enc, comp, (t1 - t0) * 1e3, numbers)
    stats["label"] = STRATEGIES[name].label
    stats["adaptive"] = STRATEGIES[name].adaptive
    return Panel(overlay, comp, stats, None, strategy_ms=(t1 - t0) * 1e3, draw_ms=(t2 - t1) * 1e3)


def compare_panel(enc: Encoding, budget: int, with_figure: bool = True) -> Panel:
    """Every strategy at ``budget`` tokens: a labelled grid of overlays, a table, the curve.

    ``stats["rows"]`` holds one row per strategy: label, M, ratio, fidelity,
    attention kept, ms. The fidelity-vs-M sweep is computed once per encoding.
    """
    from compress import STRATEGIES
    from compress.registry import fidelity_sweep

    from .compare import fidelity_plot, tile_grid

    t0 = time.perf_counter()
    budget = min(max(1, int(budget)), enc.num_patches)
    tiles, rows, strategy_ms, draw_ms = [], [], 0.0, 0.0
    comps = {}
    for name, strategy in STRATEGIES.items():
        p = strategy_panel(enc, name, budget, display=COMPARE_CELL)
        comps[name] = p.comp
        s = p.stats
        label = strategy.short
        tiles.append((f"{strategy.short}  M={s['M']}", p.overlay))
        rows.append([label, s["M"], round(s["ratio"], 2), round(s["fidelity"], 4),
                     s["attention_mass_kept"], round(p.strategy_ms, 1)])
        strategy_ms += p.strategy_ms
        draw_ms += p.draw_ms
    t1 = time.perf_counter()
    grid_img = tile_grid(tiles, cols=COMPARE_COLS, cell=COMPARE_CELL,
                         title=f"every strategy at budget M = {budget} of N = {enc.num_patches} patches")
    figure = None
    if with_figure:
        curves = fidelity_sweep(enc)
        labels = {k: v.label for k, v in STRATEGIES.items()}
        figure = fidelity_plot(curves, labels, budget, enc.num_patches)
    t2 = time.perf_counter()
    stats = {"budget": budget, "N": enc.num_patches, "rows": rows,
             "columns": ["strategy", "M", "ratio", "fidelity", "attention kept", "ms"]}
    comp = next(iter(comps.values()))
    panel = Panel(grid_img, comp, stats, figure, strategy_ms=strategy_ms,
                  draw_ms=(t2 - t1) * 1e3 + draw_ms)
    panel.extra["comps"] = comps
    panel.extra["total_ms"] = (t2 - t0) * 1e3
    return panel


# --- the seed's claims, on this image -----------------------------------------------------

TASK_KEPT_CC = 0.9  # the seed claims' test: a claim "keeps the task" when the saliency CC is at least this


def seed_claims(enc: Encoding) -> list[dict]:
    """The seed document's three claims, run with its own settings on this image.

    Returns rows: claim, setting, what this image gives, whether the
    claim holds here, and ``task``: the saliency head's agreement on the
    compressed tokens (CC; the task is judged kept at CC >= ``TASK_KEPT_CC``),
    or why there is no head. Honest numbers, whatever they are.
    """
    rows = _seed_claim_rows(enc)
    comps = {str(i): row.pop("comp") for i, row in enumerate(rows)}
    agreement, reason = task_column(enc, comps)
    for i, row in enumerate(rows):
        a = agreement[str(i)]
        if a is None:
            row["task"] = f"n/a: {reason}"
        else:
            kept = "task kept" if a["cc"] >= TASK_KEPT_CC else "task suffers"
            row["task"] = f"CC {a['cc']:.3f}: {kept}"
    return rows


def _seed_claim_rows(enc: Encoding) -> list[dict]:
    n = enc.num_patches
    rows = []
    r = resample(enc, 64, init="kmeans")
    s = summary(enc, r)
    rows.append({
        "claim": "Perceiver Resampler: 576 -> 64 tokens (9x)",
        "setting": "64 latents, k-means init (untrained)",
        "here": f"{n} -> {s['M']} ({s['ratio']:.1f}x), fidelity {s['fidelity']:.3f}",
        "holds": "yes (by construction)" if n == 576 else f"{s['ratio']:.1f}x: this image has {n} tokens",
        "comp": r,
    })
    m = merge_threshold(enc, 0.9)
    fewer = 1 - m.num_out / n
    rows.append({
        "claim": "Token merging at cosine 0.9: 20-40% fewer tokens, training-free",
        "setting": "adjacent threshold 0.9, 4-neighbour",
        "here": f"{n} -> {m.num_out} ({fewer:.0%} fewer), fidelity {summary(enc, m)['fidelity']:.3f}",
        "holds": "yes" if 0.2 <= fewer <= 0.4 else ("more than claimed" if fewer > 0.4 else
                                                   "less than claimed"),
        "comp": m,
    })
    for ratio in (0.5, 0.25):
        p = prune_attention(enc, ratio) if enc.cls_attn is not None else prune_attention(
            enc, ratio, score="received")
        sp = summary(enc, p)
        kept = sp["attention_mass_kept"]
        rows.append({
            "claim": "Attention pruning: 2-4x, query-dependent",
            "setting": f"keep {ratio:.0%} by CLS attention ({1 / ratio:.0f}x)",
            "here": (f"{n} -> {sp['M']}, fidelity {sp['fidelity']:.3f}"
                     + ("" if kept is None else f", keeps {kept:.0%} of CLS attention")),
            "holds": "ratio yes; loss shown by fidelity and the task",
            "comp": p,
        })
    return rows


# --- what the strategies see ----------------------------------------------------------------

def features_panel(enc: Encoding, display: int = 448) -> dict:
    """PCA-as-RGB, token norms, neighbour similarity map and per-head CLS attention, as images."""
    from compress.features import neighbour_similarity_map, pca_rgb, token_norms

    from .compare import patch_rgb_overlay

    norms = token_norms(enc.tokens)
    images = {
        "pca": patch_rgb_overlay(enc.image, enc.grid, pca_rgb(enc.tokens), display=display),
        "norms": heatmap_overlay(enc.image, enc.grid, norms, cmap="viridis", display=display),
        "neighbours": heatmap_overlay(enc.image, enc.grid, neighbour_similarity_map(enc),
                                      cmap="magma", display=display),
    }
    if enc.cls_attn is not None:
        images["heads"] = heatmap_grid(enc.image, enc.grid, enc.cls_attn, cols=min(6, enc.num_heads),
                                       cell=150, title="CLS attention, one map per head")
    else:
        images["heads"] = None
    top = norms.topk(min(5, norms.numel()))
    gw = enc.grid[1]
    hi = ", ".join(f"({i // gw}, {i % gw}): {v:.0f}" for v, i in zip(top.values.tolist(),
                                                                     top.indices.tolist(), strict=True))
    median = float(norms.median())
    outliers = int((norms > 2 * median).sum())
    text = (f"Token norm median {median:.1f}; highest (row, col): {hi}. "
            f"{outliers} patch(es) have more than twice the median norm"
            + (" - high-norm artefact tokens that attract CLS attention in DINOv2 without registers."
               if outliers else "."))
    return {"images": images, "text": text}


# --- the model downstream -------------------------------------------------------------------

def downstream_view(enc: Encoding, comp: Compression, display: int = DEFAULT_DISPLAY // 2) -> dict:
    """What the trained head downstream makes of ``comp``, for a tab.

    Returns {"agreement": {"cc", "kl", "sim", "top_iou"} or None, "picture":
    the original-vs-compressed saliency pair or None, "reason": why there is
    no head here ("" when there is), "about": what the head is, "ms": time}.
    """
    from compress.downstream import compressed_map, reference_map
    from compress.heads import head_status

    from .saliency import saliency_pair

    t0 = time.perf_counter()
    head, reason = head_status(enc.model)
    if head is not None:
        reason = head.supports(enc)
    about = head.about if head is not None else ""
    if head is None or reason:
        return {"agreement": None, "picture": None, "reason": reason, "about": about, "ms": 0.0}
    ref = reference_map(enc, head)
    comp_map = compressed_map(enc, comp, head)
    agreement = head.compare(ref, comp_map)
    picture = saliency_pair(enc.image, ref, comp_map, caption=f"CC {agreement['cc']:.3f}",
                            display=display)
    return {"agreement": agreement, "picture": picture, "reason": "", "about": about,
            "ms": (time.perf_counter() - t0) * 1e3}


def task_column(enc: Encoding, comps: dict[str, Compression]) -> tuple[dict[str, dict | None], str]:
    """({name: task agreement or None}, why there is none) for many compressions, the head run
    once on all of them (a batch)."""
    import torch

    from compress.downstream import patch_tokens, reference_map
    from compress.heads import head_status

    head, reason = head_status(enc.model)
    if head is not None:
        reason = head.supports(enc)
    if head is None or reason:
        return {name: None for name in comps}, reason
    ref = reference_map(enc, head)
    names = list(comps)
    maps = head.run(enc, torch.stack([patch_tokens(enc, comps[n]) for n in names]))
    return dict(zip(names, head.compare(ref, maps), strict=True)), ""
