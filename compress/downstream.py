"""From a Compression back to the patch grid, and what a trained head downstream makes of it.

- ``patch_tokens``: every patch gets the output token that represents it,
  so a head that reads tokens on the grid can read a compression.
- ``task_agreement``: the head's output on those tokens against its output
  on the original tokens (``compress.metrics.saliency_agreement`` for the
  saliency head).
- ``agreement_sweep``: that agreement for every strategy over the sweep's
  budgets, batched, with progress; ``compress.registry.fidelity_sweep``'s twin.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int
from .heads import Head
from .registry import STRATEGIES, sweep_budgets
from .types import Compression, Encoding

DROPPED = ("key", "position", "zero", "mean")
# The default for patches no output covers: what a model that sees only the kept tokens (with their
# positions) has there. "key" picks with the dropped patch's own key, which such a model never gets:
# on the five sample photos it lifts CLS pruning's saliency CC at M = 64 from 0.27 to 0.90.
DEFAULT_DROPPED = "position"
# Maps per head forward in the sweep, by device. On a quiet 2-thread AVX2 CPU single maps were the
# fastest (bench/bench_head.py: 55 ms per map against 74 in batches of 8; an earlier run on a loaded
# CPU had favoured batches); on a GPU a batch fills the device. Memory stays bounded:
# ``SaliencyHead`` splits big batches.
SWEEP_BATCH = {"cpu": 1, "cuda": 8}


def sweep_batch(device: torch.device) -> int:
    """Maps per head forward for tokens on ``device`` (``SWEEP_BATCH``; 8 on other devices)."""
    return SWEEP_BATCH.get(device.type, 8)


def output_vectors(enc: Encoding, comp: Compression) -> torch.Tensor:
    """The outputs as vectors in the encoder's token space, [M, C].

    ``comp.tokens`` for every strategy whose outputs are patch-token
    combinations (merging, pruning, pooling, PruMerge, whose tokens are rows
    of ``assign @ tokens``); for outputs in another space -- flagged by
    ``comp.extra["latent_space"]``, as the Perceiver Resampler sets it -- what
    each gathered there, ``comp.represented(enc.tokens)``.
    """
    if comp.num_in != enc.num_patches:
        raise ValueError(f"the compression has {comp.num_in} input patches, the encoding "
                         f"{enc.num_patches}: it was made from another encoding")
    if comp.extra.get("latent_space"):
        return comp.represented(enc.tokens.float())
    if comp.tokens.shape[-1] != enc.dim:
        raise ValueError(f"the compression's tokens are {comp.tokens.shape[-1]} wide, the encoding's "
                         f"{enc.dim}: set extra['latent_space'] = True for outputs in another space")
    return comp.tokens.float()


def patch_tokens(enc: Encoding, comp: Compression, dropped: str = DEFAULT_DROPPED) -> torch.Tensor:
    """Every patch's representing output token, [N, C] in grid order: what a head reads.

    With A = ``comp.assign`` [M, N] and V = ``output_vectors(enc, comp)`` [M, C]:

    - a patch n that some output covers (column sum of A > 0) gets the mix of
      the outputs covering it, weighted by A[:, n] renormalised over the
      outputs: sum_m A[m, n] V[m] / sum_m A[m, n]. For hard merge rows (a
      patch in exactly one cluster) this is its cluster's token; for a kept
      patch under one-hot pruning, the kept token itself; for soft rows (the
      resampler, PruMerge's neighbour folding) a blend of the outputs that
      drew on the patch, in proportion to how much each drew on it.
    - a patch no output covers (dropped by pruning) gets, by ``dropped``:
      ``"position"`` (the default, ``DEFAULT_DROPPED``): the output nearest on
      the grid (Euclidean distance from the patch's (row, col) to the output's
      centre, ``A[m] @ patch positions``; ties to the earlier output) -- only
      what a model that sees the kept tokens with their positions has.
      ``"key"``: the output whose key is most cosine-similar to the patch's
      key (keys of the encoding's layer averaged over heads, ToMe's metric; an
      output's key is ``A[m] @ patch_keys``; ties to the earlier output).
      Optimistic: it picks with the dropped patch's own key, which a model
      that sees only the kept tokens never gets. ``"zero"``: a zero vector.
      ``"mean"``: the mean of the M output vectors.
    """
    check_choice("dropped", dropped, DROPPED)
    vectors = output_vectors(enc, comp)
    assign = comp.assign.to(vectors.device).float()
    cover = assign.sum(dim=0)  # [N]
    covered = cover > 0
    weights = assign / torch.where(covered, cover, torch.ones_like(cover))
    out = weights.T @ vectors  # uncovered patches: zero rows, filled below
    if bool(covered.all()) or dropped == "zero":
        return out
    missing = (~covered).nonzero().flatten()
    if dropped == "mean":
        out[missing] = vectors.mean(dim=0)
        return out
    out[missing] = vectors[nearest_outputs(enc, comp, missing, dropped)]
    return out


def nearest_outputs(enc: Encoding, comp: Compression, patches: torch.Tensor,
                    rule: str = DEFAULT_DROPPED) -> torch.Tensor:
    """For each of ``patches`` (indices, [K]), the output that stands in for it, [K] (long).

    ``"position"``: the output nearest on the grid (Euclidean distance from the
    patch's (row, col) to the output's centre ``A[m] @ patch positions``);
    ``"key"``: the output whose key ``A[m] @ patch_keys`` is most
    cosine-similar to the patch's key. Ties go to the earlier output. The rule
    ``patch_tokens`` uses for dropped patches, and the inspector's stand-in.
    """
    check_choice("rule", rule, ("position", "key"))
    assign = comp.assign.float()
    if rule == "position":
        gh, gw = enc.grid
        rows, cols = torch.meshgrid(torch.arange(gh, device=assign.device),
                                    torch.arange(gw, device=assign.device), indexing="ij")
        pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()  # [N, 2]
        # exact differences, not the matrix-product shortcut: grid distances tie often
        dist = torch.cdist(pos[patches], assign @ pos, compute_mode="donot_use_mm_for_euclid_dist")
        return dist.argmin(dim=1)
    keys = enc.k[:, enc.num_prefix:].float().mean(dim=0).to(assign.device)  # [N, d]
    out_keys = F.normalize(assign @ keys, dim=-1)
    return (F.normalize(keys[patches], dim=-1) @ out_keys.T).argmax(dim=1)


def _usable(enc: Encoding, head: Head | None) -> bool:
    return head is not None and not head.supports(enc)


def reference_map(enc: Encoding, head: Head) -> torch.Tensor:
    """The head's output on the original patch tokens (e.g. a saliency map [H, W]); kept in ``enc.memo``."""
    key = ("head_reference", head.name)
    if key not in enc.memo:
        enc.memo[key] = head.run(enc, enc.tokens)[0]
    return enc.memo[key]


def compressed_map(enc: Encoding, comp: Compression, head: Head,
                   dropped: str = DEFAULT_DROPPED) -> torch.Tensor:
    """The head's output on ``comp`` laid back onto the grid (``patch_tokens``), e.g. [H, W]."""
    return head.run(enc, patch_tokens(enc, comp, dropped))[0]


def task_agreement(enc: Encoding, comp: Compression, head: Head | None,
                   dropped: str = DEFAULT_DROPPED) -> dict[str, float] | None:
    """``head.compare(reference map, compressed map)``; None when there is no head or it cannot read ``enc``.

    For the saliency head: {"cc", "kl", "sim", "top_iou"} (``metrics.saliency_agreement``).
    """
    if not _usable(enc, head):
        return None
    return head.compare(reference_map(enc, head), compressed_map(enc, comp, head, dropped))


def agreement_sweep(
    enc: Encoding,
    head: Head | None,
    budgets: list[int] | None = None,
    names: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    dropped: str = DEFAULT_DROPPED,
    batch: int | None = None,
) -> dict[str, list[tuple[int, dict[str, float]]]] | None:
    """Task agreement against the actual output count M for every strategy over a sweep of budgets.

    Returns {strategy name: [(M, agreement dict), ...]} sorted by M, with
    the same budgets (``sweep_budgets``) and points as ``fidelity_sweep``:
    adaptive strategies give one point, and when two budgets give the same M
    the later one's compression is kept. None when there is no usable head.
    The head runs on ``batch`` maps at a time (default: ``SWEEP_BATCH`` for
    the encoding's device). ``progress(done, total)`` is
    called as work finishes: one unit per compression, one per map. Cached
    in ``enc.memo``.
    """
    if not _usable(enc, head):
        return None
    check_choice("dropped", dropped, DROPPED)
    batch = sweep_batch(enc.device) if batch is None else check_int("batch", batch, 1, 1024)
    budgets = budgets or sweep_budgets(enc.num_patches)
    names = names or list(STRATEGIES)
    for name in names:
        check_choice("strategy", name, tuple(STRATEGIES))
    key = ("agreement_sweep", head.name, tuple(budgets), tuple(names), dropped)
    if key in enc.memo:
        return enc.memo[key]
    runs = {name: budgets[:1] if STRATEGIES[name].adaptive else budgets for name in names}
    total, done = 2 * sum(len(b) for b in runs.values()), 0
    ref = reference_map(enc, head)
    out: dict[str, list[tuple[int, dict[str, float]]]] = {name: [] for name in names}
    pending: list[tuple[str, int, torch.Tensor]] = []  # (name, M, tokens on the grid [N, C])

    def run_head(least: int) -> None:
        nonlocal done
        while len(pending) >= least:
            chunk, pending[:] = pending[:batch], pending[batch:]
            maps = head.run(enc, torch.stack([tokens for _, _, tokens in chunk]))
            for (name, m, _), agreement in zip(chunk, head.compare(ref, maps), strict=True):
                out[name].append((m, agreement))
            done += len(chunk)
            if progress is not None:
                progress(done, total)

    for name, name_budgets in runs.items():
        grids: dict[int, torch.Tensor] = {}  # M -> tokens: a later budget with the same M wins
        for b in name_budgets:
            comp = STRATEGIES[name].at_budget(enc, b)
            done += 1 + (comp.num_out in grids)  # a replaced point's map will not be made
            grids[comp.num_out] = patch_tokens(enc, comp, dropped)
            if progress is not None:
                progress(done, total)
        pending.extend((name, m, tokens) for m, tokens in grids.items())
        run_head(batch)  # bounded memory: at most one strategy's points plus a batch wait
    run_head(1)
    for name in out:
        out[name].sort(key=lambda point: point[0])
    enc.memo[key] = out
    return out
