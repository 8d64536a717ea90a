"""Numbers that compare strategies, one definition for all of them.

- ``fidelity``: mean over patches of the cosine similarity between a patch
  token and the output that represents it best. An output is read in patch
  space as ``assign @ tokens`` (for merging and pruning that is the output
  token itself; for the resampler, whose outputs live in another space, it is
  what its attention gathered), so every strategy is measured the same way.
- ``attention_mass_kept``: the share of the CLS attention (mean over heads)
  that falls on patches some output draws on. 1.0 for merging and the
  resampler (every patch is represented), the kept share for pruning.
"""

from __future__ import annotations

import torch.nn.functional as F

from .types import Compression, Encoding


def fidelity(enc: Encoding, comp: Compression) -> float:
    """Mean over patches of max over outputs of cos(patch token, represented output)."""
    rep = F.normalize(comp.represented(enc.tokens.float()), dim=-1)
    unit = F.normalize(enc.tokens.float(), dim=-1)
    return float((unit @ rep.T).amax(dim=1).mean())


def attention_mass_kept(enc: Encoding, comp: Compression) -> float | None:
    """Share of CLS attention on the patches that survive; None without a CLS token."""
    if enc.cls_attn is None:
        return None
    attn = enc.cls_attn.float().mean(dim=0)
    return float(attn[comp.kept_mask()].sum() / attn.sum())


def summary(enc: Encoding, comp: Compression) -> dict:
    """N, M, ratio, fidelity, attention mass kept and time, as plain Python numbers."""
    return {
        "strategy": comp.strategy,
        "N": comp.num_in,
        "M": comp.num_out,
        "ratio": round(comp.ratio, 3),
        "fidelity": round(fidelity(enc, comp), 4),
        "attention_mass_kept": (
            None if (m := attention_mass_kept(enc, comp)) is None else round(m, 4)
        ),
        "ms": round(comp.elapsed_ms, 2),
    }
