"""Bounded caches: encoders loaded once and shared, encodings kept per session.

An ``Encoding`` is computed once per (image, model, size, layer, keep_aspect)
and kept, so that sliders never re-encode, while memory stays bounded however
many sessions and images there are:

- each session's ``EncodingCache`` remembers at most ``capacity`` encodings
  for ``ttl`` seconds (an LRU);
- the encodings themselves live in one process-wide store, ``ENCODINGS``,
  holding at most ``TCE_MAX_ENCODINGS`` (default 64) across all sessions: past
  that the globally least recently used one goes, whichever session had it
  (that session then re-encodes on its next request). A session's entries go
  when it is garbage-collected. The store also shares encodings by content: a
  session asking for a picture that another session has encoded with the same
  settings gets that encoding (and everything derived from it) at once, and
  many sessions asking together wait for one encode (a class opening the
  sample photo at the same moment);
- ``shared_encoder`` loads each (model, device) once for the process and keeps
  at most ``TCE_MAX_MODELS`` (default 3) models, dropping the least recently
  used one -- never the bundled default.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable

import numpy as np
from PIL import Image

from .encoder import Encoder
from .images import to_rgb
from .types import Encoding
from .weights import BUNDLED_NAME


def env_int(name: str, default: int, lo: int = 1) -> int:
    """The whole number in environment variable ``name`` (``default`` when unset), at least ``lo``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < lo:
        raise ValueError(f"environment variable {name} must be a whole number >= {lo}, got {raw!r}")
    return value


def image_digest(image) -> str:
    """A short content hash of an image (PIL or array): the cache key's image part."""
    rgb = to_rgb(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{rgb.size}".encode())
    h.update(np.asarray(rgb).tobytes())
    return h.hexdigest()


class LRUCache:
    """A thread-safe LRU mapping with at most ``capacity`` entries, each living ``ttl`` seconds.

    ``on_evict(key, value)`` is called for every entry that leaves other than
    by being overwritten (expired, pushed out, discarded, cleared), after the
    cache's lock is released, so it may call into other caches.
    """

    def __init__(self, capacity: int = 4, ttl: float = 1800.0, clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[Hashable, object], None] | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if not ttl > 0:
            raise ValueError(f"ttl must be positive seconds, got {ttl}")
        self.capacity, self.ttl, self._clock = capacity, ttl, clock
        self._on_evict = on_evict
        self._items: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            gone = self._expire()
            n = len(self._items)
        self._evicted(gone)
        return n

    def _expire(self) -> list:
        now = self._clock()
        gone = [(k, v) for k, (t, v) in self._items.items() if now - t > self.ttl]
        for key, _ in gone:
            del self._items[key]
        return gone

    def _evicted(self, gone: list) -> None:
        if self._on_evict is not None:
            for key, value in gone:
                self._on_evict(key, value)

    def get(self, key: Hashable):
        with self._lock:
            gone = self._expire()
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
        self._evicted(gone)
        return None if hit is None else hit[1]

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._items[key] = (self._clock(), value)
            self._items.move_to_end(key)
            gone = self._expire()
            while len(self._items) > self.capacity:
                gone.append((k := next(iter(self._items)), self._items.pop(k)[1]))
        self._evicted(gone)

    def discard_if(self, predicate: Callable[[Hashable, object], bool]) -> int:
        """Remove every entry for which ``predicate(key, value)`` holds; how many went."""
        with self._lock:
            gone = [(k, v) for k, (_, v) in self._items.items() if predicate(k, v)]
            for key, _ in gone:
                del self._items[key]
        self._evicted(gone)
        return len(gone)

    def discard(self, key: Hashable) -> None:
        with self._lock:
            hit = self._items.pop(key, None)
        if hit is not None:
            self._evicted([(key, hit[1])])

    def keys(self) -> list:
        """The live keys, least recently used first."""
        with self._lock:
            gone = self._expire()
            keys = list(self._items)
        self._evicted(gone)
        return keys

    def clear(self) -> None:
        self.discard_if(lambda _k, _v: True)


class SharedEncodings:
    """The process-wide store of cached encodings: at most ``capacity``, across all sessions.

    Entries are keyed by (owner, key): an owner is one ``EncodingCache``.
    Past ``capacity`` the least recently used entry of any owner is dropped.
    An entry also expires after its owner's ttl, even while its session is idle.
    """

    def __init__(self, capacity: int = 64, clock: Callable[[], float] = time.monotonic):
        self._lru = LRUCache(capacity, math.inf, clock)
        self._clock = clock
        self._dead: deque[int] = deque()  # owners gone since the last call; appended from finalizers
        self._making: dict[Hashable, threading.Lock] = {}  # one encode per key at a time
        self._making_lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._lru.capacity

    def __len__(self) -> int:
        self._tidy()
        return len(self._lru)

    def _tidy(self) -> None:
        """Drop the entries of owners that are gone and the entries past their time."""
        dead = set()
        while self._dead:
            dead.add(self._dead.popleft())
        now = self._clock()
        self._lru.discard_if(lambda key, value: key[0] in dead or value[1] < now)

    def get(self, owner: int, key: Hashable) -> Encoding | None:
        self._tidy()
        hit = self._lru.get((owner, key))
        return None if hit is None else hit[0]

    def put(self, owner: int, key: Hashable, enc: Encoding, ttl: float = math.inf) -> None:
        self._tidy()
        self._lru.put((owner, key), (enc, self._clock() + ttl))

    def discard(self, owner: int, key: Hashable) -> None:
        self._lru.discard((owner, key))

    def find(self, key: Hashable) -> Encoding | None:
        """Any owner's live encoding under ``key`` (the same picture with the same settings)."""
        self._tidy()
        for owner, k in self._lru.keys():
            if k == key:
                hit = self._lru.get((owner, k))
                if hit is not None:
                    return hit[0]
        return None

    def get_or_make(self, owner: int, key: Hashable, make: Callable[[], Encoding],
                    ttl: float = math.inf) -> tuple[Encoding, bool]:
        """(encoding, was_cached) for ``owner``: reuse another owner's encoding of the same
        ``key``, else ``make()`` it -- once, however many owners ask at the same moment (a
        class opening the sample photo together waits for one encode, not sixteen)."""
        with self._making_lock:
            lock = self._making.setdefault(key, threading.Lock())
        try:
            with lock:
                enc, cached = self.find(key), True
                if enc is None:
                    enc, cached = make(), False
                self.put(owner, key, enc, ttl)
                return enc, cached
        finally:
            with self._making_lock:
                if not lock.locked():
                    self._making.pop(key, None)

    def count(self, owner: int) -> int:
        """How many encodings ``owner`` has in the store."""
        self._tidy()
        return sum(1 for k in self._lru.keys() if k[0] == owner)

    def owner_gone(self, owner: int) -> None:
        """Forget ``owner``'s entries (at the next call). Safe from a finalizer: takes no lock."""
        self._dead.append(owner)

    def clear(self) -> None:
        self._lru.clear()


ENCODINGS = SharedEncodings(env_int("TCE_MAX_ENCODINGS", 64))
_OWNERS = itertools.count()


class EncodingCache:
    """Encodings of one session, keyed by (image digest, model, size, layer, keep_aspect).

    The session remembers its ``capacity`` most recent encodings for ``ttl``
    seconds; the encodings live in ``store`` (default: the process-wide
    ``ENCODINGS``), which may drop one first to stay within its global cap.
    """

    def __init__(self, capacity: int = 4, ttl: float = 1800.0, store: SharedEncodings | None = None,
                 clock: Callable[[], float] = time.monotonic):
        store = ENCODINGS if store is None else store
        owner = next(_OWNERS)
        self._store, self._owner, self._ttl = store, owner, ttl
        # The callback holds the store and the owner id, not self: no reference cycle.
        self._lru = LRUCache(capacity, ttl, clock, on_evict=lambda key, _v: store.discard(owner, key))
        weakref.finalize(self, store.owner_gone, owner)

    def __len__(self) -> int:
        self._lru.keys()  # expire this session's old entries (and so free them in the store)
        return self._store.count(self._owner)

    def get_or_encode(self, encoder: Encoder, image: Image.Image, digest: str, size: int,
                      layer: int, keep_aspect: bool) -> tuple[Encoding, bool]:
        """(encoding, was_cached)."""
        key = (digest, encoder.name, str(encoder.device), getattr(encoder, "precision", "fp32"),
               int(size), encoder.resolve_layer(layer), bool(keep_aspect))
        if self._lru.get(key) is not None:
            hit = self._store.get(self._owner, key)
            if hit is not None:
                return hit, True
        enc, cached = self._store.get_or_make(
            self._owner, key,
            lambda: encoder.encode(image, size=size, layer=layer, keep_aspect=keep_aspect),
            self._ttl)
        self._lru.put(key, True)
        return enc, cached


class ModelPool:
    """Encoders loaded once per (model, device) and shared by every session.

    At most ``capacity`` are kept; past that the least recently used goes,
    except ``keep`` (the bundled default), which is never dropped. A dropped
    encoder lives on for whoever still holds it. Loading happens outside the
    pool's lock (one load at a time per model), so a slow download of one
    model does not hold up requests for another.
    """

    def __init__(self, capacity: int = 3, factory: Callable[..., Encoder] = Encoder,
                 keep: tuple[str, ...] = (BUNDLED_NAME,)):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity, self._factory, self._keep = capacity, factory, keep
        self._items: OrderedDict[tuple[str, str], Encoder] = OrderedDict()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def loaded(self) -> list[tuple[str, str]]:
        """The (model, device) keys held, least recently used first."""
        with self._lock:
            return list(self._items)

    def _hit(self, key) -> Encoder | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def get(self, model: str = BUNDLED_NAME, device: str = "auto") -> Encoder:
        key = (model.strip() if isinstance(model, str) else model, str(device))
        with self._lock:
            if (hit := self._hit(key)) is not None:
                return hit
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if (hit := self._hit(key)) is not None:  # loaded while we waited
                    return hit
            try:
                encoder = self._factory(key[0], device=device)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._items[key] = encoder
                self._evict()
            return encoder

    def _evict(self) -> None:
        while len(self._items) > self.capacity:
            victim = next((k for k in self._items if k[0] not in self._keep), None)
            if victim is None:
                return
            del self._items[victim]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


PRECISION = os.environ.get("TCE_PRECISION", "fp32")


def set_precision(precision: str) -> None:
    """Process-wide precision for encoders loaded from now on ("fp32" or "bf16")."""
    global PRECISION
    from .encoder import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != PRECISION:
        PRECISION = precision
        MODELS.clear()


def _make_encoder(name: str, device: str = "auto") -> Encoder:
    return Encoder(name, device=device, precision=PRECISION)


MODELS = ModelPool(env_int("TCE_MAX_MODELS", 3), factory=_make_encoder)


def shared_encoder(model: str = BUNDLED_NAME, device: str = "auto") -> Encoder:
    """One ``Encoder`` per (model, device) for the whole process, loaded on first use.

    At most ``TCE_MAX_MODELS`` are kept (the bundled default always is).
    """
    return MODELS.get(model, device)
