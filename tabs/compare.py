"""The "Compare" tab: every strategy at one budget M, the numbers, the curves, the seed's claims.

The grid and the fidelity table follow the budget slider live. On release
come the slower columns: task agreement (the saliency head on every
strategy's tokens, one batch), ToMe and EViT run inside the network at the
same budget with their measured speedup, and the seed claims judged by the
task too. The curves (fidelity and task agreement against M for every
strategy) are computed once per image by a background job; a timer polls it.
"""

from __future__ import annotations

import gradio as gr

from compress import STRATEGIES
from compress.cache import shared_encoder
from compress.downstream import agreement_sweep
from compress.heads import head_status
from compress.registry import fidelity_sweep
from viz.compare import curves_plot
from viz.inside import inside_at_budget
from viz.panels import compare_panel, seed_claims, task_column

from . import priority
from .common import (
    LIVE,
    NO_TARGETS,
    QUIET,
    Tab,
    Wiring,
    guarded,
    need,
    pause_unless,
    runs_label,
    threads_label,
)
from .gesture import Gesture
from .jobs import JOBS
from .priority import lone_cores
from .source import LIMITS

ID = "compare"
COLUMNS = ["strategy", "M", "ratio", "fidelity", "task CC", "attention kept", "ms", "speedup"]
NO_SPEEDUP = "none: post hoc"  # ran after the network (the text above the table says so)
TEXT = """**Every strategy at the same budget M**, on this image: overlays, numbers, and two curves
for all of them, computed once per image in the background. *Fidelity* (mean cosine of each patch
token to the output that represents it best) measures the tokens and flatters uniform coverage;
*task CC* measures what a trained model downstream loses (the saliency head: Pearson correlation of
its map on the compressed tokens with its map on the original ones). Random keep and pooling are
the floor every method must beat. The strategies above run after the network (post hoc), so they save nothing
inside it; ToMe and EViT *inside the ViT* run in its blocks at the same final M, and their speedup is
measured against the plain forward on this machine. Beside it, once the numbers settle: the *free cut*,
the same forward cut to the same token counts for nothing (the last tokens dropped, no matching): the
most any method with those counts can gain here (a method a few % above it is as fast: that is the
machine's noise)."""


def claims_md(enc) -> str:
    rows = seed_claims(enc)
    lines = ["| the seed claims | setting | on this image | holds? | the task |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['claim']} | {r['setting']} | {r['here']} | {r['holds']} | {r['task']} |"
              for r in rows]
    return "\n".join(lines)


def _row(label, s, task, speedup) -> list:
    kept = s["attention_mass_kept"]
    return [label, s["M"], round(s["ratio"], 2), round(s["fidelity"], 4),
            "n/a" if task is None else round(task["cc"], 3),
            "n/a" if kept is None else round(kept, 3), round(s["ms"], 1), speedup]


@guarded
def render(session, budget: int):
    """[grid, table, note] for every strategy at ``budget`` (fidelity; the task follows)."""
    enc = need(session)
    p = compare_panel(enc, min(int(budget), enc.num_patches), with_figure=False)
    session.panels[ID] = p
    rows = [[label, m, ratio, fid, "…", "n/a" if kept is None else round(kept, 3), ms, NO_SPEEDUP]
            for label, m, ratio, fid, kept, ms in p.stats["rows"]]
    note = (f"budget M = {p.stats['budget']} of N = {p.stats['N']} · {len(rows)} strategies in "
            f"{p.extra['total_ms']:.0f} ms · task agreement and the inside-network rows follow on "
            "release")
    return [p.overlay, {"headers": COLUMNS, "data": rows}, note]


@guarded
def slower(session, budget: int):
    """[table with task CC and the inside-network rows, note, seed claims] at ``budget``, the
    one the grid shows; skipped when the slider has moved to another budget meanwhile (a
    tab opened at one budget and dragged at once must not get the old table back). The
    inside rows come from one run each here; ``settled_rows`` times them again after."""
    return _answer(session, budget, settled=False)


SETTLE_PAUSE_S = 0.5  # the page draws the table before the inside rows are timed again


@guarded
def settled_rows(session, budget: int, pause: float = SETTLE_PAUSE_S):
    """[table, note]: the inside rows timed again in turns, with the free cut to their counts
    (``viz.inside.settle``), for a person alone on the server; skipped otherwise, or when the
    budget has moved on. Its own step after ``slower``, so the table does not wait for it."""
    p = session.panels.get(ID) if session is not None else None
    if p is None or p.stats["budget"] != min(int(budget), need(session).num_patches):
        return [gr.skip()] * 2
    if not pause_unless(pause, lambda: session.panels.get(ID) is not p or not priority.alone()):
        return [gr.skip()] * 2  # a newer budget shown, or someone else waiting
    return _answer(session, budget, settled=True)[:2]


@guarded
def after_curves(session, budget: int):
    """[table, note]: the inside rows settled once the image's curves job has finished, if they
    were shown unsettled (the job takes a core: while it runs no one is alone on the server, so
    a table shown then keeps its first runs; opening the tab starts the job). Skipped at once
    otherwise: it follows every tick of the curves' timer."""
    p = session.panels.get(ID) if session is not None and session.enc is not None else None
    job = session.enc.memo.get("curves_job") if p is not None else None
    if (p is None or p.extra.get("settled") or "task" not in p.extra or job is None
            or not job.finished or p.stats["budget"] != min(int(budget), session.enc.num_patches)
            or not priority.alone()):
        return [gr.skip()] * 2
    return _answer(session, budget, settled=True)[:2]


def _answer(session, budget: int, settled: bool) -> list:
    """[table, note, claims]; the inside rows settled (``inside_at_budget(settled=True)``) when
    ``settled`` and this person is alone on the server. The head's task column is computed
    once per shown budget and kept with the panel."""
    from compress import summary

    enc = need(session)
    budget = min(int(budget), enc.num_patches)
    p = session.panels.get(ID)
    if p is None or p.stats["budget"] != budget:  # the slider has moved on since: stale
        return [gr.skip()] * 3
    extra_note = ""
    inside = {}
    known = p.extra.setdefault("task", {})
    with lone_cores():  # forwards and the head: every core while no one else is waiting
        # the post-hoc rows' task column first: the page draws the grid meanwhile, and the
        # inside forwards are timed after it (timed beside the browser's drawing, on two
        # cores, ToMe r = 43 read 1.05x where the benchmark measures 1.6x)
        if "rows" not in known:
            known["rows"] = task_column(enc, p.extra["comps"])
        task, reason = dict(known["rows"][0]), known["rows"][1]
        settling = settled and priority.alone()  # not at others' cost
        try:
            inside = inside_at_budget(shared_encoder(enc.model, LIMITS.device), enc, budget,
                                      settled=settling)
            p.extra["settled"] = p.extra.get("settled") or settling
        except ValueError as exc:
            extra_note = f" · inside the network: n/a ({exc})"
        if inside:
            if "inside" not in known:  # the same runs (kept with the encoding): the same task
                known["inside"] = task_column(enc, {name: row["comp"] for name, row in inside.items()})[0]
            task.update(known["inside"])
    rows = [_row(STRATEGIES[name].short, summary(enc, comp), task[name], NO_SPEEDUP)
            for name, comp in p.extra["comps"].items()]
    for name, row in inside.items():
        s = summary(enc, row["comp"])
        s["ms"] = row["forward_ms"]
        cut = "" if row["cut_speedup"] is None else f"; free cut {row['cut_speedup']:.2f}x"
        rows.append(_row(f"{row['label']} ({row['setting']})", s, task[name],
                         f"{row['speedup']:.2f}x (FLOPs {row['flops_ratio']:.0%}{cut})"))
    note = (f"budget M = {budget} of N = {enc.num_patches} · {len(p.extra['comps'])} strategies in "
            f"{p.extra['total_ms']:.0f} ms" + (f" · task CC n/a: {reason}" if reason else "")
            + extra_note)
    if inside:
        first = next(iter(inside.values()))
        job = enc.memo.get("curves_job")  # running: the rows settle when it ends (after_curves)
        again = not settling and (priority.alone() or (job is not None and not job.finished))
        note += (f" · inside rows: ms is the whole forward ({runs_label(first, again)}; the plain "
                 f"forward: {first['plain_ms']:.0f} ms, {threads_label(first['threads'])})")
    if session.panels[ID].stats["budget"] != budget:  # moved while these seconds ran: stale
        return [gr.skip()] * 3
    return [{"headers": COLUMNS, "data": rows}, note, claims_md(enc)]


@guarded
def everything(session, budget: int):
    """The /compare endpoint: [table, note, claims] at ``budget``, drawn first if it is not; the
    inside rows settled when this person is alone on the server."""
    render(session, budget)
    return _answer(session, budget, settled=True)


# --- the curves: a background job per image, polled -----------------------------------------

def _curves_job(enc):
    head, reason = head_status(enc.model)
    if head is not None:
        reason = head.supports(enc)

    def run(progress):
        enc.memo["curves_fidelity"] = fidelity_sweep(enc)
        if head is None or reason:
            return None
        return agreement_sweep(enc, head, progress=progress)

    return JOBS.once(enc.memo, "curves_job", run), reason


def _curve_view(session, budget: int) -> tuple[object, str, bool]:
    """(figure, note, finished) for the current state of the image's curves job."""
    enc = need(session)
    job, reason = _curves_job(enc)
    labels = {k: v.short for k, v in STRATEGIES.items()}
    fidelity = enc.memo.get("curves_fidelity")
    if job.error:
        return gr.skip(), f"curves failed: {job.error}", True
    if fidelity is None:
        return gr.skip(), f"fidelity and task curves: {job.describe()}", False
    agreement = None
    if job.finished and job.result is not None:
        agreement = {name: [(m, a["cc"]) for m, a in points] for name, points in job.result.items()}
    note = (f"no task curve: {reason}" if reason else
            "task curve: " + job.describe())
    figure = curves_plot(fidelity, agreement, labels, int(budget), enc.num_patches,
                         note=note if agreement is None else "")
    return figure, f"curves: {job.describe()}" if not reason else note, job.finished


@guarded
def curve(session, budget: int):
    """[figure, note, timer]: what the curves job has so far; the timer polls while it runs."""
    figure, note, finished = _curve_view(session, budget)
    session.drawn["compare:curve"] = (session.version, finished)
    return [figure, note, gr.Timer(active=not finished)]


@guarded
def poll(session, budget: int):
    """A timer tick: redraw when the job has moved on to something new to show."""
    if session is None or session.enc is None:
        return [gr.skip(), gr.skip(), gr.Timer(active=False)]
    job, _ = _curves_job(session.enc)
    seen = session.drawn.get("compare:curve")
    stage = (session.version, job.finished, "curves_fidelity" in session.enc.memo)
    if seen == stage:
        return [gr.skip(), job.describe(), gr.Timer(active=not job.finished)]
    figure, note, finished = _curve_view(session, budget)
    session.drawn["compare:curve"] = stage
    return [figure, note, gr.Timer(active=not finished)]


def build(w: Wiring) -> Tab:
    with gr.Tab("Compare", id=ID) as tab:
        with gr.Row():
            budget = gr.Slider(1, 576, value=64, step=1, label="Token budget M (every strategy)",
                               elem_id="compare-budget", scale=3)
            note = gr.Markdown(elem_id="compare-note")
        grid = gr.Image(label="Every strategy at M", format="jpeg", interactive=False,
                        show_label=False, elem_id="compare-grid")
        table = gr.Dataframe(label="Numbers", interactive=False, elem_id="compare-table",
                             max_height=760, wrap=True,
                             column_widths=["24%", "6%", "8%", "11%", "9%", "12%", "8%", "22%"])
        curve_note = gr.Markdown(elem_id="compare-curve-note")
        plot = gr.Plot(label="Fidelity and task agreement against M", elem_id="compare-plot")
        gr.Markdown(TEXT)
        claims = gr.Markdown(elem_id="seed-claims")
        timer = gr.Timer(1.0, active=False)
        api_full = gr.Button(visible=False)  # the /compare endpoint: the table at any budget
        api_live = gr.Button(visible=False)  # /compare_live: always answered

    fast = [grid, table, note]
    slow = [table, note, claims]
    curves = [plot, curve_note, timer]
    g = Gesture(ID)  # drags and releases in the user's order
    w.on(api_live.click, render, [w.session, budget], fast, "compare_live", **LIVE)
    w.on(budget.input, g.drag(render, len(fast), 0), [w.session, budget], fast, **LIVE)
    released = w.on(budget.release, g.full(render, 0), [w.session, budget], fast, **LIVE)
    released = w.on(released.then, slower, [w.session, budget], slow, **QUIET)
    w.on(released.then, settled_rows, [w.session, budget], [table, note], **QUIET)
    w.on(api_full.click, everything, [w.session, budget], slow, "compare", **LIVE)
    w.on(released.then, curve, [w.session, budget], curves, **QUIET)
    ticked = w.on(timer.tick, poll, [w.session, budget], curves, api_visibility="private", **NO_TARGETS)
    # (its own queue, as the timer's: a tick's check must not wait behind everyone's live steps)
    w.on(ticked.then, after_curves, [w.session, budget], [table, note], api_visibility="undocumented",
         **NO_TARGETS)

    def fit(enc, budget):
        n = enc.num_patches
        return [gr.update(maximum=n, value=min(int(budget), n))]

    def later(session, budget):  # a tab opened: the inside rows settled at once (alone)
        return [*_answer(session, budget, settled=True), *curve(session, budget)]

    def api_later(session, budget):  # /encode: no background curves job nobody would poll
        return [*_answer(session, budget, settled=True), gr.skip(),
                "curves: drawn when the Compare tab is opened", gr.skip()]

    return Tab(ID, tab, [budget], fast, render, [budget], fit,
               later=(later, [budget], slow + curves), api_later=api_later)
