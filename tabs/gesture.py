"""A dragged slider's updates and its release, shown in the order the user made them.

Gradio sends a slider's drag updates (``.input``, only the last pending one
kept) and its release (``.release``) as separate events. The last drag update
waits in the browser for the one before it to come back, so it can reach the
server after the release, and the two then run side by side on the shared
queue: a drag update that lands after the release left its picture without
fidelity (or an earlier position's picture) on the page, and its panel as the
one exported. ``Gesture`` orders them per session and tab:

- a full update (a release, or any control that is not dragged) notes when it
  started, and a release the value its slider was let go at, then runs;
- a drag update of a slider at the value that slider was last released at is
  the gesture's trailing update (the release brings the same picture and its
  numbers; a new drag's first update has moved off that value): it is
  skipped, however late it comes, whatever was released since;
- a drag update is skipped when a full update started after it (it shows a
  position the user has left), checked before and after its work;
- the two take turns on one lock per session and tab, so a skipped drag never
  replaces the panel the release made;
- "started" is when the request reached the handler, before it gives way to
  running encodes (``tabs/priority.py``): an older drag that waited longer is
  still older.

Only the browser's events go through a ``Gesture``: the named API endpoints
(``/merge_live`` ...) answer every call.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable

import gradio as gr

from .priority import give_way

_clock = itertools.count(1)  # one order for every start, across sessions (next() is atomic)


class _Moves:
    """One session's state for one tab: its lock, the last full update's start, and where each
    slider was last let go."""

    def __init__(self):
        self.lock = threading.Lock()
        self.full_at = 0
        self.released: dict[int, float] = {}  # a slider's place in the values -> its last release


class Gesture:
    """The drag and full updates of one tab (``key``), ordered per session."""

    def __init__(self, key: str):
        self.key = key

    def _moves(self, session) -> _Moves:
        return session.moves.setdefault(self.key, _Moves())  # setdefault: atomic on a dict

    def lock(self, session) -> threading.Lock:
        """The session's lock for this tab: held by every full and drag update while it runs."""
        return self._moves(session).lock

    def full(self, fn: Callable, slider: int | None = None) -> Callable:
        """``fn`` as a full update (the release of the slider at ``values[slider]``, or another
        control): later-starting drags to other settings are shown after it."""
        @functools.wraps(fn)
        def run(session, *values):
            if session is None:
                return fn(session, *values)
            m = self._moves(session)
            if slider is not None:
                m.released[slider] = values[slider]
            m.full_at = next(_clock)
            give_way()
            with m.lock:
                return fn(session, *values)
        run.gives_way = True  # Wiring.on need not wrap it in priority.yielding
        return run

    def drag(self, fn: Callable, n_outputs: int, slider: int) -> Callable:
        """``fn`` as a drag update of the slider at ``values[slider]``: skipped (every output
        left as it is) once a release or full update has answered for it, or started after it."""
        @functools.wraps(fn)
        def run(session, *values):
            if session is None:
                return fn(session, *values)
            start, m = next(_clock), self._moves(session)
            give_way()

            def answered() -> bool:
                return m.full_at > start or m.released.get(slider) == values[slider]

            with m.lock:
                if answered():
                    return [gr.skip()] * n_outputs
                out = fn(session, *values)
            return [gr.skip()] * n_outputs if answered() else out
        run.gives_way = True
        return run


def slider_of(trigger, inputs: list) -> int | None:
    """The place in a handler's values (its ``inputs`` after the session) of the component whose
    event ``trigger`` is (``slider.input``, ``slider.release``), or None when it is not an input."""
    component = getattr(trigger, "__self__", None)
    for i, c in enumerate(inputs[1:]):
        if c is component:
            return i
    return None
