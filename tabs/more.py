"""The "More methods" tab: every registered strategy beyond the seed's four, at a budget M.

Each strategy's own settings (``Strategy.knobs``) get a control, shown while
that strategy is chosen; nothing here knows a strategy by name.
"""

from __future__ import annotations

import gradio as gr

from compress import STRATEGIES
from viz.panels import strategy_panel

from .common import (
    LIVE,
    NO_TARGETS,
    OVERLAY_H,
    Details,
    Tab,
    Wiring,
    export_box,
    guarded,
    need,
    patch_at,
    stats_md,
)
from .gesture import Gesture, slider_of

ID = "more"
SEED_FOUR = ("merge_threshold", "merge_bipartite", "prune_attention", "resample")
NAMES = [k for k in STRATEGIES if k not in SEED_FOUR]
DEFAULT = "visionzip"
# every (strategy, knob) pair, in a fixed order: one control each
KNOBS = [(name, knob) for name in NAMES for knob in STRATEGIES[name].knobs]
TEXT = """**What am I looking at?** The methods people compare against, at a token budget M.
The picture follows the form of each result: clusters for merging (pooling, VisionZip's contextual
groups), outlined kept patches for selection (DivPrune, random keep), and for PruMerge each patch
coloured by the kept token that absorbed it - the one colour over most of the picture is PruMerge's
summary token, the attention-weighted mean of every patch no kept token absorbed. PruMerge picks its
own M from the image (CLS-attention outliers), so the budget slider does not move it. CDPruner weighs
diversity by relevance to a query patch: click the picture to choose it (the same query as in the
pruning tab); for the other strategies a click inspects the token there."""


def settings_for(name: str, knob_values) -> dict:
    """The chosen strategy's knob values by name, from the values of every knob control."""
    return {knob.name: value for (owner, knob), value in zip(KNOBS, knob_values, strict=True)
            if owner == name}


@guarded
def render(session, name: str, budget: int, *knob_values, numbers: bool = True):
    """[overlay, stats] for strategy ``name`` at ``budget`` with its knobs (``numbers=False``:
    a slider being dragged, fidelity on release)."""
    enc = need(session)
    if name not in NAMES:
        raise gr.Error(f"unknown strategy {name!r}; choose one of: {', '.join(NAMES)}")
    strategy = STRATEGIES[name]
    session.last_args[ID] = (name, budget, *knob_values)  # what a click on the picture redraws
    settings = settings_for(name, knob_values)
    if strategy.uses_query:
        settings["query"] = session.query
    p = strategy_panel(enc, name, min(int(budget), enc.num_patches), numbers=numbers, **settings)
    session.panels[ID] = p
    extra = f" · {strategy.source}"
    if strategy.uses_query:
        q = p.comp.params.get("query")
        extra += (" · relevance to no patch: click the picture to pick one" if q is None else
                  f" · relevance to patch (row {q // enc.grid[1]}, col {q % enc.grid[1]})")
    if strategy.adaptive:
        extra += " · M chosen by the rule (budget ignored)"
    return [p.overlay, stats_md(p, extra)]


def _control(name: str, knob):
    visible = name == DEFAULT
    elem = f"more-{name}-{knob.name}".replace("_", "-")
    if knob.integer and knob.hi - knob.lo > 1000:
        return gr.Number(int(knob.default), precision=0, minimum=knob.lo, maximum=knob.hi,
                         label=knob.label, visible=visible, elem_id=elem)
    return gr.Slider(knob.lo, knob.hi, value=knob.default, step=knob.step, label=knob.label,
                     visible=visible, elem_id=elem)


def build(w: Wiring) -> Tab:
    details = Details(ID)
    with gr.Tab("More methods", id=ID) as tab:
        with gr.Row():
            with gr.Column(scale=3, min_width=420):
                overlay = gr.Image(label="Result (click to inspect a token)", format="jpeg",
                                   interactive=False,
                                   height=OVERLAY_H, elem_id="more-overlay")
                details.picture()
            with gr.Column(scale=2, min_width=300):
                choice = gr.Radio([(STRATEGIES[k].label, k) for k in NAMES], value=DEFAULT,
                                  label="Strategy", elem_id="more-strategy")
                budget = gr.Slider(1, 576, value=64, step=1, label="Token budget M",
                                   elem_id="more-budget")
                knobs = [_control(name, knob) for name, knob in KNOBS]
                stats = gr.Markdown(elem_id="more-stats")
                details.numbers()
                details.inspect()
                gr.Markdown(TEXT)
        export_box(w, ID)
        api_live = gr.Button(visible=False)  # /more_live: always answered

    inputs = [w.session, choice, budget, *knobs]
    out = [overlay, stats]
    full = out + details.outputs

    def everything(session, *values):
        return [*render(session, *values), *details.view(session)]

    def drag(session, *values):
        return render(session, *values, numbers=False)

    g = Gesture(ID)  # drags and releases in the user's order
    w.on(api_live.click, drag, inputs, out, "more_live", **LIVE)
    w.on(budget.input, g.drag(drag, len(out), slider_of(budget.input, inputs)), inputs, out, **LIVE)
    w.on(budget.release, g.full(everything, slider_of(budget.release, inputs)), inputs, full, **LIVE)
    w.on(choice.input, g.full(everything), inputs, full, "more", **LIVE)
    for ctl in knobs:
        if isinstance(ctl, gr.Slider):
            at = slider_of(ctl.input, inputs)
            w.on(ctl.input, g.drag(drag, len(out), at), inputs, out, **LIVE)
            w.on(ctl.release, g.full(everything, at), inputs, full, **LIVE)
        else:
            w.on(ctl.submit, g.full(everything), inputs, full, **LIVE)
    @guarded
    def click(session, evt: gr.SelectData):
        """A click inspects the patch; for a strategy with a query (CDPruner) it also moves it."""
        patch = patch_at(session, ID, evt)
        session.inspected[ID] = patch
        shown = session.panels.get(ID)
        name = shown.comp.strategy if shown is not None else ""
        if not (name in STRATEGIES and STRATEGIES[name].uses_query):
            return [gr.skip()] * (len(out) + 2) + details.inspector.view(session)
        session.query = patch
        return everything(session, *session.last_args[ID])

    w.on(overlay.select, click, [w.session], full, api_visibility="private", **LIVE)

    def show_knobs(name):
        return [gr.update(visible=owner == name) for owner, _ in KNOBS]

    if knobs:
        choice.change(show_knobs, choice, knobs, api_visibility="private", **NO_TARGETS)

    def fit(enc, _name, budget, *_knobs):
        n = enc.num_patches
        return [gr.update(maximum=n, value=min(int(budget), n))]

    def later(session, *_values):
        return details.view(session)

    # first the overlay and the numbers, then what the head downstream makes of it
    return Tab(ID, tab, inputs[1:], out, render, [budget], fit,
               later=(later, inputs[1:], details.outputs))
