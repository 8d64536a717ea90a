"""Slider updates give way to running encodes (tabs/priority.py), and only for a moment."""

from __future__ import annotations

import threading
import time

import pytest
import torch

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


def running_encode() -> tuple[threading.Thread, threading.Event]:
    """An encode that has started and runs until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def encode():
        with priority.encoding():
            started.set()
            release.wait(5)

    worker = threading.Thread(target=encode)
    worker.start()
    started.wait(5)
    return worker, release


def test_the_wait_is_bounded():
    worker, release = running_encode()
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
    worker, release = running_encode()
    try:
        # e.g. the first picture after an upload: never held back by a running encode
        start = time.monotonic()
        assert seen["quiet"]() == "drawn" and time.monotonic() - start < 1.0
        answers = []
        live = threading.Thread(target=lambda: answers.append(seen["always_last"]()))
        live.start()
        live.join(0.2)
        assert live.is_alive() and answers == []  # a slider update gives way
    finally:
        release.set()
    live.join(5)
    worker.join(5)
    assert answers == ["drawn"]


# --- both cores for a lone request ------------------------------------------------------------


@pytest.fixture
def configured(monkeypatch):
    """The app's thread policy: one torch thread per request, two for a lone heavy step."""
    monkeypatch.setattr(priority, "_base", 1)
    monkeypatch.setattr(priority, "LONE_THREADS", 2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_without_the_app_there_is_no_policy():
    assert priority._base is None  # the library and other tests are left as they are
    assert priority.step_threads() is None
    assert priority.alone()  # nothing to share the server with: a library call may time freely
    before = torch.get_num_threads()
    with priority.lone_cores():
        assert torch.get_num_threads() == before


def test_a_lone_request_gets_every_core_and_shares_once_another_arrives(configured):
    seen = {}
    inside, release = threading.Event(), threading.Event()
    me, someone_else = object(), object()  # two sessions

    lone = {}

    @priority.counted
    def heavy(session, key):
        seen[key] = priority.step_threads()
        lone[key] = priority.alone()

    @priority.counted
    def other(session):
        inside.set()
        release.wait(5)

    def beside(session, key):
        inside.clear()
        release.clear()
        waiting = threading.Thread(target=other, args=(session,))
        waiting.start()
        inside.wait(5)
        heavy(me, key)
        release.set()
        waiting.join(5)

    heavy(me, "alone")
    beside(me, "beside my own drag update")  # e.g. a release whose drag update is finishing
    beside(someone_else, "beside another session's request")
    beside(None, "beside a page's first request")
    with priority.encoding(), priority.encoding():
        heavy(me, "two encodes")
    heavy(me, "alone again")
    heavy(None, "a first request alone")
    assert seen == {"alone": 2, "beside my own drag update": 2,
                    "beside another session's request": 1, "beside a page's first request": 1,
                    "two encodes": 1, "alone again": 2, "a first request alone": 2}
    assert lone == {key: n == 2 for key, n in seen.items()}  # alone() says what the count follows
    assert not priority._active  # every request counted out


def test_no_one_is_alone_while_a_background_job_runs(configured):
    """The Compare curves job takes a core: a lone step on both would time its forwards against
    it (ToMe inside read 0.88x beside it)."""
    from tabs.jobs import Jobs

    started, release, seen = threading.Event(), threading.Event(), {}

    def job(progress):
        started.set()
        release.wait(5)

    @priority.counted
    def heavy(session, key):
        seen[key] = priority.step_threads()

    jobs = Jobs()
    me = object()
    heavy(me, "before")
    running = jobs.once({}, "curves", job)
    started.wait(5)
    heavy(me, "beside the job")
    release.set()
    running.event.wait(5)
    heavy(me, "after")
    assert seen == {"before": 2, "beside the job": 1, "after": 2}


def test_lone_cores_changes_only_the_calling_thread_and_restores_it(configured):
    other_count, ready, checked = [], threading.Event(), threading.Event()

    def bystander():  # a worker thread that has already run torch on its one thread
        priority.own_threads()
        ready.set()
        checked.wait(5)
        other_count.append(torch.get_num_threads())

    t = threading.Thread(target=bystander)
    t.start()
    ready.wait(5)
    with priority.request(object()), priority.lone_cores():  # a request alone
        assert torch.get_num_threads() == 2
        checked.set()
        t.join(5)
    assert other_count == [1]
    assert torch.get_num_threads() == 1


def test_streaming_and_async_handlers_keep_their_kind():
    def stream(session):
        yield 1

    async def later(session):
        return 1

    assert priority.counted(stream) is stream and priority.counted(later) is later


def test_lone_blocks_nest(configured):
    """The resampler's fit takes every core and the saliency head inside it asks again: the inner
    block leaves the outer one's count in force."""
    with priority.request(object()):
        with priority.lone_cores():
            with priority.lone_cores():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1


def test_a_request_starts_on_the_configured_threads(configured):
    torch.set_num_threads(2)  # e.g. a worker thread born while a lone step had raised the count
    assert priority.counted(torch.get_num_threads)() == 1


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_lone_thread_count_is_named(value):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import tabs.priority"], capture_output=True,
                          text=True, env={**os.environ, "TCE_LONE_THREADS": value}, timeout=120)
    assert done.returncode != 0
    assert f"TCE_LONE_THREADS must be a whole number of threads, at least 1; got '{value}'" \
        in done.stderr
