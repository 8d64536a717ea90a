"""The "Inside the ViT" tab: ToMe and EViT pruning within the network's blocks, block by block."""

from __future__ import annotations

import gradio as gr

from compress.cache import shared_encoder
from compress.inside import EVIT_BLOCKS, largest_r
from viz.inside import depth_animation, inside_panel, run_key, settle, timing

from . import priority
from .common import (
    LIVE,
    OVERLAY_H,
    QUIET,
    Details,
    Steps,
    Tab,
    Wiring,
    export_box,
    export_folder,
    guarded,
    need,
    pause_unless,
    runs_label,
    threads_label,
)
from .gesture import slider_of
from .priority import lone_cores
from .source import LIMITS

ID = "inside"
METHODS = [("ToMe: merge r tokens in every block", "tome"),
           ("EViT: keep the top by CLS attention at chosen blocks", "prune")]
SCHEDULES = [("constant: r in every block", 0), ("decreasing: 2r → 0 (ToMe's schedule)", -1),
             ("increasing: 0 → 2r", 1)]
TEXT = """**What am I looking at?** Here the compression runs *inside* the network, as the papers
run it, so it saves compute. *ToMe* (Bolya et al., ICLR 2023) merges r tokens in every block, between
attention and MLP, by bipartite matching of the keys, with size-weighted averages and proportional
attention; clusters grow with depth. Its *decreasing* schedule merges 2r in block 1 down to 0 in the
last (about as many in all): merging early, where there are many tokens, saves more. *EViT* (Liang et
al., ICLR 2022) keeps the patches the CLS token attends to most at chosen blocks and fuses the rest
into one token (or drops them). Move *Show after
block* to watch the clusters (or kept patches) form. The numbers compare this forward with the plain one
on the same image: FLOPs, measured time, and what survives at the output (each patch's final token
against the plain forward's, the CLS token, and the saliency head downstream). *A free cut* drops as
many tokens at every block for nothing (the last ones, no matching): the most any method with these
token counts can gain on this machine. Where it falls short of the FLOPs, the machine is why (few
tokens use the cores less well, and every block still reads its weights); the rest is the method's own
work."""


def _tome_what(params: dict) -> str:
    if not isinstance(params["r"], tuple):
        return f"r = {params['schedule'][0]} per block"
    (r, slope), per_block = params["r"], params["schedule"]
    way = "decreasing" if slope < 0 else "increasing"
    return f"r = {r}, {way}: {per_block[0]} in block 1 → {per_block[-1]} in block {len(per_block)}"


def stats_md(p, again: bool = False) -> str:
    """The numbers line; ``again``: a first run's numbers that the settle step will time again."""
    s = p.stats
    r = p.comp.params
    what = (_tome_what(r) if p.comp.strategy == "tome_inside" else
            f"keep {r['keep_ratio']:.0%} at blocks {', '.join(str(b + 1) for b in r['blocks'])}"
            + (", rest fused" if r["fuse"] else ", rest dropped"))
    merge = "" if s["merge_ms"] is None else (f" · reducing {s['merge_ms']:.0f} ms "
                                                 f"({s['merge_ms'] / s['forward_ms']:.0%})")
    cls = "" if s["cls_cosine"] is None else f" · CLS cos **{s['cls_cosine']:.4f}**"
    cut = ""
    if s.get("cut_speedup") is not None:
        cut = f" · a free cut to these counts: {s['cut_speedup']:.2f}x"
        if s["cut_speedup"] <= s["speedup"]:  # a method's own step costs a few %: noise can flip them
            cut += " (no faster than the method: the difference is this machine's noise)"
    dropped = (f" (on the {1 - s['discarded_share']:.0%} still covered)"
               if s["discarded_share"] else "")
    return (f"### {s['N']} → {s['M']} tokens at the output ({what})\n"
            f"after block {s['block']}: {s['tokens_at_block']} tokens · FLOPs **{s['flops_ratio']:.0%}** "
            f"of the plain forward · forward {s['forward_ms']:.0f} ms vs plain {s['plain_ms']:.0f} ms "
            f"({threads_label(s['threads'])}, {runs_label(s, again)}): **{s['speedup']:.2f}x**"
            f"{cut}{merge}  \n"
            f"what survives: final patch tokens cos **{s['patch_cosine']:.4f}**{dropped}{cls}")


SETTLE_PAUSE_S = 1.0  # the page draws the first answer before the forwards are timed again


@guarded
def settled(session, method: str, r: int, keep: float, fuse: bool, blocks: list, _block: int,
            schedule: int = 0, pause: float = SETTLE_PAUSE_S):
    """[stats]: the shown run's numbers once its forward, the plain one and the free cut to its
    counts have been timed again in turns (``viz.inside.settle``). A first run shares the CPU
    with the server's own work on the request and, on a laptop, with the browser drawing the
    answer: in the app it read ToMe at r = 36 as 159 ms where the same forward took 113 ms a
    moment later. So the page first draws (``pause``), then the forwards run again; only for a
    person alone on the server (with others, the runs would cost them a core and still time a
    busy CPU). Skipped when the tab shows another setting by now, or the cores are not the
    run's; stopped between forwards when a newer setting is shown or someone else waits."""
    p = session.panels.get(ID) if session is not None else None
    if p is None or "key" not in p.extra or not priority.alone():
        return gr.skip()
    key = p.extra["key"]
    if key != run_key(method, int(r), float(keep), tuple(sorted(int(b) for b in blocks)), bool(fuse),
                      int(schedule)):
        return gr.skip()  # the controls have moved on: their own answer will come

    def moved_on() -> bool:  # a newer setting shown, or someone else waiting: nothing more to time
        return session.panels.get(ID) is not p or not priority.alone()

    if not pause_unless(pause, moved_on):  # (a newer setting ends the wait at once)
        return gr.skip()
    enc = need(session)
    encoder = shared_encoder(enc.model, LIMITS.device)
    result = p.extra["result"]
    with lone_cores():  # settles only on the first run's count (else it would not compare)
        if not settle(encoder, enc, key, with_cut=True, stop=moved_on) or moved_on():
            return gr.skip()
        p.stats.update(timing(encoder, enc, result, key))
    return stats_md(p)


@guarded
def render(session, method: str, r: int, keep: float, fuse: bool, blocks: list, block: int,
           schedule: int = 0, with_figure: bool = True):
    """[overlay, stats] (+ [figure]) for one run inside the network, shown after ``block``."""
    enc = need(session)
    encoder = shared_encoder(enc.model, LIMITS.device)
    if enc.layer != encoder.depth - 1:
        session.panels.pop(ID, None)
        out = [None, f"### Inside the network runs all {encoder.depth} blocks\nSet *Block to read "
                     f"tokens from* to {encoder.depth} (this encoding reads block {enc.layer + 1})."]
        return out + [None] if with_figure else out
    with lone_cores():  # the forwards: every core while no one else is waiting (timed alike)
        p = inside_panel(encoder, enc, method, int(r), float(keep),
                         tuple(sorted(int(b) for b in blocks)), bool(fuse), int(block),
                         with_figure=with_figure, schedule=int(schedule))
    session.panels[ID] = p
    out = [p.overlay, stats_md(p, again=priority.alone())]  # alone: ``settled`` follows
    return out + [p.figure] if with_figure else out


def r_range(enc, r: int, schedule: int):
    """r's slider for this image and schedule: its range the largest r allowed, its value within it."""
    top = largest_r(enc.num_patches, shared_encoder(enc.model, LIMITS.device).depth, int(schedule))
    return gr.update(maximum=top, value=min(int(r), top))


@guarded
def fit_r(session, r: int, schedule: int):
    """r's slider when the schedule changes (``r_range``)."""
    return r_range(need(session), r, schedule)


@guarded
def animate(session) -> str:
    """The shown run's tokens after every block as an animated GIF (a file for the page)."""
    enc = need(session)
    p = session.panels.get(ID)
    if p is None or "result" not in p.extra:
        raise gr.Error("Nothing to animate yet: the tab shows no run.")
    path = export_folder() / f"inside-{p.comp.strategy}-blocks.gif"
    depth_animation(p.extra["result"], enc, path)
    return str(path)


def shown_for(method: str) -> list:
    """[ToMe's settings, EViT's settings]: visible for the chosen method only."""
    return [gr.update(visible=method == "tome"), gr.update(visible=method == "prune")]


def build(w: Wiring) -> Tab:
    details = Details(ID)
    with gr.Tab("Inside the ViT", id=ID) as tab:
        with gr.Row():
            with gr.Column(scale=3, min_width=420):
                # (a label that fits beside the picture's buttons at 1280 px: a longer one ran under them)
                overlay = gr.Image(label="Tokens after the chosen block (click to inspect)",
                                   format="jpeg", interactive=False, height=OVERLAY_H,
                                   elem_id="inside-overlay")
                details.picture()
            with gr.Column(scale=2, min_width=300):
                method = gr.Radio(METHODS, value="tome", label="Method", elem_id="inside-method")
                # only the chosen method's settings are shown (``shown_for``)
                with gr.Column(elem_id="inside-tome") as tome:
                    r = gr.Slider(0, 288, value=16, step=1, label="ToMe: r merged per block",
                                  elem_id="inside-r")
                    schedule = gr.Radio(SCHEDULES, value=0, label="ToMe: schedule over the blocks",
                                        elem_id="inside-schedule")
                with gr.Column(visible=False, elem_id="inside-evit") as evit:
                    keep = gr.Slider(0.05, 1.0, value=0.7, step=0.01, label="EViT: keep ratio per block",
                                     elem_id="inside-keep")
                    with gr.Row():
                        blocks = gr.CheckboxGroup([(str(b + 1), b) for b in range(12)],
                                                  value=list(EVIT_BLOCKS), label="EViT: prune at blocks",
                                                  elem_id="inside-blocks")
                        fuse = gr.Checkbox(True, label="EViT: fuse the rest into one token",
                                           elem_id="inside-fuse")
                block = gr.Slider(1, 12, value=12, step=1, label="Show after block",
                                  elem_id="inside-block")
                stats = gr.Markdown(elem_id="inside-stats")
                details.numbers()
                details.inspect()
        plot = gr.Plot(label="Tokens per block", elem_id="inside-plot")
        with gr.Accordion("Animate: the tokens after every block, as a GIF", open=False):
            play = gr.Button("Make the animation", size="sm", elem_id="inside-animate")
            movie = gr.Image(label="Blocks 1 to the last, looping", type="filepath", interactive=False,
                             height=OVERLAY_H, elem_id="inside-animation")
        gr.Markdown(TEXT)
        export_box(w, ID)
        api_live = gr.Button(visible=False)  # /inside_live: always answered

    inputs = [w.session, method, r, keep, fuse, blocks, block, schedule]
    live = [overlay, stats]
    full = live + [plot] + details.outputs

    steps = Steps(render, details)

    # a new setting runs the network (~0.5 s at 336 px on a CPU): on release, never per drag step
    everything = steps.gesture.full(steps.everything)  # drags and releases in the user's order
    # ... then the forwards are timed again in turns, and the numbers line settles
    done = [w.on(r.release, everything, inputs, full, "inside", **LIVE),
            w.on(keep.release, everything, inputs, full, **LIVE)]
    done += [w.on(ctl.input, everything, inputs, full, **LIVE) for ctl in (method, fuse, blocks)]
    # a schedule's first (or last) block merges 2r: r's range follows the schedule, then it runs
    fitted = w.on(schedule.input, fit_r, [w.session, r, schedule], [r], **LIVE)
    done.append(w.on(fitted.then, everything, inputs, full, **LIVE))
    for event in done:
        w.on(event.then, settled, inputs, [stats], **QUIET)
    # the settings of the method not chosen are hidden (also when an API call sets the method)
    w.on(method.change, shown_for, [method], [tome, evit], api_visibility="private", queue=False)
    w.on(play.click, animate, [w.session], [movie], "inside_animation", **LIVE)
    # the block slider only redraws a kept run: live
    w.on(api_live.click, steps.quick, inputs, live, "inside_live", **LIVE)
    steps.on_drag(w, block.input, inputs, live, steps.quick)
    w.on(block.release, steps.gesture.full(steps.show, slider_of(block.release, inputs)),
         inputs, live + [plot], **LIVE)
    w.on(overlay.select, details.inspector.click(), [w.session], details.inspector.outputs,
         api_visibility="private", **LIVE)

    def fit(enc, _method, r_value, _keep, _fuse, blocks_value, block_value, schedule_value):
        depth = shared_encoder(enc.model, LIMITS.device).depth
        return [r_range(enc, r_value, schedule_value),
                gr.update(choices=[(str(b + 1), b) for b in range(depth)],
                          value=[b for b in blocks_value if b < depth]),
                gr.update(maximum=depth, value=min(int(block_value), depth))]

    def later(session, *values):  # a tab opened: the figure, the model downstream, the timing
        out = [*steps.later(session, *values), settled(session, *values)]
        if not steps.shows(session, values):  # released meanwhile: that answer is newer than
            return [gr.skip()] * len(out)     # this figure and saliency pair, sent after it
        return out

    return Tab(ID, tab, inputs[1:], live, steps.quick, [r, blocks, block], fit,
               later=(later, inputs[1:], [plot] + details.outputs + [stats]),
               api_later=lambda session, *values: [*steps.later(session, *values), gr.skip()])
