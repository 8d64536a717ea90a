"""The "Merging" tab (token merging): adjacent threshold merging and ToMe, live."""

from __future__ import annotations

import gradio as gr

from viz.panels import merge_panel

from .common import LIVE, OVERLAY_H, Details, Steps, Tab, Wiring, export_box, guarded, need, stats_md

ID = "merge"
METHODS = [("adjacent threshold", "threshold"), ("ToMe bipartite", "tome")]
FILLS = [("mean colour", "mean"), ("distinct colours", "distinct")]
TEXT = """**What am I looking at?** Each coloured region is one output token: the patches
inside it were merged into a single token (their mean). *Adjacent threshold* merges neighbouring
patches whose tokens have cosine similarity at least the threshold; merges chain, so a smooth
region can become one token. *ToMe* (Bolya et al., 2023) repeatedly pairs alternate tokens with
their most similar partner and merges the best pairs until the target count remains; its
clusters need not be connected. Fidelity is how well each patch is still represented (mean
cosine of a patch to its best output token)."""


@guarded
def render(session, method: str, threshold: float, target: int, fill: str, with_figure: bool = True,
           numbers: bool = True):
    """[overlay, stats] (+ [figure]) for the current encoding (``numbers=False``: a slider
    being dragged, fidelity on release)."""
    enc = need(session)
    p = merge_panel(enc, method, float(threshold), int(target), fill, with_figure=with_figure,
                    numbers=numbers)
    session.panels[ID] = p
    if numbers:  # a full draw (a drag's may not have reached the page when its release is sent)
        session.last_args[ID] = (method, float(threshold), int(target), fill)
    out = [p.overlay, stats_md(p)]
    return out + [p.figure] if with_figure else out


def build(w: Wiring) -> Tab:
    details = Details(ID)
    with gr.Tab("Merging", id=ID) as tab:
        with gr.Row():
            with gr.Column(scale=3, min_width=420):
                overlay = gr.Image(label="Merged clusters (click to inspect a token)", format="jpeg",
                                   interactive=False, height=OVERLAY_H, elem_id="merge-overlay")
                details.picture()
            with gr.Column(scale=2, min_width=300):
                method = gr.Radio(METHODS, value="threshold", label="Method", elem_id="merge-method")
                threshold = gr.Slider(0.0, 1.0, value=0.9, step=0.005, label="Threshold (adjacent)",
                                      elem_id="merge-threshold")
                target = gr.Slider(1, 576, value=144, step=1, label="Target tokens (ToMe)",
                                   elem_id="merge-target")
                fill = gr.Radio(FILLS, value="mean", label="Fill", elem_id="merge-fill")
                stats = gr.Markdown(elem_id="merge-stats")
                details.numbers()
                details.inspect()
                gr.Markdown(TEXT)
        plot = gr.Plot(label="Similarities", elem_id="merge-plot")
        export_box(w, ID)
        api_full = gr.Button(visible=False)  # the /merge endpoint: everything in one call
        api_live = gr.Button(visible=False)  # /merge_live: always answered

    inputs = [w.session, method, threshold, target, fill]
    live = [overlay, stats]
    full = live + [plot] + details.outputs

    def by(chosen: str, with_details: bool):
        # the slider a user moves picks the method it belongs to
        def fn(session, _method, threshold, target, fill):
            at, value = (1, float(threshold)) if chosen == "threshold" else (2, int(target))
            last = session.last_args.get(ID) if session is not None else None
            if with_details and _method != chosen and last is not None and last[at] == value:
                # released where it was: only its number box was clicked into and left (Gradio
                # sends "release" then too); the other method's picture stays
                return [gr.skip()] * (1 + len(live) + len(details.outputs))
            out = render(session, chosen, threshold, target, fill, with_figure=False,
                         numbers=with_details)
            return [gr.skip() if _method == chosen else chosen, *out,
                    *(details.view(session) if with_details else [])]
        return fn

    steps = Steps(render, details)
    w.on(api_full.click, steps.everything, inputs, full, "merge", **LIVE)
    for slider, chosen in ((threshold, "threshold"), (target, "tome")):
        steps.on_drag(w, slider.input, inputs, [method] + live, by(chosen, False))
        steps.on_release(w, slider.release, inputs, [method] + live + details.outputs, plot,
                         by(chosen, True))
    for ctl in (method, fill):
        steps.on_release(w, ctl.input, inputs, live + details.outputs, plot)
    w.on(overlay.select, details.inspector.click(), [w.session], details.inspector.outputs,
         api_visibility="private", **LIVE)
    # the API's live update, with the method it is given (the UI's sliders pick theirs)
    w.on(api_live.click, lambda *a: render(*a, with_figure=False, numbers=False), inputs, live,
         "merge_live", **LIVE)

    def fit(enc, _method, _threshold, target, _fill):
        n = enc.num_patches
        return [gr.update(maximum=n, value=min(int(target), n))]

    # first the overlay and the numbers, then the figure (the slowest picture)
    return Tab(ID, tab, inputs[1:], live, steps.quick, [target], fit,
               later=(steps.later, inputs[1:], [plot] + details.outputs))
