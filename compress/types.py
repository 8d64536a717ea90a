"""The two data types everything flows through: ``Encoding`` and ``Compression``.

``Encoding`` is one image through one model at one resolution and layer.
``Compression`` is what every strategy returns: output tokens and ``assign``,
how each output token draws on the input patches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

GRAM_KEPT_MAX = 2048  # up to this many patches an encoding keeps the cosine of every pair (16 MB)


@dataclass(eq=False)
class Encoding:
    """Patch tokens of one image, plus what the strategies need to score them.

    Shapes: ``tokens`` [N, C] with N = gh * gw in row-major grid order;
    ``prefix`` [P, C] (CLS and register tokens, P may be 0);
    ``q``/``k`` [H, P + N, d] per-head queries and keys of the chosen layer
    (prefix tokens first); ``cls_attn`` [H, N] CLS-to-patch attention, or
    ``None`` when the model has no CLS token.
    """

    image: Image.Image
    grid: tuple[int, int]
    patch_size: int
    tokens: torch.Tensor
    prefix: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    cls_attn: torch.Tensor | None
    device: torch.device
    encode_ms: float
    model: str = ""
    layer: int = -1
    attention_layer: int | None = None  # the block q/k/attention come from, when not ``layer``
    size: int = 0
    weights: str = ""
    scale: float = 0.0  # the attention scale of the layer (1/sqrt(d) for ViTs)
    notice: str = ""  # what the user should know about how it was made, e.g. a GPU fallback
    # Results derived from this encoding and kept with it (attention received, the fidelity
    # sweep, fitted resamplers): computed once, however often a slider asks.
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def num_patches(self) -> int:
        return self.tokens.shape[0]

    def remember(self, key: tuple, make, keep: int | None = None):
        """``memo[key]``, made by ``make()`` on first use. With ``keep``, at most that many
        keys of the same family (``key[0]``) stay: the oldest go first."""
        if key not in self.memo:
            self.memo[key] = make()
            if keep is not None:
                same = [k for k in list(self.memo) if isinstance(k, tuple) and k[:1] == key[:1]]
                for old in same[:-keep]:
                    self.memo.pop(old, None)
        return self.memo[key]

    def unit_tokens(self) -> torch.Tensor:
        """The patch tokens scaled to unit length, [N, C] float (kept: every metric reads them)."""
        return self.remember(("unit_tokens",), lambda: torch.nn.functional.normalize(
            self.tokens.float(), dim=-1))

    @property
    def keeps_gram(self) -> bool:
        """Whether ``cosine_gram`` is kept with the encoding (N <= ``GRAM_KEPT_MAX``: 64 MB per
        image at N = 4096 would outweigh everything else a server keeps for it)."""
        return self.num_patches <= GRAM_KEPT_MAX

    def cosine_gram(self) -> torch.Tensor:
        """Cosine similarity of every pair of patch tokens, [N, N] (exactly symmetric); kept when
        ``keeps_gram``, else made anew on each call."""
        from .prune import cosine_gram  # the blocked half product: prune imports this module

        if not self.keeps_gram:
            return cosine_gram(self.unit_tokens())
        return self.remember(("cosine_gram",), lambda: cosine_gram(self.unit_tokens()))

    @property
    def num_prefix(self) -> int:
        return self.prefix.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    @property
    def dim(self) -> int:
        return self.tokens.shape[1]

    def attention(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Exact softmax attention of the layer, [H, R, P + N], for query rows ``rows``.

        ``rows`` indexes the P + N tokens (prefix first); ``None`` means all.
        """
        q = self.q if rows is None else self.q[:, rows]
        scale = self.scale or self.q.shape[-1] ** -0.5
        logits = (q.float() * scale) @ self.k.float().transpose(-1, -2)
        return logits.softmax(dim=-1)

    def received(self) -> torch.Tensor:
        """Mean attention each patch receives, per head, [H, N].

        The mean is over every query token (prefix and patches). Computed in
        chunks of query rows so that N = 4096 stays within memory.
        """
        if "received" not in self.memo:
            total = self.q.shape[1]
            acc = torch.zeros(self.q.shape[0], total, device=self.q.device)
            step = 1024
            for start in range(0, total, step):
                acc += self.attention(slice(start, start + step)).sum(dim=1)
            self.memo["received"] = (acc / total)[:, self.num_prefix:]
        return self.memo["received"]


@dataclass(eq=False)
class Compression:
    """The result of one strategy on one ``Encoding``.

    ``tokens`` [M, C] are the output tokens; ``assign`` [M, N] is
    non-negative with rows summing to 1: how each output token draws on the N
    input patches (hard rows for merging, one-hot rows for pruning, soft rows
    for the resampler). ``extra`` holds strategy-specific detail (e.g. the
    resampler's per-layer maps), ``params`` the arguments it was called with.
    ``form`` says how the strategy means its rows when the numbers alone are
    ambiguous: ``"merge"`` for merging rules, whose result is drawn as clusters
    even when nothing was merged (every row then looks one-hot, like pruning).
    """

    tokens: torch.Tensor
    assign: torch.Tensor
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    elapsed_ms: float = 0.0
    form: str = ""

    @property
    def num_in(self) -> int:
        """N, the number of input patches."""
        return self.assign.shape[1]

    @property
    def num_out(self) -> int:
        """M, the number of output tokens."""
        return self.assign.shape[0]

    @property
    def ratio(self) -> float:
        """The compression ratio N / M."""
        return self.num_in / self.num_out

    @functools.cached_property
    def kind(self) -> str:
        """``"prune"`` (one-hot rows), ``"merge"`` (hard, disjoint rows) or ``"soft"``; read from
        ``assign`` once (a live update asks several times; no strategy changes it afterwards)."""
        support = self.assign > 0
        if bool((support.sum(dim=1) == 1).all()):
            return "prune"
        if bool((support.sum(dim=0) <= 1).all()):
            return "merge"
        return "soft"

    def labels(self) -> torch.Tensor:
        """Per-patch label [N]: the output token that draws most on each patch.

        For merging this is the cluster id; for pruning, patches that no output
        token uses get -1; for soft assignments it is the argmax over outputs.
        """
        best, idx = self.assign.max(dim=0)
        return torch.where(best > 0, idx, torch.full_like(idx, -1))

    def kept_mask(self) -> torch.Tensor:
        """Bool [N]: patches that at least one output token draws on."""
        return (self.assign > 0).any(dim=0)

    def kept_indices(self) -> torch.Tensor:
        """Indices of the kept patches, in grid order."""
        return self.kept_mask().nonzero().flatten()

    def represented(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """What each output stands for in patch-token space: ``assign @ tokens``, [M, C]."""
        return self.assign.to(patch_tokens.dtype) @ patch_tokens
