"""Token Compression Explorer: the library.

Encode an image into ViT patch tokens, then compress them with a strategy.
Every strategy returns a ``Compression`` (output ``tokens`` [M, C] and
``assign`` [M, N]).

    >>> from compress import Encoder, merge_bipartite
    >>> enc = Encoder().encode(image, size=336)       # 576 patch tokens
    >>> out = merge_bipartite(enc, target=64)
    >>> out.num_out, out.ratio
"""

from .encoder import Encoder, device_label, resolve_device
from .images import ImageError, load_image
from .inside import (
    InsideResult,
    keep_for_budget,
    output_agreement,
    plain_forward,
    prune_forward,
    r_for_budget,
    tome_forward,
)
from .merge import merge_bipartite, merge_threshold, pool
from .metrics import attention_mass_kept, fidelity, summary
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
from .types import Compression, Encoding
from .weights import BUNDLED_NAME, WeightsUnavailable

__all__ = [
    "BUNDLED_NAME",
    "Compression",
    "Encoder",
    "Encoding",
    "ImageError",
    "InsideResult",
    "PerceiverResampler",
    "STRATEGIES",
    "Strategy",
    "WeightsUnavailable",
    "attention_mass_kept",
    "attention_scores",
    "fidelity",
    "load_image",
    "keep_for_budget",
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
    "visionzip",
]
