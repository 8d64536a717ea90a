"""What keeping freed memory (``compress.allocator``) does to an encode: page faults and time.

Run: ``.venv/bin/python bench/bench_allocator.py [--sizes 224 336 448] [--rounds 3] [--repeat 8]
[--threads 2]``.

glibc's settings are process-wide and cannot be put back cleanly, so each side runs in a
fresh process of its own (``TCE_KEEP_FREED=0``: glibc as it is; otherwise the app's setting),
the two alternating for ``--rounds`` rounds so a slow stretch of the machine hits both. In each
process: the bundled encoder, two warm-up encodes per size, then ``--repeat`` encodes per size
(the same call the app's upload makes); per encode its wall time and the minor page faults the
process took during it, on a worker thread as in the app (``--where main``: the main
thread, whose malloc arena behaves differently). The table shows medians over all rounds,
and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(sizes: list[int], repeat: int, threads: int, where: str) -> dict:
    from compress.allocator import keep_freed_memory

    applied = keep_freed_memory()  # before the model's memory is allocated, as app.py does

    import torch
    from PIL import Image

    from compress import Encoder

    torch.set_num_threads(threads)
    encoder = Encoder()
    image = Image.open(ROOT / "assets" / "coffee.jpg").convert("RGB")
    def one(size: int) -> tuple[float, int]:
        torch.set_num_threads(threads)  # a worker thread starts from the default count
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        encoder.encode(image, size)
        ms = (time.perf_counter() - start) * 1e3
        return ms, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    out = {"applied": applied, "sizes": {}}
    with ThreadPoolExecutor(1) as worker:  # the app encodes on a worker thread (its own malloc arena)
        run = one if where == "main" else (lambda size: worker.submit(one, size).result())
        for size in sizes:
            for _ in range(2):
                run(size)
            ms, faults = zip(*(run(size) for _ in range(repeat)), strict=True)
            out["sizes"][size] = {"ms": ms, "faults": faults}
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 336, 448])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--where", choices=["worker", "main"], default="worker",
                    help="the thread that encodes: a worker thread, as in the app (default), or the main one")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.sizes, args.repeat, args.threads, args.where)))
        return

    import torch
    from common import header

    torch.set_num_threads(args.threads)  # the header names this process's count: the children's
    print(header("cpu"))
    print(f"encode (the app's upload) of assets/coffee.jpg on the {args.where} thread; {args.rounds} rounds "
          f"of a fresh process per side, {args.repeat} encodes per size in each; medians\n")
    sides = {"glibc as it is": "0", "keep freed memory": "1"}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(args.rounds):
        for side, flag in sides.items():
            env = dict(os.environ, TCE_KEEP_FREED=flag)
            cmd = [sys.executable, __file__, "--child", "--sizes", *map(str, args.sizes),
                   "--repeat", str(args.repeat), "--threads", str(args.threads), "--where", args.where]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not all(r["applied"] for r in runs["keep freed memory"]):
        print("note: this C library has no mallopt (not glibc): both sides run alike")
    print("| px | allocator | page faults per encode | encode ms | peak RSS MB |")
    print("| ---: | --- | ---: | ---: | ---: |")
    base: dict[int, float] = {}
    for size in args.sizes:
        for side in sides:
            ms = [m for r in runs[side] for m in r["sizes"][str(size)]["ms"]]
            faults = [f for r in runs[side] for f in r["sizes"][str(size)]["faults"]]
            med = statistics.median(ms)
            rel = f" ({med / base[size]:.2f}x)" if size in base else ""
            base.setdefault(size, med)
            rss = max(r["rss_mb"] for r in runs[side])
            print(f"| {size} | {side} | {statistics.median(faults):.0f} | {med:.1f}{rel} | {rss:.0f} |")


if __name__ == "__main__":
    main()
