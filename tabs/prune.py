"""The "Pruning" tab: keep the top patches by CLS, received or a clicked patch's attention."""

from __future__ import annotations

import gradio as gr

from viz.panels import prune_panel

from .common import (
    LIVE,
    OVERLAY_H,
    Details,
    Steps,
    Tab,
    Wiring,
    export_box,
    guarded,
    need,
    patch_at,
    stats_md,
)

ID = "prune"
SCORES = [("CLS attention", "cls"), ("attention received", "received"),
          ("query (click image)", "query")]
TEXT = """**What am I looking at?** Bright patches are kept, dark ones are dropped. The
score is the attention the model pays to each patch: from the CLS token (what the model
summarises the image with), received from all tokens, or from one *query* patch - with that
score, a click on the image moves the query: the kept set then follows what that patch attends
to, which is how query-dependent pruning behaves. With the other scores a click inspects the
token there. "Attention kept" is the share of CLS attention on the kept patches."""


def _head(value: str):
    return None if value in (None, "mean") else int(value)


@guarded
def render(session, score: str, head: str, keep: float, heatmap: bool, with_figure: bool = True,
           numbers: bool = True):
    """[overlay, stats] (+ [figure]) for the current encoding and query patch."""
    enc = need(session)
    p = prune_panel(enc, float(keep), score, _head(head), session.query, bool(heatmap),
                    with_figure=with_figure, numbers=numbers)
    session.panels[ID] = p
    extra = ""
    if score == "query":
        gw = enc.grid[1]
        q = p.comp.params["query"]
        extra = f" · query patch (row {q // gw}, col {q % gw})"
    out = [p.overlay, stats_md(p, extra)]
    return out + [p.figure] if with_figure else out


@guarded
def do_query(session, score, head, keep, heatmap, text, details=None):
    """The query patch typed as "row, col"."""
    enc = need(session)
    try:
        row, col = (int(v) for v in str(text).replace("(", "").replace(")", "").split(","))
    except ValueError:
        raise gr.Error(f"query must be 'row, col' (two whole numbers), got {text!r}") from None
    gh, gw = enc.grid
    if not (0 <= row < gh and 0 <= col < gw):
        raise gr.Error(f"query ({row}, {col}) is outside the {gh} x {gw} patch grid")
    session.query = row * gw + col
    session.inspected[ID] = session.query
    out = ["query", *render(session, "query", head, keep, heatmap)]
    return out + (details.view(session) if details is not None else [])


def build(w: Wiring) -> Tab:
    details = Details(ID)
    with gr.Tab("Pruning", id=ID) as tab:
        with gr.Row():
            with gr.Column(scale=3, min_width=420):
                overlay = gr.Image(label="Kept patches (click: inspect, or move the query)",
                                   format="jpeg",
                                   interactive=False, height=OVERLAY_H, elem_id="prune-overlay")
                details.picture()
            with gr.Column(scale=2, min_width=300):
                score = gr.Radio(SCORES, value="cls", label="Score", elem_id="prune-score")
                with gr.Row():
                    head = gr.Dropdown(["mean"], value="mean", label="Head", elem_id="prune-head")
                    heat = gr.Checkbox(False, label="Score heatmap", elem_id="prune-heatmap")
                keep = gr.Slider(0.0, 1.0, value=0.25, step=0.01, label="Keep ratio",
                                 elem_id="prune-keep")
                query = gr.Textbox(label="Query patch (row, col), or click",
                                   placeholder="e.g. 12, 8 then Enter", max_lines=1,
                                   elem_id="prune-query")
                stats = gr.Markdown(elem_id="prune-stats")
                details.numbers()
                details.inspect()
                gr.Markdown(TEXT)
        plot = gr.Plot(label="Scores", elem_id="prune-plot")
        export_box(w, ID)
        api_full = gr.Button(visible=False)  # the /prune endpoint: everything in one call
        api_live = gr.Button(visible=False)  # /prune_live: always answered

    inputs = [w.session, score, head, keep, heat]
    live = [overlay, stats]
    full = live + [plot] + details.outputs

    steps = Steps(render, details)

    @guarded
    def click(session, score, head, keep, heatmap, evt: gr.SelectData):
        """With the query score a click moves the query (and inspects there); else it inspects."""
        patch = patch_at(session, ID, evt)
        session.inspected[ID] = patch
        if score != "query":
            return [gr.skip()] * (1 + len(live) + 3) + details.inspector.view(session)
        session.query = patch
        return ["query", *render(session, "query", head, keep, heatmap), *details.view(session)]

    w.on(api_live.click, steps.drag, inputs, live, "prune_live", **LIVE)
    steps.on_drag(w, keep.input, inputs, live)
    w.on(api_full.click, steps.everything, inputs, full, "prune", **LIVE)
    for trigger in (keep.release, score.input, head.input, heat.input):
        steps.on_release(w, trigger, inputs, live + details.outputs, plot)
    w.on(overlay.select, click, inputs, [score] + full, api_visibility="private", **LIVE)
    w.on(query.submit, lambda *a: do_query(*a, details=details), inputs + [query],
         [score] + full, "prune_query", **LIVE)

    def fit(enc, _score, head, _keep, _heat):
        heads = ["mean"] + [str(h) for h in range(enc.num_heads)]
        return [gr.update(choices=heads, value=head if head in heads else "mean")]

    # first the overlay and the numbers, then the figure (the slowest picture)
    return Tab(ID, tab, inputs[1:], live, steps.quick, [head], fit,
               later=(steps.later, inputs[1:], [plot] + details.outputs))
