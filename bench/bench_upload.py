"""One person alone on the server: upload -> first overlay, with and without the lone-request cores.

A teacher at a projector is the app's commonest user, and alone on the
machine. Each request runs on ``--threads`` torch threads (one by default,
right for a class); a request alone on the server takes every core for its
encode (``TCE_LONE_THREADS``, tabs/priority.py). This starts the real app
twice on loopback, once as shipped and once with ``TCE_LONE_THREADS=1`` (one
thread, as before), and sends the same uploads to both in turns (the order
alternates), through the page's own chain (``/upload`` encodes, ``/draw_open``
draws the open tab), timed from the request to the first overlay. Each photo
is new to the server (flipped / rotated / resized copies of the bundled
photos), so every upload encodes; at each size the photos are then sent
again, which the session cache answers (the "cached" column).

Run: ``.venv/bin/python bench/bench_upload.py [--photos 8] [--sizes 224 336 448]``.
Prints a Markdown table with the machine in its header.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import header  # noqa: E402
from bench.load_test import QueueClient, encode_defaults, make_photos, picture_chain  # noqa: E402
from bench.serve import HOST, free_port, start_app, stop_app  # noqa: E402

SETUPS = {"lone request on every core (as shipped)": {},
          "one thread per request (TCE_LONE_THREADS=1)": {"TCE_LONE_THREADS": "1"}}


async def run(args, work: Path) -> dict:
    import httpx

    photos = make_photos(args.photos, work)
    servers, times = {}, {name: {} for name in SETUPS}
    try:
        for name, env in SETUPS.items():
            port = free_port()
            log = work / f"server-{len(servers)}.log"
            servers[name] = (start_app(port, log, extra_env=env), f"http://{HOST}:{port}/")
        async with httpx.AsyncClient(timeout=args.timeout) as http:
            apis = {}
            for name, (_, url) in servers.items():
                config = (await http.get(url + "config")).json()
                fns = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}
                apis[name] = (url, fns, encode_defaults(url))
            for size in args.sizes:
                for step, photo in enumerate(photos + photos):  # the second pass: cached
                    kind = "new" if step < len(photos) else "cached"
                    order = list(SETUPS) if step % 2 == 0 else list(reversed(SETUPS))
                    for name in order:
                        url, fns, defaults = apis[name]
                        client = QueueClient(http, url, fns)
                        image = await client.upload(photo)
                        values = list(defaults)
                        values[1] = size  # after the image: model, size, layer, keep_aspect, ...
                        start = time.perf_counter()
                        await picture_chain(client, image, values)
                        times[name].setdefault((size, kind), []).append(
                            (time.perf_counter() - start) * 1e3)
                        await asyncio.sleep(args.pause)  # the server idle again: a lone request
    finally:
        for proc, _ in servers.values():
            stop_app(proc)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 336, 448])
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between uploads")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    if not 1 <= args.photos <= 30:
        raise SystemExit("--photos must be 1..30")
    work = Path(tempfile.mkdtemp(prefix="tce-upload-"))
    try:
        times = asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lone, single = list(SETUPS)
    print(f"One user alone: upload -> first overlay, {args.photos} new photos per size then the "
          f"same again (cached), both setups in turns")
    print(f"{header()} (this process); the servers: 1 torch thread per request (--threads), "
          f"{len(os.sched_getaffinity(0))} for a lone request as shipped")
    print()
    print("| px | photos | as shipped: median ms | one thread: median ms | speed-up | "
          "cached, as shipped | cached, one thread |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        a, b = times[lone][(size, "new")], times[single][(size, "new")]
        ca, cb = times[lone][(size, "cached")], times[single][(size, "cached")]
        print(f"| {size} | {len(a)} | {statistics.median(a):.0f} | {statistics.median(b):.0f} | "
              f"{statistics.median(b) / statistics.median(a):.2f}x | {statistics.median(ca):.0f} | "
              f"{statistics.median(cb):.0f} |")


if __name__ == "__main__":
    main()
