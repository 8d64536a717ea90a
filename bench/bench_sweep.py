"""Sweep benchmark: images per second of the plain loop and of Ray Data with 1 and 2 workers.

Run from the project's folder: ``.venv/bin/python bench/bench_sweep.py [--images 100]
[--size 336] [--strategies merge_bipartite,prune_attention] [--budgets 64,144]``
(``--gpus-per-worker 1`` on a machine with a GPU).

Makes ``--images`` pictures from the bundled photos (flips, crops, resizes)
in a temporary folder, then sweeps them four ways, one after the other:
the plain loop (``plain_sweep``) with 2 and with 1 torch threads, and
``run_sweep`` with 1 worker x 2 threads and 2 workers x 1 thread. Each Ray
run starts and stops its own embedded Ray, so its wall time includes
``ray.init``, the actors' start (a fresh Python importing torch and loading
the model) and the shutdown; the plain loop's includes loading the model in
this process (torch is already imported). "steady" is the rate between the
first and the last result, without any start-up. Ray's overhead compares
like with like: the same CPUs for the work (2 threads) in both. Memory per
worker is the peak RSS of each actor process (sampled every 0.25 s from
/proc), beside the RSS of Ray's own processes and of this process. A
two-image plain sweep first (not timed) puts the weights in the page cache.
Prints Markdown tables; on a shared CPU, read the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # Ray's workers start in the driver's folder and import ``compress`` from there

from bench.common import header  # noqa: E402
from compress.sweep import plain_sweep, run_sweep  # noqa: E402


def make_images(folder: Path, count: int) -> list[str]:
    """``count`` JPEGs from the bundled photos: each photo as is, mirrored, cropped, resized, ..."""
    photos = sorted((ROOT / "assets").glob("*.jpg"))
    made = []
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            kind, k = (i // len(photos)) % 4, i // (4 * len(photos))
            w, h = im.size
            if kind == 1:
                im = ImageOps.mirror(im)
            elif kind == 2:
                f = 0.5 + 0.05 * (k % 8)
                im = im.crop((0, 0, int(w * f), int(h * f)))
            elif kind == 3:
                im = im.resize((max(32, w // (2 + k % 3)), max(32, h // (2 + k % 3))))
            path = folder / f"img{i:04d}.jpg"
            im.save(path, quality=90)
            made.append(str(path))
    return made


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RayMemory:
    """Peak RSS of this session's Ray actor processes (by pid) and of Ray's other processes (summed)."""

    def __init__(self, every_s: float = 0.25):
        self.every_s, self.sid = every_s, os.getsid(0)
        self.actors: dict[int, float] = {}
        self.before = {pid for pid, _ in self._ours()}  # a previous run's processes, still exiting
        self.others_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ours(self):
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[3]) != self.sid:
                    continue
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            pid = int(stat.parent.name)
            old = pid == os.getpid() or pid in getattr(self, "before", ())
            if not old and ("ray" in cmd or "raylet" in cmd or "gcs_server" in cmd):
                yield pid, cmd

    def _run(self):
        while not self._stop.is_set():
            others = 0.0
            for pid, cmd in self._ours():
                mb = rss_mb(pid)
                if "MapWorker" in cmd:
                    self.actors[pid] = max(self.actors.get(pid, 0.0), mb)
                else:
                    others += mb
            self.others_peak = max(self.others_peak, others)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--strategies", default="merge_bipartite,prune_attention")
    ap.add_argument("--budgets", default="64,144")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(header("cuda" if args.gpus_per_worker else "cpu"))
    print(f"\n{args.images} images at {args.size} px; strategies {args.strategies}; budgets {args.budgets}; "
          f"{os.cpu_count()} CPUs; Ray's runs each start and stop an embedded Ray\n")
    settings = {"strategies": args.strategies, "budgets": args.budgets, "size": args.size}
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        folder = work / "images"
        folder.mkdir()
        make_images(folder, args.images)
        # warm-up (not timed): the weights' cache files into the page cache, as for every later run
        plain_sweep(sorted(map(str, folder.iterdir()))[:2], threads=2, **settings)
        rows = []
        for threads in (2, 1):
            stamps: list[float] = []
            start = time.monotonic()
            plain_sweep(str(folder), threads=threads,
                        progress=lambda _d, _t, stamps=stamps: stamps.append(time.monotonic()), **settings)
            wall = time.monotonic() - start
            steady = (len(stamps) - 1) / (stamps[-1] - stamps[0])
            rows.append((f"plain loop, {threads} thread(s)", wall, args.images / wall, steady, 0.0, None,
                         rss_mb(os.getpid()), 0.0))
        ray_runs = [(1, 2), (2, 1)]
        if args.gpus_per_worker:
            ray_runs = [(1, 1)]
        for workers, threads in ray_runs:
            out = work / f"ray_{workers}x{threads}.parquet"
            with RayMemory() as mem:
                start = time.monotonic()
                report = run_sweep(str(folder), out, workers=workers, threads_per_worker=threads,
                                   gpus_per_worker=args.gpus_per_worker, progress=False,
                                   num_cpus=max(2, workers * threads), **settings)
                wall = time.monotonic() - start
            assert report.done == args.images and report.errors == 0, report
            rows.append((f"Ray, {workers} worker(s) x {threads} thread(s)", wall, args.images / wall,
                         report.steady_images_per_s, report.startup_s, sorted(mem.actors.values()),
                         rss_mb(os.getpid()), mem.others_peak))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base_wall, base_steady = rows[0][1], rows[0][3]
    print("| run | wall s | images/s (end to end) | images/s (steady) | Ray start-up s | "
          "wall vs plain 2 threads | steady vs plain 2 threads |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, wall, rate, steady, startup, *_ in rows:
        print(f"| {name} | {wall:.1f} | {rate:.2f} | {steady:.2f} | {startup:.1f} | "
              f"{wall / base_wall:.2f}x | {steady / base_steady:.2f}x |")
    one = rows[2]
    print(f"\nRay's overhead over the plain loop at {args.images} images, both on 2 threads "
          f"(1 worker x 2 threads): {one[1] / base_wall - 1:+.1%} end to end (target <= 15 %), "
          f"{base_steady / one[3] - 1:+.1%} in the steady state.")
    print("\n| run | peak RSS per actor (MB) | Ray's other processes (MB, summed) | this process (MB) |")
    print("| --- | --- | ---: | ---: |")
    for name, _, _, _, _, actors, own, others in rows:
        per = "-" if actors is None else ", ".join(f"{a:.0f}" for a in actors)
        print(f"| {name} | {per} | {others:.0f} | {own:.0f} |")


if __name__ == "__main__":
    main()
