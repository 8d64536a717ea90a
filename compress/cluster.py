"""Clustering merges: DPC-kNN, density peaks with k nearest neighbours.

``dpc_knn`` picks cluster centres where the tokens are dense and far from
anything denser, and merges every other patch into its nearest centre: hard
``assign`` rows, each output the plain mean of its members.
"""

from __future__ import annotations

import math
import time

import torch

from ._checks import check_int
from .knn import nearest
from .merge import _hard_assign
from .prune import _roles
from .types import Compression, Encoding

DPC_K = 5  # TCFormer's default (CTM(k=5)); HoliTom's cluster_dpc_knn defaults to 7
_PARENT_LIST = 16  # nearest neighbours searched for a denser one before a full row is scanned


def dpc_knn(enc: Encoding, target: int, k: int = DPC_K) -> Compression:
    """DPC-kNN merging: ``target`` density-peak centres, every patch merged into its nearest.

    Density peaks clustering (Rodriguez & Laio, Science 2014) with the kNN
    density of Du et al. (Knowledge-Based Systems 2016), as TCFormer runs it
    (Zeng et al., CVPR 2022, arXiv:2204.08680; checked against
    ``cluster_dpc_knn`` and ``merge_tokens`` in
    ``tcformer_module/tcformer_utils.py`` of zengwang430521/TCFormer, and the
    copy in ``holitom/llava_arch.py`` of cokeshao/HoliTom):

    - distances d_ij = ||x_i - x_j|| / sqrt(C) between patch tokens;
    - density rho_i = exp(-mean of d_ij^2 over the k nearest tokens), the
      token itself included (``topk`` over the whole row, d_ii = 0);
    - distance indicator delta_i = the distance to the nearest denser token;
      for the densest token, the largest distance in the whole matrix;
    - centres: the ``target`` tokens with the highest rho * delta;
    - every token joins its nearest centre (a centre joins itself).

    Defaults: k = 5, TCFormer's (``CTM(k=5)``); HoliTom uses 7. Where we
    differ: TCFormer breaks density ties with uniform noise of size 1e-6; we
    break them by grid order (the earlier patch counts as denser), and
    centre ties by grid order too, so the result is deterministic.
    TCFormer's merge averages with weights exp(score) from a learned layer
    (``CTM.score``); we have no learned score, so each cluster is the plain
    mean of its members, as ``merge_tokens`` with ``token_weight=None``
    (and as HoliTom's ``NO_BETA`` variant, centre and members averaged).
    Our tokens are the encoding's (DINOv2 final-norm tokens at the last
    block), not a CNN stage's features.

    Returns a ``Compression`` [target, C], hard rows (1/|cluster| on each
    member), clusters ordered by their centre's grid position. ``extra``:
    ``parts`` {``density`` rho [N], ``distance`` delta [N], ``score`` rho *
    delta [N], ``centre_distance``: d to the centre each patch joined [N]};
    ``centres`` (patch indices, grid order); ``labels`` [N] (cluster of
    each patch); ``parent`` [N] (the nearest denser patch, -1 for the densest).
    """
    n = enc.num_patches
    target = check_int("target", target, 1, n)
    k = check_int("k", k, 1, n)
    start = time.perf_counter()
    x = enc.tokens.float()
    device = x.device
    scale = 1.0 / x.shape[1]
    sq = (x * x).sum(dim=1)

    def dist2(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # d^2 [R, K]
        return (sq[rows, None] + sq[None, cols] - 2.0 * x[rows] @ x[cols].T).clamp_(min=0.0) * scale

    # Each patch's nearest (itself first, at 0) and the largest distance of all, without the
    # N x N matrix (knn.nearest: 64 MB at N = 4096); kept with the encoding, since no budget
    # changes them (a slider move then skips the 130 ms at N = 4096).
    width = min(max(k, _PARENT_LIST), n)
    near_d2, near, far2 = enc.remember(("nearest_sqdist", width), lambda: nearest(
        x, width, "sqdist", with_extreme=True), keep=2)
    near_d2 = near_d2 * scale
    all_rows = torch.arange(n, device=device)
    density = torch.exp(-near_d2[:, :k].mean(dim=1))

    # Denser = higher density, or equal density and an earlier patch.
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[torch.sort(density, descending=True, stable=True).indices] = all_rows
    denser = rank[near] < rank[:, None]  # [N, L] over the nearest, ascending distance
    found = denser.any(dim=1)
    first = denser.to(torch.uint8).argmax(dim=1, keepdim=True)
    parent = near.gather(1, first).squeeze(1)
    delta2 = near_d2.gather(1, first).squeeze(1)
    lonely = (~found).nonzero().flatten()  # no denser token among the nearest: scan the row
    if lonely.numel():
        rows = dist2(lonely, all_rows).masked_fill_(rank[None, :] >= rank[lonely, None], math.inf)
        best_d2, best = rows.min(dim=1)
        parent[lonely] = best
        delta2[lonely] = best_d2
    top = rank.argmin()
    parent[top] = -1
    delta2[top] = far2 * scale
    distance = delta2.sqrt()
    score = distance * density

    centres = torch.sort(score, descending=True, stable=True).indices[:target].sort().values
    to_centre = dist2(all_rows, centres)  # [N, M]
    labels = to_centre.argmin(dim=1)
    labels[centres] = torch.arange(target, device=device)
    centre_d2 = to_centre.gather(1, labels[:, None]).squeeze(1)
    assign = _hard_assign(labels, target)
    counts = torch.bincount(labels, minlength=target).float()
    sums = torch.zeros(target, enc.dim, device=device).index_add_(0, labels, x)
    return Compression(
        tokens=(sums / counts[:, None]).to(enc.tokens.dtype),
        assign=assign,
        strategy="dpc_knn",
        params={"target": target, "k": k},
        extra={"centres": centres, "labels": labels, "parent": parent,
               "parts": {"density": density, "distance": distance, "score": score,
                         "centre_distance": centre_d2.sqrt()},
               "role": _roles(n, {"centre (a density peak)": centres},
                              "merged into its nearest centre")},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
        form="merge",
    )
