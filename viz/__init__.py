"""Pictures of token compression: overlays on the image and matplotlib figures.

    >>> from viz import draw_compression, heatmap_grid, similarity_plot
    >>> img = draw_compression(enc, merge_threshold(enc, 0.9))   # PIL RGB, 576 px

Overlays return RGB ``PIL.Image``s; plots return ``matplotlib.figure.Figure``s.
Nothing here imports Gradio.
"""

from .overlay import (
    DEFAULT_DISPLAY,
    assign_kind,
    cell_edges,
    cluster_overlay,
    display_size,
    draw_compression,
    heatmap_grid,
    heatmap_overlay,
    latent_overlay,
    normalise,
    palette,
    prune_overlay,
    to_numpy,
)
from .plots import pruning_plot, resampler_plot, similarity_plot

__all__ = [
    "DEFAULT_DISPLAY",
    "assign_kind",
    "cell_edges",
    "cluster_overlay",
    "display_size",
    "draw_compression",
    "heatmap_grid",
    "heatmap_overlay",
    "latent_overlay",
    "normalise",
    "palette",
    "prune_overlay",
    "pruning_plot",
    "resampler_plot",
    "similarity_plot",
    "to_numpy",
]
