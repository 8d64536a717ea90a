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
import json
import os
import shutil
import subprocess
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


def hwm_mb(pid: int) -> float:
    """The peak resident memory (VmHWM) of process ``pid`` in MB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RayMemory:
    """Peak RSS of this session's Ray actor processes (by pid) and of Ray's other processes (summed)."""

    def __init__(self, every_s: float = 0.25):
        self.every_s, self.sid = every_s, os.getsid(0)
        self.actors: dict[int, float] = {}
        self.skip: set[int] = set()  # the benchmark's own child (its driver), not Ray's
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
            old = pid == os.getpid() or pid in self.skip or pid in getattr(self, "before", ())
            if not old and ("ray" in cmd or "raylet" in cmd or "gcs_server" in cmd):
                yield pid, cmd

    def _run(self):
        while not self._stop.is_set():
            others = 0.0
            for pid, cmd in self._ours():
                mb = hwm_mb(pid)
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


def child(spec: dict) -> dict:
    """One run in this (fresh) process: the plain loop or ``run_sweep``; its numbers as a dict."""
    settings = spec["settings"]
    if spec["workers"] == 0:
        stamps: list[float] = []
        plain_sweep(spec["folder"], threads=spec["threads"],
                    progress=lambda _d, _t: stamps.append(time.monotonic()), **settings)
        return {"steady": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "startup": 0.0,
                "done": len(stamps), "errors": 0, "hwm": hwm_mb(os.getpid())}
    report = run_sweep(spec["folder"], spec["out"], workers=spec["workers"],
                       threads_per_worker=spec["threads"], gpus_per_worker=spec["gpus"], progress=False,
                       num_cpus=max(2, spec["workers"] * spec["threads"]), **settings)
    return {"steady": report.steady_images_per_s, "startup": report.startup_s, "done": report.done,
            "errors": report.errors, "hwm": hwm_mb(os.getpid())}


def timed_child(spec: dict) -> tuple[float, dict, list[float], float]:
    """(wall s from spawn to exit, the child's numbers, peak RSS per actor, Ray's other processes' RSS)."""
    with RayMemory() as mem:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        mem.skip.add(proc.pid)
        out, _ = proc.communicate()
        wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the run {spec} failed (rc {proc.returncode}): {out[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return wall, result, sorted(mem.actors.values()), mem.others_peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--strategies", default="merge_bipartite,prune_attention")
    ap.add_argument("--budgets", default="64,144")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    torch.set_num_threads(2)
    print(header("cuda" if args.gpus_per_worker else "cpu"))
    print(f"\n{args.images} images at {args.size} px; strategies {args.strategies}; budgets {args.budgets}; "
          f"{os.cpu_count()} CPUs; each run in a fresh process, timed from its start to its exit\n")
    settings = {"strategies": args.strategies, "budgets": args.budgets, "size": args.size}
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    runs = [(0, 2), (0, 1), (1, 2), (2, 1)] if not args.gpus_per_worker else [(0, 2), (1, 1)]
    try:
        folder = work / "images"
        folder.mkdir()
        make_images(folder, args.images)
        # warm-up (not timed): the weights' cache files into the page cache, as for every later run
        plain_sweep(sorted(map(str, folder.iterdir()))[:2], threads=2, **settings)
        rows = []
        for workers, threads in runs:
            spec = {"folder": str(folder), "out": str(work / f"r{workers}x{threads}.parquet"),
                    "workers": workers, "threads": threads, "gpus": args.gpus_per_worker,
                    "settings": settings}
            wall, res, actors, others = timed_child(spec)
            assert res["done"] == args.images and res["errors"] == 0, res
            name = (f"plain loop, {threads} thread(s)" if workers == 0
                    else f"Ray, {workers} worker(s) x {threads} thread(s)")
            rows.append((name, wall, res, actors if workers else None, others))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.images
    base_wall, base_steady = rows[0][1], rows[0][2]["steady"]
    print("| run | wall s | images/s (end to end) | images/s (steady) | Ray start-up s | fixed cost s | "
          "wall vs plain 2 threads | steady rate vs plain 2 threads |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, wall, res, _, _ in rows:
        steady = res["steady"]
        print(f"| {name} | {wall:.1f} | {n / wall:.2f} | {steady:.2f} | {res['startup']:.1f} | "
              f"{wall - n / steady:.1f} | {wall / base_wall:.2f}x | {steady / base_steady:.2f}x |")
    for name, wall, res, _, _ in rows[2:]:
        print(f"\n{name}: overhead over the plain loop on 2 threads at {n} images "
              f"{wall / base_wall - 1:+.1%} end to end (target <= 15 %), "
              f"{base_steady / res['steady'] - 1:+.1%} in the steady state.")
    print("\nfixed cost: wall - images / steady rate (imports, model loading, Ray's start and stop).")
    print("\n| run | peak RSS per actor (MB) | Ray's other processes (MB, summed) | driver peak (MB) |")
    print("| --- | --- | ---: | ---: |")
    for name, _, res, actors, others in rows:
        per = "-" if actors is None else ", ".join(f"{a:.0f}" for a in actors)
        print(f"| {name} | {per} | {others:.0f} | {res['hwm']:.0f} |")


if __name__ == "__main__":
    main()
