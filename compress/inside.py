"""Compression inside the ViT: ToMe and EViT-style pruning run within the blocks.

The post-hoc strategies compress the final tokens once. Here the encoder's own
blocks run with a reduction between attention and MLP, so every later block
works on fewer tokens and the saving compounds with depth:

- ``tome_forward``: Token Merging (Bolya et al., ICLR 2023; rules checked
  against facebookresearch/ToMe ``tome/merge.py`` and ``tome/patch/timm.py``).
  In every block, ``r`` tokens are merged by bipartite soft matching on the
  block's keys averaged over heads, size-weighted, with proportional
  attention (log size added to the attention logits of every key).
- ``prune_forward``: EViT (Liang et al., ICLR 2022; rules checked against
  youweiliang/evit ``evit.py``). At chosen blocks the ceil(keep_ratio * T)
  tokens with the highest CLS attention (head mean) are kept, the rest are
  fused into one token (or discarded).
- ``plain_forward``: the same loop with no reduction, the reference;
  ``cut_forward``: the loop cut to given counts for free, the yardstick of speed.

All return an ``InsideResult``: the final tokens, their sizes, for every block
which patches each token covers, and a ``Compression`` for the final tokens so
the overlays, metrics, exports and the downstream head read it unchanged.

Only timm's plain pre-norm ``Block`` with its standard ``Attention`` is run
(q/k norms, attention-output norm and gate included); other block types are
refused with a clear error. Batch size is 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ._checks import check_int, check_real
from .merge import bipartite_match
from .types import Compression

EVIT_BLOCKS = (3, 6, 9)  # EViT's --drop_loc default: 0-based, i.e. the 4th, 7th and 10th blocks
# The clock forward_ms and merge_ms are read with. A benchmark on a machine shared with other
# work may set time.thread_time (with one thread): CPU time, which waiting for a core does not inflate.
TIMER: Callable[[], float] = time.perf_counter


@dataclass(eq=False)
class InsideResult:
    """One image through the encoder with compression inside its blocks.

    ``tokens`` [T, C]: the final patch-side tokens after the model's final
    norm; ``prefix`` [P, C]: CLS and registers (never merged or pruned);
    ``sizes`` [T]: how many patches each token covers. ``covers`` has one
    entry per block: a labels vector [N] giving, for every patch, the index
    of the token that covers it after that block's reduction (-1: discarded).
    ``counts`` [depth + 1]: patch-side tokens before block 0 and after each
    block. ``compression`` is the ``Compression`` of the final tokens.
    ``forward_ms`` times the network from pixels to the final norm;
    ``merge_ms`` the matching + merging (or scoring + pruning) within it
    (``None`` on a GPU unless ``profile=True``). ``flops``/``plain_flops``:
    see ``forward_flops``. ``scores``: block -> [T] scores used for pruning.
    ``threads``: torch's thread count on the CPU when ``forward_ms`` was
    measured (times at different counts do not compare).
    """

    tokens: torch.Tensor
    prefix: torch.Tensor
    sizes: torch.Tensor
    covers: list[torch.Tensor]
    counts: list[int]
    compression: Compression
    strategy: str
    params: dict[str, Any]
    image: Image.Image
    grid: tuple[int, int]
    patch_size: int
    has_cls: bool
    forward_ms: float
    merge_ms: float | None
    flops: float
    plain_flops: float
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    threads: int = 1

    @property
    def num_patches(self) -> int:
        return self.covers[-1].shape[0] if self.covers else self.tokens.shape[0]

    @property
    def flops_ratio(self) -> float:
        """FLOPs of this forward over the plain forward's."""
        return self.flops / self.plain_flops


# ---------------------------------------------------------------- the block pieces


def check_supported(encoder) -> None:
    """``ValueError`` unless every block is timm's plain pre-norm ``Block`` with standard ``Attention``."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    for i, blk in enumerate(encoder.net.blocks):
        attn = getattr(blk, "attn", None)
        if type(blk) is not Block or type(attn) is not Attention:
            raise ValueError(
                f"model {encoder.name!r} is not a plain ViT for compression inside the network: block {i} "
                f"is {type(blk).__name__} with {type(attn).__name__}; only timm's pre-norm Block with its "
                "standard Attention is supported (e.g. DINOv2, DeiT, CLIP, SigLIP ViTs)"
            )


def attention(attn, x: torch.Tensor, log_size: torch.Tensor | None = None):
    """timm ``Attention.forward`` with proportional attention; returns (output, q, k).

    ``x`` [1, T, C] (already ``norm1``-ed); ``log_size`` [T] is added to the
    logits of every query for each key (ToMe's proportional attention:
    ``softmax(q k^T * scale + log s)``), ``None`` adds nothing. q/k norms, the
    attention-output norm and the gate run as in timm. ``q``/``k`` are
    [1, H, T, d] after the q/k norms.
    """
    out, q, k = _attention(attn, x[0], log_size)
    return out[None], q[None], k[None]


def _attention(attn, x: torch.Tensor, log_size: torch.Tensor | None):
    """``attention`` on one sequence without its batch axis: x [T, C] -> (out [T, C], q, k [H, T, d]).

    The forward loop's form: every Python-level operation between two blocks'
    matrix multiplies costs tens of microseconds on a CPU (the multiplies
    leave the caches cold), so identity layers are not called at all.
    """
    t = x.shape[0]
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(x).view(t, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3).unbind(0)
    if not isinstance(attn.q_norm, nn.Identity):
        q = attn.q_norm(q)
    if not isinstance(attn.k_norm, nn.Identity):
        k = attn.k_norm(k)
    mask = None if log_size is None else log_size.to(q.dtype).view(1, 1, 1, t)
    # with a batch axis: the fused kernels (flash, memory-efficient) take 4-D inputs only
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]  # scale d^-0.5
    out = out.transpose(0, 1).reshape(t, attn.attn_dim)
    if not isinstance(attn.norm, nn.Identity):
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj(out), q, k


@numba.njit(cache=True, nogil=True)
def _merge_compiled(x, size, src, unm, dst, p, a0, new_x, new_size):  # pragma: no cover
    """``bipartite_merge``'s size-weighted merge of a given match, the same float32 steps in
    the same order, in one compiled call instead of ~12 small torch operations. ``x``
    [P + T, C], ``size`` [T]; fills ``new_x`` [P + T - r, C] and ``new_size`` [T - r]
    (torch's memory: its alignment suits the next block's matrix multiplies)."""
    keep, r, width = unm.shape[0], src.shape[0], x.shape[1]
    sb = size[1 - a0::2].copy()
    for j in range(r):
        sb[dst[j]] += size[a0 + 2 * src[j]]
    # rows copied element by element: a row slice per token cost ~2x at 577 tokens
    for i in range(p):
        for c in range(width):
            new_x[i, c] = x[i, c]
    for j in range(keep):
        row = p + a0 + 2 * unm[j]
        for c in range(width):
            new_x[p + j, c] = x[row, c]
    for j in range(sb.shape[0]):
        row = p + 1 - a0 + 2 * j
        for c in range(width):
            new_x[p + keep + j, c] = x[row, c]
    for j in range(r):
        coef = size[a0 + 2 * src[j]] / sb[dst[j]]
        ra, rb, out = p + a0 + 2 * src[j], p + 1 - a0 + 2 * dst[j], p + keep + dst[j]
        for c in range(width):
            new_x[out, c] += (x[ra, c] - x[rb, c]) * coef
    for j in range(keep):
        new_size[j] = size[a0 + 2 * unm[j]]
    new_size[keep:] = sb


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _unit_keys_compiled(rows, col, heads, width, p, a0, unit_a, unit_b):  # pragma: no cover
    """ToMe's matching metric from the keys: ``rows`` [P + T, *] (C order) holds head h's key of
    token i at ``rows[i, col + h * width:][:width]``; the patch-side keys summed over heads
    (the mean's cosines, one division less), made unit length and split into ToMe's A and
    B sets (``unit_a`` [|A|, D], ``unit_b`` [|B|, D]), in one pass."""
    row = np.empty(width, np.float32)
    for j in range(rows.shape[0] - p):
        keys = rows[p + j, col:col + heads * width]
        row[:] = keys[:width]
        for h in range(1, heads):
            for c in range(width):
                row[c] += keys[h * width + c]
        norm = np.float32(0.0)
        for c in range(width):
            norm += row[c] * row[c]
        norm = np.sqrt(norm)
        out = unit_a[(j - a0) // 2] if j % 2 == a0 else unit_b[(j - 1 + a0) // 2]  # position P + j even: A
        for c in range(width):
            out[c] = row[c] / norm


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _match_merge_compiled(scores, best, x, size, p, a0, r, sort_unm, new_x, new_size, new_log,
                          src, unm, dst):  # pragma: no cover
    """The rest of a block's ToMe step in one call, given the cosines ``scores`` [|A|, |B|]
    and each A token's best one, ``best`` [|A|] (row maxima): the r best edges merged (a
    stable order: ties keep position order, as torch's stable sort) into the first B token
    that reaches the maximum, the size-weighted merge (``_merge_compiled``) and the log
    sizes the next block's proportional attention adds ([P + T - r], prefix 0). A NaN
    cosine (keys summing to zero) is ordered and matched as torch orders it: NaN is the
    largest (its rows merge first, in position order) and a row's maximum is its first NaN."""
    na, nb = scores.shape
    key = -best  # ascending -cosine = descending cosine
    for i in range(na):
        if np.isnan(key[i]):
            key[i] = -np.inf  # torch's descending sort puts NaN first (cosines are never +inf)
    order = np.argsort(key, kind="mergesort")
    for j in range(r):
        i = order[j]
        src[j] = i
        at = 0
        if np.isnan(best[i]):
            while at < nb - 1 and not np.isnan(scores[i, at]):
                at += 1
        else:
            while at < nb - 1 and scores[i, at] != best[i]:
                at += 1
        dst[j] = at
    rest = np.sort(order[r:]) if sort_unm else order[r:]
    for j in range(na - r):
        unm[j] = rest[j]
    _merge_compiled(x, size, src, unm, dst, p, a0, new_x, new_size)
    for i in range(p):
        new_log[i] = 0.0
    for j in range(new_size.shape[0]):
        new_log[p + j] = np.log(new_size[j])


def _key_rows(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``k`` [H, P + T, D] as (rows, col) for ``_unit_keys_compiled``, without a copy when ``k``
    is the qkv output's view (rows: the whole qkv output, col: where the keys start)."""
    heads, t, width = k.shape
    step_h, row_len, step_c = k.stride()
    col = heads * width  # the keys sit after the queries
    base = k.storage_offset() - col
    if step_h == width and step_c == 1 and row_len >= 2 * col and base >= 0:
        try:
            return k.as_strided((t, row_len), (row_len, 1), base), col
        except RuntimeError:  # the rows would run past the storage: not a qkv output
            pass
    return k.transpose(0, 1).reshape(t, heads * width), 0


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
                    num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """One ToMe merge of the sequence ``x`` [P + T, C] (prefix first); ``size``, ``metric``: [T], [T, D].

    ToMe splits the whole sequence alternately (A: even positions, B: odd)
    with the prefix first, and keeps the CLS out by giving its scores -inf.
    We leave the ``num_prefix`` = P prefix tokens out of the matching instead
    but keep ToMe's parity: mergeable token j sits at position P + j, so it
    is in A when that is even. With one prefix token (CLS) or none this is
    exactly ToMe's split; registers are protected the same way. The ``r`` A
    tokens with the most cosine-similar edges (``bipartite_match``) fold into
    their B token by a size-weighted average (computed as B plus the weighted
    differences, so tokens that merge with nothing are copied exactly).
    Output order, as ToMe's: the prefix, the unmerged A tokens (sorted by
    position when there is a prefix, as ToMe does for a CLS model; else in
    order of decreasing similarity), then B.

    Returns (x [P + T - r, C], size [T - r], match): ``match`` = (src, unm,
    dst) in A/B positions, for ``merge_where``. ``r`` is capped at T // 2 (ToMe).
    On a CPU, in float32 and without autograd (the forward), the merge after
    the match is one compiled call (``_merge_compiled``, the same numbers bit
    for bit; tested against the torch operations).
    """
    p = num_prefix
    t = x.shape[0] - p
    r = min(r, t // 2)
    a0 = p % 2
    if r <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return x, size, (empty, torch.arange(len(range(a0, t, 2)), device=x.device), empty)
    metric = metric.float()
    unit = metric / metric.norm(dim=-1, keepdim=True)  # ToMe's expression (no epsilon)
    src, unm, dst = bipartite_match(unit[a0::2], unit[1 - a0::2], r)
    if p > 0:
        unm = unm.sort().values
    if (x.device.type == "cpu" and x.dtype == size.dtype == torch.float32
            and not torch.is_grad_enabled()):
        new_x, new_size = torch.empty(x.shape[0] - r, x.shape[1]), torch.empty(t - r)
        _merge_compiled(x.contiguous().numpy(), size.contiguous().numpy(), src.numpy(),
                        unm.numpy(), dst.numpy(), p, a0, new_x.numpy(), new_size.numpy())
        return new_x, new_size, (src, unm, dst)
    xa, xb = x[p + a0::2], x[p + 1 - a0::2]
    sa, sb = size[a0::2], size[1 - a0::2]
    s_src = sa.index_select(0, src)
    sb = sb.index_add(0, dst, s_src)
    coef = (s_src / sb.index_select(0, dst)).to(x.dtype)  # s_a / (s_b + sum of the s_a merged into b)
    delta = (xa.index_select(0, src) - xb.index_select(0, dst)) * coef[:, None]
    keep = unm.shape[0]
    new_x = torch.empty(p + keep + xb.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    new_x[:p] = x[:p]  # one pass over the tokens: every part is written into place
    torch.index_select(xa, 0, unm, out=new_x[p:p + keep])
    new_x[p + keep:] = xb
    new_x[p + keep:].index_add_(0, dst, delta)
    return new_x, torch.cat([sa.index_select(0, unm), sb]), (src, unm, dst)


def merge_on_keys(x: torch.Tensor, size: torch.Tensor, k: torch.Tensor, r: int,
                  num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor]:
    """One block's ToMe step from its keys: ``bipartite_merge`` with the keys ``k`` [H, P + T, d]
    summed over heads as the metric (the mean over heads: the same cosines, one division less).

    Returns (x [P + T - r, C], size [T - r], match, log_size [P + T - r]): ``log_size`` is
    what the next block's proportional attention adds (0 for the prefix). On a CPU in
    float32 without autograd the step is two compiled calls around one matrix multiply
    (``_unit_keys_compiled``, the cosines, ``_match_merge_compiled``: the same match as the
    torch operations up to the rounding of the cosines, the same merge bit for bit,
    tested); bf16 keys (a bf16 forward on a CPU) are read in float32 for it, so their sum
    over heads is not rounded to bf16 as the torch operations round it. Elsewhere (GPU,
    autograd) it runs as torch operations.
    """
    p = num_prefix
    t = x.shape[0] - p
    r = min(r, t // 2)
    if (r <= 0 or x.device.type != "cpu" or torch.is_grad_enabled()
            or not x.dtype == size.dtype == torch.float32 or k.dtype not in (torch.float32, torch.bfloat16)):
        new_x, new_size, match = bipartite_merge(x, size, k[:, p:].sum(dim=0), r, p)
        return new_x, new_size, match, F.pad(new_size.log(), (p, 0))
    a0 = p % 2
    na = len(range(a0, t, 2))
    unit_a, unit_b = torch.empty(na, k.shape[2]), torch.empty(t - na, k.shape[2])
    rows, col = _key_rows(k)
    if rows.dtype != torch.float32:  # bf16 keys (the residual stream stays float32): the keys' columns
        rows, col = rows[:, col:col + k.shape[0] * k.shape[2]].float(), 0  # in float32, one copy
    _unit_keys_compiled(rows.numpy(), col, k.shape[0], k.shape[2], p, a0, unit_a.numpy(), unit_b.numpy())
    if torch.is_autocast_enabled("cpu"):  # a bf16 forward: the cosines stay float32
        with torch.autocast("cpu", enabled=False):
            scores = unit_a @ unit_b.T
    else:
        scores = unit_a @ unit_b.T  # the steps over all T^2 / 4 edges: torch's, multithreaded
    best = scores.amax(dim=-1)
    new_x, new_size = torch.empty(x.shape[0] - r, x.shape[1]), torch.empty(t - r)
    new_log = torch.empty(p + t - r)
    src, dst = torch.empty(r, dtype=torch.long), torch.empty(r, dtype=torch.long)
    unm = torch.empty(na - r, dtype=torch.long)
    _match_merge_compiled(scores.numpy(), best.numpy(), x.contiguous().numpy(), size.contiguous().numpy(),
                          p, a0, r, p > 0, new_x.numpy(), new_size.numpy(), new_log.numpy(), src.numpy(),
                          unm.numpy(), dst.numpy())
    return new_x, new_size, (src, unm, dst), new_log


def merge_where(t: int, num_prefix: int, match: tuple) -> torch.Tensor:
    """[T]: the index each of the T tokens has after ``bipartite_merge`` returned ``match``."""
    src, unm, dst = match
    a0 = num_prefix % 2
    keep = unm.shape[0]
    device = unm.device
    where_a = torch.empty(keep + src.shape[0], dtype=torch.long, device=device)
    where_a[unm] = torch.arange(keep, device=device)
    where_a[src] = keep + dst
    where = torch.empty(t, dtype=torch.long, device=device)
    where[a0::2] = where_a
    where[1 - a0::2] = keep + torch.arange(len(range(1 - a0, t, 2)), device=device)
    return where


def attentive_keep(x: torch.Tensor, score: torch.Tensor, keep: int,
                   fuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's token reorganisation of ``x`` [T, C] by ``score`` [T] (CLS attention, head mean).

    The ``keep`` tokens with the highest score are kept, in order of
    decreasing score (``topk(sorted=True)``, as EViT). With ``fuse`` the rest
    become one token appended last: sum_i score_i * x_i over the dropped
    tokens -- EViT's rule (``extra_token``): a sum weighted by the raw
    attention, not renormalised. Without ``fuse`` they are discarded.

    Returns (x [keep (+1), C], top [keep]: the kept positions in output order).
    """
    top = torch.topk(score, keep, largest=True, sorted=True).indices
    out = x[top]
    if fuse and keep < x.shape[0]:
        dropped = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        dropped[top] = False
        fused = score[dropped].float() @ x[dropped].float()
        out = torch.cat([out, fused[None].to(x.dtype)])
    return out, top


def keep_where(t: int, top: torch.Tensor, fuse: bool) -> torch.Tensor:
    """[T]: each token's index after ``attentive_keep`` kept ``top``; the fused token's, or -1."""
    keep = top.shape[0]
    fill = keep if fuse and keep < t else -1
    where = torch.full((t,), fill, dtype=torch.long, device=top.device)
    where[top] = torch.arange(keep, device=top.device)
    return where


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, step: int = 1024) -> torch.Tensor:
    """Mean attention each token receives over all queries and heads, [T] (q, k: [H, T, d])."""
    total = q.shape[1]
    acc = torch.zeros(total, device=q.device)
    kt = k.float().transpose(-1, -2)
    for start in range(0, total, step):
        logits = (q[:, start:start + step].float() * scale) @ kt
        acc += logits.softmax(-1).sum(dim=(0, 1))
    return acc / (total * q.shape[0])


# ---------------------------------------------------------------- FLOPs


def _linear_macs(module: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def forward_flops(net, counts: Sequence[int], num_prefix: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward with patch-side ``counts`` [depth + 1].

    Patch embedding: 2 N (3 p^2) C. Block i, with t = P + counts[i] tokens at
    attention and t' = P + counts[i + 1] at the MLP (the reduction sits
    between them): 2 t sum(in x out over the attention's Linears: qkv, proj,
    gate) + 4 t^2 attn_dim (q k^T and attention @ v) + 2 t' sum(in x out
    over the MLP's Linears). For ViT-S (C = 384, MLP 1536): 2 t (4 C^2)
    + 4 t^2 C + 2 t' (8 C^2). Norms, softmax, activations and the matching
    itself are not counted.
    """
    pe = net.patch_embed.proj
    flops = 2.0 * counts[0] * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] * pe.out_channels
    for i, blk in enumerate(net.blocks):
        t, t_mlp = num_prefix + counts[i], num_prefix + counts[i + 1]
        flops += 2.0 * t * _linear_macs(blk.attn) + 4.0 * t * t * blk.attn.attn_dim
        flops += 2.0 * t_mlp * _linear_macs(blk.mlp)
    return flops


# ---------------------------------------------------------------- the forward loop


class _Tracks:
    """Per-patch membership, rebuilt after the forward from what each block recorded."""

    def __init__(self, n: int, device: torch.device):
        self.labels = torch.arange(n, device=device)  # patch -> token index, -1 discarded
        self.weight: torch.Tensor | None = None  # per-patch fusion weight (EViT), None: all 1

    def move(self, where: torch.Tensor, score: torch.Tensor | None = None, fused: int = -1) -> None:
        """Relabel patches by ``where`` [T_old] (old token -> new, -1 gone). Patches of a token
        that goes into the fused token ``fused`` have their weight multiplied by its ``score``."""
        old = self.labels.clamp(min=0)
        new = torch.where(self.labels >= 0, where[old], self.labels)
        if fused >= 0:
            weight = torch.ones_like(score[old]) if self.weight is None else self.weight
            self.weight = torch.where((self.labels >= 0) & (new == fused), weight * score[old], weight)
        self.labels = new


class _State:
    """What the block loop carries between blocks besides the tokens."""

    def __init__(self, n: int, device: torch.device):
        self.size = torch.ones(n, device=device)  # patch-side token sizes
        # [P + T]: log size, what proportional attention adds to the logits; None: all sizes 1
        self.log_size: torch.Tensor | None = None
        self.moves: dict[int, Callable[[_Tracks], None]] = {}  # block -> its relabelling, run afterwards
        self.scores: dict[int, torch.Tensor] = {}


# step(block index, x [P + T, C] after attention, q, k [H, P + T, d], state) -> x
Step = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, _State], torch.Tensor]


@torch.no_grad()
def _run(encoder, image, size: int, keep_aspect: bool, step: Step | None,
         strategy: str, params: dict, profile: bool = False,
         validate: Callable[[int], None] | None = None) -> InsideResult:
    """The block loop; ``validate(N)`` runs once the grid is known, before the network.

    timm's pre-norm block on the one sequence (no batch axis), in eval mode
    (drop-path and dropout are identities and not called), with the step
    between attention and MLP. The per-patch covers are not needed by the
    network: each block records its match, and the covers are rebuilt from
    those after the timed forward.
    """
    check_supported(encoder)
    resized, pixels, grid = encoder.preprocess(image, size, keep_aspect)
    net, p = encoder.blocks_net, encoder.num_prefix  # bf16: the copy with bf16 weights
    n = grid[0] * grid[1]
    if validate is not None:
        validate(n)
    dev = pixels.device
    gpu = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if gpu else (lambda: None)
    state = _State(n, dev)
    counts = [n]
    merge_s = 0.0
    bf16 = encoder.precision == "bf16"
    sync()
    start = TIMER()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        x = encoder.embed(pixels, net)[0]
        for i, blk in enumerate(net.blocks):
            a, q, k = _attention(blk.attn, blk.norm1(x), state.log_size)
            x = _residual(x, blk.ls1, a)
            if step is not None:
                if profile:
                    sync()
                t0 = TIMER()
                x = step(i, x, q, k, state)
                if profile:
                    sync()
                merge_s += TIMER() - t0
            counts.append(x.shape[0] - p)
            x = _residual(x, blk.ls2, _mlp(blk.mlp, blk.norm2(x)))
        x = net.norm(x)
    sync()
    forward_ms = (TIMER() - start) * 1e3
    tracks, covers = _Tracks(n, dev), []
    for i in range(len(net.blocks)):
        if i in state.moves:
            state.moves[i](tracks)
        covers.append(tracks.labels)
    x = x.float()
    tokens, prefix = x[p:].contiguous(), x[:p].contiguous()
    labels = tracks.labels
    sizes = torch.bincount(labels[labels >= 0], minlength=tokens.shape[0]).float()
    comp = _compression(tokens, tracks, sizes, strategy, params, forward_ms)
    return InsideResult(
        tokens=tokens, prefix=prefix, sizes=sizes, covers=covers, counts=counts,
        compression=comp, strategy=strategy, params=params, image=resized, grid=grid,
        patch_size=encoder.patch_size, has_cls=encoder.has_cls, forward_ms=forward_ms,
        merge_ms=None if gpu and not profile else merge_s * 1e3,
        flops=forward_flops(net, counts, p),
        plain_flops=forward_flops(net, [n] * (len(net.blocks) + 1), p), scores=state.scores,
        threads=torch.get_num_threads(),
    )


def _residual(x: torch.Tensor, scale: nn.Module, branch: torch.Tensor) -> torch.Tensor:
    """x + scale(branch), in place (x is the loop's own); LayerScale is usually folded
    into the linear layer before it at load, leaving an identity."""
    return x.add_(branch if isinstance(scale, nn.Identity) else scale(branch))


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Mlp`` without calling its identity layers (dropouts in eval, no norm); other
    MLP kinds (GLU, SwiGLU) run as they are."""
    if type(mlp) is not _timm_mlp():
        return mlp(x)
    x = mlp.act(mlp.fc1(x))
    if not isinstance(mlp.norm, nn.Identity):
        x = mlp.norm(x)
    return mlp.fc2(x)


def _timm_mlp() -> type:
    from timm.layers import Mlp

    return Mlp


def _compression(tokens, tracks: _Tracks, sizes: torch.Tensor, strategy: str, params: dict,
                 forward_ms: float) -> Compression:
    """[M, N] assign from the final covers: uniform over a token's patches (= size-weighted),
    fusion-weighted for EViT's fused token; discarded patches get no column mass."""
    labels = tracks.labels
    n = labels.shape[0]
    kept = (labels >= 0).nonzero().flatten()
    weight = torch.ones(n, device=labels.device) if tracks.weight is None else tracks.weight
    assign = torch.zeros(tokens.shape[0], n, device=labels.device)
    assign[labels[kept], kept] = weight[kept].float()
    assign = assign / assign.sum(dim=1, keepdim=True)
    return Compression(tokens=tokens, assign=assign, strategy=strategy, params=dict(params),
                       extra={"sizes": sizes}, elapsed_ms=forward_ms)


def plain_forward(encoder, image, size: int = 336, keep_aspect: bool = False,
                  profile: bool = False) -> InsideResult:
    """The reference: the same block loop with no reduction (its tokens equal ``encode``'s)."""
    return _run(encoder, image, size, keep_aspect, None, "plain", {"size": size}, profile)


def cut_forward(encoder, image, size: int = 336, counts: Sequence[int] = (),
                keep_aspect: bool = False) -> InsideResult:
    """The block loop with the patch-side count after block i cut to ``counts[i + 1]`` by
    dropping the last tokens: a reduction that costs nothing and chooses nothing.

    Not a method but a yardstick: the same loop, linear layers and attention at the same
    sizes as a method whose ``InsideResult.counts`` these are, with no matching, no
    scoring and no proportional attention. ``plain_forward``'s time over this one bounds
    the speed-up any method with these counts can reach on the machine; where that bound
    falls short of the FLOPs count's, the time goes to what FLOPs do not count (reading
    the weights, fixed costs per operation), not to the method. ``counts``: [depth + 1],
    ``counts[0]`` = N, never rising, at least 1.
    """
    depth = len(encoder.net.blocks)
    counts = [check_int(f"counts[{i}]", c, 1) for i, c in enumerate(counts)]
    if len(counts) != depth + 1 or any(b > a for a, b in zip(counts, counts[1:], strict=False)):
        raise ValueError(f"counts must be {depth + 1} patch-side counts that never rise, got {counts}")
    p = encoder.num_prefix

    def validate(n: int) -> None:
        if counts[0] != n:
            raise ValueError(f"counts[0] must be the {n} patches of this image at {size} px, got {counts[0]}")

    def step(i, x, _q, _k, state: _State) -> torch.Tensor:
        t, keep = x.shape[0] - p, counts[i + 1]
        if keep >= t:
            return x
        where = torch.arange(t, device=x.device)
        state.moves[i] = lambda tracks: tracks.move(torch.where(where < keep, where, -1))
        return x[:p + keep]

    params = {"counts": counts, "size": size, "keep_aspect": keep_aspect}
    return _run(encoder, image, size, keep_aspect, step, "cut", params, False, validate)


# ---------------------------------------------------------------- ToMe


def parse_r(r, depth: int) -> list[int]:
    """A per-block list of r, with the forms of ToMe's ``parse_r``.

    ``int``: the same r in every block. ``tuple`` (r, inflection): r per
    block rising (inflection +1) or falling (-1, the paper's "decreasing
    schedule") linearly from int(r (1 - inflection)) to 2 r minus that;
    (r, 0) is constant. ``list``: one r per block, padded with zeros.
    """
    if isinstance(r, list):
        if len(r) > depth:
            raise ValueError(f"r schedule has {len(r)} entries but the model has only {depth} blocks")
        values = [check_int(f"r[{i}]", v, 0) for i, v in enumerate(r)]
        return values + [0] * (depth - len(values))
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"a tuple r is ToMe's (r, inflection) pair; use a list for a per-block "
                             f"schedule, got {r!r}")
        base = check_int("r", r[0], 0)
        inflect = check_real("inflection", r[1], -1.0, 1.0)
        low = int(base * (1.0 - inflect))
        step = (2 * base - 2 * low) / (depth - 1) if depth > 1 else 0.0
        return [int(low + step * i) for i in range(depth)]
    return [check_int("r", r, 0)] * depth


def tome_counts(num_patches: int, schedule: Sequence[int]) -> list[int]:
    """Patch-side token counts before block 0 and after each block: T -> T - min(r, T // 2)."""
    counts = [num_patches]
    for r in schedule:
        t = counts[-1]
        counts.append(t - min(r, t // 2))
    return counts


def tome_forward(encoder, image, size: int = 336, r=8, keep_aspect: bool = False,
                 profile: bool = False) -> InsideResult:
    """Run ``encoder`` on ``image`` with ToMe in every block (Bolya et al., ICLR 2023).

    In each block, after attention and before the MLP: the matching metric
    is the block's keys (after any k-norm) averaged over heads (summed: the
    same cosines, one division less); A/B split, matching and size-weighted
    merge as ``bipartite_merge``; the prefix is never merged; ``r`` is capped
    at half the mergeable tokens of the block. Attention is proportional:
    log(size) is added to the logits for every key (prefix tokens have size
    1). ``r``: an int (the same in every block), ToMe's (r, inflection)
    schedule, or a per-block list (``parse_r``). Each r must be at most
    N // 2 (N patches), the first block's cap: more is refused. (The cap
    itself means ToMe never runs out of tokens: T - min(r, T // 2) >= 1.)
    ``profile``: on a GPU, synchronise around each merge so ``merge_ms`` is
    measured (slows the forward a little).
    """
    depth = len(encoder.net.blocks)
    schedule = parse_r(r, depth)
    p = encoder.num_prefix

    def validate(n: int) -> None:
        if max(schedule) <= n // 2:
            return
        if isinstance(r, tuple):  # a schedule: name the largest r whose blocks all stay within the cap
            top = largest_r(n, depth, r[1])
            raise ValueError(
                f"r must be between 0 and {top} for {n} patch tokens with the schedule (r, {r[1]:g}): "
                f"r = {r[0]} would merge {max(schedule)} in one block, and ToMe merges at most half "
                f"the mergeable tokens ({n // 2}) of a block"
            )
        raise ValueError(
            f"r must be between 0 and {n // 2} for {n} patch tokens (ToMe merges at most half the "
            f"mergeable tokens of a block), got {max(schedule)}"
        )

    def step(i, x, _q, k, state: _State) -> torch.Tensor:
        t = x.shape[0] - p
        if min(schedule[i], t // 2) <= 0:
            return x
        merged, state.size, match, state.log_size = merge_on_keys(x, state.size, k, schedule[i], p)
        state.moves[i] = lambda tracks: tracks.move(merge_where(t, p, match))
        return merged

    params = {"r": r, "schedule": schedule, "size": size, "keep_aspect": keep_aspect}
    return _run(encoder, image, size, keep_aspect, step, "tome_inside", params, profile, validate)


# ---------------------------------------------------------------- EViT


def evit_keep(keep_ratio: float, t: int) -> int:
    """EViT's kept count: ceil(keep_ratio * T), with EViT's own float expression."""
    return math.ceil(keep_ratio * t)


def prune_counts(num_patches: int, keep_ratio: float, depth: int, blocks: Sequence[int] = EVIT_BLOCKS,
                 fuse: bool = True) -> list[int]:
    """Patch-side counts before block 0 and after each block for ``prune_forward``."""
    counts = [num_patches]
    for i in range(depth):
        t = counts[-1]
        if i in blocks and evit_keep(keep_ratio, t) < t:
            t = evit_keep(keep_ratio, t) + (1 if fuse else 0)
        counts.append(t)
    return counts


def _check_blocks(blocks, depth: int) -> tuple[int, ...]:
    if isinstance(blocks, int | bool) or not isinstance(blocks, Sequence):
        raise ValueError(f"blocks must be a sequence of block indices, got {blocks!r}")
    out = tuple(check_int("block", b, 0, depth - 1) for b in blocks)
    if len(set(out)) != len(out):
        raise ValueError(f"blocks must not repeat a block, got {tuple(blocks)!r}")
    return out


def prune_forward(encoder, image, size: int = 336, keep_ratio: float = 0.7, blocks=EVIT_BLOCKS,
                  fuse: bool = True, keep_aspect: bool = False, profile: bool = False) -> InsideResult:
    """Run ``encoder`` on ``image`` with EViT-style pruning inside (Liang et al., ICLR 2022).

    At each block in ``blocks`` (0-based; EViT's default (3, 6, 9) is its
    4th, 7th and 10th layer, as in its ``--drop_loc``), after attention and
    before the MLP, the ceil(keep_ratio * T) patch-side tokens (a fused token
    from an earlier block counts as one, as in EViT) with the highest
    attention are kept (``attentive_keep``) and the rest fused into one token
    (``fuse=True``, EViT) or discarded. The score is the CLS token's attention
    averaged over heads (EViT), over the patch-side tokens only, so registers
    are never pruned; a model without CLS uses the mean attention each token
    receives from all queries (ours). No proportional attention (EViT has none).
    ``keep_ratio`` in (0, 1]; 1 (or no blocks) is the plain forward.
    """
    depth = len(encoder.net.blocks)
    blocks = _check_blocks(blocks, depth)
    if isinstance(keep_ratio, int | float) and not isinstance(keep_ratio, bool) and keep_ratio <= 0:
        raise ValueError(
            f"keep_ratio must be greater than 0 and at most 1, got {keep_ratio}: it would keep no patch "
            "token; any keep_ratio > 0 keeps at least ceil(keep_ratio * T) >= 1"
        )
    keep_ratio = check_real("keep_ratio", keep_ratio, 0.0, 1.0)
    p, has_cls = encoder.num_prefix, encoder.has_cls
    scale = encoder.net.blocks[0].attn.scale

    def step(i, x, q, k, state: _State) -> torch.Tensor:
        t = x.shape[0] - p
        keep = evit_keep(keep_ratio, t)
        if i not in blocks or keep >= t:
            return x
        if has_cls:
            logits = (q[:, :1].float() * scale) @ k.float().transpose(-1, -2)
            score = logits.softmax(-1)[:, 0, p:].mean(dim=0)
        else:
            score = received_attention(q, k, scale)[p:]
        state.scores[i] = score
        out, top = attentive_keep(x[p:], score, keep, fuse)
        state.moves[i] = lambda tracks: tracks.move(keep_where(t, top, fuse), score, keep if fuse else -1)
        return torch.cat([x[:p], out])

    params = {"keep_ratio": keep_ratio, "blocks": blocks, "fuse": fuse, "size": size,
              "keep_aspect": keep_aspect, "score": "cls" if has_cls else "received"}
    return _run(encoder, image, size, keep_aspect, step, "prune_inside", params, profile)


# ---------------------------------------------------------------- budgets and agreement


def _num_patches(num_patches) -> int:
    if isinstance(num_patches, tuple | list):
        return check_int("grid height", num_patches[0], 1) * check_int("grid width", num_patches[1], 1)
    return check_int("num_patches", num_patches, 1)


def _depth(depth) -> int:
    return check_int("depth", getattr(depth, "depth", depth), 1)


def largest_r(num_patches, depth, inflection: float = 0.0) -> int:
    """The largest r that ``tome_forward`` takes for ``num_patches`` (N or a grid): N // 2 for a
    constant r; for ToMe's schedule (r, ``inflection``) the largest whose every block's r is at
    most N // 2 (the decreasing schedule's first block merges 2 r: about N // 4)."""
    n, depth = _num_patches(num_patches), _depth(depth)
    if inflection == 0:
        return n // 2
    return max((r for r in range(n // 2, -1, -1) if max(parse_r((r, inflection), depth)) <= n // 2),
               default=0)


def r_for_budget(num_patches, budget: int, depth) -> int:
    """The constant r whose final patch-side count is nearest ``budget`` (ties: the smaller r).

    ``num_patches``: N or a grid (gh, gw); ``depth``: the block count or an
    ``Encoder``. Counts follow ``tome_counts``; no network is run.
    """
    n, depth = _num_patches(num_patches), _depth(depth)
    budget = check_int("budget", budget, 1, n)
    best, best_gap = 0, n
    for r in range(n // 2 + 1):
        final = tome_counts(n, [r] * depth)[-1]
        if abs(final - budget) < best_gap:
            best, best_gap = r, abs(final - budget)
        if final <= budget:  # the count only falls as r grows
            break
    return best


def keep_for_budget(num_patches, budget: int, depth, blocks=EVIT_BLOCKS, fuse: bool = True) -> float:
    """The keep ratio whose final ``prune_forward`` count is nearest ``budget`` (ties: the larger count).

    Of the ratios (multiples of 1e-6) that give that count, the largest is
    returned, so a budget reached at 0.7 gives 0.7 rather than 0.690001.
    Counts follow ``prune_counts``; no network is run.
    """
    n, depth = _num_patches(num_patches), _depth(depth)
    blocks = _check_blocks(blocks, depth)
    budget = check_int("budget", budget, 1, n)
    scale = 10**6

    def final(i: int) -> int:
        return prune_counts(n, i / scale, depth, blocks, fuse)[-1]

    def first(pred) -> int:  # the smallest i in [1, scale] with pred(final(i)); the count never falls
        lo, hi = 1, scale
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(final(mid)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    i = first(lambda c: c >= budget)
    target = final(i)
    if i > 1 and budget - final(i - 1) < target - budget:
        target = final(i - 1)
    if final(scale) <= target:
        return 1.0
    return (first(lambda c: c > target) - 1) / scale


def output_agreement(result: InsideResult, plain) -> dict:
    """How much of the plain forward survives at the output.

    ``plain``: ``plain_forward``'s result or the last-layer ``Encoding`` of the
    same image, size and model. ``patch_cosine``: mean over the patches that
    are still covered of cos(token covering the patch, the plain forward's
    token of that patch); discarded patches (pruning without fusion) are
    left out and counted in ``discarded_share``. ``cls_cosine``: cos of the
    two CLS outputs (``None`` without CLS).
    """
    labels = result.covers[-1] if result.covers else torch.arange(result.tokens.shape[0])
    if plain.tokens.shape[0] != labels.shape[0]:
        raise ValueError(f"plain has {plain.tokens.shape[0]} patch tokens, the result covers "
                         f"{labels.shape[0]}: run both on the same image, size and model")
    kept = labels >= 0
    ours = F.normalize(result.tokens.float()[labels[kept]], dim=-1)
    ref = F.normalize(plain.tokens.float().to(ours.device)[kept], dim=-1)
    cls = None
    if result.has_cls:
        cls = float(F.cosine_similarity(result.prefix[0].float(), plain.prefix[0].float().to(ours.device),
                                        dim=0))
    return {
        "patch_cosine": float((ours * ref).sum(-1).mean()) if kept.any() else float("nan"),
        "cls_cosine": cls,
        "discarded_share": float((~kept).float().mean()),
        "tokens": int(result.tokens.shape[0]),
        "flops_ratio": result.flops_ratio,
    }
