"""The token inspector: why a patch's token was kept, merged or dropped.

``inspect_patch(enc, comp, patch)`` answers, for the output token that holds
a patch (or, for a dropped patch, the kept token that now stands for it):
which patches the token covers, its size, its attention, and the parts of the
score that decided it -- whatever the strategy recorded in
``comp.extra["parts"]`` (importance, diversity, relevance, a merge
similarity: name -> value per patch, [N]) and ``comp.extra["role"]`` (a word
per patch: "dominant", "outlier", "dropped", ...). Every strategy that wants
to explain itself fills those two; the inspector knows no strategy by name.

The result is plain Python (numbers, lists, strings), ready for JSON.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .downstream import DEFAULT_DROPPED, nearest_outputs
from .prune import query_index
from .types import Compression, Encoding


def _rank(values: torch.Tensor, i: int) -> int:
    """1-based rank of ``values[i]`` from the top (ties share the better rank)."""
    return int((values > values[i]).sum()) + 1


def stand_ins(enc: Encoding, comp: Compression, rule: str = DEFAULT_DROPPED) -> torch.Tensor:
    """For every patch, the output that stands for it, [N] (long).

    A covered patch: the output that draws most on it (``comp.labels()``). A
    patch no output covers: the output ``compress.downstream.nearest_outputs``
    picks by ``rule`` -- the same rule the task agreement uses for dropped
    patches (default: the kept token nearest on the grid, what a model that
    sees only the kept tokens has there).
    """
    labels = comp.labels()
    dropped = labels < 0
    if bool(dropped.any()):
        labels = labels.clone()
        labels[dropped] = nearest_outputs(enc, comp, dropped.nonzero().flatten(), rule)
    return labels


STAND_IN = {"position": "the kept token nearest on the grid",
            "key": "the kept token nearest by key (keys averaged over heads)"}


def inspect_patch(enc: Encoding, comp: Compression, patch, rule: str = DEFAULT_DROPPED) -> dict:
    """Why the token holding ``patch`` (an index or (row, col)) is what it is.

    Returns a dict: ``patch``, ``row``, ``col``, ``kept`` (some output draws
    on it), ``token`` (the output that holds it, or stands for it when
    dropped), ``token_patches`` and ``token_weights`` (the patches the token
    draws on, with their weights), ``token_size``, ``token_attention`` (share
    of the CLS attention on the token's patches; None without CLS),
    ``patch_attention`` and ``patch_attention_rank``, ``similarity`` (cosine
    of the patch token to what its token represents), ``held_by`` (for a kept
    patch: up to 5 [output, weight] pairs drawing on it, heaviest first),
    ``role`` (when the
    strategy names one), ``parts`` ({name: {"value", "rank"}} at this patch,
    rank 1 = highest of N) and, for a dropped patch, ``stands_in`` (how the
    standing-in token was chosen: ``rule``, as the task agreement chooses it).
    """
    n = enc.num_patches
    i = query_index(enc, patch)
    gw = enc.grid[1]
    assign = comp.assign
    column = assign[:, i]
    kept = bool((column > 0).any())
    m = int(column.argmax()) if kept else int(nearest_outputs(enc, comp, torch.tensor([i]), rule)[0])
    row = assign[m]
    members = (row > 0).nonzero().flatten()
    rep = comp.represented(enc.tokens.float())[m]
    similarity = float(F.cosine_similarity(enc.tokens[i].float(), rep, dim=0))
    out: dict = {
        "strategy": comp.strategy,
        "patch": i, "row": i // gw, "col": i % gw,
        "kept": kept,
        "token": m,
        "token_patches": members.tolist(),
        "token_weights": [round(float(w), 6) for w in row[members]],
        "token_size": int(members.numel()),
        "similarity": round(similarity, 4),
        "token_attention": None, "patch_attention": None, "patch_attention_rank": None,
    }
    if enc.cls_attn is not None:
        attn = enc.cls_attn.float().mean(dim=0)
        out["token_attention"] = round(float(attn[members].sum() / attn.sum()), 6)
        out["patch_attention"] = round(float(attn[i]), 6)
        out["patch_attention_rank"] = _rank(attn, i)
    if kept:  # every output drawing on the patch, heaviest first (soft rows: several)
        held = column.nonzero().flatten()
        held = held[column[held].argsort(descending=True)][:5]
        out["held_by"] = [[int(t), round(float(column[t]), 6)] for t in held]
    else:
        out["stands_in"] = STAND_IN[rule]
    roles = comp.extra.get("role")
    if roles is not None and len(roles) == n:
        out["role"] = str(roles[i])
    parts = {}
    for name, values in (comp.extra.get("parts") or {}).items():
        values = torch.as_tensor(values).float().flatten()
        if values.numel() != n:
            continue
        v = float(values[i])
        finite = torch.nan_to_num(values, nan=-math.inf)
        parts[name] = {"value": None if math.isnan(v) else round(v, 6),
                       "rank": None if math.isnan(v) else _rank(finite, i)}
    out["parts"] = parts
    return out


def describe(report: dict, n: int) -> str:
    """The report as a few lines of Markdown for the app."""
    where = f"patch ({report['row']}, {report['col']})"
    size = report["token_size"]
    if report["kept"]:
        head = (f"**{where}** is held by output token **#{report['token']}**, which draws on "
                f"{size} patch{'es' if size != 1 else ''}")
    else:
        head = (f"**{where}** was **dropped**; the kept token standing in for it is "
                f"**#{report['token']}** ({report['stands_in']})")
    lines = [head + f"; cosine of the patch to it: **{report['similarity']:.3f}**."]
    others = report.get("held_by", [])[1:]
    if others:
        lines.append("Also drawn on by " + ", ".join(f"#{t} (weight {w:.3g})" for t, w in others)
                     + f"; #{report['token']} has the largest weight ({report['held_by'][0][1]:.3g}).")
    if report.get("role"):
        lines.append(f"Role: **{report['role']}**.")
    if report["token_attention"] is not None:
        lines.append(f"CLS attention: the patch {report['patch_attention']:.4f} (rank "
                     f"{report['patch_attention_rank']} of {n}); the token's patches hold "
                     f"{report['token_attention']:.1%} of it.")
    for name, part in report["parts"].items():
        if part["value"] is None:
            lines.append(f"{name.replace('_', ' ')}: n/a for this patch.")
        else:
            lines.append(f"{name.replace('_', ' ')}: {part['value']:.4g} (rank {part['rank']} of {n}).")
    return "  \n".join(lines)
