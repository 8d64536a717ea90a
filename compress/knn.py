"""Every token's nearest tokens, without keeping the N x N matrix.

``nearest(x, k, score)`` returns, for each row of ``x`` [N, D], its ``k``
best partners (itself included) by a symmetric pair score: the dot product
(``"dot"``: the cosine for unit rows, largest first) or the squared
Euclidean distance (``"sqdist"``, smallest first).

Only the upper block-triangle of the pair matrix is multiplied (the lower
half is its transpose: half the multiply-adds of ``x @ x.T``), one panel of
rows at a time into one reused buffer (8 MB at N = 4096, where the whole
matrix would be 64 MB whose fresh pages alone take ~40 ms to fault in on
these CPUs). A panel's rows take their ``k`` best over the panel's columns
with one ``topk``; the pairs below the diagonal are offered to the later
rows' lists by a compiled pass down the panel's columns (numba), where
nearly every offer is refused by one comparison with the list's worst.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

PANEL = 512  # rows per panel


@numba.njit(cache=True, nogil=True)
def _offer(vals, idx, worst, row, v, j):  # pragma: no cover - compiled
    """Put (v, j) into row ``row``'s min-heap of the best k (root: the worst kept), dropping the root."""
    k = vals.shape[1]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        if child + 1 < k and vals[row, child + 1] < vals[row, child]:
            child += 1
        if vals[row, child] >= v:
            break
        vals[row, pos] = vals[row, child]
        idx[row, pos] = idx[row, child]
        pos = child
    vals[row, pos] = v
    idx[row, pos] = j
    worst[row] = vals[row, 0]


@numba.njit(cache=True, nogil=True)
def _offer_columns(blk, i0, vals, idx, worst):  # pragma: no cover - compiled
    """Offer the pairs (j, i) read down the columns j beyond panel ``blk`` (rows i0.., columns
    i0..) to row j's heap: the lower half of the matrix, which is never multiplied. ``worst``
    [N] mirrors each heap's root, so nearly every offer is refused by one contiguous read."""
    rows, cols = blk.shape
    for a in range(rows):
        for c in range(rows, cols):
            v = blk[a, c]
            if v > worst[i0 + c]:
                _offer(vals, idx, worst, i0 + c, v, i0 + a)


def nearest(x: torch.Tensor, k: int, score: str = "dot", panel: int | None = None,
            with_extreme: bool = False):
    """The ``k`` best partners of every row of ``x`` [N, D] (CPU) by ``score``, best first.

    Returns (values [N, k], indices [N, k]) as torch tensors; with
    ``with_extreme`` also the worst pair score of all (for ``"sqdist"``: the
    largest squared distance) as a float. ``"sqdist"`` values are clamped at
    0 and a row's own entry is exactly 0. Partners with equal scores are
    listed by index (which of several tied at the k-th place are kept is
    not promised).
    """
    if score not in ("dot", "sqdist"):
        raise ValueError(f"score must be 'dot' or 'sqdist', got {score!r}")
    n = x.shape[0]
    k = min(k, n)
    if x.is_cuda:  # a GPU holds the whole matrix easily and selects from it fast
        return _nearest_whole(x.detach().float(), k, score, with_extreme)
    device = x.device
    x = x.detach().float().cpu().contiguous()
    panel = panel or PANEL
    sq = (x * x).sum(dim=1) if score == "sqdist" else None
    vals = np.full((n, k), -np.inf, dtype=np.float32)  # min-heaps; "sqdist" ones hold -d^2
    idx = np.zeros((n, k), dtype=np.int64)
    worst = np.full(n, -np.inf, dtype=np.float32)
    buf = torch.empty(min(panel, n) * n, dtype=x.dtype)
    least = math.inf
    # Last panel first: a panel's rows take their k best over columns i0.. by one topk (their
    # heaps' start), then the earlier panels offer them the rest down their columns, where a
    # good start refuses nearly everything.
    for i0 in reversed(range(0, n, panel)):
        i1 = min(i0 + panel, n)
        rows, cols = i1 - i0, n - i0
        blk = buf[:rows * cols].view(rows, cols)  # pairs (i0..i1) x (i0..n)
        if sq is None:
            torch.mm(x[i0:i1], x[i0:].T, out=blk)
        else:  # -d^2 = 2 x_i.x_j - |x_i|^2 - |x_j|^2
            torch.addmm(sq[None, i0:], x[i0:i1], x[i0:].T, beta=-1.0, alpha=2.0, out=blk)
            blk.sub_(sq[i0:i1, None]).clamp_(max=0.0)
            blk[:, :rows].diagonal().zero_()
        if with_extreme:
            least = min(least, float(blk.min()))
        kr = min(k, cols)  # the last rows may have fewer columns than k: the rest stays -inf
        v, j = blk.topk(kr, dim=1)  # descending; reversed (after any -inf) a valid min-heap
        vals[i0:i1, k - kr:] = v.flip(1).numpy()
        idx[i0:i1, k - kr:] = (j.flip(1) + i0).numpy()
        worst[i0:i1] = vals[i0:i1, 0]
        if cols > rows:
            _offer_columns(blk.numpy(), i0, vals, idx, worst)
    # Heaps -> best first; equal scores by partner index (a stable sort after sorting by index).
    values, idx = torch.from_numpy(vals), torch.from_numpy(idx)
    by_index = idx.argsort(dim=1)
    values, idx = values.gather(1, by_index), idx.gather(1, by_index)
    order = values.sort(dim=1, descending=True, stable=True).indices
    values, idx = values.gather(1, order), idx.gather(1, order)
    if sq is not None:
        values, least = values.neg_(), -least
    out = (values.to(device), idx.to(device))
    return (*out, least) if with_extreme else out


def _nearest_whole(x: torch.Tensor, k: int, score: str, with_extreme: bool):
    """``nearest`` from the whole matrix at once (on a GPU)."""
    if score == "dot":
        full = x @ x.T
    else:
        sq = (x * x).sum(dim=1)
        full = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_(min=0.0)
        full.diagonal().zero_()
    values, idx = full.topk(k, dim=1, largest=score == "dot")
    if not with_extreme:
        return values, idx
    return values, idx, float(full.max() if score == "sqdist" else full.min())
