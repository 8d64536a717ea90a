"""One person alone on the server, with and without the lone-user cores: uploads, Inside the ViT, Compare.

A teacher at a projector is the app's commonest user, and alone on the
machine. Each request runs on ``--threads`` torch threads (one by default,
right for a class); a person alone on the server gets every core for the
heavy steps (``TCE_LONE_THREADS``, tabs/priority.py). This starts the real
app twice on loopback, once as shipped and once with ``TCE_LONE_THREADS=1``
(one thread, as before), and sends the same requests to both in turns (the
order alternates):

- uploads through the page's own chain (``/upload`` encodes, ``/draw_open``
  draws the open tab), timed from the request to the first overlay. Each
  photo is new to the server (flipped / rotated / resized copies of the
  bundled photos), so every upload encodes; at each size the photos are then
  sent again, which the session cache answers (the "cached" column);
- ``/inside`` with a new ToMe r each time (what releasing the r slider runs:
  the forward with merging inside, the plain forward once per image, the
  saliency head, the plot), at 336 px;
- ``/compare`` at a new budget each time (Compare's release: every strategy,
  the two inside-the-ViT rows and the head on all of them), at 336 px.

Run: ``.venv/bin/python bench/bench_alone.py [--photos 8] [--sizes 224 336 448]``.
Prints Markdown tables with the machine in the header.
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

INSIDE_R = (4, 8, 12, 16, 20, 24, 28, 32)  # ToMe r per block: each a new forward
BUDGETS = (40, 90, 150, 30, 120, 60)  # Compare budgets: each a new set of inside runs


def inside_defaults(url: str) -> list:
    """/inside's parameters, each at the app's default (read from its API)."""
    from gradio_client import Client

    api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    return [p["parameter_default"] for p in api["named_endpoints"]["/inside"]["parameters"]]


# the other side of the comparison (--against): its name, the server's environment, a short label
AGAINST = {
    "lone": ("one thread per request (TCE_LONE_THREADS=1)", {"TCE_LONE_THREADS": "1"}, "one thread"),
    "allocator": ("freed memory kept (TCE_KEEP_FREED=1)", {"TCE_KEEP_FREED": "1"}, "memory kept"),
}
SETUPS = {"as shipped": {}, AGAINST["lone"][0]: AGAINST["lone"][1]}


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
            for name, (url, fns, defaults) in apis.items():  # a session on the coffee photo
                client = QueueClient(http, url, fns)
                image = await client.upload(ROOT / "assets" / "coffee.jpg")
                await picture_chain(client, image, defaults)
                apis[name] = (url, fns, defaults, client, inside_defaults(url))
            for step, r in enumerate(INSIDE_R):
                for name in list(SETUPS) if step % 2 == 0 else list(reversed(SETUPS)):
                    *_, client, inside = apis[name]
                    args_ = list(inside)
                    args_[1] = r  # method, r, keep, fuse, blocks, block (the session is sent apart)
                    start = time.perf_counter()
                    await client.call("inside", args_)
                    times[name].setdefault(("inside", None), []).append(
                        (time.perf_counter() - start) * 1e3)
                    await asyncio.sleep(args.pause)
            for step, budget in enumerate(BUDGETS):
                for name in list(SETUPS) if step % 2 == 0 else list(reversed(SETUPS)):
                    client = apis[name][3]
                    start = time.perf_counter()
                    await client.call("compare", [budget])
                    times[name].setdefault(("compare", None), []).append(
                        (time.perf_counter() - start) * 1e3)
                    await asyncio.sleep(args.pause)
            for size in args.sizes:
                for step, photo in enumerate(photos + photos):  # the second pass: cached
                    kind = "new" if step < len(photos) else "cached"
                    order = list(SETUPS) if step % 2 == 0 else list(reversed(SETUPS))
                    for name in order:
                        url, fns, defaults = apis[name][:3]
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
    ap.add_argument("--against", choices=sorted(AGAINST), default="lone",
                    help="what the shipped app is compared with: one thread for a lone request "
                         "(lone), or freed memory kept (allocator: compress/allocator.py on)")
    args = ap.parse_args()
    name, env, short = AGAINST[args.against]
    SETUPS.clear()
    SETUPS.update({"as shipped": {}, name: env})
    if not 1 <= args.photos <= 30:
        raise SystemExit("--photos must be 1..30")
    work = Path(tempfile.mkdtemp(prefix="tce-upload-"))
    try:
        times = asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lone, single = list(SETUPS)
    med = statistics.median
    print(f"One user alone: upload -> first overlay, {args.photos} new photos per size then the "
          f"same again (cached), both setups in turns: as shipped against {single}")
    print(f"{header()} (this process); the servers: 1 torch thread per request (--threads), "
          f"{len(os.sched_getaffinity(0))} for a lone request as shipped")
    print()
    print(f"| px | photos | as shipped: median ms | {short}: median ms | speed-up | "
          f"cached, as shipped | cached, {short} |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        a, b = times[lone][(size, "new")], times[single][(size, "new")]
        ca, cb = times[lone][(size, "cached")], times[single][(size, "cached")]
        print(f"| {size} | {len(a)} | {statistics.median(a):.0f} | {statistics.median(b):.0f} | "
              f"{statistics.median(b) / statistics.median(a):.2f}x | {statistics.median(ca):.0f} | "
              f"{statistics.median(cb):.0f} |")
    print()
    print(f"| release, 336 px | runs | as shipped: median ms | {short}: median ms | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, label in ((("inside", None), "Inside the ViT: a new r (forward, head, plot)"),
                       (("compare", None), "Compare: a new budget (inside rows, task column)")):
        a, b = times[lone][key], times[single][key]
        print(f"| {label} | {len(a)} | {med(a):.0f} | {med(b):.0f} | {med(b) / med(a):.2f}x |")


if __name__ == "__main__":
    main()
