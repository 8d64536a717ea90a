"""A trivial image update, for the browser benchmark's transport floor (only with TCE_BENCH_FLOOR=1).

Its handler does no work: it returns one of two fixed small JPEG files. The
time from moving its slider to the new picture loaded is what Gradio's queue,
the connection and the page cost for any image update, so the benchmark can
report each real slider's "transport + UI" as a multiple of it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

from .common import LIVE, Wiring

FLOOR_DIR = Path(tempfile.gettempdir()) / "tce-floor"


def _pictures() -> list[str]:
    FLOOR_DIR.mkdir(exist_ok=True)
    paths = []
    for i, colour in enumerate(((200, 60, 40), (40, 90, 200))):
        path = FLOOR_DIR / f"floor{i}.jpg"
        if not path.exists():
            Image.new("RGB", (64, 64), colour).save(path, quality=90)
        paths.append(str(path))
    return paths


def build(w: Wiring) -> None:
    pictures = _pictures()
    with gr.Row():
        slider = gr.Slider(0, 100, value=0, step=1, label="transport floor (benchmark)",
                           elem_id="floor-slider")
        image = gr.Image(value=pictures[0], format="jpeg", interactive=False, height=80,
                         elem_id="floor-image")
    w.on(slider.input, lambda v: pictures[int(v) % 2], slider, image, "floor", **LIVE)
