"""Skipped outputs cost nothing (tabs/skips.py) and an upload sends only the range updates that
change something on the page (tabs/source.py ``_needed``)."""

from __future__ import annotations

import asyncio
import copy

import gradio as gr
import pytest
from conftest import ASSETS
from gradio.state_holder import SessionState

from tabs import skips
from tabs.common import Session
from tabs.source import _needed


def small_app(cls):
    with cls() as demo:
        state = gr.State(0)
        slider = gr.Slider(0, 10, value=3)
        text = gr.Markdown("a")
        image = gr.Image()
        gr.Button().click(lambda: None, None, [state, slider, text, image])
    return demo, slider, image


@pytest.mark.parametrize("predictions", [
    [5, gr.skip(), "b", gr.skip()],
    [gr.skip(), gr.skip(), gr.skip(), gr.skip()],
    [5, gr.update(maximum=20, value=7), gr.skip(), gr.skip()],
    [5, gr.skip(), gr.skip(), str(ASSETS / "coffee.jpg")],
    [5, 4, "c", None],
])
def test_the_page_receives_what_gradio_would_send(predictions):
    plain, _, _ = small_app(gr.Blocks)
    ours, _, _ = small_app(skips.Blocks)

    def run(demo):
        fn = next(iter(demo.fns.values()))
        # a fresh copy: Gradio pops "value" out of the update dicts it is given
        return asyncio.run(demo.postprocess_data(fn, copy.deepcopy(predictions), SessionState(demo)))

    want, got = run(plain), run(ours)
    if isinstance(predictions[3], str):  # an image file: its cached copy's path and url differ
        want[3], got[3] = want[3]["orig_name"], got[3]["orig_name"]
    assert got == want


def test_a_skipped_output_is_not_rebuilt():
    demo, slider, image = small_app(skips.Blocks)
    fn = next(iter(demo.fns.values()))
    state = SessionState(demo)
    out = asyncio.run(demo.postprocess_data(fn, [1, gr.skip(), "b", gr.skip()], state))
    assert out[1] == out[3] == {"__type__": "update"}
    assert state.blocks_config.blocks[slider._id] is slider  # Gradio's own path builds a copy
    assert state.blocks_config.blocks[image._id] is image
    plain, plain_slider, _ = small_app(gr.Blocks)
    plain_state = SessionState(plain)
    asyncio.run(plain.postprocess_data(next(iter(plain.fns.values())),
                                       [1, gr.skip(), "b", gr.skip()], plain_state))
    assert plain_state.blocks_config.blocks[plain_slider._id] is not plain_slider


def test_range_updates_are_sent_only_when_they_change_the_page():
    session = Session()
    latents = gr.Slider(1, 576, value=64, step=1)
    # as built: nothing to send
    assert _needed(session, latents, gr.update(maximum=576, value=64), 64) == gr.skip()
    # a value the slider does not show (clamped into a smaller range): sent, and remembered
    assert _needed(session, latents, gr.update(maximum=256, value=64), 64)["maximum"] == 256
    assert _needed(session, latents, gr.update(maximum=256, value=64), 64) == gr.skip()
    assert _needed(session, latents, gr.update(maximum=256, value=256), 300)["value"] == 256
    # back to the built range: the page shows 256 as the maximum now, so it is sent
    assert _needed(session, latents, gr.update(maximum=576, value=64), 64)["maximum"] == 576
    other = Session()  # another session's page still shows the slider as built
    assert _needed(other, latents, gr.update(maximum=576, value=64), 64) == gr.skip()


def test_an_upload_sends_range_updates_only_for_a_new_grid():
    """The app's own upload handler: a same-size picture updates no slider; another size does."""
    import app

    demo = app.build()
    fn = next(f for f in demo.fns.values() if f.api_name == "upload")
    names = {c._id: i for i, c in enumerate(fn.outputs)}
    ranges = [i for c_id, i in names.items() if i >= 3]  # after session, status, input image

    def upload(session, image, size):
        values = [c.value for c in fn.inputs[1:]]
        values[0], values[2] = str(ASSETS / image), size
        return fn.fn(session, *values)

    out = upload(None, "coffee.jpg", 336)
    session = out[0]
    sent = [i for i in ranges if out[i] != gr.skip()]
    assert len(sent) == 1 and "choices" in out[sent[0]]  # only the prune tab's heads: built empty
    out = upload(session, "chelsea.jpg", 336)
    assert all(out[i] == gr.skip() for i in ranges)
    out = upload(session, "chelsea.jpg", 224)  # 16 x 16 = 256 patches
    maxima = [out[i]["maximum"] for i in ranges if out[i] != gr.skip() and "maximum" in out[i]]
    assert 256 in maxima
    out = upload(session, "coffee.jpg", 224)
    assert all(out[i] == gr.skip() for i in ranges)
