"""Token merging: adjacent threshold merging, ToMe bipartite soft matching, grid pooling.

All return a ``Compression`` with hard rows: every patch belongs to exactly
one output token, and an output token is the (size-weighted) mean of its
members.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int, check_real
from .types import Compression, Encoding


def grid_edges(grid: tuple[int, int], connectivity: int = 4, device=None) -> torch.Tensor:
    """Edges between neighbouring patches of a row-major gh x gw grid, [E, 2].

    4-connectivity links right and down neighbours; 8 adds both diagonals.
    Each undirected edge appears once.
    """
    check_choice("connectivity", connectivity, (4, 8))
    gh, gw = grid
    idx = torch.arange(gh * gw, device=device).view(gh, gw)
    pairs = [
        (idx[:, :-1], idx[:, 1:]),  # right
        (idx[:-1, :], idx[1:, :]),  # down
    ]
    if connectivity == 8:
        pairs += [(idx[:-1, :-1], idx[1:, 1:]), (idx[:-1, 1:], idx[1:, :-1])]
    return torch.cat([torch.stack([a.flatten(), b.flatten()], dim=1) for a, b in pairs])


def neighbour_similarity(
    tokens: torch.Tensor, grid: tuple[int, int], connectivity: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every neighbouring pair: (edges [E, 2], sims [E])."""
    edges = grid_edges(grid, connectivity, device=tokens.device)
    unit = F.normalize(tokens.float(), dim=-1)
    sims = (unit[edges[:, 0]] * unit[edges[:, 1]]).sum(-1).clamp(-1.0, 1.0)
    return edges, sims


def encoding_neighbours(enc: Encoding, connectivity: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``neighbour_similarity`` of the encoding's patch tokens, kept with the encoding (every
    threshold a slider passes reads the same similarities)."""
    check_choice("connectivity", connectivity, (4, 8))
    return enc.remember(("neighbours", connectivity),
                        lambda: neighbour_similarity(enc.tokens, enc.grid, connectivity))


def connected_components(num_nodes: int, edges: torch.Tensor) -> torch.Tensor:
    """Component label per node, [num_nodes], labels 0..K-1 ordered by smallest member.

    Vectorised min-label propagation with pointer jumping: each pass lowers
    every node's label to the smallest label among its neighbours, then jumps
    labels to their label's label. Passes repeat until nothing changes.
    """
    device = edges.device
    labels = torch.arange(num_nodes, device=device)
    if edges.numel() == 0:
        return labels
    u, v = edges[:, 0], edges[:, 1]
    src = torch.cat([u, v])
    dst = torch.cat([v, u])
    for _ in range(num_nodes):
        new = labels.scatter_reduce(0, dst, labels[src], reduce="amin")
        # The label a node points at can itself point lower: follow the chain.
        new = new.scatter_reduce(0, labels, new, reduce="amin")
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, labels):
            break
        labels = new
    return torch.unique(labels, return_inverse=True)[1]


def _hard_assign(labels: torch.Tensor, num_out: int) -> torch.Tensor:
    """[M, N] matrix with 1/|cluster| on each member of each cluster."""
    onehot = F.one_hot(labels, num_out).T.float()
    return onehot / onehot.sum(dim=1, keepdim=True)


def _member_means(labels: torch.Tensor, num_out: int, tokens: torch.Tensor) -> torch.Tensor:
    """The mean of each cluster's member tokens, [M, C] (``assign @ tokens`` for hard rows, by
    one pass of sums instead of an [M, N] x [N, C] product)."""
    sums = torch.zeros(num_out, tokens.shape[1], device=tokens.device).index_add_(
        0, labels, tokens.float())
    counts = torch.bincount(labels, minlength=num_out).clamp(min=1)
    return (sums / counts[:, None]).to(tokens.dtype)


def _best_merged_edge(n: int, edges: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
    """Per patch, the highest similarity among the edges that merged it, [N] (NaN: merged with none)."""
    best = torch.full((n,), -math.inf, device=sims.device)
    if edges.numel():
        both = torch.cat([edges[:, 0], edges[:, 1]])
        best = best.scatter_reduce(0, both, torch.cat([sims, sims]), reduce="amax")
    return torch.where(torch.isinf(best), torch.full_like(best, math.nan), best)


def merge_threshold(enc: Encoding, threshold: float, connectivity: int = 4) -> Compression:
    """Merge adjacent patches whose cosine similarity is at least ``threshold``.

    The seed's rule: build a graph on the patch grid with an edge between two
    neighbouring patches (4- or 8-connected) when the cosine similarity of
    their tokens is >= ``threshold``; each connected component becomes one
    output token, the mean of its members. Merging chains: A~B and B~C put A
    and C in one cluster even when A and C themselves are dissimilar, so a
    smooth gradient can merge across a whole region. ``threshold`` > 1 merges
    nothing; ``threshold`` <= -1 merges each connected grid into one token.

    Returns a ``Compression`` with M = number of clusters, hard ``assign``.
    """
    threshold = check_real("threshold", threshold)
    check_choice("connectivity", connectivity, (4, 8))
    start = time.perf_counter()
    edges, sims = encoding_neighbours(enc, connectivity)
    keep = edges[sims >= threshold]
    labels = connected_components(enc.num_patches, keep)
    num_out = int(labels.max()) + 1
    assign = _hard_assign(labels, num_out)
    tokens = _member_means(labels, num_out, enc.tokens)
    return Compression(
        tokens=tokens,
        assign=assign,
        strategy="merge_threshold",
        params={"threshold": threshold, "connectivity": connectivity},
        extra={"edge_sims": sims, "edges": edges,
               "parts": {"best similarity to a merged neighbour": _best_merged_edge(
                   enc.num_patches, keep, sims[sims >= threshold])}},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
        form="merge",
    )


def bipartite_match(
    unit_a: torch.Tensor, unit_b: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's matching step: which A tokens merge, and into which B token.

    ``unit_a`` [|A|, D] and ``unit_b`` [|B|, D] are unit-length matching
    features, so their dot product is the cosine similarity. Each A token
    draws one edge to its most similar B token; the ``r`` A tokens with the
    most similar edges are merged (ties broken by position, a stable sort;
    ToMe's own ``argsort`` does not promise an order for ties).

    Returns (``src`` [r]: the merged A positions, ``unm`` [|A| - r]: the
    unmerged A positions, in order of decreasing edge similarity,
    ``dst`` [r]: the B position each ``src`` token merges into).
    """
    scores = unit_a @ unit_b.T
    # amax, then argmax over the r merged rows only: the same as max(dim=-1) (first maximum on
    # ties), and much cheaper on a CPU than the indices of every row.
    order = torch.sort(scores.amax(dim=-1), descending=True, stable=True).indices
    src, unm = order[:r], order[r:]
    return src, unm, scores.index_select(0, src).argmax(dim=-1)


def bipartite_round(
    metric: torch.Tensor, members: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of ToMe's bipartite soft matching (Bolya et al., ICLR 2023, Alg. 1).

    ``metric`` [T, D] is the matching feature of the current T tokens and
    ``members`` [T, N] how many of each original patch every token holds
    (its row sum is the token's size). Tokens are split alternately into A
    (even positions) and B (odd positions); each A token draws an edge to its
    most cosine-similar B token; the ``r`` edges with the highest similarity
    are merged (the A token is folded into its B token, size-weighted).

    Returns the new (metric [T - r, D], members [T - r, N]), ordered as ToMe
    orders them: the unmerged A tokens, then all B tokens.
    """
    metric, _, moved = _merge_step(metric, members.sum(dim=1), r)
    if moved is None:
        return metric, members
    new_members = torch.zeros(metric.shape[0], members.shape[1], dtype=members.dtype,
                              device=members.device).index_add_(0, moved, members)
    return metric, new_members


def _merge_step(metric: torch.Tensor, size: torch.Tensor, r: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The round of ``bipartite_round`` on features and sizes [T] alone. Returns the new
    (metric [T - r, D], size [T - r], moved [T]: the new position of every old token, for a
    merged A token the position of the B token it went into); ``moved`` is None when nothing
    merges."""
    t = metric.shape[0]
    r = min(r, t // 2)
    if r <= 0:
        return metric, size, None
    unit = F.normalize(metric.float(), dim=-1)
    src_idx, unm_idx, dst_idx = bipartite_match(unit[0::2], unit[1::2], r)
    weighted = metric.float() * size[:, None]  # size-weighted sums merge by addition
    a_w, b_w = weighted[0::2], weighted[1::2]
    a_s, b_s = size[0::2], size[1::2]
    b_w = b_w.index_add(0, dst_idx, a_w[src_idx])
    b_s = b_s.index_add(0, dst_idx, a_s[src_idx])
    new_size = torch.cat([a_s[unm_idx], b_s])
    new_metric = torch.cat([a_w[unm_idx], b_w]) / new_size[:, None]
    # ToMe's order: the unmerged A tokens, then every B token (holding the A tokens merged into it)
    u = unm_idx.shape[0]
    moved = torch.empty(t, dtype=torch.long, device=metric.device)
    moved[1::2] = torch.arange(u, u + b_s.shape[0], device=metric.device)
    a_to = torch.empty(a_s.shape[0], dtype=torch.long, device=metric.device)
    a_to[unm_idx] = torch.arange(u, device=metric.device)
    a_to[src_idx] = u + dst_idx
    moved[0::2] = a_to
    return new_metric, new_size, moved


def merge_bipartite(
    enc: Encoding,
    target: int | None = None,
    r: int | None = None,
    metric: str = "keys",
) -> Compression:
    """ToMe bipartite soft matching, repeated until ``target`` tokens remain.

    ``metric="keys"`` matches on the layer's keys averaged over heads (as
    ToMe does); ``"tokens"`` on the patch tokens. Each round removes
    ``min(r, T // 2, T - target)`` tokens (``r`` defaults to as many as
    allowed). With only ``r`` given, exactly one round runs. Output tokens are
    size-weighted means of the original patch tokens they cover, ordered by
    their first patch in grid order.
    """
    check_choice("metric", metric, ("keys", "tokens"))
    n = enc.num_patches
    if target is None and r is None:
        raise ValueError("merge_bipartite needs a token budget: pass target=M or r=R")
    if target is not None:
        target = check_int("target", target, 1, n)
    if r is not None:
        r = check_int("r", r, 0, n)
    start = time.perf_counter()
    if metric == "keys":
        feats = enc.k[:, enc.num_prefix:].float().mean(dim=0)
    else:
        feats = enc.tokens.float()
    # Every token holds whole patches, so who holds what is one label per patch and a size per
    # token: the rounds of ``bipartite_round`` without its [T, N] membership matrix.
    holder = torch.arange(n, device=feats.device)
    size = torch.ones(n, device=feats.device)

    def merge_round(feats, size, holder, r):
        feats, size, moved = _merge_step(feats, size, r)
        return feats, size, (holder if moved is None else moved[holder])

    if target is None:
        feats, size, holder = merge_round(feats, size, holder, r)
        rounds = 1
    else:
        rounds = 0
        while size.shape[0] > target:
            t = size.shape[0]
            step = min(t // 2, t - target, r if r else math.inf)
            if step <= 0:
                break
            feats, size, holder = merge_round(feats, size, holder, int(step))
            rounds += 1
    m = size.shape[0]
    first = torch.full((m,), n, device=holder.device).scatter_reduce(
        0, holder, torch.arange(n, device=holder.device), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(first)
    rank[order] = torch.arange(m, device=first.device)
    labels = rank[holder]  # tokens ordered by their first patch in grid order
    assign = _hard_assign(labels, m)
    tokens = _member_means(labels, m, enc.tokens)
    return Compression(
        tokens=tokens,
        assign=assign,
        strategy="merge_bipartite",
        params={"target": target, "r": r, "metric": metric},
        extra={"rounds": rounds, "sizes": size[order]},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
        form="merge",
    )


def _kernel_pair(kernel, grid: tuple[int, int]) -> tuple[int, int]:
    """``kernel`` (an int k or a (kh, kw) pair) as (kh, kw), each within the grid."""
    gh, gw = grid
    if isinstance(kernel, (tuple, list)):
        if len(kernel) != 2:
            raise ValueError(f"kernel must be an int k or a (kh, kw) pair, got {kernel!r}")
        kh = check_int("kernel height", kernel[0], 1, gh)
        return kh, check_int("kernel width", kernel[1], 1, gw)
    k = check_int("kernel", kernel, 1, max(gh, gw))
    return min(k, gh), min(k, gw)


def pool_grid(grid: tuple[int, int], kernel) -> tuple[int, int]:
    """The pooled grid (ceil(gh / kh), ceil(gw / kw)) for ``kernel``."""
    kh, kw = _kernel_pair(kernel, grid)
    return -(-grid[0] // kh), -(-grid[1] // kw)


def pool(enc: Encoding, kernel) -> Compression:
    """2-D average pooling of the patch grid: each kh x kw window becomes one token.

    Windows do not overlap (stride = kernel) and start at the top-left patch;
    when the grid is not divisible by the kernel the last row/column of
    windows is partial and averages only the patches it covers -- the result
    of ``F.avg_pool2d(grid, kernel, stride=kernel, ceil_mode=True)``. So a
    gh x gw grid gives ceil(gh / kh) * ceil(gw / kw) tokens, in row-major
    window order. ``kernel`` is an int k (a k x k window, clipped to the grid)
    or a (kh, kw) pair. ``assign`` has hard rows: 1/|window| on its patches.
    """
    gh, gw = enc.grid
    kh, kw = _kernel_pair(kernel, enc.grid)
    start = time.perf_counter()
    device = enc.tokens.device
    ph, pw = -(-gh // kh), -(-gw // kw)
    rows = torch.arange(gh, device=device) // kh
    cols = torch.arange(gw, device=device) // kw
    labels = (rows[:, None] * pw + cols[None, :]).flatten()  # window of each patch, [N]
    num_out = ph * pw
    assign = _hard_assign(labels, num_out)
    return Compression(
        tokens=_member_means(labels, num_out, enc.tokens),
        assign=assign,
        strategy="pool",
        params={"kernel": (kh, kw)},
        extra={"labels": labels, "pooled_grid": (ph, pw)},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
        form="merge",
    )
