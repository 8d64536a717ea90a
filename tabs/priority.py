"""Who gets the cores: first pictures first, and every core for a person alone on the server.

First pictures first: while an upload is being encoded, slider updates give way a moment.

In a class, sixteen uploads arrive within a minute and the students already
served start dragging sliders at once; on a small CPU every slider update
then takes cores from the encodes the others are waiting on. Each
interactive update waits (at most ``WAIT_S``, env ``TCE_GIVE_WAY_S``) while
any encode runs, so the encodes get the cores: nobody waits long for a first
picture, and a slider during those seconds answers at most ``WAIT_S`` later.
Measured with ``bench/load_test.py --sessions 16``: the median upload -> first
overlay went from 6.5-7.3 s (no waiting) to 5.5-7.3 s (1 s) and 5.1 s (3 s),
with the slider medians and p95s within the machine's run-to-run spread; 5 s
gave 4.9 s, as 3 s did in the run beside it.

Both cores for a lone request: each request runs on ``--threads`` torch
threads (one by default: on a busy small CPU several one-thread requests side
by side beat contended thread pools), but a teacher alone on the machine
would leave the second core idle while waiting for an encode. So the heavy
steps (an encode, block by block; the saliency head's forward; the forwards
of Inside the ViT and Compare's release; the resampler's fit) take
``LONE_THREADS`` (all the cores; env ``TCE_LONE_THREADS``) while every
request in flight is their own session's, and go back to ``--threads`` (at
the next block, for an encode) once another session's request arrives.
Measured with ``bench/bench_alone.py``: a lone upload's first picture comes
1.2-1.5x sooner on 2 cores; the load test is unchanged.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

from compress.threads import torch_threads

WAIT_S = float(os.environ.get("TCE_GIVE_WAY_S", "3"))  # the most a slider update waits for encodes


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _env_threads(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SystemExit(f"{name} must be a whole number of threads, at least 1; got {text!r}")
    return value


LONE_THREADS = _env_threads("TCE_LONE_THREADS", _cores())  # a lone person's heavy steps

_cond = threading.Condition()
_running = 0  # encodes running
_active: collections.Counter = collections.Counter()  # requests (and jobs) in flight, by owner
_local = threading.local()  # the session whose request this thread runs
_NOBODY = object()
_base: int | None = None  # torch threads per request (``--threads``); None: no policy (library use)


@contextmanager
def encoding() -> Iterator[None]:
    """Mark an encode as running for as long as the block lasts."""
    global _running
    with _cond:
        _running += 1
    try:
        yield
    finally:
        with _cond:
            _running -= 1
            if _running == 0:
                _cond.notify_all()


def encodes_running() -> int:
    return _running


def give_way(limit: float = WAIT_S) -> bool:
    """Wait until no encode runs, or ``limit`` seconds; True when none was running at the end."""
    with _cond:
        return _cond.wait_for(lambda: _running == 0, timeout=limit)


def configure(threads: int) -> None:
    """The app's ``--threads``: what each request uses, and what a lone heavy step returns to."""
    global _base
    _base = int(threads)


@contextmanager
def request(owner: Hashable) -> Iterator[None]:
    """Count a request of ``owner`` (a session) as in flight for as long as the block lasts."""
    mine = _local.__dict__.get("owner", _NOBODY)
    _local.owner = owner
    with _cond:
        _active[owner] += 1
    try:
        yield
    finally:
        with _cond:
            _active[owner] -= 1
            if not _active[owner]:
                del _active[owner]
        if mine is _NOBODY:
            del _local.owner
        else:
            _local.owner = mine


def counted(fn: Callable) -> Callable:
    """``fn``, counted as a request of its session (the first argument of every handler the app
    wires) while it runs, on ``--threads`` torch threads (a worker thread started while a lone
    step had raised torch's count would inherit that). Generator and async handlers are left
    as they are: Gradio streams them by their kind, which a plain wrapper would hide."""
    if inspect.isgeneratorfunction(fn) or inspect.iscoroutinefunction(fn) \
            or inspect.isasyncgenfunction(fn):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        own_threads()
        # no session yet (a page's first request): alone only if nothing else is in flight
        with request(id(args[0]) if args and args[0] is not None else object()):
            return fn(*args, **kwargs)
    return wrapper


def own_threads() -> None:
    """Put the calling thread on ``--threads`` torch threads. Torch's count is per thread, but a
    thread takes the last count set anywhere at its first torch call: one whose first call
    fell inside another's lone step would keep that step's count."""
    if _base is not None and torch.get_num_threads() != _base:
        torch.set_num_threads(_base)


def alone() -> bool:
    """Whether every request in flight is the calling request's session's (and at most one
    encode runs): a person alone on the server. True when the app has configured nothing
    (library use, tests)."""
    if _base is None:
        return True
    owner = _local.__dict__.get("owner", _NOBODY)
    with _cond:
        return owner is not _NOBODY and set(_active) <= {owner} and _running <= 1


def step_threads() -> int | None:
    """Torch threads for the calling request's next heavy step: ``LONE_THREADS`` while every
    request in flight is its own session's (a person alone on the server: e.g. the drag update
    that a release follows may still be finishing; a background job counts as someone else's,
    tabs/jobs.py) and at most one encode runs; else
    ``--threads``. None when the app has not configured a thread count (library use: leave
    torch as it is)."""
    if _base is None:
        return None
    return max(_base, LONE_THREADS) if alone() else _base


@contextmanager
def lone_cores() -> Iterator[None]:
    """Within the block the calling thread uses ``step_threads()`` torch threads (decided on
    entry), then the count it had before (blocks nest). Torch's count is per thread: other
    requests keep theirs."""
    with torch_threads(step_threads()):
        yield


def yielding(fn: Callable) -> Callable:
    """``fn``, first giving way to running encodes."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        give_way()
        return fn(*args, **kwargs)
    return wrapper
