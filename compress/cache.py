"""Bounded caches: encoders loaded once and shared, encodings kept per session.

An ``Encoding`` is computed once per (image, model, size, layer, keep_aspect)
and kept in a small LRU with a time-to-live, so that sliders never re-encode
while memory stays bounded however many images a session uploads.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np
from PIL import Image

from .encoder import Encoder
from .images import to_rgb
from .types import Encoding


def image_digest(image) -> str:
    """A short content hash of an image (PIL or array): the cache key's image part."""
    rgb = to_rgb(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{rgb.size}".encode())
    h.update(np.asarray(rgb).tobytes())
    return h.hexdigest()


class LRUCache:
    """A thread-safe LRU mapping with at most ``capacity`` entries, each living ``ttl`` seconds."""

    def __init__(self, capacity: int = 4, ttl: float = 1800.0, clock: Callable[[], float] = time.monotonic):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity, self.ttl, self._clock = capacity, ttl, clock
        self._items: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (t, _) in self._items.items() if now - t > self.ttl]:
            del self._items[key]

    def get(self, key: Hashable):
        with self._lock:
            self._expire()
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key][1]

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._items[key] = (self._clock(), value)
            self._items.move_to_end(key)
            self._expire()
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_ENCODERS: dict[tuple[str, str], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def shared_encoder(model: str = "dinov2-s14", device: str = "auto") -> Encoder:
    """One ``Encoder`` per (model, device) for the whole process, loaded on first use."""
    key = (model, str(device))
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = Encoder(model, device=device)
        return _ENCODERS[key]


class EncodingCache:
    """Encodings of one session, keyed by (image digest, model, size, layer, keep_aspect)."""

    def __init__(self, capacity: int = 4, ttl: float = 1800.0):
        self._lru = LRUCache(capacity, ttl)

    def __len__(self) -> int:
        return len(self._lru)

    def get_or_encode(self, encoder: Encoder, image: Image.Image, digest: str, size: int,
                      layer: int, keep_aspect: bool) -> tuple[Encoding, bool]:
        """(encoding, was_cached)."""
        key = (digest, encoder.name, str(encoder.device), int(size), encoder.resolve_layer(layer),
               bool(keep_aspect))
        hit = self._lru.get(key)
        if hit is not None:
            return hit, True
        enc = encoder.encode(image, size=size, layer=layer, keep_aspect=keep_aspect)
        self._lru.put(key, enc)
        return enc, False
