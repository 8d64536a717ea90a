"""Attention-based pruning: keep the top-k patches by an attention score."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int, check_real
from .types import Compression, Encoding

SCORES = ("cls", "received", "query")


def query_index(enc: Encoding, query) -> int:
    """A patch index from ``query``: an int index, or a (row, col) grid position."""
    gh, gw = enc.grid
    if isinstance(query, (tuple, list)):
        if len(query) != 2:
            raise ValueError(f"query must be a patch index or (row, col), got {query!r}")
        row = check_int("query row", query[0], 0, gh - 1)
        col = check_int("query col", query[1], 0, gw - 1)
        return row * gw + col
    return check_int("query", query, 0, gh * gw - 1)


def attention_scores(
    enc: Encoding, score: str = "cls", head: int | None = None, query=None
) -> torch.Tensor:
    """Per-patch score [N] used to rank patches.

    ``"cls"``: the CLS token's attention to each patch; ``"received"``: the
    mean attention each patch receives from all tokens; ``"query"``: the
    attention of one patch's query (``query``) over all patches. ``head``
    selects one head; ``None`` averages over heads.
    """
    check_choice("score", score, SCORES)
    if head is not None:
        head = check_int("head", head, 0, enc.num_heads - 1)
    if score == "cls":
        if enc.cls_attn is None:
            raise ValueError(
                f"model {enc.model!r} has no CLS token; use score='received' or 'query'"
            )
        per_head = enc.cls_attn
    elif score == "received":
        per_head = enc.received()
    else:
        if query is None:
            raise ValueError("score='query' needs a query patch: an index or (row, col)")
        row = enc.num_prefix + query_index(enc, query)
        per_head = enc.attention(slice(row, row + 1))[:, 0, enc.num_prefix:]
    return per_head.float().mean(dim=0) if head is None else per_head[head].float()


def keep_count(keep_ratio: float, n: int) -> int:
    """k = max(1, round(keep_ratio * n))."""
    return max(1, round(keep_ratio * n))


def prune_attention(
    enc: Encoding,
    keep_ratio: float,
    score: str = "cls",
    head: int | None = None,
    query=None,
) -> Compression:
    """Keep the k = max(1, round(keep_ratio * N)) patches with the highest score.

    Ties are broken by grid order (earlier patch first). Kept tokens are
    returned in grid order; ``assign`` is one-hot. ``extra["scores"]`` holds
    the per-patch score [N] that was ranked.
    """
    keep_ratio = check_real("keep_ratio", keep_ratio, 0.0, 1.0)
    start = time.perf_counter()
    scores = attention_scores(enc, score, head, query)
    n = scores.shape[0]
    k = keep_count(keep_ratio, n)
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = order[:k].sort().values
    assign = F.one_hot(kept, n).float()
    params = {"keep_ratio": keep_ratio, "score": score, "head": head}
    if score == "query":
        params["query"] = query_index(enc, query)
    return Compression(
        tokens=enc.tokens[kept],
        assign=assign,
        strategy="prune_attention",
        params=params,
        extra={"scores": scores, "kept": kept},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )
