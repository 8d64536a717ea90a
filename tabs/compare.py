"""The "Compare" tab: every strategy at one budget M, the numbers, the curves, the seed's claims."""

from __future__ import annotations

import gradio as gr

from viz.panels import compare_panel, seed_claims

from .common import LIVE, Tab, Wiring, guarded, need

ID = "compare"
TEXT = """**Every strategy at the same budget M**, on this image: overlays, numbers, and fidelity
against M for all of them (computed once per image). Random keep is the floor every method must
beat. Fidelity: mean cosine of each patch token to the output that represents it best."""


def claims_md(enc) -> str:
    rows = seed_claims(enc)
    lines = ["| the seed claims | setting | on this image | holds? |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['claim']} | {r['setting']} | {r['here']} | {r['holds']} |" for r in rows]
    return "\n".join(lines)


@guarded
def render(session, budget: int, with_figure: bool = False):
    """[grid, table, note] (+ [figure]) for every strategy at ``budget``."""
    enc = need(session)
    p = compare_panel(enc, min(int(budget), enc.num_patches), with_figure=with_figure)
    session.panels[ID] = p
    rows = [[r[0], r[1], r[2], r[3], "n/a" if r[4] is None else round(r[4], 3), r[5]]
            for r in p.stats["rows"]]
    table = {"headers": p.stats["columns"], "data": rows}
    note = (f"budget M = {p.stats['budget']} of N = {p.stats['N']} · all strategies in "
            f"{p.extra['total_ms']:.0f} ms")
    out = [p.overlay, table, note]
    return out + [p.figure] if with_figure else out


@guarded
def draw(session, budget: int):
    """The first look: grid, table, note and the seed claims (the curve follows)."""
    return [*render(session, budget), claims_md(need(session))]


@guarded
def curve(session, budget: int):
    """The fidelity-against-M figure (its sweep is computed once per image)."""
    return render(session, budget, with_figure=True)[-1]


def build(w: Wiring) -> Tab:
    with gr.Tab("Compare", id=ID) as tab:
        with gr.Row():
            budget = gr.Slider(1, 576, value=64, step=1, label="Token budget M (every strategy)",
                               elem_id="compare-budget", scale=3)
            note = gr.Markdown(elem_id="compare-note")
        grid = gr.Image(label="Every strategy at M", format="jpeg", interactive=False,
                        show_label=False, elem_id="compare-grid")
        table = gr.Dataframe(label="Numbers", interactive=False, elem_id="compare-table")
        plot = gr.Plot(label="Fidelity against M", elem_id="compare-plot")
        gr.Markdown(TEXT)
        claims = gr.Markdown(elem_id="seed-claims")

    out = [grid, table, note]
    w.on(budget.input, render, [w.session, budget], out, "compare_live", **LIVE)
    w.on(budget.release, lambda s, b: render(s, b, with_figure=True), [w.session, budget],
         out + [plot], "compare", **LIVE)

    def fit(enc, budget):
        n = enc.num_patches
        return [gr.update(maximum=n, value=min(int(budget), n))]

    return Tab(ID, tab, [budget], out + [claims], draw, [budget], fit,
               later=(curve, [budget], [plot]))
