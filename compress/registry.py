"""One list of strategies: it drives the tests, the app and the comparisons.

Each entry knows how to run its strategy at a token budget M (or as close to
M as its rule allows), so that strategies can be compared on equal terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._checks import check_int
from .cluster import dpc_knn
from .merge import merge_bipartite, merge_threshold, neighbour_similarity, pool
from .prune import divprune, prumerge, prumerge_plus, prune_attention, random_keep, visionzip
from .resample import resample
from .select import cdpruner, dart, vispruner
from .types import Compression, Encoding


@dataclass(frozen=True)
class Strategy:
    """A strategy by name: ``run(enc, **params)`` and ``at_budget(enc, M)``.

    ``at_budget`` returns M output tokens, or as close to M as the rule
    allows. ``adaptive`` strategies choose their own count from the image
    (PruMerge's outlier rule): their ``at_budget`` ignores M and runs the rule.
    """

    name: str
    label: str
    source: str
    run: Callable[..., Compression]
    at_budget: Callable[[Encoding, int], Compression]
    adaptive: bool = False


def threshold_for_budget(enc: Encoding, budget: int, connectivity: int = 4) -> float:
    """The threshold whose adjacent-merge token count is closest to ``budget``.

    The count only changes at the neighbour similarities themselves, so the
    candidates are exactly those values (plus "merge nothing"); a binary
    search over them uses that the count never falls as the threshold rises.
    """
    _, sims = neighbour_similarity(enc.tokens, enc.grid, connectivity)
    cands = torch.cat([sims.unique(), torch.tensor([1.01], device=sims.device)]).tolist()
    lo, hi = 0, len(cands) - 1
    while lo < hi:  # smallest candidate whose count is >= budget
        mid = (lo + hi) // 2
        if merge_threshold(enc, cands[mid], connectivity).num_out >= budget:
            hi = mid
        else:
            lo = mid + 1
    best = cands[lo]
    if lo > 0:
        below = cands[lo - 1]
        if abs(merge_threshold(enc, below, connectivity).num_out - budget) < abs(
            merge_threshold(enc, best, connectivity).num_out - budget
        ):
            best = below
    return float(best)


def _threshold_at(enc: Encoding, m: int) -> Compression:
    return merge_threshold(enc, threshold_for_budget(enc, m))


def kernel_for_budget(grid: tuple[int, int], budget: int) -> tuple[int, int]:
    """The pooling kernel (kh, kw) whose token count ceil(gh/kh) * ceil(gw/kw) is closest to M.

    Every kernel up to the grid size is a candidate; among equally close
    counts the squarest kernel wins, then the shorter one.
    """
    gh, gw = grid
    kh = torch.arange(1, gh + 1)[:, None]
    kw = torch.arange(1, gw + 1)[None, :]
    counts = (-(-gh // kh)) * (-(-gw // kw))
    span = gh + gw + 1
    key = ((counts - budget).abs() * span + (kh - kw).abs()) * span + kh
    best = int(key.argmin())
    return best // gw + 1, best % gw + 1


def _pool_at(enc: Encoding, m: int) -> Compression:
    return pool(enc, kernel_for_budget(enc.grid, m))


def _score_for(enc: Encoding) -> str:
    return "cls" if enc.cls_attn is not None else "received"


def _prumerge_at(enc: Encoding, m: int, plus: bool = False) -> Compression:
    # Adaptive: the IQR rule sets the count, the budget is not used.
    return prumerge(enc, plus=plus, attention="concat" if enc.cls_attn is not None else "received")


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("merge_threshold", "Adjacent threshold merging",
                 "the seed document: merge adjacent patches with cosine >= threshold",
                 merge_threshold, _threshold_at),
        Strategy("merge_bipartite", "ToMe bipartite merging",
                 "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023",
                 merge_bipartite, lambda enc, m: merge_bipartite(enc, target=m)),
        Strategy("prune_attention", "CLS-attention pruning",
                 "keep the top-k patches by CLS attention (the seed document)",
                 prune_attention, lambda enc, m: prune_attention(enc, m / enc.num_patches)),
        Strategy("resample", "Perceiver Resampler",
                 "Alayrac et al., Flamingo, NeurIPS 2022 (untrained here: k-means init)",
                 resample, lambda enc, m: resample(enc, m, init="kmeans")),
        Strategy("prumerge", "PruMerge (adaptive)",
                 "Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large "
                 "Multimodal Models, 2024 (arXiv:2403.15388)",
                 prumerge, _prumerge_at, adaptive=True),
        Strategy("prumerge_plus", "PruMerge+ (adaptive)",
                 "Shang et al., LLaVA-PruMerge, 2024: PruMerge+ adds spatially uniform samples",
                 prumerge_plus, lambda enc, m: _prumerge_at(enc, m, plus=True), adaptive=True),
        Strategy("visionzip", "VisionZip",
                 "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language "
                 "Models, 2024 (arXiv:2412.04467)",
                 visionzip, lambda enc, m: visionzip(enc, m, score=_score_for(enc))),
        Strategy("divprune", "DivPrune",
                 "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large "
                 "Multimodal Models, CVPR 2025 (arXiv:2503.02175)",
                 divprune, lambda enc, m: divprune(enc, m)),
        Strategy("pool", "2-D average pooling",
                 "average pooling of the patch grid, the baseline many VLMs use",
                 pool, _pool_at),
        Strategy("random_keep", "Random keep",
                 "a seeded uniform random subset: the floor every method must beat",
                 random_keep, lambda enc, m: random_keep(enc, m, seed=0)),
        Strategy("vispruner", "VisPruner",
                 "Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective "
                 "Token Pruning in VLMs, ICCV 2025 (arXiv:2412.01818)",
                 vispruner, lambda enc, m: vispruner(enc, m, score=_score_for(enc))),
        Strategy("cdpruner", "CDPruner",
                 "Zhang et al., Beyond Attention or Similarity: Maximizing Conditional Diversity for "
                 "Token Pruning in MLLMs, NeurIPS 2025 (arXiv:2506.10967); relevance to a clicked "
                 "patch, none at a budget",
                 cdpruner, lambda enc, m: cdpruner(enc, m)),
        Strategy("dart", "DART-style",
                 "after Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: "
                 "Duplication Matters More, EMNLP 2025 (arXiv:2502.11494), run on the vision tokens",
                 dart, lambda enc, m: dart(enc, m)),
        Strategy("dpc_knn", "DPC-kNN merging",
                 "density peaks with kNN density (Du et al., 2016) as in TCFormer, Zeng et al., Not "
                 "All Tokens Are Equal, CVPR 2022 (arXiv:2204.08680)",
                 dpc_knn, lambda enc, m: dpc_knn(enc, m)),
    ]
}


def run_at_budget(name: str, enc: Encoding, budget: int) -> Compression:
    """Run strategy ``name`` at about ``budget`` output tokens."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    budget = check_int("budget", budget, 1, enc.num_patches)
    return STRATEGIES[name].at_budget(enc, budget)


def sweep_budgets(n: int, count: int = 10) -> list[int]:
    """About ``count`` budgets from 1/36 of N to N/2, log-spaced, unique."""
    import math

    lo, hi = max(1, n // 36), max(2, n // 2)
    vals = {round(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (count - 1)))
            for i in range(count)}
    return sorted(v for v in vals if 1 <= v <= n)


def fidelity_sweep(enc: Encoding, budgets: list[int] | None = None,
                   names: list[str] | None = None) -> dict[str, list[tuple[int, float]]]:
    """Fidelity against the actual output count M for every strategy over a sweep of budgets.

    Returns {strategy name: [(M, fidelity), ...]} sorted by M. Adaptive
    strategies give one point (their rule picks M). Cached on the encoding.
    """
    from .metrics import fidelity

    budgets = budgets or sweep_budgets(enc.num_patches)
    names = names or list(STRATEGIES)
    key = ("fidelity_sweep", tuple(budgets), tuple(names))
    cache = enc.memo
    if key in cache:
        return cache[key]
    out: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        strategy = STRATEGIES[name]
        points = {}
        for b in budgets[:1] if strategy.adaptive else budgets:
            comp = strategy.at_budget(enc, b)
            points[comp.num_out] = fidelity(enc, comp)
        out[name] = sorted(points.items())
    cache[key] = out
    return out
