"""A bounded load test of the real app: many concurrent sessions on loopback, then a table.

Starts ``app.py`` on a free port of 127.0.0.1 (never another interface, never
a share link), then runs ``--sessions`` sessions at once (``QueueClient``: Gradio's
queue protocol spoken directly, as the page speaks it, in one asyncio loop),
all starting together as a class does. Every session first
opens the page: the page's own event chain runs (``/upload`` encodes the
sample photo, ``/draw_open`` draws the open tab), timed from the request to
the first overlay; then uploads its own photo through the same chain (the
bundled photos, plus flipped, rotated and resized copies made in a temporary
folder so that no two sessions share an image), timed likewise; then sends slider
updates (``/merge_live``, ``/prune_live``, ``/resample_live``, values swept
within the sliders' limits) for ``--seconds``, pausing ``--pause`` s between
updates as a dragging hand does. Every loop is bounded in count and in time;
every request has a timeout. Meanwhile the server's resident memory is
sampled every 0.5 s from ``/proc/<pid>/status``.

Prints a Markdown table: requests served, errors (by message), median and
p95 latency per endpoint, and the server's memory (after start-up, peak
sampled, the kernel's high-water mark, at the end).

Run: ``.venv/bin/python bench/load_test.py [--sessions 16] [--seconds 60]``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import HOST, free_port, start_app, stop_app  # noqa: E402  (loopback only)

MERGE_METHODS = ("threshold", "tome")
STATUS_GRID = re.compile(r"(\d+) tokens \((\d+) x (\d+) patches")  # the status line after /encode


def make_photos(count: int, folder: Path) -> list[Path]:
    """``count`` distinct JPEGs: the bundled photos, then flipped / rotated / resized copies."""
    from PIL import Image, ImageOps

    sources = sorted((ROOT / "assets").glob("*.jpg"))
    variants = [
        ("orig", lambda im: im),
        ("mirror", ImageOps.mirror),
        ("flip", ImageOps.flip),
        ("rot180-small", lambda im: im.rotate(180).resize((im.width * 3 // 4, im.height * 3 // 4))),
        ("mirror-small", lambda im: ImageOps.mirror(im).resize((im.width // 2, im.height // 2))),
        ("crop", lambda im: im.crop((im.width // 8, im.height // 8, im.width, im.height))),
    ]
    photos = []
    for i in range(count):
        src = sources[i % len(sources)]
        name, fn = variants[(i // len(sources)) % len(variants)]
        rnd = i // (len(sources) * len(variants))  # beyond 30 sessions: shrink a little more
        image = fn(Image.open(src).convert("RGB"))
        if rnd:
            image = image.resize((max(8, image.width - 8 * rnd), max(8, image.height - 8 * rnd)))
        path = folder / f"{i:02d}-{src.stem}-{name}.jpg"
        image.save(path, quality=90)
        photos.append(path)
    return photos


def cpu_s(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` in KiB, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


class MemorySampler(threading.Thread):
    """Samples the server's VmRSS every ``period`` seconds until stopped."""

    def __init__(self, pid: int, period: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.stop = threading.Event()
        self.samples: list[int] = []

    def run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                self.samples.append(rss_kib(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return


class Stats:
    """Latencies and errors per endpoint, shared by all session threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ms: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def ok(self, endpoint: str, ms: float) -> None:
        with self.lock:
            self.ms[endpoint].append(ms)

    def error(self, endpoint: str, exc: BaseException) -> None:
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        with self.lock:
            self.errors[endpoint][text] += 1


def sweep(lo: float, hi: float, step: int, period: int = 17) -> float:
    """A value that zig-zags between lo and hi as ``step`` grows: every update changes something."""
    t = (step % period) / (period - 1)
    t = t if (step // period) % 2 == 0 else 1 - t
    return lo + (hi - lo) * t


def slider_updates(n_tokens: int):
    """Endless (endpoint, args) pairs within the sliders' limits, cycling the three tabs."""
    for step in itertools.count():
        kind = step % 3
        if kind == 0:
            method = MERGE_METHODS[(step // 3) % 2]
            threshold = round(sweep(0.80, 0.98, step), 3)
            target = int(round(sweep(8, min(400, n_tokens), step + 5)))
            yield "/merge_live", (method, threshold, target, "mean")
        elif kind == 1:
            keep = round(sweep(0.02, 0.95, step), 2)
            head = "mean" if step % 4 else "0"
            yield "/prune_live", ("cls", head, keep, False)
        else:
            latents = int(round(sweep(4, min(128, n_tokens), step)))
            selected = step % latents
            yield "/resample_live", (latents, 2, "kmeans", selected)


def encode_defaults(url: str) -> list:
    """/encode's parameters after the image, each at the app's own default (read from its API).

    The image comes first (the app's order: image, model, size, layer,
    keep_aspect, then each tab's controls); reading the rest from the API
    keeps this test in step when the app grows a tab.
    """
    from gradio_client import Client

    api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    named = api["named_endpoints"]
    missing = [e for e in ("/encode", "/merge_live", "/prune_live", "/resample_live") if e not in named]
    if missing:
        raise SystemExit(f"the app has no endpoint {', '.join(missing)}")
    params = named["/encode"]["parameters"]
    if not params or "image" not in str(params[0].get("component", "")).lower():
        raise SystemExit(f"/encode's first parameter is not the image: {params[:1]}")
    no_default = [p.get("parameter_name") for p in params[1:] if not p.get("parameter_has_default")]
    if no_default:
        raise SystemExit(f"/encode parameters without a default: {no_default}")
    return [p["parameter_default"] for p in params[1:]]


class QueueClient:
    """One browser session speaking Gradio's queue protocol directly (httpx, asyncio).

    ``gradio_client`` spends ~130 ms of CPU per request here (a thread per
    request polling every 50 ms), which on a 2-core machine takes the server's
    CPU; this client joins the queue (``/gradio_api/queue/join``) and reads the
    session's event stream (``/gradio_api/queue/data``) like the page does, for
    a few ms each. The session hash keys the server-side state, as a tab's does.
    """

    def __init__(self, http, base: str, fns: dict[str, int]):
        import uuid

        self.http, self.base, self.fns = http, base, fns
        self.hash = uuid.uuid4().hex[:11]

    async def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            r = await self.http.post(self.base + "gradio_api/upload", files={"files": (path.name, f)})
        r.raise_for_status()
        return self.file(r.json()[0], path.name)

    @staticmethod
    def file(server_path: str, name: str) -> dict:
        return {"path": server_path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}

    async def call(self, name: str, data: list) -> list:
        """The outputs of endpoint ``name`` (an api name) on ``data``; RuntimeError with its message.

        Every endpoint of this app takes the session state first: the page sends a placeholder
        for it (the server keeps the state under the session hash), and so does this client.
        """
        import json

        r = await self.http.post(self.base + "gradio_api/queue/join", json={
            "data": [None, *data], "event_data": None, "fn_index": self.fns[name], "trigger_id": None,
            "session_hash": self.hash})
        r.raise_for_status()
        event = r.json()["event_id"]
        async with self.http.stream("GET", self.base + "gradio_api/queue/data",
                                    params={"session_hash": self.hash}) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") != event or msg.get("msg") != "process_completed":
                    if msg.get("msg") == "unexpected_error":
                        raise RuntimeError(msg.get("message", "unexpected error"))
                    continue
                if not msg.get("success"):
                    raise RuntimeError((msg.get("output") or {}).get("error") or "failed")
                return msg["output"]["data"]
        raise RuntimeError(f"the event stream closed before {name} completed")


async def timed(stats: Stats, label: str, coro, timeout: float):
    """Await ``coro`` within ``timeout``, recording its time under ``label``; None on failure."""
    import asyncio

    start = time.perf_counter()
    try:
        out = await asyncio.wait_for(coro, timeout)
    except Exception as exc:  # noqa: BLE001 - every failure is a data point
        stats.error(label, exc)
        return None
    stats.ok(label, (time.perf_counter() - start) * 1e3)
    return out


async def picture_chain(client: QueueClient, image: dict, defaults: list) -> list:
    """The page's own chain for a new picture: encode ("upload"), then draw the open tab."""
    head = await client.call("upload", [image, *defaults])
    await client.call("draw_open", defaults[4:])
    return head


async def session(http, base: str, fns: dict, sample: dict, photo: Path, defaults: list,
                  stats: Stats, seconds: float, pause: float, max_requests: int, timeout: float) -> None:
    """One user: open the page (the sample photo's encode + the open tab drawn), upload
    ``photo`` (the same chain), then slider updates until ``seconds`` have passed."""
    import asyncio

    client = QueueClient(http, base, fns)
    if await timed(stats, "page open -> first overlay", picture_chain(client, sample, defaults),
                   timeout) is None:
        return
    mine = await timed(stats, "upload (file transfer)", client.upload(photo), timeout)
    if mine is None:
        return
    out = await timed(stats, "upload -> first overlay", picture_chain(client, mine, defaults), timeout)
    if out is None:
        return
    grids = [m for o in out if isinstance(o, str) and (m := STATUS_GRID.search(o))]
    n_tokens = int(grids[0][1]) if grids else 576
    deadline = time.monotonic() + seconds
    updates = slider_updates(n_tokens)
    for _ in range(max_requests):
        if time.monotonic() >= deadline:
            break
        endpoint, args = next(updates)
        await timed(stats, endpoint, client.call(endpoint.lstrip("/"), list(args)), timeout)
        await asyncio.sleep(pause)


async def run_sessions(url: str, photos: list[Path], defaults: list, stats: Stats, args) -> int:
    """All sessions at once, as a class starts together; returns how many were still running
    at the hard stop (then cancelled)."""
    import asyncio

    import httpx

    limits = httpx.Limits(max_connections=4 * len(photos) + 8)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
        config = (await http.get(url + "config")).json()
        fns = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}
        # the page's default picture, as the config hands it to the page (a served copy)
        box = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "input-image")
        sample = box["props"]["value"]
        tasks = [asyncio.create_task(session(http, url, fns, sample, photo, defaults, stats,
                                             args.seconds, args.pause, args.max_requests,
                                             args.timeout))
                 for photo in photos]
        done, pending = await asyncio.wait(tasks, timeout=args.seconds + 2 * args.timeout + 60)
        for task in pending:
            task.cancel()
        return len(pending)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0, help="slider phase per session")
    ap.add_argument("--pause", type=float, default=0.1, help="seconds between one session's updates")
    ap.add_argument("--timeout", type=float, default=120.0, help="per request")
    ap.add_argument("--max-requests", type=int, default=5000, help="per session, a hard bound")
    args = ap.parse_args()
    if not (1 <= args.sessions <= 64 and 0 < args.seconds <= 600):
        raise SystemExit("--sessions must be 1..64 and --seconds 0..600")

    import torch

    work = Path(tempfile.mkdtemp(prefix="tce-load-"))
    stats = Stats()
    try:
        photos = make_photos(args.sessions, work)
        port = free_port()
        log = work / "server.log"
        t_start = time.perf_counter()
        proc = start_app(port, log)
        startup_s = time.perf_counter() - t_start
        url = f"http://{HOST}:{port}/"
        base = rss_kib(proc.pid)["VmRSS"]
        sampler = MemorySampler(proc.pid)
        sampler.start()
        print(f"app up on {url} in {startup_s:.1f} s (RSS {base / 1024:.0f} MiB); "
              f"{args.sessions} sessions for {args.seconds:.0f} s ...", file=sys.stderr)
        defaults = encode_defaults(url)
        # The clients run here, on the server's 2 cores; in a class they run on other machines.
        # At the lowest priority they take mostly CPU the server leaves idle.
        os.nice(19)
        server_cpu0, self_cpu0 = cpu_s(proc.pid), time.process_time()
        t0 = time.perf_counter()
        import asyncio

        stuck = asyncio.run(run_sessions(url, photos, defaults, stats, args))
        wall = time.perf_counter() - t0
        server_cpu, self_cpu = cpu_s(proc.pid) - server_cpu0, time.process_time() - self_cpu0
        sampler.stop.set()
        sampler.join(timeout=5)
        mem = rss_kib(proc.pid)
        alive = proc.poll() is None
        stop_app(proc)
        tracebacks = log.read_text(errors="replace").count("Traceback")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    served = sum(len(v) for v in stats.ms.values())
    failed = sum(sum(c.values()) for c in stats.errors.values())
    peak = max(sampler.samples or [base])
    print(f"Load test: {args.sessions} concurrent sessions (Gradio's queue protocol, like the page) "
          f"on loopback, each its own "
          f"photo, then slider updates for {args.seconds:.0f} s ({args.pause:.2f} s pause between "
          f"a session's updates); {os.cpu_count()}-core CPU, torch {torch.__version__.split('+')[0]}, "
          f"wall {wall:.0f} s")
    print()
    print("| endpoint | served | errors | median ms | p95 ms | max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for endpoint in ("page open -> first overlay", "upload (file transfer)",
                     "upload -> first overlay", "/merge_live", "/prune_live", "/resample_live"):
        ms = stats.ms.get(endpoint, [])
        errs = sum(stats.errors.get(endpoint, {}).values())
        if not ms and not errs:
            continue
        if ms:
            print(f"| {endpoint} | {len(ms)} | {errs} | {statistics.median(ms):.0f} | "
                  f"{percentile(ms, 0.95):.0f} | {max(ms):.0f} |")
        else:
            print(f"| {endpoint} | 0 | {errs} | - | - | - |")
    print(f"| **all** | **{served}** ({served / wall:.1f}/s) | **{failed}** | | | |")
    print()
    print(f"CPU over the run: the server {server_cpu:.0f} s, this load generator (the "
          f"{args.sessions} clients) {self_cpu:.0f} s, of {os.cpu_count() * wall:.0f} s the "
          f"{os.cpu_count()} cores had: the clients share the server's CPU here.")
    print()
    print("| server memory (RSS) | MiB |")
    print("| --- | ---: |")
    print(f"| after start-up | {base / 1024:.0f} |")
    print(f"| peak, sampled every 0.5 s | {peak / 1024:.0f} |")
    print(f"| peak, kernel high-water mark (VmHWM) | {mem['VmHWM'] / 1024:.0f} |")
    print(f"| at the end | {mem['VmRSS'] / 1024:.0f} |")
    print()
    trace = sampler.samples[::20]  # every 10 s
    print("server RSS every 10 s from the first session's start (MiB): "
          + " ".join(f"{kib / 1024:.0f}" for kib in trace))
    print()
    print("targets: page open and upload to first overlay median <= 5 s, p95 <= 15 s; slider "
          "updates median <= 400 ms, p95 <= 1.5 s; 0 errors; memory levels off")
    print()
    print(f"server alive at the end: {'yes' if alive else 'NO'}; tracebacks in its log: {tracebacks}; "
          f"sessions still running at the hard stop: {stuck}")
    for endpoint, counter in stats.errors.items():
        for text, n in counter.most_common(5):
            print(f"- error x{n} on {endpoint}: {text}")


if __name__ == "__main__":
    main()
