"""The "Features" tab: what the strategies see (PCA, token norms, neighbour similarity, heads)."""

from __future__ import annotations

import gradio as gr

from viz.panels import features_panel

from .common import Tab, Wiring, guarded, need

ID = "features"
TEXT = """**What the strategies see.** *PCA*: the first three principal components of the patch
tokens as red, green, blue - similar tokens share a colour, so this is what merging groups.
*Token norms*: artefact tokens with a very high norm (DINOv2 without registers) attract CLS
attention and so steer attention pruning; after the final LayerNorm norms are evened out, so pick an
earlier block to see them. *Neighbour similarity*: how alike each patch is to its neighbours -
threshold merging eats bright regions first. *CLS attention per head*: heads disagree; pruning uses
their mean or the one you pick."""


@guarded
def render(session):
    """[PCA, norms, neighbour similarity, per-head CLS attention, text]."""
    f = features_panel(need(session))
    im = f["images"]
    return [im["pca"], im["norms"], im["neighbours"], im["heads"], f["text"]]


def build(w: Wiring) -> Tab:
    with gr.Tab("Features", id=ID) as tab:
        text = gr.Markdown(elem_id="features-text")
        with gr.Row():
            pca = gr.Image(label="PCA of tokens as RGB", format="jpeg", interactive=False,
                           elem_id="features-pca")
            norms = gr.Image(label="Token norms", format="jpeg", interactive=False,
                             elem_id="features-norms")
            neighbours = gr.Image(label="Neighbour cosine similarity", format="jpeg",
                                  interactive=False, elem_id="features-neighbours")
        heads = gr.Image(label="CLS attention per head", format="jpeg", interactive=False,
                         show_label=False, elem_id="features-heads")
        gr.Markdown(TEXT)
    return Tab(ID, tab, [], [pca, norms, neighbours, heads, text], render)
