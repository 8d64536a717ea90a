"""Importance and diversity selection rules (2025): VisPruner, CDPruner, DART-style.

- ``vispruner``: the most CLS-attended patches, then diverse ones by rounds of
  dropping the most duplicated (Zhang et al., ICCV 2025).
- ``cdpruner``: the greedy MAP subset of a DPP whose kernel is the token
  similarity scaled by a relevance (Zhang et al., NeurIPS 2025).
- ``dart``: a few pivot patches, then the patches least similar to them
  (after Wen et al., EMNLP 2025; run on the vision tokens, hence "DART-style").

All three keep patches: one-hot ``assign`` rows, kept tokens in grid order,
exactly ``target`` of them. ``extra["parts"]`` holds, per patch [N], the
quantities the rule read to decide that patch (for the token inspector).
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int, check_real
from .knn import _offer, nearest
from .prune import attention_scores, query_index
from .types import Compression, Encoding

# --- VisPruner (Zhang et al., ICCV 2025) ---------------------------------------------------

VISPRUNER_IMPORTANT_RATIO = 0.5  # the authors' default (--important_ratio in their eval scripts)
VISPRUNER_PER_ROUND = 8  # at most this many duplicates are dropped per round (their constant)
_LIST = 48  # most-similar partners listed per token (a round reads them in order)
_RELIST = 128  # room per token: a token listed anew alone (its partners were dropped) lists this many


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dot(unit, i, j):  # pragma: no cover - compiled
    s = np.float32(0.0)
    for d in range(unit.shape[1]):
        s += unit[i, d] * unit[j, d]
    return s


@numba.njit(cache=True, nogil=True)
def _relist(unit, row, cur, lists, sims, in_b):  # pragma: no cover - compiled
    """Make ``row``'s list its most similar tokens among the survivors ``cur``; return its
    highest similarity to a B token (``in_b``)."""
    width = lists.shape[1]
    heap = np.full((1, width), -np.inf, dtype=sims.dtype)  # the best so far; root: the worst
    held = np.zeros((1, width), dtype=lists.dtype)
    worst = np.full(1, -np.inf, dtype=sims.dtype)
    best = -np.inf
    for t in range(cur.shape[0]):
        cos = _dot(unit, row, cur[t])
        if in_b[cur[t]]:
            best = max(best, cos)
        if cos > worst[0]:
            _offer(heap, held, worst, 0, cos, cur[t])
    order = np.argsort(-heap[0], kind="mergesort")
    for j in range(width):  # fewer survivors than the width: the rest is the token itself
        found = heap[0, order[j]] > -np.inf
        lists[row, j] = held[0, order[j]] if found else row
        sims[row, j] = heap[0, order[j]]
    return best


@numba.njit(cache=True, nogil=True)
def _descending(score):  # pragma: no cover - compiled
    """``np.argsort(-score, kind="stable")`` for float32 scores, by one sort of packed keys: the
    score's bits, made to order as unsigned integers (descending), above the position (ties in
    list order). Five times quicker than numba's merge sort here."""
    n = score.shape[0]
    bits = score.view(np.uint32)
    key = np.empty(n, dtype=np.uint64)
    for t in range(n):
        b = bits[t] if bits[t] != np.uint32(0x80000000) else np.uint32(0)  # -0.0 ties with 0.0
        up = (~b) if (b >> np.uint32(31)) else (b | np.uint32(0x80000000))  # ascending order
        key[t] = (np.uint64(~up & np.uint32(0xFFFFFFFF)) << np.uint64(32)) | np.uint64(t)
    key.sort()
    order = np.empty(n, dtype=np.int64)
    for t in range(n):
        order[t] = np.int64(key[t] & np.uint64(0xFFFFFFFF))
    return order


@numba.njit(cache=True, nogil=True)
def _rounds(unit, cur, keep, per_round, lists, sims, tok, last, dropped):  # pragma: no cover
    """VisPruner's rounds on ``cur`` (rows of ``unit``, in list order) until ``keep`` remain;
    returns them in list order. Compiled (numba).

    A token's score is its highest cosine to a B token: the first B token in its most-similar
    list ``lists``/``sims`` (descending; every unlisted survivor is at most as similar as the
    last listed one). When none of the listed is in B (its neighbours were dropped), the token
    is compared with every survivor and listed anew (``_relist``).
    ``tok`` maps rows to patch indices for ``last`` (each token's last A-side score) and
    ``dropped`` (the round that dropped it).
    """
    in_b = np.zeros(unit.shape[0], dtype=np.bool_)
    width = lists.shape[1]
    rnd = 0
    while True:
        size = cur.shape[0]
        r = min(per_round, size - keep)
        if r <= 0:
            return cur
        a, b = cur[0::2], cur[1::2]
        r = min(r, a.shape[0])
        for j in range(b.shape[0]):
            in_b[b[j]] = True
        score = np.empty(a.shape[0], dtype=sims.dtype)
        for t in range(a.shape[0]):
            row = a[t]
            found = False
            for j in range(width):
                if in_b[lists[row, j]]:
                    score[t] = sims[row, j]
                    found = True
                    break
            if not found:  # list the survivors anew for this token, then read B from them
                score[t] = _relist(unit, row, cur, lists, sims, in_b)
        order = _descending(score)  # stable: ties keep list order
        nxt = np.empty(size - r, dtype=cur.dtype)
        for t in range(a.shape[0]):
            last[tok[a[t]]] = score[t]
        for t in range(r):
            dropped[tok[a[order[t]]]] = rnd
        for t in range(r, a.shape[0]):
            nxt[t - r] = a[order[t]]
        nxt[a.shape[0] - r:] = b
        for j in range(b.shape[0]):
            in_b[b[j]] = False
        cur = nxt
        rnd += 1


def _residual_lists(near: tuple, tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each residual token's most-similar list among all patches (``near``: values and indices
    [N, k], best first) kept to its residual partners, as rows of ``tok`` (patch of each row),
    in the same order; the freed places at the end hold the row itself with -inf (never read).

    Still exact for the rounds: a residual partner missing from a list is at most as similar
    as the list's k-th (a patch), so at most as similar as any residual partner listed."""
    values, index = (v.cpu().numpy() for v in near)
    row_of = np.full(values.shape[0], -1, dtype=np.int64)
    row_of[tok] = np.arange(tok.size)
    rows = row_of[index[tok]]  # [R, k]: partners as rows, -1 for important patches
    first = np.argsort(rows < 0, axis=1, kind="stable")  # residual partners first, in order
    rows = np.take_along_axis(rows, first, axis=1)
    sims = np.take_along_axis(values[tok], first, axis=1).astype(np.float32)
    gone = rows < 0
    rows[gone] = np.broadcast_to(np.arange(tok.size)[:, None], rows.shape)[gone]
    sims[gone] = -np.inf
    return sims, rows


def _drop_duplicates(unit: torch.Tensor, residual: torch.Tensor, keep: int, per_round: int,
                     gram: torch.Tensor | None = None, near: tuple | None = None):
    """VisPruner's diversity rounds on ``residual`` (token indices in rank order) down to ``keep``.

    Each round splits the current list into A (even positions) and B (odd
    positions), scores each A token by its highest cosine to any B token, and
    drops the ``min(per_round, len - keep)`` highest-scoring A tokens; the
    list for the next round is the surviving A tokens by descending score,
    then B. ``unit``: the unit-length patch tokens [N, C]; ``gram``: their
    cosine matrix [N, N] if the encoding keeps it (the lists are then read
    from it instead of computed).
    Returns (the ``keep`` survivors in list order, each token's last A-side
    score [N] (NaN if never on side A), the round in which each token was
    dropped [N] (-1 if not)).

    The scores are exact: each token lists its ``_LIST`` most similar
    patches (``near``, ``knn.nearest`` over all N: no N x N matrix is kept;
    the encoding keeps these lists, so a new budget reuses them) less the
    important ones (``_residual_lists``), and a round
    reads the first listed token in B (``_rounds``, compiled: about
    (N - keep) / 8 small dependent rounds). A token none of whose listed
    tokens is in B is listed anew alone, among the survivors: its cosines are then summed in
    another order than the matrix product's, equal up to the last bit, and the rounds amplify
    such differences where cosines nearly tie (README, limits). (Listing all
    survivors anew when half are gone, as before, took 317 ms at N = 4096
    against 256 for relisting alone with lists of 48 instead of 32.)
    """
    device = unit.device
    n = unit.shape[0]
    tok = residual.cpu().numpy().astype(np.int64)  # row -> patch
    pick = torch.from_numpy(tok)
    rows = unit.detach().float().cpu()[pick].contiguous()
    if gram is not None:
        sims, lists = gram.cpu()[pick][:, pick].topk(min(_LIST, tok.size), dim=1)
        sims, lists = sims.numpy(), lists.numpy()
    else:
        sims, lists = _residual_lists(near or nearest(unit, _LIST, "dot"), tok)
    # Room for _RELIST partners; the rest of each row is the token itself (never in B when it is
    # scored, so never read as a partner).
    width = min(_RELIST, tok.size)
    room = np.repeat(np.arange(tok.size, dtype=np.int64)[:, None], width, axis=1)
    room_sims = np.full((tok.size, width), -np.inf, dtype=np.float32)
    k = min(lists.shape[1], width)
    room[:, :k] = lists[:, :k]
    room_sims[:, :k] = sims[:, :k]
    last = np.full(n, np.nan, dtype=np.float32)
    dropped = np.full(n, -1, dtype=np.int64)
    cur = _rounds(rows.numpy(), np.arange(tok.size, dtype=np.int64), keep, per_round, room,
                  room_sims, tok, last, dropped)
    return (torch.from_numpy(tok[cur]).to(device), torch.from_numpy(last).to(device),
            torch.from_numpy(dropped).to(device))


def vispruner(
    enc: Encoding,
    target: int,
    important_ratio: float = VISPRUNER_IMPORTANT_RATIO,
    score: str = "cls",
    per_round: int = VISPRUNER_PER_ROUND,
) -> Compression:
    """VisPruner (Zhang et al., ICCV 2025, arXiv:2412.01818): important, then diverse patches.

    Checked against the authors' code, ``LlavaMetaForCausalLM.encode_images``
    in ``llava/model/llava_arch.py`` of Theia-4869/VisPruner (the CLS row of
    the vision tower's attention is taken in ``feature_select`` of
    ``clip_encoder.py``, read in anonymous-4869/VisPruner, the same code's
    first release). The rule:

    1. T_imp = int(``target`` * ``important_ratio``) **important** patches:
       the highest CLS attention, mean over heads. Default ratio 0.5, the
       argparse default of their eval scripts (their README also runs 0.75).
    2. The other patches, in descending attention order, lose duplicates in
       rounds until T_div = ``target`` - T_imp remain: split the list into A
       (even positions) and B (odd positions); score each A patch by its
       highest cosine similarity to a B patch; drop the min(8, len - T_div)
       highest-scoring A patches; the next list is the surviving A patches by
       descending score, then B. The survivors are the **diverse** patches.

    Where we differ: the authors read the CLS attention and the tokens of
    CLIP's penultimate block (LLaVA's ``mm_vision_select_layer = -2``); we
    read the encoding's own layer (by default the last block, whose tokens
    are DINOv2's final-norm tokens). Ties are broken by grid order (their
    ``argsort`` is not stable). Their code gathers the kept A patches with
    an index expanded to R // 2 - r columns, which fails when the list
    length R is odd (A then has R // 2 + 1 patches, e.g. when N - T_imp is
    odd); we take A as the even positions whatever R is, and when a round
    would drop more than A holds (few patches left) we drop all of A.
    ``score="received"`` (ours) ranks by mean attention received, for
    models without a CLS token.

    Returns a ``Compression`` [target, C], one-hot rows, kept tokens in grid
    order. ``extra``: ``parts`` {``importance``: the ranked attention [N],
    ``duplication``: each patch's last A-side score, its highest cosine to
    B in the last round it was scored (NaN if never on side A)}; ``role``
    [N] (0 dropped, 1 important, 2 diverse); ``dropped_round`` [N] (-1 if
    not dropped by a round); ``important``, ``diverse`` (patch indices).
    """
    n = enc.num_patches
    target = check_int("target", target, 1, n)
    important_ratio = check_real("important_ratio", important_ratio, 0.0, 1.0)
    check_choice("score", score, ("cls", "received"))
    per_round = check_int("per_round", per_round, 1)
    if score == "cls" and enc.cls_attn is None:
        raise ValueError(f"model {enc.model!r} has no CLS token; use score='received' for VisPruner")
    start = time.perf_counter()
    importance = attention_scores(enc, score)
    device = importance.device
    num_imp = int(target * important_ratio)
    num_div = target - num_imp
    ranked = torch.sort(importance, descending=True, stable=True).indices
    important, residual = ranked[:num_imp], ranked[num_imp:]
    duplication = torch.full((n,), math.nan, device=device)
    dropped_round = torch.full((n,), -1, dtype=torch.long, device=device)
    if num_div == 0:
        diverse = residual[:0]
    elif residual.numel() == num_div:
        diverse = residual
    else:
        # Only residual patches are listed: a patch is never compared with itself or an important
        # patch (neither is ever on side B when it is scored).
        gram = near = None
        if enc.keeps_gram:
            gram = enc.cosine_gram()  # kept with the encoding, shared
        else:  # every patch's nearest, kept with the encoding for the next budget (2.4 MB at N 4096)
            near = enc.remember(("nearest_dot", _LIST), lambda: nearest(enc.unit_tokens(), _LIST,
                                                                        "dot"))
        diverse, duplication, dropped_round = _drop_duplicates(enc.unit_tokens(), residual, num_div,
                                                               per_round, gram, near)
    role = torch.zeros(n, dtype=torch.long, device=device)
    role[important] = 1
    role[diverse] = 2
    kept = (role > 0).nonzero().flatten()
    return Compression(
        tokens=enc.tokens[kept],
        assign=F.one_hot(kept, n).float(),
        strategy="vispruner",
        params={"target": target, "important_ratio": important_ratio, "score": score,
                "per_round": per_round},
        extra={"kept": kept, "parts": {"importance": importance, "duplication": duplication},
               "role_code": role, "dropped_round": dropped_round,
               "role": [("dropped", "important (top attention)", "diverse (survived the duplicate "
                         "rounds)")[r] for r in role.tolist()],
               "important": important.sort().values, "diverse": diverse.sort().values},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )


# --- CDPruner (Zhang et al., NeurIPS 2025) -------------------------------------------------

_DPP_EXHAUSTED = 1e-10  # conditional variance below which no new direction is left (Chen et al.)


def _cdp_roles(n: int, order: list[int], picks: int) -> list[str]:
    roles = ["dropped"] * n
    for j, i in enumerate(order):
        roles[i] = (f"pick #{j + 1} (the largest conditional gain then)" if j < picks
                    else "filled by relevance (the kernel had no new direction left)")
    return roles


def relevance_to(enc: Encoding, query) -> torch.Tensor:
    """Relevance [N] in (0, 1] of every patch to the query patch: min-max scaled cosine.

    q_i = (s_i - min s + 1e-6) / (max s - min s + 1e-6) with s_i the cosine
    of patch i's token to the query patch's token, so the query itself (and
    any exact copy) gets 1 and the least similar patch about 1e-6 / range.
    """
    unit = F.normalize(enc.tokens.float(), dim=-1)
    sims = unit @ unit[query_index(enc, query)]
    lo, hi = sims.min(), sims.max()
    return (sims - lo + 1e-6) / (hi - lo + 1e-6)


def cdpruner(enc: Encoding, target: int, query=None) -> Compression:
    """CDPruner (Zhang et al., NeurIPS 2025, arXiv:2506.10967): a conditional DPP's greedy MAP.

    Kernel L = diag(q) S diag(q) with S_ij the cosine similarity of patch
    tokens i and j and q a relevance in (0, 1]; the kept set is the greedy
    MAP of the DPP: each step adds the patch with the largest conditional
    variance d_j^2 = det(L_{S+j}) / det(L_S) (the log-det gain is log d_j^2),
    by the incremental Cholesky update of fast greedy MAP inference (Chen et
    al., NeurIPS 2018), O(N * step) per step.

    Checked against the authors' code, ``LlavaMetaForCausalLM.encode_images``
    in ``llava/model/llava_arch.py`` of Theia-4869/CDPruner: the same kernel
    and update, S the cosine of the projected visual tokens, relevance
    min-max scaled, (r - min + 1e-6) / (max - min); no stopping rule. Where
    we differ:

    - Relevance. The authors relate each patch to the instruction: in their
      code r_i is the mean over text tokens of the *negated* CLIP cosine
      between the patch's CLIP image embedding and the text embedding
      (``(-relevance)``), where the paper (section 3.3, which their reply in
      issue #5 points to; only its abstract is in our index) speaks of the
      patches relevant to the instruction; asked about the sign in issue
      #14, they answer that they observed this with CLIP in LLaVA only (and
      point to issue #9). An exponential reweighting with a trade-off theta
      is commented out in their code, so their kernel uses r as is, as we
      do. We have no text tower, so ``query`` is a patch: an index or
      (row, col) as in ``prune.query_index``, and q_i is the min-max scaled
      *plain* cosine of patch i to it (``relevance_to``), so patches like
      the clicked one are favoured. We also add the 1e-6 to the denominator so q stays <= 1 and
      a constant similarity gives q = 1 rather than a division by zero.
      ``query=None`` sets q = 1: pure diversity, the DPP on S alone.
    - The diagonal. S_ii = 1 exactly (their code reads it from the computed
      Gram, with rounding noise), so with q = 1 the first pick is patch 0 and
      ties always go to the earlier patch.
    - Rank. S has rank at most C (384 for ViT-S, fewer than 576 patches):
      once every remaining d_j^2 is below 1e-10 (the stopping threshold of
      Chen et al.'s reference code) the DPP has no new direction to add, and
      their code would go on dividing by the root of a rounding-noise d_j^2
      (NaN where it is negative; with their 4096-wide projected tokens and
      576 patches it does not arise). We stop the DPP there and fill the
      rest of the budget by descending relevance, then grid order, so the
      count is exactly ``target``. The update runs in float64 so that this
      threshold separates a spent kernel from a real, small gain.

    Returns a ``Compression`` [target, C], one-hot rows, kept tokens in grid
    order. ``extra``: ``parts`` {``relevance``: q [N], ``marginal_gain``: d_j^2
    at the step patch j was picked (NaN if never picked; ~0 for the fill)};
    ``order``: the pick order [target]; ``dpp_picks``: how many came from the
    DPP before the fill; ``query``: the query patch index or None.
    """
    n = enc.num_patches
    target = check_int("target", target, 1, n)
    qi = None if query is None else query_index(enc, query)
    start = time.perf_counter()
    device = enc.tokens.device
    relevance = torch.ones(n, device=device) if qi is None else relevance_to(enc, qi)
    # float64 everywhere but MPS, which has none: run the small greedy loop on the CPU there.
    work = torch.device("cpu") if device.type == "mps" else device
    rel = relevance.to(work, torch.float64)
    x = F.normalize(enc.tokens.to(work, torch.float64), dim=-1) * rel[:, None]  # L = x x^T
    d2 = rel * rel  # L_jj = q_j^2 (S_jj = 1)
    chol = torch.zeros(target, n, dtype=torch.float64, device=work)
    order = torch.empty(target, dtype=torch.long, device=work)
    gain = torch.full((n,), math.nan, dtype=torch.float64, device=work)
    picks = 0
    while picks < target:
        j = int(d2.argmax())
        dj = float(d2[j])
        if dj <= _DPP_EXHAUSTED:
            break
        order[picks] = j
        gain[j] = dj
        e = (x @ x[j] - chol[:picks].T @ chol[:picks, j]) / math.sqrt(dj)
        chol[picks] = e
        d2 -= e * e
        d2[j] = -math.inf
        picks += 1
    if picks < target:  # the kernel is spent: fill by relevance, then grid order
        rest = torch.isfinite(d2).nonzero().flatten()
        rest = rest[torch.sort(rel[rest], descending=True, stable=True).indices][: target - picks]
        order[picks:] = rest
        gain[rest] = d2[rest].clamp(min=0.0)
    order = order.to(device)
    kept = order.sort().values
    return Compression(
        tokens=enc.tokens[kept],
        assign=F.one_hot(kept, n).float(),
        strategy="cdpruner",
        params={"target": target, "query": qi},
        extra={"kept": kept, "order": order, "dpp_picks": picks, "query": qi,
               "parts": {"relevance": relevance, "marginal_gain": gain.to(device, torch.float32)},
               "role": _cdp_roles(n, order.tolist(), picks)},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )


# --- DART-style (after Wen et al., EMNLP 2025) ----------------------------------------------

DART_PIVOTS = 4  # the authors' image pivots (--pivot_image_token 4; plus 4 text pivots there)
DART_PIVOT_BY = ("key_norm", "cls")


def key_norms(enc: Encoding) -> torch.Tensor:
    """L1 norm of each patch's key, heads concatenated, [N] (DART's pivot score)."""
    keys = enc.k[:, enc.num_prefix:].float()  # [H, N, d]
    return keys.abs().sum(dim=(0, 2))


def _dart_roles(owner: torch.Tensor, pivots: torch.Tensor) -> list[str]:
    roles = ["dropped" if o < 0 else f"kept: among the least similar to pivot #{o + 1}"
             for o in owner.tolist()]
    for j, p in enumerate(pivots.tolist()):
        roles[p] = f"pivot #{j + 1}"
    return roles


def dart(enc: Encoding, target: int, pivots: int = DART_PIVOTS, pivot_by: str = "key_norm") -> Compression:
    """DART-style selection (after Wen et al., EMNLP 2025, arXiv:2502.11494): pivots, then the
    patches least similar to them.

    DART itself prunes inside the language model (at its layer 2, on the
    image tokens of the LLM's sequence); ours runs on the vision tokens of
    the encoding, so it is labelled "DART-style". The rule:

    1. P = min(``pivots``, ``target``) **pivots**: the patches with the
       largest key norm (``pivot_by="key_norm"``: L1 norm of the layer's key,
       heads concatenated, as the authors' code) or CLS attention (``"cls"``,
       mean over heads; needs a CLS token).
    2. The rest of the budget, ``target`` - P, is split over the pivots as
       evenly as possible (the first pivots take the remainder); pivot by
       pivot, in descending pivot score, each takes its share of the
       not-yet-kept patches **least** cosine-similar to it (ties: grid order).

    The authors' code was read in two copies, because ZichenWen1/DART is in
    our index with its README only: ``get_retained_image_token`` in
    ``llava/model/language_model/modeling_llama_self.py`` of
    xqy1111111/DART (a fork with the same README) and in
    ``llmc/compression/token_reduction/dart.py`` of ModelTC/llmc. There the
    pivots are the 4 image tokens and 4 text tokens with the largest L1 key
    norm (``--pivot_image_token 4 --pivot_text_token 4``); each of the 8
    takes ``max_num_trunction // 8`` image tokens (128 // 8 = 16) by
    ``topk`` of the negated cosine of the LLM's final-norm hidden states;
    the image pivots are kept as well. Where we differ: no text tokens, so
    all pivots are image pivots and they share the whole budget, which is
    met exactly; we read the encoding's layer keys and its tokens (DINOv2
    final-norm tokens at the last block) instead of an LLM layer's; the
    pivots take their shares in descending score order (the code iterates a
    Python set).

    Returns a ``Compression`` [target, C], one-hot rows, kept tokens in grid
    order. ``extra``: ``parts`` {``pivot_similarity``: each patch's highest
    cosine to a pivot [N], and the pivot score, ``key_norm`` or
    ``cls_attention`` [N]}; ``pivots`` (patch indices, descending score);
    ``owner`` [N] (the pivot, by position in ``pivots``, that kept each
    patch; pivots own themselves; -1 dropped).
    """
    n = enc.num_patches
    target = check_int("target", target, 1, n)
    pivots = check_int("pivots", pivots, 1, n)
    check_choice("pivot_by", pivot_by, DART_PIVOT_BY)
    if pivot_by == "cls" and enc.cls_attn is None:
        raise ValueError(f"model {enc.model!r} has no CLS token; use pivot_by='key_norm' for DART")
    start = time.perf_counter()
    if pivot_by == "key_norm":
        pivot_score, part = key_norms(enc), "key_norm"
    else:
        pivot_score, part = attention_scores(enc, "cls"), "cls_attention"
    device = pivot_score.device
    p = min(pivots, target)
    piv = torch.sort(pivot_score, descending=True, stable=True).indices[:p]
    unit = F.normalize(enc.tokens.float(), dim=-1)
    sims = unit[piv] @ unit.T  # [P, N]
    owner = torch.full((n,), -1, dtype=torch.long, device=device)
    owner[piv] = torch.arange(p, device=device)
    rest = target - p
    for i in range(p):
        share = rest // p + (1 if i < rest % p else 0)
        if share == 0:
            continue
        free = torch.where(owner < 0, sims[i], math.inf)
        pick = torch.sort(free, stable=True).indices[:share]
        owner[pick] = i
    kept = (owner >= 0).nonzero().flatten()
    return Compression(
        tokens=enc.tokens[kept],
        assign=F.one_hot(kept, n).float(),
        strategy="dart",
        params={"target": target, "pivots": pivots, "pivot_by": pivot_by},
        extra={"kept": kept, "pivots": piv, "owner": owner,
               "parts": {"pivot_similarity": sims.amax(dim=0), part: pivot_score},
               "role": _dart_roles(owner, piv)},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )


def compile_kernels() -> None:
    """Compile the compiled loops (VisPruner's rounds, ``knn.nearest``, the ToMe merge and step
    inside the ViT), or load them from numba's cache: ~25 s once after a fresh checkout, so the
    app runs this at start-up, in the background, and no request waits for it."""
    from .inside import bipartite_merge, merge_on_keys  # here: inside imports this module

    gen = torch.Generator().manual_seed(0)
    unit = F.normalize(torch.randn(40, 4, generator=gen), dim=1)
    _drop_duplicates(unit, torch.arange(40), 4, 8)  # compiles _rounds and what it calls
    nearest(unit, 2, "sqdist", panel=8, with_extreme=True)
    with torch.no_grad():
        bipartite_merge(torch.randn(41, 4, generator=gen), torch.ones(40), unit, 4, num_prefix=1)
        keys = torch.randn(41, 3, 2, 4, generator=gen).permute(1, 2, 0, 3)[1]  # as a qkv output's view
        merge_on_keys(torch.randn(41, 4, generator=gen), torch.ones(40), keys, 4, num_prefix=1)
