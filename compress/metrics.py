"""Numbers that compare strategies, one definition for all of them.

- ``fidelity``: mean over patches of the cosine similarity between a patch
  token and the output that represents it best. An output is read in patch
  space as ``assign @ tokens`` (for merging and pruning that is the output
  token itself; for the resampler, whose outputs live in another space, it is
  what its attention gathered), so every strategy is measured the same way.
- ``attention_mass_kept``: the share of the CLS attention (mean over heads)
  that falls on patches some output draws on. 1.0 for merging and the
  resampler (every patch is represented), the kept share for pruning.

Task agreement between two saliency maps -- the map a trained head makes
from the original tokens (``ref``) and from the compressed ones (``other``)
-- as the MIT/Tuebingen saliency benchmark defines them (Bylinskii et al.,
"What do different evaluation metrics tell us about saliency models?",
TPAMI 2019; the benchmark's MATLAB code, ``code_forMetrics/CC.m``,
``KLdiv.m`` and ``similarity.m``): ``saliency_cc``, ``saliency_kl``,
``saliency_sim``, plus ``top_iou``, the overlap of the most salient pixels.
``saliency_agreement`` returns all four. Both maps must have the same shape
(the benchmark resizes the first to the second; ours are made at one size).
All are computed in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_real
from .types import Compression, Encoding

# MATLAB's ``eps`` (2^-52), the constant of the benchmark's KLdiv.m.
KL_EPS = 2.220446049250313e-16


def fidelity(enc: Encoding, comp: Compression) -> float:
    """Mean over patches of max over outputs of cos(patch token, represented output).

    For a selection (one-hot rows) the outputs are patches, so the patch-to-patch cosines kept
    with the encoding are read instead of multiplying again (the same numbers)."""
    if enc.keeps_gram and comp.kind == "prune":  # one-hot rows: output m is patch argmax(row m)
        return float(enc.cosine_gram()[:, comp.assign.argmax(dim=1)].amax(dim=1).mean())
    rep = F.normalize(comp.represented(enc.tokens.float()), dim=-1)
    return float((enc.unit_tokens() @ rep.T).amax(dim=1).mean())


def attention_mass_kept(enc: Encoding, comp: Compression) -> float | None:
    """Share of CLS attention on the patches that survive; None without a CLS token."""
    if enc.cls_attn is None:
        return None
    attn = enc.cls_attn.float().mean(dim=0)
    return float(attn[comp.kept_mask()].sum() / attn.sum())


def summary(enc: Encoding, comp: Compression, with_fidelity: bool = True) -> dict:
    """N, M, ratio, fidelity, attention mass kept and time, as plain Python numbers.

    ``with_fidelity=False`` leaves ``fidelity`` None (a slider being dragged: the one
    multiplication of every update that nobody reads until the slider rests)."""
    return {
        "strategy": comp.strategy,
        "N": comp.num_in,
        "M": comp.num_out,
        "ratio": round(comp.ratio, 3),
        "fidelity": round(fidelity(enc, comp), 4) if with_fidelity else None,
        "attention_mass_kept": (
            None if (m := attention_mass_kept(enc, comp)) is None else round(m, 4)
        ),
        "ms": round(comp.elapsed_ms, 2),
    }


def _as_array(saliency) -> np.ndarray:
    if isinstance(saliency, torch.Tensor):
        saliency = saliency.detach().cpu().numpy()  # zero-copy on the CPU; float64 in NumPy
    return np.asarray(saliency, dtype=np.float64)


def _pair(ref, other) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as flat float64 NumPy vectors; ``ValueError`` when their shapes differ.

    NumPy, not torch: on 10^5 pixels single-threaded NumPy takes well under
    a millisecond per pass, while torch's threaded kernels can stall for
    milliseconds when the CPU is shared.
    """
    a, b = _as_array(ref), _as_array(other)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"saliency maps must have the same non-empty shape, got {a.shape} and {b.shape}")
    return a.ravel(), b.ravel()


def saliency_cc(ref, other) -> float:
    """Pearson's linear correlation coefficient of the two maps' pixel values, in [-1, 1].

    As the benchmark's CC.m (each map standardised, then ``corr2``). A
    constant map has no variance: the coefficient is undefined and NaN is
    returned, as the benchmark's code gives.
    """
    a, b = _pair(ref, other)
    a, b = a - a.mean(), b - b.mean()
    # elementwise sums, not ``a @ b``: BLAS threads stall on a shared CPU as torch's do
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def saliency_kl(ref, other) -> float:
    """KL divergence of ``other`` from ``ref`` as distributions: sum P log(eps + P / (Q + eps)).

    As the benchmark's KLdiv.m: P = ``ref`` (there the fixation map; here the
    map from the original tokens) and Q = ``other``, each divided by its sum
    (an all-zero map is left as zeros), eps = ``KL_EPS`` = 2^-52 (MATLAB's
    ``eps``). About 0 for identical maps (each pixel adds P * eps), larger is
    worse; maps should be non-negative (ours are sigmoid outputs in (0, 1)).
    """
    p, q = _pair(ref, other)
    p = p / p.sum() if p.any() else p
    q = q / q.sum() if q.any() else q
    return float((p * np.log(KL_EPS + p / (q + KL_EPS))).sum())


def _sim_normalise(m: np.ndarray) -> np.ndarray:
    if not m.any():  # a zero map stays a zero map
        return m
    with np.errstate(invalid="ignore", divide="ignore"):  # constant map: 0 / 0 = NaN, as the benchmark
        m = (m - m.min()) / (m.max() - m.min())
        return m / m.sum()


def saliency_sim(ref, other) -> float:
    """Similarity (histogram intersection): sum over pixels of min(P, Q), in [0, 1].

    As the benchmark's similarity.m: each map is first min-max normalised to
    [0, 1] (so a map that gives every pixel a floor gains nothing from it),
    then divided by its sum. 1 for maps equal after that normalisation. A
    constant (non-zero) map gives NaN, as in the benchmark's code.
    """
    a, b = _pair(ref, other)
    a, b = _sim_normalise(a), _sim_normalise(b)
    if np.isnan(a).all() or np.isnan(b).all():
        return math.nan
    return float(np.minimum(a, b).sum())


def top_set(saliency, top: float = 0.10) -> np.ndarray:
    """Bool mask (the map's shape) of the most salient pixels: those at or above the k-th largest value.

    k = max(1, ceil(``top`` * n)) for n pixels. Every pixel tied with the
    k-th largest value is included, so with ties the set can hold more than
    k pixels (it never holds fewer).
    """
    top = check_real("top", top, 0.0, 1.0)
    if top == 0.0:
        raise ValueError("top must be above 0 (the share of pixels to keep), got 0.0")
    m = _as_array(saliency)
    flat = m.ravel()
    k = max(1, math.ceil(round(top * flat.size, 9)))
    threshold = np.partition(flat, flat.size - k)[flat.size - k]
    return m >= threshold


def top_iou(ref, other, top: float = 0.10) -> float:
    """Intersection over union of the two maps' ``top_set``s (by default the top 10 % of pixels)."""
    a, b = _pair(ref, other)
    sa, sb = top_set(a, top), top_set(b, top)
    return float((sa & sb).sum()) / float((sa | sb).sum())


def saliency_agreement(ref, other, top: float = 0.10) -> dict[str, float]:
    """All four agreement numbers, {"cc", "kl", "sim", "top_iou"}, of two same-shape maps.

    ``ref`` is the reference map (from the original tokens), ``other`` the
    one to judge; tensors (any device) or arrays. See each function.
    """
    a, b = _pair(ref, other)
    return {"cc": saliency_cc(a, b), "kl": saliency_kl(a, b),
            "sim": saliency_sim(a, b), "top_iou": top_iou(a, b, top)}
