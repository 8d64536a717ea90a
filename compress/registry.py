"""One list of strategies: it drives the tests, the app and the comparisons.

Each entry knows how to run its strategy at a token budget M (or as close to
M as its rule allows), so that strategies can be compared on equal terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._checks import check_int
from .merge import merge_bipartite, merge_threshold, neighbour_similarity
from .prune import prune_attention
from .resample import resample
from .types import Compression, Encoding


@dataclass(frozen=True)
class Strategy:
    """A strategy by name: ``run(enc, **params)`` and ``at_budget(enc, M)``."""

    name: str
    label: str
    source: str
    run: Callable[..., Compression]
    at_budget: Callable[[Encoding, int], Compression]


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
    ]
}


def run_at_budget(name: str, enc: Encoding, budget: int) -> Compression:
    """Run strategy ``name`` at about ``budget`` output tokens."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    budget = check_int("budget", budget, 1, enc.num_patches)
    return STRATEGIES[name].at_budget(enc, budget)
