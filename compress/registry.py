"""One list of strategies: it drives the tests, the app and the comparisons.

Each entry knows how to run its strategy at a token budget M (or as close to
M as its rule allows), so that strategies can be compared on equal terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._checks import check_int, check_real
from .cluster import DPC_K, dpc_knn
from .merge import encoding_neighbours, merge_bipartite, merge_threshold, pool
from .prune import (
    VISIONZIP_DOMINANT_RATIO,
    divprune,
    prumerge,
    prumerge_plus,
    prune_attention,
    random_keep,
    visionzip,
)
from .resample import resample
from .select import DART_PIVOTS, VISPRUNER_IMPORTANT_RATIO, cdpruner, dart, vispruner
from .types import Compression, Encoding


@dataclass(frozen=True)
class Knob:
    """A setting of a strategy beside its budget (VisionZip's dominant share, a seed).

    The app draws one control per knob from these fields; ``integer`` knobs take whole numbers.
    """

    name: str
    label: str
    default: float
    lo: float
    hi: float
    step: float = 0.01
    integer: bool = False


@dataclass(frozen=True)
class Strategy:
    """A strategy by name: ``run(enc, **params)`` and ``at_budget(enc, M, **settings)``.

    ``at_budget`` returns M output tokens, or as close to M as the rule
    allows; ``settings`` are the strategy's ``knobs`` by name. ``adaptive``
    strategies choose their own count from the image (PruMerge's outlier
    rule): their ``at_budget`` ignores M and runs the rule. ``short`` is the
    name a tile or a plot legend has room for.
    """

    name: str
    label: str
    short: str
    source: str
    run: Callable[..., Compression]
    at_budget: Callable[..., Compression]
    adaptive: bool = False
    knobs: tuple[Knob, ...] = ()
    uses_query: bool = False  # at_budget takes query= (a patch index): relevance to a clicked patch

    def defaults(self) -> dict[str, float]:
        """Every knob at its default value."""
        return {k.name: (int(k.default) if k.integer else k.default) for k in self.knobs}


def threshold_for_budget(enc: Encoding, budget: int, connectivity: int = 4) -> float:
    """The threshold whose adjacent-merge token count is closest to ``budget``.

    The count only changes at the neighbour similarities themselves, so the
    candidates are exactly those values (plus "merge nothing"); a binary
    search over them uses that the count never falls as the threshold rises.
    """
    _, sims = encoding_neighbours(enc, connectivity)
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
        Strategy("merge_threshold", "Adjacent threshold merging", "Threshold merge",
                 "the seed document: merge adjacent patches with cosine >= threshold",
                 merge_threshold, _threshold_at),
        Strategy("merge_bipartite", "ToMe bipartite merging", "ToMe",
                 "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023",
                 merge_bipartite, lambda enc, m: merge_bipartite(enc, target=m)),
        Strategy("prune_attention", "CLS-attention pruning", "CLS prune",
                 "keep the top-k patches by CLS attention (the seed document)",
                 prune_attention, lambda enc, m: prune_attention(enc, m / enc.num_patches,
                                                                 score=_score_for(enc))),
        Strategy("resample", "Perceiver Resampler", "Resampler",
                 "Alayrac et al., Flamingo, NeurIPS 2022 (untrained here: k-means init)",
                 resample, lambda enc, m: resample(enc, m, init="kmeans")),
        Strategy("prumerge", "PruMerge (adaptive)", "PruMerge",
                 "Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large "
                 "Multimodal Models, 2024 (arXiv:2403.15388)",
                 prumerge, _prumerge_at, adaptive=True),
        Strategy("prumerge_plus", "PruMerge+ (adaptive)", "PruMerge+",
                 "Shang et al., LLaVA-PruMerge, 2024: PruMerge+ adds spatially uniform samples",
                 prumerge_plus, lambda enc, m: _prumerge_at(enc, m, plus=True), adaptive=True),
        Strategy("visionzip", "VisionZip", "VisionZip",
                 "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language "
                 "Models, 2024 (arXiv:2412.04467)",
                 visionzip, lambda enc, m, dominant_ratio=VISIONZIP_DOMINANT_RATIO: visionzip(
                     enc, m, dominant_ratio=dominant_ratio, score=_score_for(enc)),
                 knobs=(Knob("dominant_ratio", "VisionZip: dominant share of M",
                             VISIONZIP_DOMINANT_RATIO, 0.0, 1.0),)),
        Strategy("divprune", "DivPrune", "DivPrune",
                 "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large "
                 "Multimodal Models, CVPR 2025 (arXiv:2503.02175)",
                 divprune, lambda enc, m: divprune(enc, m)),
        Strategy("pool", "2-D average pooling", "Pooling",
                 "average pooling of the patch grid, the baseline many VLMs use",
                 pool, _pool_at),
        Strategy("random_keep", "Random keep", "Random keep",
                 "a seeded uniform random subset: the floor every method must beat",
                 random_keep, lambda enc, m, seed=0: random_keep(enc, m, seed=int(seed)),
                 knobs=(Knob("seed", "Random keep: seed", 0, 0, 2**31 - 1, 1, integer=True),)),
        Strategy("vispruner", "VisPruner", "VisPruner",
                 "Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective "
                 "Token Pruning in VLMs, ICCV 2025 (arXiv:2412.01818)",
                 vispruner, lambda enc, m, important_ratio=VISPRUNER_IMPORTANT_RATIO: vispruner(
                     enc, m, important_ratio=important_ratio, score=_score_for(enc)),
                 knobs=(Knob("important_ratio", "VisPruner: important share of M",
                             VISPRUNER_IMPORTANT_RATIO, 0.0, 1.0),)),
        Strategy("cdpruner", "CDPruner", "CDPruner",
                 "Zhang et al., Beyond Attention or Similarity: Maximizing Conditional Diversity for "
                 "Token Pruning in MLLMs, NeurIPS 2025 (arXiv:2506.10967); relevance to the query "
                 "patch (click the picture), none at a budget",
                 cdpruner, lambda enc, m, query=None: cdpruner(enc, m, query=query),
                 uses_query=True),
        Strategy("dart", "DART-style", "DART-style",
                 "after Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: "
                 "Duplication Matters More, EMNLP 2025 (arXiv:2502.11494), run on the vision tokens",
                 dart, lambda enc, m, pivots=DART_PIVOTS: dart(enc, m, pivots=int(pivots)),
                 knobs=(Knob("pivots", "DART-style: pivot tokens", DART_PIVOTS, 1, 32, 1,
                             integer=True),)),
        Strategy("dpc_knn", "DPC-kNN merging", "DPC-kNN",
                 "density peaks with kNN density (Du et al., 2016) as in TCFormer, Zeng et al., Not "
                 "All Tokens Are Equal, CVPR 2022 (arXiv:2204.08680)",
                 dpc_knn, lambda enc, m, k=DPC_K: dpc_knn(enc, m, k=int(k)),
                 knobs=(Knob("k", "DPC-kNN: neighbours for the density", DPC_K, 1, 32, 1,
                             integer=True),)),
    ]
}


def run_at_budget(name: str, enc: Encoding, budget: int, **settings) -> Compression:
    """Run strategy ``name`` at about ``budget`` output tokens, with its knobs in ``settings``."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    strategy = STRATEGIES[name]
    budget = check_int("budget", budget, 1, enc.num_patches)
    known = {k.name: k for k in strategy.knobs}
    query = settings.pop("query", None)
    for key, value in settings.items():
        if key not in known:
            raise ValueError(f"{strategy.label} has no setting {key!r}"
                             + (f"; its settings: {', '.join(known)}" if known else ""))
        knob = known[key]
        check = check_int if knob.integer else check_real
        settings[key] = check(key, value, int(knob.lo) if knob.integer else knob.lo,
                              int(knob.hi) if knob.integer else knob.hi)
    if strategy.uses_query:
        settings["query"] = query
    return strategy.at_budget(enc, budget, **settings)


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
