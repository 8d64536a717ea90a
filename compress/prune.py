"""Attention-based pruning and the selection strategies that followed it.

- ``prune_attention``: keep the top-k patches by an attention score (the seed).
- ``prumerge`` / ``prumerge_plus``: keep the CLS-attention outliers (IQR rule),
  fold key-similar patches into them (Shang et al., 2024).
- ``visionzip``: top-k dominant patches plus merged contextual tokens (Yang et al., 2024).
- ``divprune``: a maximally diverse subset, greedy max-min (Alvar et al., 2025).
- ``random_keep``: a seeded uniform random subset, the floor.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int, check_real
from .types import Compression, Encoding

SCORES = ("cls", "received", "query")
SCORE_NAMES = {"cls": "CLS attention", "received": "attention received",
               "query": "attention from the query patch"}


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
        extra={"scores": scores, "kept": kept, "parts": {SCORE_NAMES[score]: scores},
               "role": _roles(n, {"kept (top-k)": kept}, "dropped")},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )


def _roles(n: int, groups: dict[str, torch.Tensor], rest: str) -> list[str]:
    """A word per patch for the inspector: the first group (patch indices) that holds it, else ``rest``."""
    roles = [rest] * n
    for name, idx in reversed(list(groups.items())):
        for i in idx.tolist():
            roles[i] = name
    return roles


# --- PruMerge / PruMerge+ (Shang et al., 2024) -----------------------------------------

PRUMERGE_ATTENTION = ("concat", "mean", "received")
PRUMERGE_SCORE_NAMES = {"concat": "CLS attention (one softmax over the concatenated heads)",
                        "mean": "CLS attention (mean over heads)", "received": "attention received"}


def _prumerge_attention(enc: Encoding, attention: str) -> torch.Tensor:
    """Per-patch attention [N] that PruMerge ranks and weights by.

    ``"concat"``: as the official code, one softmax over the concatenated
    heads, ``softmax(q_cls . k / sqrt(H * d))`` over all P + N tokens, patches
    kept; ``"mean"``: the mean over heads of the per-head CLS attention;
    ``"received"``: mean attention received (for models without a CLS token).
    """
    check_choice("attention", attention, PRUMERGE_ATTENTION)
    if attention == "received":
        return attention_scores(enc, "received")
    if enc.cls_attn is None or (attention == "concat" and enc.num_prefix == 0):
        raise ValueError(
            f"model {enc.model!r} has no CLS token; use attention='received' for PruMerge"
        )
    if attention == "mean":
        return enc.cls_attn.float().mean(dim=0)
    heads, total, d = enc.k.shape
    q_cls = enc.q[:, 0].float().reshape(-1)  # [H * d]
    keys = enc.k.float().permute(1, 0, 2).reshape(total, heads * d)
    return ((keys @ q_cls) * (heads * d) ** -0.5).softmax(dim=0)[enc.num_prefix:]


def iqr_outliers(scores: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Bool mask [N] of the scores above Q3 + 1.5 IQR, and that bound.

    Quartiles by linear interpolation (``numpy.percentile``'s default, as the
    PruMerge code uses). Only the upper fence matters: low scores are pruned anyway.
    """
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    bound = q3 + 1.5 * (q3 - q1)
    return scores > bound, float(bound)


PRUMERGE_CODE_REVISION = "42Shawn/LLaVA-PruMerge@1ca8b2ba (clip_encoder.py)"


def plus_samples(n: int, outliers: int, per_outlier: float = 3.0, device=None) -> torch.Tensor:
    """PruMerge+'s spatially uniform sample positions: the authors' current code where it is
    well defined, evenly spaced beyond.

    The code (``token_prune_merge_advanced_plus``, revision ``PRUMERGE_CODE_REVISION``)
    takes ``step = int(1 / ratio)`` with ``ratio = outliers / N`` and samples the
    raster positions ``arange(0, 575, int(step / 3))``: from position 0, every
    ``stride = floor(floor(N / outliers) / 3)``-th patch, up to but excluding
    patch 575 -- the last patch of LLaVA-1.5's 576, so ``N - 1`` here. We take
    ``N // outliers`` in integers (the code's float ``1 / ratio`` equals it up to
    rounding), ``per_outlier`` in place of the code's 3, and ``outliers`` of 0
    as 1. For 576 patches and 32 outliers: stride 6, positions 0, 6, ..., 570 (96).
    An earlier revision (9d6586e3) started at ``int(step / 6)`` instead of 0.

    We follow the code while its stride is at least 2 (outliers <= N / 6 with
    the default 3 per outlier). Beyond that the code degenerates: stride 1
    samples every patch (no compression at all) and stride 0 fails. CLIP's
    penultimate block gives ~32 outliers of 576, but DINOv2's last block here
    gives 50-120, so we then take S = min(N, ceil(``per_outlier`` * outliers))
    evenly spaced positions floor((i + 1/2) N / S), i < S -- the code's "about
    3 samples per outlier" without its integer truncation (ours, not the code's).
    """
    outliers = max(outliers, 1)
    stride = math.floor((n // outliers) / per_outlier)
    if stride >= 2:
        return torch.arange(0, max(n - 1, 1), stride, device=device)
    count = min(n, math.ceil(per_outlier * outliers))
    i = torch.arange(count, device=device)
    return ((2 * i + 1) * n) // (2 * count)  # exact integer floor


def prumerge(
    enc: Encoding,
    plus: bool = False,
    neighbours: int = 32,
    attention: str = "concat",
    summary_token: bool = True,
    plus_ratio: float = 3.0,
) -> Compression:
    """LLaVA-PruMerge (Shang et al., 2024, arXiv:2403.15388); PruMerge+ with ``plus=True``.

    The rule, as the authors' code (``token_prune_merge_advanced[_plus]`` in
    their ``clip_encoder.py``) runs it:

    1. Score every patch by its CLS attention (``attention``, see below) and
       keep the IQR outliers: patches whose score is above Q3 + 1.5 IQR. The
       count adapts to the image; it is never fixed by a budget.
    2. PruMerge+ only: add spatially uniform samples, about ``plus_ratio`` (3
       in the code) per outlier, at the raster positions of the authors'
       current code (``plus_samples``: stride floor(floor(N / n) / 3) from
       position 0, so for 32 outliers of 576 patches 96 samples 0, 6, ...,
       570: about 25% of the tokens, the paper's PruMerge+ share, against
       ~5.5% for PruMerge); for n > N / 6, where the code's stride falls to
       1 (every patch), evenly spaced 3n samples instead. Samples that are
       already outliers are dropped.
    3. Merge: for each kept patch i, take its ``neighbours`` (32 in the code)
       most key-similar other patches -- kept or pruned, by cosine of the
       layer's keys concatenated over heads (the code's ``k_proj`` output) --
       and update x_i <- x_i + sum_j a_j x_j with a_j their attention. The
       code does not divide by the weights (the line is commented out), so
       the kept patch has weight 1 and its neighbours a_j (about 1/N each).
       To keep ``assign`` rows summing to 1 we divide by 1 + sum_j a_j: the
       same direction, a positive rescale; ``extra["scale"]`` holds the
       divisor so the code's value is ``tokens * scale``.
    4. With ``summary_token`` (the code always does it), one more token: the
       attention-weighted mean of all pruned patches (the code's
       ``extra_one_token``, again undivided there). So M = kept + 1.

    The paper's text describes step 3 as clustering the pruned tokens to the
    kept ones and a weighted average; we follow the code, which is what was
    evaluated. ``attention``: ``"concat"`` is the code's single softmax over
    the concatenated heads, q_cls . k / sqrt(H d); ``"mean"`` averages the
    per-head CLS attention; ``"received"`` (ours) uses the mean attention
    each patch receives, for models without a CLS token. If no patch is an
    outlier PruMerge keeps none and returns only the summary token (as the
    code would); PruMerge+ then spaces its samples as if n were 1. Without
    ``summary_token`` and with nothing kept, the top-scoring patch is kept.

    Which block: the code merges the penultimate block's output tokens (what
    LLaVA-1.5 feeds its language model, ``mm_vision_select_layer = -2``) and
    scores and matches them with q and k of the *last* block
    (``layers[23].self_attn`` of CLIP ViT-L/14), the block that reads them.
    An ``Encoding`` pairs a block's tokens with its own attention by
    default; ``Encoder.encode(image, layer=-2, attention_layer=-1)`` gives the
    authors' pairing. The app reads tokens and attention of the last block.

    Returns a ``Compression`` [M = kept (+1), C]: kept tokens in grid order,
    then the summary token. ``assign`` rows are soft: row i has 1/scale on
    patch i and a_j/scale on its neighbours. ``extra``: ``scores`` [N],
    ``bound``, ``outliers``, ``samples`` (plus only), ``kept``, ``neighbours``
    [K, k], ``scale`` [M].
    """
    if not isinstance(plus, bool):
        raise ValueError(f"plus must be True or False, got {plus!r}")
    if not isinstance(summary_token, bool):
        raise ValueError(f"summary_token must be True or False, got {summary_token!r}")
    n = enc.num_patches
    neighbours = check_int("neighbours", neighbours, 0)
    plus_ratio = check_real("plus_ratio", plus_ratio, 0.01, float(n))
    start = time.perf_counter()
    scores = _prumerge_attention(enc, attention)
    device = scores.device
    outlier_mask, bound = iqr_outliers(scores)
    outliers = outlier_mask.nonzero().flatten()
    keep_mask = outlier_mask.clone()
    samples = None
    if plus:
        cand = plus_samples(n, outliers.numel(), plus_ratio, device)
        samples = cand[~outlier_mask[cand]]
        keep_mask[samples] = True
    if not summary_token and not bool(keep_mask.any()):
        keep_mask[scores.argmax()] = True  # nothing to return otherwise: keep the top patch
    kept = keep_mask.nonzero().flatten()
    k = min(neighbours, n - 1)

    heads, total, d = enc.k.shape
    keys = enc.k[:, enc.num_prefix:].float().permute(1, 0, 2).reshape(n, heads * d)
    unit = F.normalize(keys, dim=-1)
    sims = unit[kept] @ unit.T  # [K, N]
    rows = torch.arange(kept.numel(), device=device)
    sims[rows, kept] = -math.inf  # a patch is not its own neighbour
    nbr = sims.topk(k, dim=1).indices  # [K, k]
    a = scores.float()
    nbr_w = a[nbr]  # [K, k]
    scale = 1.0 + nbr_w.sum(dim=1)  # [K]
    w = nbr_w / scale[:, None]
    assign = torch.zeros(kept.numel(), n, device=device)
    assign.scatter_(1, nbr, w)
    assign[rows, kept] = 1.0 / scale
    x = enc.tokens.float()
    tokens = x[kept] / scale[:, None]
    for slot in range(k):  # k neighbour slots, each one [K, C] gather: no [K, k, C] tensor
        tokens += w[:, slot, None] * x[nbr[:, slot]]

    pruned = ~keep_mask
    if summary_token and bool(pruned.any()):
        pw = torch.where(pruned, a, torch.zeros_like(a))
        total_w = pw.sum()
        # all-zero attention on the pruned patches (underflow): fall back to their plain mean
        pw = torch.where(total_w > 0, pw, pruned.float())
        row = pw / pw.sum()
        assign = torch.cat([assign, row[None]])
        tokens = torch.cat([tokens, (row @ x)[None]])
        scale = torch.cat([scale, total_w.reshape(1)])
    params = {"plus": plus, "neighbours": neighbours, "attention": attention,
              "summary_token": summary_token}
    if plus:
        params["plus_ratio"] = plus_ratio
    return Compression(
        tokens=tokens.to(enc.tokens.dtype),
        assign=assign,
        strategy="prumerge_plus" if plus else "prumerge",
        params=params,
        extra={"scores": scores, "bound": bound, "outliers": outliers, "samples": samples,
               "kept": kept, "neighbours": nbr, "scale": scale,
               "parts": {PRUMERGE_SCORE_NAMES[attention]: scores},
               "role": _roles(n, {"outlier (score above Q3 + 1.5 IQR)": outliers,
                                  "spatial sample (PruMerge+)": samples if samples is not None
                                  else outliers[:0],
                                  "folded into a kept token (key neighbour)": nbr.flatten()},
                              "pruned (in the summary token)")},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )


def prumerge_plus(enc: Encoding, **kwargs) -> Compression:
    """PruMerge+: ``prumerge(enc, plus=True, ...)``, outliers plus spatially uniform samples."""
    return prumerge(enc, plus=True, **kwargs)


# --- VisionZip (Yang et al., 2024) --------------------------------------------------------

VISIONZIP_DOMINANT_RATIO = 54 / 64  # the official LLaVA-1.5 setting: 54 dominant + 10 contextual


def visionzip(
    enc: Encoding,
    target: int,
    dominant_ratio: float = VISIONZIP_DOMINANT_RATIO,
    score: str = "cls",
) -> Compression:
    """VisionZip (Yang et al., 2024, arXiv:2412.04467): dominant + contextual tokens.

    The rule, as the authors' code runs it (the ``visionzip`` package's CLIP
    encoder and utilities, and its LLaVA demo ``dvlab-research/VisionZip``):

    - D = round(``dominant_ratio`` * ``target``) **dominant** tokens: the
      patches with the highest CLS attention summed over heads (ties: grid
      order). The official code also counts the CLS token itself as one of
      its dominant tokens; our outputs describe patches only, so all D go to
      patches. Default ratio 54/64, the paper's setting for LLaVA-1.5.
    - C = ``target`` - D **contextual** tokens from the R = N - D remaining
      patches, kept in grid order: targets are every ``max(1, R // C)``-th
      remaining patch (positions 0, step, 2 step, ..., the first C); every
      other remaining patch joins the target whose key is most cosine-similar
      (keys of the layer averaged over heads, as the code's ``metric``).
    - Each contextual token is, as in the code, ``x_target + mean(x_members)``
      (a target no patch joined stays ``x_target``: the code's counts are
      clamped to 1). Like PruMerge we keep ``assign`` rows summing to 1: the
      row puts 1/2 on the target and 1/(2 k) on each of its k members, the
      output token is ``assign @ x`` (the code's token halved: same
      direction), and ``extra["scale"]`` [M] holds the divisor (2, or 1 for
      dominant tokens and lone targets), so the code's value is
      ``tokens * scale[:, None]``.

    Which block: the authors pair the penultimate block's output tokens with
    that same block's attention and keys (``hidden_states[-2]`` and
    ``attentions[-2]`` of CLIP ViT-L/14 in LLaVA-1.5), so
    ``Encoder.encode(image, layer=-2)`` reproduces their setting exactly; the
    app's default reads the last block.

    ``score="received"`` (ours) ranks by mean attention received, for models
    without a CLS token. With C = 0 the remaining patches are dropped.

    Returns a ``Compression`` [target, C]: the dominant tokens (grid order,
    one-hot rows), then the contextual tokens (in target order).
    ``extra``: ``scores`` [N], ``dominant``, ``targets`` (patch indices),
    ``groups`` [N] (contextual group per patch, -1 for dominant or dropped),
    ``scale`` [target].
    """
    n = enc.num_patches
    target = check_int("target", target, 1, n)
    dominant_ratio = check_real("dominant_ratio", dominant_ratio, 0.0, 1.0)
    check_choice("score", score, ("cls", "received"))
    start = time.perf_counter()
    scores = attention_scores(enc, score)
    device = scores.device
    num_dom = min(target, round(dominant_ratio * target))
    num_ctx = target - num_dom
    order = torch.sort(scores, descending=True, stable=True).indices
    dominant = order[:num_dom].sort().values
    is_dom = torch.zeros(n, dtype=torch.bool, device=device)
    is_dom[dominant] = True
    remaining = (~is_dom).nonzero().flatten()  # grid order
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    labels[dominant] = torch.arange(num_dom, device=device)
    groups = torch.full((n,), -1, dtype=torch.long, device=device)
    targets = remaining[:0]
    if num_ctx > 0:
        r = remaining.numel()
        step = max(1, r // num_ctx)
        tpos = torch.arange(0, r, step, device=device)[:num_ctx]
        targets = remaining[tpos]
        is_target = torch.zeros(r, dtype=torch.bool, device=device)
        is_target[tpos] = True
        metric = F.normalize(enc.k[:, enc.num_prefix:].float().mean(dim=0), dim=-1)
        members = remaining[~is_target]
        group = torch.empty(r, dtype=torch.long, device=device)
        group[tpos] = torch.arange(num_ctx, device=device)
        group[~is_target] = (metric[members] @ metric[targets].T).argmax(dim=1)
        groups[remaining] = group
        labels[remaining] = num_dom + group
    # Each output row: 1 on a dominant patch; 1/2 on a target and 1/(2 k) on its k members
    # (the code's target + mean(members), halved); 1 on a target nobody joined.
    weight = torch.zeros(n, device=device)
    weight[dominant] = 1.0
    scale = torch.ones(target, device=device)
    if num_ctx > 0:
        members_per = torch.bincount(group, minlength=num_ctx) - 1  # minus the target itself
        scale[num_dom:] = torch.where(members_per > 0, 2.0, 1.0)
        is_member = groups >= 0
        is_member[targets] = False
        weight[targets] = 1.0 / scale[num_dom:]
        mem = is_member.nonzero().flatten()
        weight[mem] = 1.0 / (2.0 * members_per[groups[mem]].float())
    cols = (labels >= 0).nonzero().flatten()
    assign = torch.zeros(target, n, device=device)
    assign[labels[cols], cols] = weight[cols]
    tokens = assign @ enc.tokens.float()
    return Compression(
        tokens=tokens.to(enc.tokens.dtype),
        assign=assign,
        strategy="visionzip",
        params={"target": target, "dominant_ratio": dominant_ratio, "score": score},
        extra={"scores": scores, "dominant": dominant, "targets": targets, "groups": groups,
               "num_dominant": num_dom, "num_contextual": num_ctx, "scale": scale,
               "parts": {SCORE_NAMES[score]: scores},
               "role": _roles(n, {"dominant (top attention)": dominant,
                                  "contextual target": targets,
                                  "merged into a contextual token": (groups >= 0).nonzero().flatten()},
                              "dropped")},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )


# --- DivPrune (Alvar et al., CVPR 2025) ---------------------------------------------------


def cosine_gram(unit: torch.Tensor, block: int = 512) -> torch.Tensor:
    """The cosine matrix [N, N] of the rows of ``unit`` (unit vectors), exactly symmetric.

    Only the upper block-triangle is multiplied (the lower one is its
    transpose), about half the work of ``unit @ unit.T``: N = 4096 is 64 MB.
    """
    n = unit.shape[0]
    gram = torch.empty(n, n, device=unit.device, dtype=unit.dtype)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        blk = unit[i0:i1] @ unit[i0:].T  # rows i0..i1, columns i0..
        gram[i0:i1, i0:] = blk
        gram[i1:, i0:i1] = blk[:, i1 - i0:].T
    return gram


def _pick_roles(n: int, order: torch.Tensor) -> list[str]:
    roles = ["dropped"] * n
    for j, i in enumerate(order.tolist()):
        roles[i] = f"pick #{j + 1} (the farthest from the earlier picks)" if j else \
            "pick #1 (the patch whose nearest neighbour is farthest)"
    return roles


def divprune(enc: Encoding, target: int) -> Compression:
    """DivPrune (Alvar et al., CVPR 2025, arXiv:2503.02175): a maximally diverse subset.

    Greedy max-min selection on the cosine distance d(i, j) = 1 - cos(x_i, x_j)
    of the patch tokens (the official code runs it on the visual tokens the
    language model receives):

    - first pick: the patch whose nearest other patch is farthest,
      argmax_i min_{j != i} d(i, j) (the code's second-smallest distance per
      column, the smallest being the patch itself);
    - then, ``target`` - 1 times: next = argmax over the unselected patches of
      the minimum distance to the selected ones.

    Ties go to the earlier patch (``argmax`` returns the first). Unlike the
    code we exclude selected patches from later picks, so exact duplicates
    cannot be picked twice. Returns a ``Compression`` [target, C] with one-hot
    rows, kept tokens in grid order; ``extra["order"]`` is the pick order and
    ``extra["min_distance"]`` the distance each pick had to the earlier ones
    (for the first: to its nearest other patch).
    """
    n = enc.num_patches
    target = check_int("target", target, 1, n)
    start = time.perf_counter()
    unit = F.normalize(enc.tokens.float(), dim=-1)
    device = unit.device
    # Maximising the min distance 1 - cos is minimising the max cosine: work with cosines.
    gram = cosine_gram(unit)
    gram.fill_diagonal_(-math.inf)  # a patch is not its own neighbour
    first_sim = gram.amax(dim=1) if n > 1 else torch.ones(1, device=device)
    order = torch.empty(target, dtype=torch.long, device=device)
    best_sim = torch.empty(target, device=device)
    idx = first_sim.argmin()
    order[0] = idx
    best_sim[0] = first_sim[idx]
    max_sim = gram[idx].clone()
    max_sim[idx] = math.inf  # picked: never again
    for i in range(1, target):
        idx = max_sim.argmin()
        order[i] = idx
        best_sim[i] = max_sim[idx]
        max_sim = torch.maximum(max_sim, gram[idx])
        max_sim[idx] = math.inf
    kept = order.sort().values
    return Compression(
        tokens=enc.tokens[kept],
        assign=F.one_hot(kept, n).float(),
        strategy="divprune",
        params={"target": target},
        extra={"kept": kept, "order": order, "min_distance": 1.0 - best_sim,
               "parts": {"distance to the earlier picks when picked":
                         torch.full((n,), math.nan, device=device).index_put_(
                             (order,), 1.0 - best_sim)},
               "role": _pick_roles(n, order)},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )


# --- Random keep: the floor ---------------------------------------------------------------


def random_keep(enc: Encoding, target: int, seed: int = 0) -> Compression:
    """Keep ``target`` patches drawn uniformly at random without replacement.

    Seeded (a CPU ``torch.Generator``, so a seed gives the same patches on
    every device); kept tokens in grid order, one-hot ``assign``. The floor
    every other strategy must beat.
    """
    n = enc.num_patches
    target = check_int("target", target, 1, n)
    seed = check_int("seed", seed, 0, 2**63 - 1)
    start = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    kept = torch.randperm(n, generator=gen)[:target].sort().values.to(enc.tokens.device)
    return Compression(
        tokens=enc.tokens[kept],
        assign=F.one_hot(kept, n).float(),
        strategy="random_keep",
        params={"target": target, "seed": seed},
        extra={"kept": kept},
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )
