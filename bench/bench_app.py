"""Slider-to-new-overlay round trip in a real browser, with the time split.

Starts ``app.py`` on a free loopback port, opens it in the system Chromium
(Playwright), and for each live slider sets a new value and fires the
range input's ``input`` event (what dragging does), then waits until the
overlay ``<img>`` shows a new, fully loaded picture. The split: strategy and
drawing times are read from the stats line the server wrote for that update;
image encoding is Gradio's own save of the overlay(s) as JPEG, timed here;
the rest is transport (queue, HTTP, websocket/SSE, image fetch and decode).

Run: ``make bench-app`` or ``.venv/bin/python bench/bench_app.py [--steps 25]``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import header  # noqa: E402
from bench.serve import free_port, start_app, stop_app  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]



def zigzag(lo: float, hi: float, n: int, digits: int = 3) -> list:
    """Values that jump between the two ends of a range, so every update changes the picture."""
    out = []
    for i in range(n):
        t = i / (2 * n)
        v = lo + (hi - lo) * t if i % 2 == 0 else hi - (hi - lo) * t
        out.append(round(v, digits) if digits else int(round(v)))
    return out


# slider id, overlay id, stats id, tab, values to step through, target ms, outputs encoded;
# RELEASED: the cases that release the slider and wait for more pictures than the overlay
RELEASED = {
    # the model downstream follows on release: the saliency pair must land too (target: the live
    # round trip + 300 ms)
    "merge-threshold (release: + saliency map)": ["merge-overlay", "merge-task-image"],
}
CASES = [
    # the floor: a trivial handler returning one of two fixed 64 px JPEG files (tabs/floor.py)
    ("floor-slider", "floor-image", None, None, list(range(1, 60)), None, ()),
    ("merge-threshold", "merge-overlay", "merge-stats", "Merging",
     zigzag(0.80, 0.97, 40), 150, ("merge",)),
    ("merge-target", "merge-overlay", "merge-stats", "Merging",
     zigzag(40, 400, 40, 0), 150, ("merge",)),
    ("prune-keep", "prune-overlay", "prune-stats", "Pruning",
     zigzag(0.10, 0.80, 40, 2), 150, ("prune",)),
    ("resampler-latents", "resampler-overlay", "resampler-stats", "Resampler",
     zigzag(16, 128, 40, 0), 300, ("resampler", "grid", "single")),
    ("merge-threshold (release: + saliency map)", "merge-overlay", "merge-stats", "Merging",
     zigzag(0.80, 0.97, 40), 450, ("merge",)),
    # Compare while dragging: every strategy's tile and row (the task column, the inside-network
    # rows and the curves follow on release: seconds, in the background)
    ("compare-budget", "compare-grid", "compare-note", "Compare",
     zigzag(24, 200, 40, 0), 1000, ("compare",)),
]

STEP_JS = """
([slider, overlays, value, release]) => new Promise((resolve, reject) => {
  const img = (id) => document.querySelector('#' + id + ' img');
  const old = overlays.map(id => img(id) ? img(id).src : '');
  const rng = document.querySelector('#' + slider + ' input[type=range]');
  const t0 = performance.now();
  rng.value = String(value);
  rng.dispatchEvent(new Event('input', {bubbles: true}));
  // a real drag lets the page take in the last value before the button comes up
  if (release) setTimeout(() => rng.dispatchEvent(new PointerEvent('pointerup', {bubbles: true})), 30);
  // Woken by the page's own changes (a new <img> or src, an image finishing its load), not by
  // polling: a 1 ms polling loop kept the renderer busy and, on 2 cores, slowed the very server
  // and page it was timing. A slow timer only backs the events up.
  let finished = false;
  const stop = () => { finished = true; obs.disconnect(); document.removeEventListener('load', check, true);
                       clearInterval(backup); clearTimeout(limit); };
  const check = () => {
    if (finished) return;
    const done = overlays.every((id, i) => {
      const e = img(id);
      return e && e.src !== old[i] && e.complete && e.naturalWidth > 0;
    });
    if (done) { const ms = performance.now() - t0; stop(); resolve(ms); }
  };
  const obs = new MutationObserver(check);
  obs.observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
  document.addEventListener('load', check, true);  // <img> load events, caught on the way down
  const backup = setInterval(check, 50);
  const limit = setTimeout(() => {
    if (!finished) { stop(); reject(new Error('no new picture within 30 s')); }
  }, 30000);
  check();
})
"""


def split_from_stats(text: str) -> tuple[float, float]:
    """(strategy ms, drawing ms) from a stats line; the compare note gives only the total."""
    m = re.search(r"strategy ([\d.]+) ms", text)
    if m is None:
        total = float(re.search(r"in ([\d.]+) ms", text).group(1))
        return total, 0.0
    return float(m.group(1)), float(re.search(r"drawing ([\d.]+) ms", text).group(1))


def jpeg_save_ms(kinds: tuple[str, ...], repeat: int = 15) -> float:
    """Gradio's own save of this update's overlay(s) to its cache as JPEG, median ms."""
    from gradio.processing_utils import save_pil_to_cache
    from PIL import Image

    from compress.cache import shared_encoder
    from viz.panels import merge_panel, prune_panel, resampler_panel

    enc = shared_encoder().encode(Image.open(ROOT / "assets" / "coffee.jpg"), size=336)
    images = []
    if "merge" in kinds:
        images.append(merge_panel(enc, with_figure=False).overlay)
    if "prune" in kinds:
        images.append(prune_panel(enc, with_figure=False).overlay)
    if "resampler" in kinds:
        p = resampler_panel(enc, with_figure=False)
        images += [p.overlay, p.extra["grid"], p.extra["single"]]
    if "compare" in kinds:
        from viz.panels import compare_panel

        images.append(compare_panel(enc, 64, with_figure=False).overlay)
    times = []
    with tempfile.TemporaryDirectory() as cache:
        for i in range(repeat):
            start = time.perf_counter()
            for img in images:
                save_pil_to_cache(img, cache, name=f"image{i}", format="jpeg")
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--pause", type=float, default=0.15, help="seconds between updates")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = start_app(port, extra_env={"TCE_BENCH_FLOOR": "1"})
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=os.environ.get("TCE_CHROMIUM", "/usr/bin/chromium"),
                                        args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => document.querySelector('#merge-stats')?.innerText.includes('→')")
            for slider, overlay, stats_id, tab, values, target, kinds in CASES:
                if tab is not None:
                    page.get_by_role("tab", name=tab).click()
                page.wait_for_selector(f"#{overlay} img")
                totals, strategy, drawing = [], [], []
                print(f"{slider}...", file=sys.stderr)
                release = slider in RELEASED
                waits = RELEASED.get(slider, [overlay])
                element = slider.split(" ")[0]
                for value in values[: (args.steps if not release else 8) + 1]:
                    ms = page.evaluate(STEP_JS, [element, waits, value, release])
                    page.wait_for_timeout(60)  # let the stats line land
                    s, d = split_from_stats(page.inner_text(f"#{stats_id}")) if stats_id else (0, 0)
                    totals.append(ms)
                    strategy.append(s)
                    drawing.append(d)
                    time.sleep(args.pause)
                # the first update of each slider warms caches: leave it out
                totals, strategy, drawing = totals[1:], strategy[1:], drawing[1:]
                rows.append((slider, totals, statistics.median(strategy), statistics.median(drawing),
                             kinds, target))
            browser.close()
    finally:
        stop_app(proc)

    print(f"Slider round trip in Chromium, {args.steps} updates per slider, 576 tokens "
          f"(coffee.jpg, 336 px, bundled DINOv2 ViT-S/14)")
    print(header("cpu"))
    print()
    print("| slider | median ms | p90 ms | strategy | drawing | JPEG encode | transport + UI "
          "| x floor | target | ok |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :-: |")
    floor = None
    for slider, totals, s, d, kinds, target in rows:
        totals = sorted(totals)
        med = statistics.median(totals)
        p90 = totals[min(len(totals) - 1, int(0.9 * len(totals)))]
        enc = jpeg_save_ms(kinds) if kinds else 0.0
        rest = max(0.0, med - s - d - enc)
        if floor is None:
            floor = rest
        ratio = rest / floor if floor else float("nan")
        ok = "" if target is None else ("yes" if med < target else "NO")
        print(f"| {slider} | {med:.0f} | {p90:.0f} | {s:.1f} | {d:.1f} | {enc:.1f} | {rest:.0f} "
              f"| {ratio:.2f} | {'' if target is None else f'< {target}'} | {ok} |")
    print()
    print("x floor: each slider's transport + UI time over the floor's (a trivial handler "
          "returning a fixed 64 px JPEG, same browser session); target <= 1.5 for merge, prune "
          "and resampler.")


if __name__ == "__main__":
    main()
