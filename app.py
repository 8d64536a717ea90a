"""Token Compression Explorer: the Gradio app (the door: it assembles one piece per tab).

Run: ``python app.py [--host 127.0.0.1] [--port 7860] [--device auto] [--share]``.
Each tab lives in ``tabs/`` (its components, handlers and events); every number
comes from ``compress/``, every picture from ``viz/``.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
# Gradio's queue rebuilds a pandas summary of its last (up to 10,000) events after every request,
# for a monitoring page this app does not use: its cost grows with the session's age (bench/load_test.py
# profiled it). Summarise every 1000 events over at most 1000 records instead.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from compress import BUNDLED_NAME, Encoder  # noqa: E402
from compress.allocator import keep_freed_memory  # noqa: E402
from compress.cache import set_precision, shared_encoder  # noqa: E402
from compress.select import compile_kernels  # noqa: E402
from tabs import (  # noqa: E402
    compare,
    dataset,
    features,
    floor,
    inside,
    merge,
    more,
    priority,
    prune,
    resampler,
    skips,
    source,
)
from tabs.common import Session, Wiring  # noqa: E402

QUEUE_SIZE = int(os.environ.get("TCE_QUEUE_SIZE", "128"))
# Interactive requests run side by side up to one more than the cores (one torch thread each: the
# extra one fills the gaps while another waits on Gradio's event loop); more at once only share the
# same cores and leave encodes (their own group, 2 at a time) less of them. Measured with
# bench/load_test.py on 2 cores: 3 at once served 7 % more than 2, and 8 far fewer.
CONCURRENCY = int(os.environ.get("TCE_CONCURRENCY", str((os.cpu_count() or 2) + 1)))
TABS = (merge, prune, resampler, more, inside, compare, features, dataset)  # in the order they appear
# Tighter tab labels: with Gradio's padding the last two tabs went behind a "..." menu on a
# 1280 px screen, where nobody finds them. Table headers wrap between words, never inside one
# ("fidelit / y" in a narrow column).
CSS = """.tab-wrapper button { padding-left: 10px; padding-right: 10px; }
.header-cell .text { word-break: normal; overflow-wrap: normal; }"""
# A slider moved with the keyboard, or a value typed into its box and Enter pressed, has come to
# rest as surely as one let go of with the mouse, but Gradio sends its "release" only for the
# mouse (and on leaving the box): the slider's own update (fidelity, the model downstream, a new
# encode for the input size) never came. The page tells Gradio as the mouse would.
JS = """() => {
  const keys = ["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End"];
  document.addEventListener("keyup", (e) => {
    const t = e.target;
    if (t instanceof HTMLInputElement && t.type === "range" && keys.includes(e.key)) {
      t.dispatchEvent(new PointerEvent("pointerup", {bubbles: true}));
    }
  });
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t instanceof HTMLInputElement && t.type === "number" && e.key === "Enter"
        && t.closest(".block")?.querySelector("input[type=range]")) {
      t.blur();
    }
  });
}"""


def build() -> gr.Blocks:
    with skips.Blocks(title="Token Compression Explorer", analytics_enabled=False, fill_width=True,
                   delete_cache=(300, 900)) as demo:
        w = Wiring(gr.State(Session, time_to_live=1800))
        gr.Markdown("# Token Compression Explorer\nSee what visual-token compression does to an "
                    "image: merge, prune or resample ViT patch tokens and watch the result live.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                src = source.build(w)
            with gr.Column(scale=2):
                with gr.Tabs() as box:
                    tabs = [module.build(w) for module in TABS]
        source.wire(w, src, tabs, demo, box)
        if os.environ.get("TCE_BENCH_FLOOR") == "1":  # the browser benchmark's transport floor
            floor.build(w)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def freeze_heap() -> None:
    """Collect once, then leave everything alive at start-up (modules, the model, the page's
    components: millions of objects) out of the garbage collector's later passes. Its full
    passes stop every thread while they walk the whole heap: under sixteen sessions one took
    314 ms mid-run on an AVX-512 machine (all requests waiting); after the freeze they took
    19-28 ms (bench/load_test.py, GC callbacks timed). Nothing frozen here was ever garbage."""
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> None:
    limits = source.LIMITS
    ap = argparse.ArgumentParser(description="Token Compression Explorer")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="interface to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--device", default=os.environ.get("TCE_DEVICE", "auto"),
                    help="auto (GPU when present), cpu or cuda")
    ap.add_argument("--share", action="store_true", help="opt in to a public share link")
    ap.add_argument("--max-upload-mb", type=float,
                    default=float(os.environ.get("TCE_MAX_UPLOAD_MB", "25")),
                    help="largest accepted upload in MB (env TCE_MAX_UPLOAD_MB, default 25)")
    ap.add_argument("--max-pixels", type=float,
                    default=float(os.environ.get("TCE_MAX_PIXELS", "40e6")),
                    help="largest accepted image in pixels (env TCE_MAX_PIXELS, default 40e6)")
    ap.add_argument("--precision", choices=["fp32", "bf16"],
                    default=os.environ.get("TCE_PRECISION", "fp32"),
                    help="bf16 encodes ~3x faster on a GPU or a CPU with native bf16 (AVX-512 "
                         "BF16, AMX); elsewhere fp32 is used, with a notice; default fp32")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TCE_THREADS", "1")),
                    help="torch threads per request (env TCE_THREADS, default 1): requests run side "
                         "by side, and on a small CPU shared with the browser or other users one "
                         "thread each is several times faster than contended thread pools; a "
                         "request alone on the server encodes on every core (TCE_LONE_THREADS)")
    ap.add_argument("--dataset-root", action="append", default=None,
                    help="a folder whose images a sweep's results file may show in the Dataset tab "
                         "(repeatable; default: the folder the app is started in)")
    args = ap.parse_args(argv)
    dataset.set_roots(args.dataset_root or [])
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    # Freed memory is handed back to the system as glibc does: kept, every request thread's arena
    # keeps its own peak (compress/allocator.py). TCE_KEEP_FREED=1 keeps it (a lone user's machine).
    keep_freed_memory(default=False)
    torch.set_num_threads(args.threads)  # before any worker thread starts: they inherit it
    # ... and a person alone on the server gets every core for the heavy steps (tabs/priority.py)
    priority.configure(args.threads)
    Encoder.thread_policy = priority.step_threads
    # Python hands its lock (GIL) between threads every 5 ms by default: an encode or a slider
    # whose torch op has finished then waits up to 5 ms to go on while the event loop or a
    # drawing holds it, on every op. 0.5 ms: under 16 sessions on 2 cores the median upload ->
    # first picture went from 5.1-5.7 s to 4.7 s, served updates from 22 to 25-26/s
    # (bench/load_test.py).
    sys.setswitchinterval(float(os.environ.get("TCE_SWITCH_INTERVAL", "0.0005")))
    logging.basicConfig(level=os.environ.get("TCE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits.device, limits.max_upload_mb = args.device, args.max_upload_mb
    limits.max_pixels = int(args.max_pixels)
    set_precision(args.precision)
    encoder = shared_encoder(BUNDLED_NAME, limits.device)  # load (and convert) before serving
    threading.Thread(target=compile_kernels, name="compile-kernels", daemon=True).start()
    if getattr(encoder, "notice", ""):
        print(f"note: {encoder.notice}", flush=True)
    # System fonts only: the default theme would fetch web fonts, and the app must work offline.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    demo = build()
    freeze_heap()
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme,
                   footer_links=["api"], run_history=False, show_error=True, css=CSS, js=JS,
                   max_file_size=int(limits.max_upload_mb * 2**20))


if __name__ == "__main__":
    main()
