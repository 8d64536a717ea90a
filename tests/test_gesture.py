"""A dragged slider's last update must not land over its release (tabs/gesture.py).

The browser's drag update can reach the server after the release; these tests
run the two orders with real threads and a real Session, the handlers standing
in for a tab's render (they record what they drew into the session's panels,
as the tabs do).
"""

import threading

import gradio as gr

from tabs.common import Session
from tabs.gesture import Gesture


def handlers(g: Gesture, gate: threading.Event | None = None, started=None, slider: int = 0):
    def drag(session, *values):
        if started is not None:
            started.set()
        if gate is not None:
            gate.wait(5)
        session.panels["t"] = ("drag", values)
        return ["drag picture", f"drag {values}"]

    def full(session, *values):
        session.panels["t"] = ("full", values)
        return ["full picture", f"full {values} fidelity"]

    return g.drag(drag, 2, slider), g.full(full, slider)


def is_skip(out) -> bool:
    return len(out) == 2 and all(o == gr.skip() for o in out)


def test_the_last_drag_update_arriving_after_its_release_is_skipped():
    s, (drag, full) = Session(), handlers(Gesture("t"))
    assert drag(s, 0.5, "mean")[0] == "drag picture"  # a drag step: shown
    assert full(s, 0.7, "mean")[0] == "full picture"  # the release at 0.7
    assert is_skip(drag(s, 0.7, "mean"))  # the trailing drag update at 0.7, after it
    assert s.panels["t"] == ("full", (0.7, "mean"))  # and the export is the release's


def test_a_late_trailing_drag_is_skipped_after_another_sliders_release():
    # slider 0 released at 0.75; then slider 1 dragged and released; then slider 0's last drag
    # update, held back in the browser, arrives: it must not draw slider 1's setting away
    g, s = Gesture("t"), Session()
    drag0, full0 = handlers(g, slider=0)
    drag1, full1 = handlers(g, slider=1)
    full0(s, 0.75, 144)
    assert drag1(s, 0.75, 100)[0] == "drag picture"
    full1(s, 0.75, 58)
    assert is_skip(drag0(s, 0.75, 144))
    assert s.panels["t"] == ("full", (0.75, 58))
    assert drag0(s, 0.7, 58)[0] == "drag picture"  # slider 0 dragged anew: drawn


def test_a_new_drag_after_a_release_is_shown():
    s, (drag, full) = Session(), handlers(Gesture("t"))
    full(s, 0.7, "mean")
    assert drag(s, 0.6, "mean")[0] == "drag picture"
    assert s.panels["t"] == ("drag", (0.6, "mean"))


def test_a_drag_still_working_when_the_release_starts_is_not_shown_and_not_kept():
    s, gate, started = Session(), threading.Event(), threading.Event()
    drag, full = handlers(Gesture("t"), gate, started)
    got = {}
    t = threading.Thread(target=lambda: got.update(drag=drag(s, 0.65, "mean")))
    t.start()
    assert started.wait(5)  # the drag at 0.65 is drawing
    r = threading.Thread(target=lambda: got.update(full=full(s, 0.7, "mean")))
    r.start()  # the release at 0.7 starts meanwhile
    r.join(0.3)
    assert r.is_alive()  # it waits for the drag's turn to end, so it draws last
    gate.set()
    t.join(5)
    r.join(5)
    assert is_skip(got["drag"])
    assert got["full"][0] == "full picture"
    assert s.panels["t"] == ("full", (0.7, "mean"))


def test_sessions_and_tabs_do_not_skip_each_others_drags():
    a, b = Session(), Session()
    drag, full = handlers(Gesture("t"))
    other_drag, _ = handlers(Gesture("u"))
    full(a, 0.7, "mean")
    assert drag(b, 0.7, "mean")[0] == "drag picture"  # another session
    assert other_drag(a, 0.7, "mean")[0] == "drag picture"  # another tab


def test_only_the_dragged_slider_tells_a_trailing_update():
    # Merging: the slider a drag moves sets the method, so the release and the drag before it may
    # read different methods; the dragged slider's value alone says it is the same gesture
    s, (drag, full) = Session(), handlers(Gesture("t"), slider=2)
    full(s, "tome", 0.9, 57, "mean")
    assert is_skip(drag(s, "threshold", 0.9, 57, "mean"))
    assert drag(s, "threshold", 0.9, 58, "mean")[0] == "drag picture"


def test_no_session_yet_passes_through_to_the_handler():
    # the tabs' handlers answer a missing session with a clear message themselves
    g = Gesture("t")
    assert g.drag(lambda s, *v: ["drawn", s], 2, 0)(None, 1) == ["drawn", None]
    assert g.full(lambda s, *v: ["drawn", s])(None, 1) == ["drawn", None]


SLIDERS = ("merge-threshold", "merge-target", "prune-keep", "resampler-latents",
           "resampler-selected", "more-budget", "inside-block", "compare-budget")


def test_every_dragged_slider_of_the_app_leaves_its_release_on_the_page(coffee_enc):
    """The app's own handlers (as wired by build()): after a slider's release, the drag update
    with the same setting changes nothing; a drag to another setting draws."""
    import app

    demo = app.build()
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    by_event = {(t[0], t[1]): f for f in demo.fns.values() for t in f.targets
                if f.inputs and isinstance(f.inputs[0], gr.State)}  # a tab's handler, with the session
    for elem in SLIDERS:
        s = Session()
        s.show(coffee_enc)
        drag, release = by_event[(ids[elem], "input")], by_event[(ids[elem], "release")]
        assert drag.inputs == release.inputs
        values = [c.value for c in release.inputs[1:]]
        release.fn(s, *values)
        assert all(o == gr.skip() for o in drag.fn(s, *values)), elem
        slider = demo.blocks[ids[elem]]
        other = list(values)
        at = release.inputs[1:].index(slider)
        other[at] = slider.minimum + 1 if values[at] != slider.minimum + 1 else slider.minimum + 2
        out = drag.fn(s, *other)  # (merging leaves its method as it is: one skip)
        assert sum(o != gr.skip() for o in out) >= len(out) - 1 >= 1, elem


def test_a_drag_that_waited_for_an_encode_is_still_older_than_the_release_after_it():
    # both wait while an upload is encoded (tabs/priority.py); when it ends, whichever runs
    # first, the drag (an earlier position) must not be the picture left on the page
    import time

    from tabs import priority

    s, got = Session(), {}
    drag, full = handlers(Gesture("t"))
    with priority.encoding():
        t = threading.Thread(target=lambda: got.update(drag=drag(s, 0.65, "mean")))
        t.start()
        time.sleep(0.2)
        r = threading.Thread(target=lambda: got.update(full=full(s, 0.7, "mean")))
        r.start()
        time.sleep(0.2)
        assert not got  # both still give way
    t.join(5)
    r.join(5)
    assert is_skip(got["drag"])
    assert s.panels["t"] == ("full", (0.7, "mean"))


def test_leaving_the_tome_box_unchanged_keeps_threshold_merging(coffee_enc):
    """Gradio sends a slider's "release" when its number box loses focus, changed or not:
    clicking into the ToMe target's box and out again must not switch merging to ToMe."""
    import app

    demo = app.build()
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    release = next(f for f in demo.fns.values() for t in f.targets
                   if t == (ids["merge-target"], "release") and isinstance(f.inputs[0], gr.State))
    s = Session()
    s.show(coffee_enc)
    values = [c.value for c in release.inputs[1:]]  # method, threshold, target, fill as built
    assert values[0] == "threshold"
    from tabs import merge

    merge.render(s, *values, with_figure=False)  # the tab as first drawn
    out = release.fn(s, *values)
    assert all(o == gr.skip() for o in out)  # nothing switched, nothing redrawn
    moved = [values[0], values[1], values[2] + 10, values[3]]
    out = release.fn(s, *moved)
    assert out[0] == "tome" and out[1] != gr.skip()  # a new target: ToMe, drawn
    # a drag to 200 whose picture (and method) had not reached the page when its release was
    # sent: the release still draws, with fidelity
    merge.render(s, "threshold", values[1], 200, values[3], with_figure=False, numbers=False)
    out = release.fn(s, "threshold", values[1], 200, values[3])
    assert out[0] == "tome" and "fidelity" in out[2]


def test_a_figure_for_a_setting_the_tab_has_left_is_not_drawn():
    # The figure is a step after its picture (a release's, or the one a tab draws on opening).
    # In the Inside tab a release right after the tab opened got the opening r's plot beside
    # its own numbers, and the opening run as its panel: the figure for values the tab no longer
    # shows is skipped, and the panel stays the newer one.
    from tabs.common import Details, Steps
    from viz.panels import Panel

    drawn = []

    def render(session, *values, with_figure=True, numbers=True):
        session.panels["t"] = Panel(None, None, {"values": values}, None)
        drawn.append((values, with_figure))
        out = [f"picture {values}", f"numbers {values}"]
        return out + [f"figure {values}"] if with_figure else out

    steps, s = Steps(render, Details("t")), Session()
    steps.quick(s, 16)  # the tab opens at r = 16 ...
    release = steps.gesture.full(steps.quick)
    release(s, 21)  # ... and r = 21 is released before its figure step came
    assert steps.figure(s, 16) == gr.skip()  # the opening r's figure: not drawn
    assert s.panels["t"].stats["values"] == (21,) and drawn[-1] == ((21,), False)
    assert steps.figure(s, 21) == "figure (21,)"  # the shown setting's: drawn
    assert s.panels["t"].stats["values"] == (21,)


def test_a_release_while_the_inside_tab_opens_is_not_overwritten_by_the_opening(encoder):
    # The Inside tab's step after opening (its plot, the saliency pair, the settled timing)
    # returns after the settle step's pause: a release of r during that pause answered first,
    # and the opening step's plot for the old r then landed over it (seen in the browser)
    import time

    from PIL import Image

    import app

    demo = app.build()
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    fns = list(demo.fns.values())
    release = next(f for f in fns for t in f.targets
                   if t == (ids["inside-r"], "release") and isinstance(f.inputs[0], gr.State))
    opening = next(f for f in fns if getattr(f.fn, "__name__", "") == "later_open")
    s = Session()
    s.show(encoder.encode(Image.open("assets/chelsea.jpg"), size=224))
    s.open_tab = "inside"
    values = [c.value for c in release.inputs[1:]]  # method, r = 16, ... as built
    release.fn(s, *values)  # the tab's first picture at r = 16
    later_values = [c.value for c in opening.inputs[1:]]
    got = {}
    t = threading.Thread(target=lambda: got.update(out=opening.fn(s, *later_values)))
    t.start()
    time.sleep(0.3)  # the opening step is in its pause
    r_at = release.inputs[1:].index(demo.blocks[ids["inside-r"]])
    newer = list(values)
    newer[r_at] = 21
    answer = release.fn(s, *newer)
    t.join(30)
    assert "(r = 21 per block)" in answer[1]
    inside_out = [o for o, c in zip(got["out"], opening.outputs, strict=True)
                  if getattr(c, "elem_id", "") and c.elem_id.startswith("inside")]
    assert inside_out and all(o == gr.skip() for o in inside_out), inside_out
    assert s.panels["inside"].extra["values"][r_at] == 21
