"""Core benchmark: encode time per input size, and every strategy at N = 576 and 4096.

Run: ``make bench`` or ``.venv/bin/python bench/bench_core.py [--device cpu|cuda] [--repeat 15]``.
Prints a Markdown table (median and p90 over repeats, after one warm-up) with the
issue's target next to each row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import header, synchronizer, timed  # noqa: E402
from compress import (  # noqa: E402
    STRATEGIES,
    Encoder,
    merge_bipartite,
    merge_threshold,
    prune_attention,
    resample,
    run_at_budget,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    encoder = Encoder(device=args.device)
    dev = encoder.device
    sync = synchronizer(dev)
    image = Image.open(ROOT / "assets" / "coffee.jpg")
    rows = []

    for size, target in ((224, None), (336, 250), (448, None)):
        med, p90 = timed(lambda s=size: encoder.encode(image, size=s), args.repeat, sync)
        n = (size // 14) ** 2
        rows.append((f"encode {size} px (N = {n})", med, p90, target))
    fast = Encoder(device=args.device, precision="bf16")
    med, p90 = timed(lambda: fast.encode(image, size=336), args.repeat, sync)
    label = "encode 336 px, precision bf16" + (" (no native bf16 here: ran fp32)" if fast.notice else "")
    rows.append((label, med, p90, 250))

    for size in (336, 896):  # 24 x 24 = 576 and 64 x 64 = 4096 patches
        enc = encoder.encode(image, size=size)
        n = enc.num_patches
        target = 20 if n == 576 else 200
        cases = [
            ("merge_threshold(0.9)", lambda e=enc: merge_threshold(e, 0.9)),
            ("merge_bipartite(target=N/4)", lambda e=enc: merge_bipartite(e, target=e.num_patches // 4)),
            ("merge_bipartite(target=64)", lambda e=enc: merge_bipartite(e, target=64)),
            ("prune_attention(0.25, cls)", lambda e=enc: prune_attention(e, 0.25)),
            ("prune_attention(0.25, query)", lambda e=enc: prune_attention(e, 0.25, score="query", query=0)),
            ("resample(64, random)", lambda e=enc: resample(e, 64, init="random")),
            ("resample(64, kmeans)", lambda e=enc: resample(e, 64, init="kmeans")),
        ]
        # Cold: each call starts from a bare encoding (what some strategies keep with it - k-means
        # centroids, resampler keys, the cosine matrix - is forgotten first). Warm rows: those
        # kept results reused, as on every slider move after the first for the same image.
        forget = enc.memo.clear
        for label, fn in cases:
            med, p90 = timed(fn, args.repeat, sync, setup=forget)
            rows.append((f"N = {n}: {label}", med, p90, target))
        for name in STRATEGIES:
            if name in ("merge_threshold", "merge_bipartite", "prune_attention", "resample"):
                continue
            med, p90 = timed(lambda e=enc, k=name: run_at_budget(k, e, 64), args.repeat, sync,
                             setup=forget)
            rows.append((f"N = {n}: {name} at M = 64", med, p90, target))
        for label, fn in (("resample(64, kmeans), warm", lambda e=enc: resample(e, 64, init="kmeans")),
                          ("vispruner at M = 64, warm", lambda e=enc: run_at_budget("vispruner", e, 64))):
            med, p90 = timed(fn, args.repeat, sync)
            rows.append((f"N = {n}: {label}", med, p90, target))
        if n == 576:
            med, p90 = timed(lambda e=enc: resample(e, 64, init="fit"), 3, sync)
            rows.append(("N = 576: resample(64, fit, 40 steps)", med, p90, 3000))
            # the Compare view after a budget change: every strategy + grid + table + curve
            from viz.panels import compare_panel

            compare_panel(enc, 64)  # the fidelity sweep, once per image
            budgets = iter([30, 90] * 50)
            med, p90 = timed(lambda e=enc, b=budgets: compare_panel(e, next(b)), 7, sync)
            rows.append((f"N = 576: Compare view refresh ({len(STRATEGIES)} strategies, grid, curve)",
                         med, p90, 1000))

    print(f"{header(dev)}; repeats {args.repeat}")
    print()
    print("| what | median ms | p90 ms | target ms | ok |")
    print("| --- | ---: | ---: | ---: | :-: |")
    for label, med, p90, target in rows:
        ok = "" if target is None else ("yes" if med < target else "NO")
        print(f"| {label} | {med:.1f} | {p90:.1f} | {'' if target is None else target} | {ok} |")


if __name__ == "__main__":
    main()
