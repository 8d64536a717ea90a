"""Token Compression Explorer: the library.

Encode an image into ViT patch tokens, then compress them with a strategy.
Every strategy returns a ``Compression`` (output ``tokens`` [M, C] and
``assign`` [M, N]).

    >>> from compress import Encoder, merge_bipartite
    >>> enc = Encoder().encode(image, size=336)       # 576 patch tokens
    >>> out = merge_bipartite(enc, target=64)
    >>> out.num_out, out.ratio
"""

from .cluster import dpc_knn
from .encoder import Encoder, device_label, resolve_device
from .images import ImageError, load_image
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
from .select import cdpruner, dart, vispruner
from .types import Compression, Encoding
from .weights import BUNDLED_NAME, WeightsUnavailable

__all__ = [
    "BUNDLED_NAME",
    "Compression",
    "Encoder",
    "Encoding",
    "ImageError",
    "PerceiverResampler",
    "STRATEGIES",
    "Strategy",
    "WeightsUnavailable",
    "attention_mass_kept",
    "attention_scores",
    "cdpruner",
    "dart",
    "dpc_knn",
    "fidelity",
    "load_image",
    "kmeans",
    "resample",
    "summary",
    "device_label",
    "divprune",
    "merge_bipartite",
    "merge_threshold",
    "pool",
    "prumerge",
    "prumerge_plus",
    "prune_attention",
    "random_keep",
    "resolve_device",
    "run_at_budget",
    "vispruner",
    "visionzip",
]
