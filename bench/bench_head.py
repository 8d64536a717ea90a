"""Head benchmark: the saliency head's forward against the same layers in bare torch, and the sweep.

Run: ``.venv/bin/python bench/bench_head.py [--repeat 9] [--threads 2]``.
Prints Markdown tables. Every comparison is timed in the same run, the
variants interleaved round by round (one call of each per round), so a
shared CPU slows them alike; medians over the rounds, after one warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import Encoder, merge_bipartite  # noqa: E402
from compress.downstream import agreement_sweep, task_agreement  # noqa: E402
from compress.heads import fold_batchnorm, head_status, load_decoder  # noqa: E402


def interleaved(cases: dict, repeat: int) -> dict[str, float]:
    """Median ms of each case, the cases called in turn ``repeat`` times after one warm-up each."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def bare_layers(decoder) -> nn.Sequential:
    """The decoder's own layers as a plain nn.Sequential (BatchNorm unfolded, default layout)."""
    d = decoder
    return nn.Sequential(d.upconv1, d.bn1, nn.ReLU(), d.upconv2, d.bn2, nn.ReLU(),
                         d.upconv3, d.bn3, nn.ReLU(), d.final_conv).eval()


def finish(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))[:, 0]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    head, why = head_status("dinov2-s14")
    if head is None:
        raise SystemExit(f"no head: {why}")
    decoder = load_decoder()
    bare = bare_layers(decoder)
    folded = fold_batchnorm(decoder)
    cl_bare = bare_layers(load_decoder()).to(memory_format=torch.channels_last)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {cpu_name()}; load average at start {load:.1f} "
          f"(a shared CPU: provisional numbers)\n")

    print("| head forward (tokens on the grid -> map) | bare torch layers ms | head ms | head / bare |")
    print("| --- | ---: | ---: | ---: |")
    for g in (16, 24, 32):
        x = torch.randn(1, 384, g, g, generator=torch.Generator().manual_seed(g))
        size = (14 * g, 14 * g)

        def run_bare(x=x, size=size):
            with torch.no_grad():
                return finish(bare(x), size)

        t = interleaved({"bare": run_bare, "head": lambda x=x: head(x)}, args.repeat)
        print(f"| {g} x {g} grid ({14 * g} px) | {t['bare']:.1f} | {t['head']:.1f} | "
              f"{t['head'] / t['bare']:.2f}x |")

    g = 24
    x = torch.randn(1, 384, g, g, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    size = (14 * g, 14 * g)

    def variant(net, inp, mode=torch.no_grad):
        def fn():
            with mode():
                return finish(net(inp), size)
        return fn

    t = interleaved({
        "bare (BatchNorm unfolded, NCHW), no_grad": variant(bare, x),
        "BatchNorm folded, NCHW": variant(folded, x),
        "BatchNorm unfolded, channels_last": variant(cl_bare, x_cl),
        "folded + channels_last (the head's layers)": variant(head.net_on("cpu"), x_cl),
        "folded + channels_last, inference_mode": variant(head.net_on("cpu"), x_cl, torch.inference_mode),
        "the head (folded + channels_last, no_grad, resize + sigmoid)": lambda: head(x_cl),
    }, args.repeat)
    print("\n| 24 x 24 grid, what each speed idea gives | ms | vs bare |")
    print("| --- | ---: | ---: |")
    base = t["bare (BatchNorm unfolded, NCHW), no_grad"]
    for name, ms in t.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")

    print("\n| batch at 24 x 24 | ms per map |")
    print("| --- | ---: |")
    batches = {b: torch.randn(b, 384, g, g) for b in (1, 4, 8, 16)}
    t = interleaved({b: (lambda xb=xb: head(xb)) for b, xb in batches.items()}, max(3, args.repeat // 2))
    for b, ms in t.items():
        print(f"| {b} | {ms / b:.1f} |")

    encoder = Encoder(device="cpu")
    enc = encoder.encode(Image.open(ROOT / "assets" / "coffee.jpg"), size=336)
    comp = merge_bipartite(enc, target=64)
    task_agreement(enc, comp, head)  # the reference map is made once, then kept
    t = interleaved({"agree": lambda: task_agreement(enc, comp, head)}, args.repeat)
    print(f"\none task_agreement call (coffee.jpg 336 px, ToMe at M = 64; regrid + head + 4 metrics, "
          f"reference map cached): {t['agree']:.0f} ms\n")

    print("| agreement_sweep, coffee.jpg 336 px, every strategy | maps | total s | head s | "
          "head ms per map |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for batch in (1, 4, 8):
        fresh = dataclasses.replace(enc, memo={})
        spent = [0.0, 0]
        plain_run = head.run

        def timed_run(e, tokens, spent=spent, plain_run=plain_run):
            start = time.perf_counter()
            out = plain_run(e, tokens)
            spent[0] += time.perf_counter() - start
            spent[1] += out.shape[0]
            return out

        head.run = timed_run
        start = time.perf_counter()
        try:
            agreement_sweep(fresh, head, batch=batch)
        finally:
            del head.run
        total = time.perf_counter() - start
        maps = spent[1] - 1  # minus the reference map
        print(f"| batch {batch} | {maps} | {total:.1f} | {spent[0]:.1f} | {spent[0] * 1e3 / spent[1]:.0f} |")


if __name__ == "__main__":
    main()
