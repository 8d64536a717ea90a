"""Slider updates give way to running encodes (tabs/priority.py), and only for a moment."""

from __future__ import annotations

import threading
import time

from tabs import priority
from tabs.common import LIVE, QUIET, Wiring


def test_nothing_running_means_no_wait():
    start = time.monotonic()
    assert priority.give_way(5.0)
    assert time.monotonic() - start < 1.0


def test_a_live_update_waits_for_the_running_encode():
    started, release, order = threading.Event(), threading.Event(), []

    def encode():
        with priority.encoding():
            started.set()
            release.wait(5)
            order.append("encode done")

    worker = threading.Thread(target=encode)
    worker.start()
    started.wait(5)

    def slider():
        assert priority.give_way(5.0)
        order.append("slider drawn")

    waiting = threading.Thread(target=slider)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and order == []  # still giving way
    release.set()
    waiting.join(5)
    worker.join(5)
    assert order == ["encode done", "slider drawn"]
    assert priority.encodes_running() == 0


def test_the_wait_is_bounded():
    release = threading.Event()
    started = threading.Event()

    def encode():
        with priority.encoding():
            started.set()
            release.wait(5)

    worker = threading.Thread(target=encode)
    worker.start()
    started.wait(5)
    start = time.monotonic()
    assert not priority.give_way(0.1)  # gave up: the encode still runs
    assert 0.09 <= time.monotonic() - start < 2.0
    release.set()
    worker.join(5)


def test_an_encode_that_fails_still_ends():
    try:
        with priority.encoding():
            raise ValueError("bad image")
    except ValueError:
        pass
    assert priority.encodes_running() == 0


def test_only_interactive_updates_are_wired_to_give_way():
    seen = {}

    def trigger(fn, inputs, outputs, **kw):
        seen[kw.get("trigger_mode", "quiet")] = fn

    def handler():
        return "drawn"

    wiring = Wiring.__new__(Wiring)  # only .on is used here
    wiring._named = set()
    wiring.on(trigger, handler, [], [], **LIVE)
    wiring.on(trigger, handler, [], [], **QUIET)
    assert seen["quiet"] is handler  # e.g. the first picture after an upload: never held back
    assert seen["always_last"] is not handler and seen["always_last"]() == "drawn"
    assert seen["always_last"].__wrapped__ is handler
