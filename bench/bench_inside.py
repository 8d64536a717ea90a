"""Speed of compression inside the ViT: ToMe's r (and EViT pruning) against tokens, FLOPs and time.

Run: ``.venv/bin/python bench/bench_inside.py [--device cpu|cuda] [--precision fp32|bf16]
[--threads 2] [--repeat 7] [--sizes 224 336 448] [--clock wall|cpu]``.

For each size the plain forward (the same block loop, no reduction) and every
compressed forward are timed in turns within one run (plain, r=4, r=8, ...,
then again), so background load hits them alike; medians over the repeats
after one warm-up. Columns: tokens left at the output, FLOPs ratio
(``forward_flops``), forward ms, speedup over the plain forward, the FLOPs
speedup (1 / ratio), their quotient (target >= 0.85), the same quotient for
``cut_forward`` at the method's counts (the loop cut to those counts for free,
timed in the same turns: the most any method with these counts can reach here)
and the share of the forward spent matching and merging (target <= 10 %; on a
GPU measured in separate runs with a sync around each merge).

``--clock cpu`` (one thread only) reads the thread's CPU time instead of the
wall clock: on a machine shared with other work, time spent waiting for a
core then does not count. Wall time at 2 threads is the issue's setting.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compress.inside as inside  # noqa: E402
from compress import Encoder, device_label  # noqa: E402
from compress.allocator import keep_freed_memory  # noqa: E402
from compress.inside import (  # noqa: E402
    cut_forward,
    plain_forward,
    prune_forward,
    r_for_budget,
    tome_forward,
)

TARGET_EFFICIENCY = 0.85
TARGET_MERGE_SHARE = 0.10


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ladder(n: int, depth: int) -> list[int]:
    """r = 0, 4, 8, 16, 24, the r that leaves N / 4 tokens and the r that leaves 64."""
    rs = {0, 4, 8, 16, 24, r_for_budget(n, max(1, n // 4), depth), r_for_budget(n, min(64, n), depth)}
    return sorted(r for r in rs if r <= n // 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 336, 448])
    ap.add_argument("--model", default="dinov2-s14")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    args = ap.parse_args()
    if args.clock == "cpu":
        if args.threads != 1 or args.device != "cpu":
            ap.error("--clock cpu measures one CPU thread: use it with --threads 1 --device cpu")
        inside.TIMER = time.thread_time
    kept = keep_freed_memory()  # no page faults in the timings (compress/allocator.py)
    torch.set_num_threads(args.threads)
    encoder = Encoder(args.model, device=args.device, precision=args.precision)
    gpu = encoder.device.type == "cuda"
    image = Image.open(ROOT / "assets" / "coffee.jpg")
    depth = encoder.depth
    print(f"device: {device_label(encoder.device)}; model {args.model}, precision {args.precision}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {cpu_model()}; "
          f"repeats {args.repeat} (median, interleaved); clock {args.clock}; "
          f"freed memory {'kept' if kept else 'returned (glibc as it is)'}")
    print()
    print("| px | N | forward | tokens left | FLOPs ratio | ms | speedup | FLOPs speedup "
          "| speedup / FLOPs speedup | free cut: speedup / FLOPs speedup | merge share | ok |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :-: |")
    for size in args.sizes:
        n = (size // encoder.patch_size) ** 2
        configs = [("plain", lambda s=size: plain_forward(encoder, image, s))]
        configs += [(f"ToMe r={r}", lambda s=size, r=r: tome_forward(encoder, image, s, r=r))
                    for r in ladder(n, depth)]
        configs += [(f"EViT keep={k} @3/6/9, fuse", lambda s=size, k=k: prune_forward(encoder, image, s, k))
                    for k in (0.7, 0.5)]

        def timm_forward(s=size):
            _, pixels, _ = encoder.preprocess(image, s)
            with torch.no_grad():
                if gpu:
                    torch.cuda.synchronize()
                start = inside.TIMER()
                with torch.autocast(encoder.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                    encoder.blocks_net.forward_features(pixels)  # bf16: bf16 weights
                if gpu:
                    torch.cuda.synchronize()
                return (inside.TIMER() - start) * 1e3

        last = {label: fn() for label, fn in configs}  # warm-up; gives each method's counts
        methods = [label for label, _ in configs if label != "plain"]
        configs += [(f"{label} cut", lambda s=size, c=last[label].counts: cut_forward(encoder, image, s, c))
                    for label in methods]
        times: dict[str, list[float]] = {label: [] for label, _ in configs}
        shares: dict[str, list[float]] = {label: [] for label, _ in configs}
        timm_ms = []
        for rep in range(args.repeat + 1):
            for label, fn in configs:
                out = fn()
                last[label] = out
                if rep == 0:
                    continue  # warm-up
                times[label].append(out.forward_ms)
                if out.merge_ms is not None:
                    shares[label].append(out.merge_ms / out.forward_ms)
            ms = timm_forward()
            if rep:
                timm_ms.append(ms)
        if gpu:  # merge share with a sync around every merge, in separate runs
            for label in methods:
                for _ in range(3):
                    kw = last[label].params
                    if label.startswith("ToMe"):
                        out = tome_forward(encoder, image, size, r=kw["r"], profile=True)
                    else:
                        out = prune_forward(encoder, image, size, kw["keep_ratio"], profile=True)
                    shares[label].append(out.merge_ms / out.forward_ms)
        plain_ms = statistics.median(times["plain"])
        print(f"| {size} | {n} | timm forward_features (check) | {n} | 1.000 | "
              f"{statistics.median(timm_ms):.1f} | {plain_ms / statistics.median(timm_ms):.2f} | | | | | |")
        for label in ["plain"] + methods:
            out = last[label]
            ms = statistics.median(times[label])
            speedup = plain_ms / ms
            flops_speedup = 1 / out.flops_ratio
            share = statistics.median(shares[label]) if shares[label] else None
            eff = speedup / flops_speedup
            if label == "plain":
                ok = ""
            else:
                ok = "yes" if eff >= TARGET_EFFICIENCY and (share or 0) <= TARGET_MERGE_SHARE else "NO"
            share_s = "" if label == "plain" else f"{100 * share:.1f} %"
            bound = ""
            if label != "plain":
                bound = f"{plain_ms / statistics.median(times[label + ' cut']) / flops_speedup:.2f}"
            print(f"| {size} | {n} | {label} | {out.counts[-1]} | {out.flops_ratio:.3f} | {ms:.1f} | "
                  f"{speedup:.2f} | {flops_speedup:.2f} | {eff:.2f} | {bound} | {share_s} | {ok} |")
        sys.stdout.flush()
    if not gpu:
        block_throughput(encoder, args.repeat)


def block_throughput(encoder, repeat: int) -> None:
    """Why few tokens fall behind the FLOPs count: one block's linear layers (qkv, proj, MLP)
    timed at token counts a merged forward passes through, as GFLOP/s."""
    blk = encoder.blocks_net.blocks[len(encoder.blocks_net.blocks) // 2]
    linears = [m for m in blk.modules() if isinstance(m, torch.nn.Linear)]
    bf16 = encoder.precision == "bf16"
    print()
    print(f"One block's linear layers by token count, {encoder.precision} (the FLOPs count assumes one "
          "rate for all):")
    print()
    print("| tokens | ms | GFLOP/s |")
    print("| ---: | ---: | ---: |")
    for t in (257, 161, 65, 17, 6):
        xs = [torch.randn(1, t, m.in_features) for m in linears]
        flops = sum(2.0 * t * m.in_features * m.out_features for m in linears)

        def run(xs=xs):
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                for m, x in zip(linears, xs, strict=True):
                    m(x)

        runs = []
        for _ in range(max(repeat, 5) * 4):
            start = time.perf_counter()
            run()
            runs.append(time.perf_counter() - start)
        ms = statistics.median(runs) * 1e3
        print(f"| {t} | {ms:.2f} | {flops / ms / 1e6:.0f} |")


if __name__ == "__main__":
    main()
