"""Drawing for the model downstream, the inspector, the curves and the inside-network view."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from viz.compare import curves_plot
from viz.overlay import QUERY_COLOR, token_overlay
from viz.saliency import CAPTION_PX, saliency_overlay, saliency_pair


def grey(size=(96, 96)) -> Image.Image:
    return Image.new("RGB", size, (128, 128, 128))


def test_saliency_overlay_colours_by_the_absolute_value():
    sal = torch.zeros(48, 48)
    sal[:, :24] = 1.0  # the left half salient
    img = np.asarray(saliency_overlay(grey(), sal, display=96)).astype(int)
    assert img.shape == (96, 96, 3)
    left, right = img[:, :40].mean(axis=(0, 1)), img[:, 56:].mean(axis=(0, 1))
    # inferno: 1 is pale yellow, 0 black; blended 0.6 over grey 128
    assert left.sum() > right.sum() + 200 and left[0] > 200 and right.max() < 60


def test_saliency_pair_is_two_maps_side_by_side_with_titles():
    a, b = torch.rand(20, 20), torch.rand(20, 20)
    pair = saliency_pair(grey((120, 60)), a, b, caption="CC 0.5", display=60, gap=6)
    assert pair.size == (2 * 60 + 3 * 6, 30 + CAPTION_PX + 2 * 6)
    arr = np.asarray(pair).astype(int)
    assert arr[6:36, 6:66].std() > 5 and arr[6:36, 72:132].std() > 5  # the two maps on top
    # the titles under them (the app's image box covers a picture's top corners with its label
    # and buttons): light text on the dark strip, none above the maps
    def background(a):  # the share of the dark strip's colour
        return float((np.abs(a - 24).sum(axis=-1) < 6).mean())

    assert background(arr[6:36, 6:132]) < 0.1  # the top rows are the maps, no title strip
    strip = arr[36:36 + CAPTION_PX]
    assert background(strip) > 0.6
    assert (strip[:, 6:66] > 200).any() and (strip[:, 72:132] > 200).any()


def test_token_overlay_dims_the_rest_and_rings_the_patch():
    weights = torch.zeros(16)
    weights[[0, 1, 4, 5]] = 0.25  # the token covers the top-left 2 x 2 patches of a 4 x 4 grid
    img = np.asarray(token_overlay(grey(), (4, 4), weights, patch=5, display=96)).astype(int)
    assert img[2:20, 2:20].mean() > img[60:90, 60:90].mean() + 40  # covered clear, the rest dimmed
    cyan = (np.abs(img - np.array(QUERY_COLOR)).sum(axis=-1) < 60)
    ys, xs = np.nonzero(cyan)
    assert len(ys) and abs(ys.mean() - 36) < 8 and abs(xs.mean() - 36) < 8  # ring on patch 5
    soft = token_overlay(grey(), (4, 4), torch.full((16,), 1 / 16), patch=0, display=96)
    assert soft.size == (96, 96)  # a row drawing on every patch: a heat map, still ringed


def test_curves_plot_draws_both_metrics_or_says_why_not():
    fid = {"pool": [(16, 0.9), (64, 0.95)], "prumerge": [(99, 0.75)]}
    cc = {"pool": [(16, 0.7), (64, 0.9)], "prumerge": [(99, 0.6)]}
    fig = curves_plot(fid, cc, {"pool": "Pooling", "prumerge": "PruMerge"}, 64, 576)
    assert isinstance(fig, Figure)
    left, right = fig.axes[:2]
    assert len(left.lines) == len(right.lines) == 3  # two strategies + the budget marker
    waiting = curves_plot(fid, None, {}, 64, 576, note="task curve: computing 40%")
    texts = [t.get_text() for t in waiting.axes[1].texts]
    assert "task curve: computing 40%" in texts and len(waiting.axes[1].lines) == 1


@pytest.fixture(scope="module")
def small_enc(encoder):
    return encoder.encode(Image.open("assets/coffee.jpg"), size=224)


def test_inside_panel_draws_the_clusters_after_the_chosen_block(encoder, small_enc):
    from viz.inside import inside_panel

    early = inside_panel(encoder, small_enc, "tome", r=8, block=1)
    late = inside_panel(encoder, small_enc, "tome", r=8, block=12)
    assert early.stats["tokens_at_block"] == 256 - 8 and late.stats["tokens_at_block"] == 256 - 96
    assert late.comp.num_out == 160 and late.stats["M"] == 160
    assert early.overlay.size == late.overlay.size == (576, 576)
    assert np.abs(np.asarray(early.overlay, int) - np.asarray(late.overlay, int)).mean() > 1
    assert 0 < late.stats["flops_ratio"] < 1 and late.stats["speedup"] > 0
    assert late.stats["patch_cosine"] > 0.9
    assert isinstance(late.figure, Figure)
    # the run is kept: moving the block slider does not run the network again
    assert inside_panel(encoder, small_enc, "tome", r=8, block=6).extra["result"] is \
        late.extra["result"]
    with pytest.raises(ValueError, match="last block"):
        inside_panel(encoder, encoder.encode(Image.open("assets/coffee.jpg"), size=224, layer=5),
                     "tome", r=8)


def test_a_speedup_compares_forwards_timed_on_the_same_thread_count(encoder):
    """The app runs a lone user's forwards on every core and others' on one: a run's speed-up
    uses the plain forward timed at the run's own count, whatever count draws it later."""
    from viz.inside import inside_panel, plain_ms

    enc = encoder.encode(Image.open("assets/chelsea.jpg"), size=224)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        def plain_counts():
            return {t for t, key in enc.memo["inside_times"] if key == ("plain",)}

        run = inside_panel(encoder, enc, "tome", r=8)  # timed on 2 threads
        assert run.stats["threads"] == run.extra["result"].threads == 2
        assert plain_counts() == {2}
        torch.set_num_threads(1)
        again = inside_panel(encoder, enc, "tome", r=8, block=3)  # redrawn on 1: not re-run
        assert again.extra["result"] is run.extra["result"]
        assert again.stats["threads"] == 2 and again.stats["plain_ms"] == run.stats["plain_ms"]
        assert plain_counts() == {2}  # no plain forward on 1 thread for it
        one = plain_ms(encoder, enc)  # the caller's count: measured and kept apart
        assert plain_counts() == {1, 2} and one > 0
        assert plain_ms(encoder, enc, 2) == run.stats["plain_ms"]  # kept, not re-measured
        assert torch.get_num_threads() == 1  # a measurement on another count puts it back
    finally:
        torch.set_num_threads(before)


def test_a_speedup_reads_the_best_of_runs_timed_in_turns(encoder):
    """One forward can catch the CPU busy (another request, the browser drawing the last
    answer): a speed-up reads the best time of each forward, and settling times the run and
    the plain forward once more, in turns, on the run's own thread count."""
    from viz.inside import PLAIN_MAX_RUNS, _samples, inside_panel, run_key, settle, timing

    enc = encoder.encode(Image.open("assets/chelsea.jpg"), size=224)
    first = inside_panel(encoder, enc, "tome", r=8)
    result, key = first.extra["result"], first.extra["key"]
    assert key == run_key("tome", 8)
    assert first.stats["runs"] == 1 and first.stats["plain_runs"] == 3
    assert first.stats["forward_ms"] == result.forward_ms
    plain = _samples(enc, result.threads, ("plain",))
    assert first.stats["plain_ms"] == min(plain) and len(plain) == 3
    _samples(enc, result.threads, key)[0] = 1e6  # as if the first run had waited for a core
    assert timing(encoder, enc, result, key)["speedup"] < 0.01
    from compress.threads import torch_threads

    with torch_threads(result.threads + 1):  # called on another count: timed on the run's own
        assert settle(encoder, enc, key)  # one more of each, in turns
        assert torch.get_num_threads() == result.threads + 1  # the caller's count is left alone
    assert _samples(enc, result.threads + 1, key) == []  # (times on another count would not compare)
    t = timing(encoder, enc, result, key)
    assert t["runs"] == 2 and t["plain_runs"] == 4 and t["forward_ms"] < 1e6
    assert 0.5 < t["speedup"] < 3 and t["speedup"] == t["plain_ms"] / t["forward_ms"]
    assert not settle(encoder, enc, key)  # settled: nothing runs again
    assert timing(encoder, enc, result, key)["runs"] == 2
    assert not settle(encoder, enc, run_key("tome", 9))  # never run: nothing to settle
    assert t["cut_speedup"] is None  # no free cut timed yet
    assert settle(encoder, enc, key, with_cut=True)  # the free cut to the run's counts, twice
    cut = _samples(enc, result.threads, ("cut", *key))
    t = timing(encoder, enc, result, key)
    assert len(cut) == 2 and t["runs"] == 2 and t["cut_speedup"] == t["plain_ms"] / min(cut)
    assert 0.5 < t["cut_speedup"] < 3
    assert not settle(encoder, enc, key, with_cut=True)
    for r in (4, 12, 16):  # more settings: the plain forward stops at PLAIN_MAX_RUNS runs
        inside_panel(encoder, enc, "tome", r=r)
        settle(encoder, enc, run_key("tome", r))
    assert len(plain) == PLAIN_MAX_RUNS
    with pytest.raises(ValueError, match="method"):
        run_key("merge")


def test_settling_stops_between_forwards_when_asked_and_resumes_later(encoder):
    # the app asks "has a newer setting come, or someone else?" before each forward it times
    from viz.inside import _samples, inside_panel, settle

    enc = encoder.encode(Image.open("assets/chelsea.jpg"), size=112)
    result, key = (run := inside_panel(encoder, enc, "tome", r=4)).extra["result"], run.extra["key"]
    asked, plain = [], _samples(enc, result.threads, ("plain",))
    assert len(plain) == 3
    assert settle(encoder, enc, key, with_cut=True, stop=lambda: asked.append(1) or len(asked) > 1)
    assert len(asked) == 2  # one forward went ahead (the plain one: each round's first), then none
    assert len(plain) == 4 and _samples(enc, result.threads, ("cut", *key)) == []
    assert len(_samples(enc, result.threads, key)) == 1
    assert settle(encoder, enc, key, with_cut=True)  # later: the rest
    assert len(_samples(enc, result.threads, ("cut", *key))) == 2
    assert len(_samples(enc, result.threads, key)) == 2


def test_compare_inside_rows_settle_with_their_free_cut(encoder):
    # Compare's inside rows: a first answer without the free cut, the settled one with it
    from viz.inside import _samples, inside_at_budget, run_key

    enc = encoder.encode(Image.open("assets/chelsea.jpg"), size=112)
    first = inside_at_budget(encoder, enc, 16)
    assert set(first) == {"tome_inside", "prune_inside"}
    assert all(row["cut_speedup"] is None and row["runs"] == 1 for row in first.values())
    settled = inside_at_budget(encoder, enc, 16, settled=True)
    for name, row in settled.items():
        assert row["runs"] == 2 and 0.3 < row["cut_speedup"] < 5, (name, row)
    r = int(settled["tome_inside"]["setting"].split()[2])
    cut = _samples(enc, settled["tome_inside"]["threads"], ("cut", *run_key("tome", r)))
    assert len(cut) == 2
    assert settled["tome_inside"]["cut_speedup"] == settled["tome_inside"]["plain_ms"] / min(cut)


def test_the_plain_forward_is_timed_as_a_run_is(encoder, monkeypatch):
    """A speed-up divides network times: the plain forward's sample is its ``forward_ms`` (pixels
    to the final norm), not the wall time of the call with the resize and the covers around it."""
    import time

    import viz.inside as vi

    got = []

    def slow_plain(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        got.append(out.forward_ms)
        time.sleep(0.05)  # as if the covers and the resize took 50 ms around the network
        return out

    from compress.inside import plain_forward

    monkeypatch.setattr(vi, "plain_forward", slow_plain)
    enc = encoder.encode(Image.open("assets/coffee.jpg"), size=112)
    assert vi.plain_ms(encoder, enc, 1) == min(got) < 50
    assert vi._samples(enc, 1, ("plain",)) == got


def test_the_inside_tab_settles_its_numbers_line(encoder):
    """The tab answers a new setting with one run's numbers, then times the forwards again in
    turns and sends the settled numbers line; nothing when the controls have moved on."""
    import gradio as gr

    from tabs import inside as tab
    from tabs import priority
    from tabs.common import Session

    session = Session()
    session.show(encoder.encode(Image.open("assets/chelsea.jpg"), size=224))
    args = ("tome", 12, 0.7, True, [3, 6, 9], 12)
    # as the app wires them: each a request of the session (its thread count follows from that)
    overlay, line = priority.counted(tab.render)(session, *args, with_figure=False)
    assert "one run, timing again…" in line  # alone: the settle step follows, the line says so
    settled_step = priority.counted(tab.settled)
    assert "free cut" not in line  # timed only when the numbers settle
    settled = settled_step(session, *args)
    assert isinstance(settled, str) and "best of 2 and 5 runs" in settled  # plain: once per turn
    assert re.search(r"a free cut to these counts: \d\.\d\dx", settled), settled
    assert session.panels["inside"].stats["runs"] == 2  # kept for the export too
    # a method at or above its free cut: the line says the difference is noise, not a gain
    from types import SimpleNamespace

    shown = session.panels["inside"]
    for speedup, cut, noise in ((1.41, 1.27, True), (1.2, 1.2, True), (1.16, 1.23, False)):
        line = tab.stats_md(SimpleNamespace(comp=shown.comp, stats={**shown.stats, "speedup": speedup,
                                                                     "cut_speedup": cut}))
        assert f"**{speedup:.2f}x** · a free cut to these counts: {cut:.2f}x" in line
        assert ("the difference is this machine's noise" in line) == noise, line
    skip = gr.skip()
    assert settled_step(session, *args) == skip  # already settled
    assert settled_step(session, "tome", 13, *args[2:]) == skip  # the slider has moved on
    # a newer setting shown while the settle step waits for the page to draw ends the wait at once
    import threading
    import time

    args14 = ("tome", 14, *args[2:])
    priority.counted(tab.render)(session, *args14, with_figure=False)
    got = []
    waiting = threading.Thread(target=lambda: got.append(
        (settled_step(session, *args14, pause=30.0), time.monotonic())))
    waiting.start()
    time.sleep(0.2)
    priority.counted(tab.render)(session, "tome", 15, *args[2:], with_figure=False)
    moved = time.monotonic()
    waiting.join(10)
    assert got and got[0][0] == skip and got[0][1] - moved < 1.0


def test_the_inside_tab_runs_tomes_schedules(encoder):
    # ToMe's paper also merges on a schedule: decreasing from 2r in block 1 to 0 (its default in
    # the released code's (r, -1)), or increasing; the tab offers both beside the constant r
    import gradio as gr

    from compress.inside import parse_r, tome_counts
    from tabs import inside as tab
    from tabs import priority
    from tabs.common import Session
    from viz.inside import run_key

    session = Session()
    session.show(encoder.encode(Image.open("assets/chelsea.jpg"), size=224))
    render = priority.counted(tab.render)
    for schedule, words in ((-1, "r = 16, decreasing: 32 in block 1 → 0 in block 12"),
                            (1, "r = 16, increasing: 0 in block 1 → 32 in block 12")):
        _, line = render(session, "tome", 16, 0.7, True, [3, 6, 9], 12, schedule, with_figure=False)
        assert words in line, line
        shown = session.panels["inside"]
        assert shown.stats["counts"] == tome_counts(256, parse_r((16, schedule), 12))
        assert shown.extra["key"] == run_key("tome", 16, schedule=schedule) == ("tome", 16, schedule)
    _, line = render(session, "tome", 16, 0.7, True, [3, 6, 9], 12, 0, with_figure=False)
    assert "(r = 16 per block)" in line and session.panels["inside"].extra["key"] == ("tome", 16)
    # 2r merged in block 1 must stay within half the tokens: the error names the largest r
    with pytest.raises(gr.Error, match=r"r must be between 0 and 64 for 256 patch tokens with the "
                                       r"schedule \(r, -1\)"):
        render(session, "tome", 100, 0.7, True, [3, 6, 9], 12, -1, with_figure=False)
    with pytest.raises(ValueError, match="schedule must be -1"):
        run_key("tome", 16, schedule=2)
    # choosing a schedule first fits r's slider to it: at most 64 here, where 128 is for a constant r
    assert tab.fit_r(session, 100, -1) == gr.update(maximum=64, value=64)
    assert tab.fit_r(session, 40, 0) == gr.update(maximum=128, value=40)


def test_the_depth_animation_plays_every_block(encoder, tmp_path):
    # For a slide or a projector: the block slider's pictures, one GIF frame per block, looping
    import numpy as np

    from viz.inside import FRAME_MS, depth_animation, inside_run

    enc = encoder.encode(Image.open("assets/astronaut.jpg"), size=224)
    result = inside_run(encoder, enc, "tome", r=16)
    path = tmp_path / "blocks.gif"
    depth_animation(result, enc, path, display=224)
    gif = Image.open(path)
    assert gif.format == "GIF" and gif.n_frames == 12 and gif.info["loop"] == 0
    frames, durations = [], []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB"), dtype=np.int16))
        durations.append(gif.info["duration"])
    assert durations == [FRAME_MS] * 11 + [3 * FRAME_MS]  # the last block is held
    assert gif.size[0] == 224 and gif.size[1] > 224  # the picture, then its caption bar
    picture = slice(0, 224)
    # clusters grow: fewer borders (white) after the last block than after the first
    white = [int((f[picture] >= 235).all(axis=-1).sum()) for f in frames]
    assert white[-1] < white[0], white
    assert not np.array_equal(frames[0][224:], frames[-1][224:])  # captions name their block
    other = encoder.encode(Image.open("assets/astronaut.jpg"), size=112)
    with pytest.raises(ValueError, match="same image at the same size"):
        depth_animation(result, other, tmp_path / "x.gif")


def test_the_inside_tab_animates_the_shown_run(encoder):
    import gradio as gr

    from tabs import inside as tab
    from tabs import priority
    from tabs.common import Session

    session = Session()
    session.show(encoder.encode(Image.open("assets/chelsea.jpg"), size=224))
    with pytest.raises(gr.Error, match="Nothing to animate yet"):
        tab.animate(session)
    priority.counted(tab.render)(session, "prune", 16, 0.5, True, [3, 6, 9], 12, 0, with_figure=False)
    path = tab.animate(session)
    assert path.endswith(".gif") and Image.open(path).n_frames == 12


def test_compare_shows_its_table_first_and_settles_the_inside_rows_after(encoder, monkeypatch):
    # Compare's release: the table with the task column and the inside rows' first runs at once;
    # the inside rows timed again in turns with their free cut in a step of their own after it
    # (it cost ~0.3 s more before the table came), for a person alone on the server only
    import gradio as gr

    from tabs import compare as tab
    from tabs import priority
    from tabs.common import Session
    from viz.panels import task_column

    session = Session()
    session.show(encoder.encode(Image.open("assets/rocket.jpg"), size=224))
    heads = []
    monkeypatch.setattr(tab, "task_column", lambda *a: heads.append(1) or task_column(*a))
    priority.counted(tab.render)(session, 32)
    table, note, claims = priority.counted(tab.slower)(session, 32)
    inside = [r for r in table["data"] if "inside the ViT" in r[0]]
    assert len(inside) == 2 and not any("free cut" in r[-1] for r in inside)
    assert "one run, timing again…" in note and "| the task |" in claims
    with monkeypatch.context() as busy:  # someone else is waiting: nothing runs
        busy.setattr(priority, "alone", lambda: False)
        assert priority.counted(tab.settled_rows)(session, 32, pause=0) == [gr.skip()] * 2
        _, busy_note, _ = priority.counted(tab.slower)(session, 32)
        assert "(one run;" in busy_note  # no step will time them again: no promise
    table2, note2 = priority.counted(tab.settled_rows)(session, 32, pause=0)
    assert all(re.search(r"FLOPs \d+%; free cut [\d.]+x\)$", r[-1])
               for r in table2["data"] if "inside the ViT" in r[0])
    assert re.search(r"best of 2 and \d+ runs", note2), note2
    posthoc = [r for r in table["data"] if "inside" not in r[0]]
    assert posthoc == [r for r in table2["data"] if "inside" not in r[0]]
    assert len(heads) == 2  # the head ran once on the post-hoc rows and once on the inside ones
    assert priority.counted(tab.settled_rows)(session, 40, pause=0) == [gr.skip()] * 2  # moved on
    # opened while the image's curves job ran (no one alone then): the rows settle when it ends
    from tabs.jobs import Job

    priority.counted(tab.render)(session, 48)
    with monkeypatch.context() as busy:
        busy.setattr(priority, "alone", lambda: False)
        table, _, _ = priority.counted(tab.slower)(session, 48)
    after = priority.counted(tab.after_curves)
    assert after(session, 48) == [gr.skip()] * 2  # no curves job: nothing to wait for
    job = session.enc.memo["curves_job"] = Job("curves_job", lambda progress: None)
    assert after(session, 48) == [gr.skip()] * 2  # still running
    job.started_at, job.finished_at = 0.0, 1.0
    job.event.set()
    table, note = after(session, 48)
    assert all("free cut" in r[-1] for r in table["data"] if "inside the ViT" in r[0]), table
    assert after(session, 48) == [gr.skip()] * 2  # settled: later ticks do nothing
