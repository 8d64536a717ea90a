"""What the strategies see: per-patch views of the tokens that explain their choices."""

from __future__ import annotations

import torch

from .merge import neighbour_similarity
from .types import Encoding


def pca_rgb(tokens: torch.Tensor) -> torch.Tensor:
    """The first three principal components of the tokens as colours, [N, 3] in [0, 1].

    Each component is min-max scaled on its own; the sign of each component
    is fixed so that its largest loading is positive (stable across runs).
    """
    x = tokens.float() - tokens.float().mean(dim=0, keepdim=True)
    k = min(3, x.shape[0], x.shape[1])
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comps = v[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    proj = x @ (comps * signs).T
    if k < 3:
        proj = torch.cat([proj, torch.zeros(x.shape[0], 3 - k, device=x.device)], dim=1)
    lo, hi = proj.amin(dim=0), proj.amax(dim=0)
    return (proj - lo) / (hi - lo).clamp(min=1e-12)


def token_norms(tokens: torch.Tensor) -> torch.Tensor:
    """L2 norm of every patch token, [N] (high-norm artefact tokens stand out)."""
    return tokens.float().norm(dim=-1)


def neighbour_similarity_map(enc: Encoding, connectivity: int = 4) -> torch.Tensor:
    """Mean cosine similarity of each patch to its grid neighbours, [N]."""
    edges, sims = neighbour_similarity(enc.tokens, enc.grid, connectivity)
    n = enc.num_patches
    total = torch.zeros(n, device=sims.device).index_add_(0, edges[:, 0], sims)
    total = total.index_add_(0, edges[:, 1], sims)
    count = torch.zeros(n, device=sims.device).index_add_(0, edges[:, 0], torch.ones_like(sims))
    count = count.index_add_(0, edges[:, 1], torch.ones_like(sims))
    return total / count.clamp(min=1)
