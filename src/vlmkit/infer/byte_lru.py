"""A least-recently-used map bounded in bytes, thread-safe, with the counters /metrics reports: the mechanism of the
server's image-feature cache (infer/image_cache.py) and prefix cache (infer/prefix_cache.py), which differ only in
how they look entries up."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """key -> value, at most `max_bytes` of values in all (0 disables it), least recently used out first; `hits`,
    `misses`, `evictions`, `nbytes` and `len()` are what /metrics reports. Subclasses look up and store under
    `self._lock` with `_hit`, `_miss`, `_store` and `_drop`."""

    kind = "cache"  # the name in errors

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the {self.kind} size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = self.misses = self.evictions = 0
        self.nbytes = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()  # key -> (value, its bytes), oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def _hit(self, key: K) -> V:
        """(lock held) The value under `key`, now the most recently used; counted as a hit."""
        self._items.move_to_end(key)
        self.hits += 1
        return self._items[key][0]

    def _miss(self) -> None:
        """(lock held) Count a lookup that found nothing."""
        self.misses += 1

    def _store(self, key: K, value: V, nbytes: int) -> None:
        """(lock held) Keep `value` (`nbytes`) under `key`, replacing what it held, then drop the least recently used
        entries until the total fits in `max_bytes`."""
        self._drop(key)
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.nbytes -= dropped
            self.evictions += 1

    def _drop(self, key: K) -> None:
        """(lock held) Forget `key` (nothing if absent)."""
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item[1]
