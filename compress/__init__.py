"""Token Compression Explorer: the library.

Encode an image into ViT patch tokens, then compress them with a strategy.
Every strategy returns a ``Compression`` (output ``tokens`` [M, C] and
``assign`` [M, N]).

    >>> from compress import Encoder, merge_bipartite
    >>> enc = Encoder().encode(image, size=336)       # 576 patch tokens
    >>> out = merge_bipartite(enc, target=64)
    >>> out.num_out, out.ratio
    >>> task_agreement(enc, out, head_for(enc.model))  # the saliency head: CC, KL, SIM, top-10% IoU
"""

from .cluster import dpc_knn
from .downstream import (
    agreement_sweep,
    compressed_map,
    patch_tokens,
    reference_map,
    task_agreement,
)
from .encoder import Encoder, device_label, resolve_device
from .heads import Head, SaliencyHead, head_for, head_status
from .images import ImageError, load_image
from .inside import (
    InsideResult,
    keep_for_budget,
    largest_r,
    output_agreement,
    plain_forward,
    prune_forward,
    r_for_budget,
    tome_forward,
)
from .merge import merge_bipartite, merge_threshold, pool
from .metrics import (
    attention_mass_kept,
    fidelity,
    saliency_agreement,
    saliency_cc,
    saliency_kl,
    saliency_sim,
    summary,
    top_iou,
)
from .prune import (
    attention_scores,
    divprune,
    prumerge,
    prumerge_plus,
    prune_attention,
    random_keep,
    visionzip,
)
from .registry import STRATEGIES, Strategy, run_at_budget
from .resample import PerceiverResampler, kmeans, resample
from .select import cdpruner, dart, vispruner
from .types import Compression, Encoding
from .weights import BUNDLED_NAME, WeightsUnavailable

__all__ = [
    "BUNDLED_NAME",
    "Compression",
    "Encoder",
    "Encoding",
    "Head",
    "ImageError",
    "InsideResult",
    "PerceiverResampler",
    "SaliencyHead",
    "STRATEGIES",
    "Strategy",
    "WeightsUnavailable",
    "agreement_sweep",
    "compressed_map",
    "head_for",
    "head_status",
    "patch_tokens",
    "reference_map",
    "saliency_agreement",
    "saliency_cc",
    "saliency_kl",
    "saliency_sim",
    "task_agreement",
    "top_iou",
    "attention_mass_kept",
    "attention_scores",
    "cdpruner",
    "dart",
    "dpc_knn",
    "fidelity",
    "load_image",
    "keep_for_budget",
    "largest_r",
    "kmeans",
    "resample",
    "summary",
    "device_label",
    "divprune",
    "merge_bipartite",
    "merge_threshold",
    "output_agreement",
    "plain_forward",
    "pool",
    "prumerge",
    "prumerge_plus",
    "prune_attention",
    "prune_forward",
    "r_for_budget",
    "random_keep",
    "resolve_device",
    "run_at_budget",
    "tome_forward",
    "vispruner",
    "visionzip",
]
