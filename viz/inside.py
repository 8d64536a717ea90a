"""Pictures of compression inside the network: the clusters (or kept patches) after any block,
tokens per block, and the numbers of one run against the plain forward.

``inside_panel`` runs (or fetches) one forward with ToMe or EViT pruning
inside the blocks (``compress.inside``) and draws the state after block
``block``; runs are kept with the encoding, so the block slider only redraws.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure

from compress import Encoding
from compress.inside import (
    EVIT_BLOCKS,
    InsideResult,
    cut_forward,
    output_agreement,
    plain_forward,
    prune_forward,
    tome_forward,
)
from compress.threads import torch_threads

from .overlay import DEFAULT_DISPLAY, cluster_overlay
from .panels import Panel
from .plots import ACCENT, MAIN, _figure, _styled

RUNS_KEPT = 6  # inside runs kept per encoding (each holds its covers)


PLAIN_RUNS = 3  # the plain forward is timed this many times per thread count at first
SETTLED_RUNS = 2  # a run is settled once its forward has been timed this many times
PLAIN_MAX_RUNS = 5  # ``settle`` times the plain forward again until it has this many runs
_PLAIN = ("plain",)


def _memo(enc: Encoding, key, make):
    runs = enc.memo.setdefault("inside_runs", {})
    if key not in runs:
        result = make()
        _samples(enc, result.threads, key).append(result.forward_ms)
        runs[key] = result
        while len(runs) > RUNS_KEPT:
            runs.pop(next(iter(runs)))
    return runs[key]


def _samples(enc: Encoding, threads: int, key) -> list[float]:
    """The forward times (ms) of run ``key`` (or the plain forward) on ``threads`` torch threads
    measured so far on this encoding's image (a speed-up reads the best of each)."""
    return enc.memo.setdefault("inside_times", {}).setdefault((int(threads), key), [])


def _time_plain(encoder, enc: Encoding) -> float:
    """The plain forward's network time, as a run's (``forward_ms``: pixels to the final norm;
    not the resize before it nor the covers after it)."""
    return plain_forward(encoder, enc.image, enc.size, keep_aspect=True).forward_ms


def plain_ms(encoder, enc: Encoding, threads: int | None = None) -> float:
    """The plain forward's time on this encoding's image on ``threads`` torch threads (default:
    the calling thread's count): the best of its runs at that count (``PLAIN_RUNS`` at first,
    one more with each ``settle`` up to ``PLAIN_MAX_RUNS``). A run's speed-up compares it with
    the plain forward at the count the run was timed at."""
    import torch

    _warm_up(encoder, "tome")
    threads = torch.get_num_threads() if threads is None else int(threads)
    kept = _samples(enc, threads, _PLAIN)
    if len(kept) < PLAIN_RUNS:
        with torch_threads(threads):
            while len(kept) < PLAIN_RUNS:
                kept.append(_time_plain(encoder, enc))
    return min(kept)


def timing(encoder, enc: Encoding, result: InsideResult, key) -> dict:
    """{"forward_ms", "plain_ms", "speedup", "runs", "plain_runs", "threads", "cut_speedup"} of
    run ``key``: the best time of each forward measured so far at the run's thread count.
    ``cut_speedup``: the plain forward's time over the free cut's to the run's counts
    (``compress.inside.cut_forward``: the most any method with these counts can gain on this
    machine), once ``settle(..., with_cut=True)`` has timed it; else None.

    Why the best and not one run: a server's forwards share the CPU with what else runs at
    that moment (the server's own work on the request, other people's requests, on a laptop
    the browser drawing the last answer), which only ever adds time: in the app a first run
    of ToMe at r = 36 took 159 ms and the same forward 113 ms a moment later. The plain
    forward gains runs with the first ``settle``s, so its best is over more runs than a
    setting's: if anything, a speed-up is understated."""
    plain = plain_ms(encoder, enc, result.threads)
    forward = min(_samples(enc, result.threads, key))  # the first run's time is its first
    cut = _samples(enc, result.threads, _cut_key(key))
    return {"forward_ms": forward, "plain_ms": plain, "speedup": plain / forward,
            "runs": len(_samples(enc, result.threads, key)),
            "plain_runs": len(_samples(enc, result.threads, _PLAIN)), "threads": result.threads,
            "cut_speedup": plain / min(cut) if len(cut) >= SETTLED_RUNS else None}


def _cut_key(key) -> tuple:
    return ("cut", *key)


def settle(encoder, enc: Encoding, key, with_cut: bool = False,
           stop: Callable[[], bool] | None = None) -> bool:
    """Time run ``key`` (kept with the encoding) once more and the plain forward once more
    (until it has ``PLAIN_MAX_RUNS`` runs: then its best is settled too), in turns, until the
    run has ``SETTLED_RUNS`` times; with ``with_cut`` the free cut to the run's counts too
    (``SETTLED_RUNS`` times, in the same turns). True if it ran anything. Always on the thread
    count the run was first timed at, whatever the caller's (the app gives a request one
    thread while others wait, and every core to a person alone): times on another count would
    not compare with the first. ``stop()``, asked before each forward, ends it early (the
    times so far are kept). What the app does after showing a new setting's first numbers."""
    result = enc.memo.get("inside_runs", {}).get(key)
    if result is None:
        return False
    with torch_threads(result.threads):
        return _settle(encoder, enc, key, result, with_cut, stop)


def _settle(encoder, enc: Encoding, key, result: InsideResult, with_cut: bool,
            stop: Callable[[], bool] | None) -> bool:
    kept = _samples(enc, result.threads, key)
    cut = _samples(enc, result.threads, _cut_key(key)) if with_cut else []
    cuts_due = SETTLED_RUNS if with_cut else 0
    if len(kept) >= SETTLED_RUNS and len(cut) >= cuts_due:
        return False
    plain_ms(encoder, enc, result.threads)  # its first runs, if they are still to come
    plain = _samples(enc, result.threads, _PLAIN)

    def time_plain():
        plain.append(_time_plain(encoder, enc))

    def time_cut():
        cut.append(cut_forward(encoder, enc.image, enc.size, result.counts, keep_aspect=True).forward_ms)

    def time_run():
        kept.append(_forward(encoder, enc, key).forward_ms)

    # In turns, one of each per round, the run's own forward last: the first forward after an
    # answer is the likeliest to share the CPU with the browser drawing it.
    while len(kept) < SETTLED_RUNS or len(cut) < cuts_due:
        due = [(len(plain) < PLAIN_MAX_RUNS, time_plain), (len(cut) < cuts_due, time_cut),
               (len(kept) < SETTLED_RUNS, time_run)]
        for wanted, step in due:
            if not wanted:
                continue
            if stop is not None and stop():
                return True
            step()
    return True


_WARM: set = set()


def _warm_up(encoder, method: str) -> None:
    """Run ``method`` once on a tiny image per encoder: the first call of a forward pays one-time
    costs (allocator, kernels' first use) that would otherwise land in the measured time."""
    key = (id(encoder), method)
    if key in _WARM:
        return
    from PIL import Image

    tiny = Image.new("RGB", (112, 112), (128, 128, 128))
    if method == "tome":
        tome_forward(encoder, tiny, 112, r=4)
    else:
        prune_forward(encoder, tiny, 112, keep_ratio=0.5)
    plain_forward(encoder, tiny, 112)
    _WARM.add(key)


def inside_run(encoder, enc: Encoding, method: str, r: int = 8, keep_ratio: float = 0.7,
               blocks=EVIT_BLOCKS, fuse: bool = True, schedule: int = 0) -> InsideResult:
    """ToMe (``method="tome"``, ``r`` per block, or ToMe's schedule around it: ``schedule`` -1
    decreasing from 2 r to 0, +1 increasing, 0 constant) or EViT pruning (``"prune"``) inside
    the encoder, on the encoding's image at its size; kept with the encoding."""
    if enc.layer != encoder.depth - 1:
        raise ValueError("compression inside the network runs the whole network: choose the last "
                         f"block (this encoding reads block {enc.layer + 1})")
    key = run_key(method, r, keep_ratio, blocks, fuse, schedule)
    _warm_up(encoder, method)
    return _memo(enc, key, lambda: _forward(encoder, enc, key))


def run_key(method: str, r: int = 8, keep_ratio: float = 0.7, blocks=EVIT_BLOCKS,
            fuse: bool = True, schedule: int = 0) -> tuple:
    """What identifies a run on an encoding: ("tome", r), ("tome", r, schedule) for ToMe's
    rising or falling schedule, or ("prune", keep, blocks, fuse)."""
    if method == "tome":
        if schedule not in (-1, 0, 1):
            raise ValueError(f"schedule must be -1 (decreasing), 0 (constant) or 1 (increasing), "
                             f"got {schedule!r}")
        return ("tome", int(r)) if schedule == 0 else ("tome", int(r), int(schedule))
    if method == "prune":
        return ("prune", float(keep_ratio), tuple(int(b) for b in blocks), bool(fuse))
    raise ValueError(f"method must be 'tome' or 'prune', got {method!r}")


def _forward(encoder, enc: Encoding, key) -> InsideResult:
    if key[0] == "tome":
        r = key[1] if len(key) == 2 else (key[1], key[2])  # (r, inflection): ToMe's schedule
        return tome_forward(encoder, enc.image, enc.size, r=r, keep_aspect=True)
    return prune_forward(encoder, enc.image, enc.size, keep_ratio=key[1], blocks=key[2],
                         fuse=key[3], keep_aspect=True)


FORWARD_NAMES = {"tome_inside": "ToMe inside", "prune_inside": "EViT inside"}


@_styled
def depth_plot(result: InsideResult, block: int) -> Figure:
    """Tokens per block (and the plain forward's constant count), the shown block marked."""
    fig, (ax,) = _figure(1)
    counts = result.counts
    x = np.arange(len(counts))
    ax.step(x, [counts[0]] * len(counts), where="post", color="#999999", linewidth=1.5,
            label="plain forward")
    ax.step(x, counts, where="post", color=MAIN, linewidth=2.0,
            label=FORWARD_NAMES.get(result.strategy, result.strategy))
    ax.axvline(block, color=ACCENT, linestyle="--", linewidth=1.5)
    ax.text(block, counts[0] * 0.98, f" after block {block}: {counts[block]}", color=ACCENT,
            va="top", fontsize=9)
    ax.set_xlabel("block (0 = the input to block 1)")
    ax.set_ylabel("patch-side tokens")
    ax.set_ylim(0, counts[0] * 1.05)
    ax.set_title(f"FLOPs {result.flops_ratio:.0%} of the plain forward")
    ax.legend(loc="lower left", frameon=False)
    return fig


FRAME_MS = 700  # one block's frame in ``depth_animation``; the last is held three times as long


def depth_animation(result: InsideResult, enc: Encoding, path, display: int = DEFAULT_DISPLAY,
                    frame_ms: int = FRAME_MS) -> None:
    """The tokens after every block, one frame per block, as an animated GIF at ``path``: the
    growth of ToMe's clusters across depth (or EViT's kept patches thinning), the picture the
    block slider shows, played for a slide or a projector. Each frame is captioned with its
    block and token count; the animation loops, holding the last block."""
    from PIL import Image, ImageDraw, ImageFont

    if result.grid != enc.grid:
        raise ValueError("the run and the encoding must be the same image at the same size")
    frames = []
    for block, labels in enumerate(result.covers, 1):
        picture = cluster_overlay(enc.image, enc.grid, labels.cpu().numpy(), display=display)
        bar = max(18, picture.height // 16)
        frame = Image.new("RGB", (picture.width, picture.height + bar), (255, 255, 255))
        frame.paste(picture, (0, 0))
        draw = ImageDraw.Draw(frame)
        font = ImageFont.load_default(size=int(bar * 0.7))
        draw.text((6, picture.height + bar // 2), f"after block {block} of {len(result.covers)}: "
                  f"{result.counts[block]} tokens", fill=(20, 20, 20), font=font, anchor="lm")
        frames.append(frame)
    # one palette for all frames, from the first (the most detail): 0.14 s where a palette per
    # frame took 1.4 s, and a third of the bytes
    palette = frames[0].quantize(colors=255, method=Image.Quantize.FASTOCTREE)
    frames = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms * 3]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=durations,
                   loop=0)


def inside_panel(encoder, enc: Encoding, method: str, r: int = 8, keep_ratio: float = 0.7,
                 blocks=EVIT_BLOCKS, fuse: bool = True, block: int | None = None,
                 with_figure: bool = True, display: int = DEFAULT_DISPLAY, schedule: int = 0) -> Panel:
    """One inside-the-network run drawn after block ``block`` (default: the last).

    ``stats``: N, M, tokens per block, FLOPs ratio, forward ms, the plain
    forward's ms and the speedup (``timing``: the best of each forward's runs
    so far, ``runs`` and ``plain_runs`` of them, timed in this process on the
    same number of torch threads: ``threads``), merge ms, and
    the output agreement (final patch tokens read back through the covers
    against the plain forward's, CLS cosine). ``schedule``: ToMe's, as ``inside_run``.
    """
    t0 = time.perf_counter()
    result = inside_run(encoder, enc, method, r, keep_ratio, blocks, fuse, schedule)
    key = run_key(method, r, keep_ratio, blocks, fuse, schedule)
    speed = timing(encoder, enc, result, key)
    t1 = time.perf_counter()
    depth = len(result.covers)
    block = depth if block is None else min(max(int(block), 1), depth)
    labels = result.covers[block - 1].cpu().numpy()
    overlay = cluster_overlay(enc.image, enc.grid, labels, display=display)
    figure = depth_plot(result, block) if with_figure else None
    t2 = time.perf_counter()
    agree = output_agreement(result, enc)
    stats = {
        "N": enc.num_patches, "M": result.compression.num_out, "block": block,
        "tokens_at_block": int(result.counts[block]), "counts": list(result.counts),
        "flops_ratio": result.flops_ratio, **speed, "merge_ms": result.merge_ms,
        "patch_cosine": agree["patch_cosine"], "cls_cosine": agree["cls_cosine"],
        "discarded_share": agree["discarded_share"],
    }
    return Panel(overlay, result.compression, stats, figure, {"result": result, "key": key},
                 strategy_ms=(t1 - t0) * 1e3, draw_ms=(t2 - t1) * 1e3)


def inside_at_budget(encoder, enc: Encoding, budget: int, settled: bool = False) -> dict[str, dict]:
    """ToMe and EViT pruning inside the network at about ``budget`` final tokens, for Compare.

    r (ToMe, the same every block) and the keep ratio (EViT at its default
    blocks, fused) are chosen so the final count is nearest ``budget``
    (``r_for_budget``, ``keep_for_budget``: no network run to find them).
    With ``settled`` each forward, and the free cut to its counts, is timed
    ``SETTLED_RUNS`` times (``settle``). Returns {name: {"label", "comp", "setting",
    "flops_ratio", and ``timing``'s "forward_ms", "plain_ms", "speedup", "runs",
    "plain_runs", "threads", "cut_speedup"}} ("cut_speedup" None unless settled).
    """
    from compress.inside import keep_for_budget, r_for_budget

    depth = len(encoder.net.blocks)
    out = {}
    r = r_for_budget(enc.grid, budget, depth)
    keep = keep_for_budget(enc.grid, budget, depth)
    for name, label, setting, key, run in (
        ("tome_inside", "ToMe inside the ViT", f"r = {r} per block", run_key("tome", r),
         lambda: inside_run(encoder, enc, "tome", r=r)),
        ("prune_inside", "EViT pruning inside the ViT", f"keep {keep:.2f} at blocks 4, 7, 10",
         run_key("prune", keep_ratio=keep), lambda: inside_run(encoder, enc, "prune", keep_ratio=keep)),
    ):
        result = run()
        if settled:
            settle(encoder, enc, key, with_cut=True)
        out[name] = {"label": label, "comp": result.compression, "setting": setting,
                     "flops_ratio": result.flops_ratio, **timing(encoder, enc, result, key)}
    return out
