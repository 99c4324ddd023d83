"""The server's prefix cache: the keys and values a finished request left in the LLM's KV cache, kept in memory so
that a later prompt starting with the same content skips prefilling it — the system prompt and chat template that
every request of a deployment shares, or the earlier turns of a conversation (its answer included).

A prompt's content is a sequence of ints, one per position (`content_key`): text positions hold their token id,
image positions a value derived from the keys (bytes) of the request's images, so the same text with another image
does not match past the image. A new prompt reuses the longest common prefix with any entry, up to all its tokens
but the last (whose logits are needed). The keys and values of those positions depend on nothing else (causal
attention, absolute positions), so the answer is the one a full prefill gives, up to float rounding.

Bounded in bytes, least recently used out first; `hits`, `misses` (lookups), `evictions`, `nbytes` and `len()` are
what /metrics reports (the tokens reused: the engine's `reused_tokens`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmkit.models.row_batch import KV


def content_key(
    ids: torch.Tensor, image_token_id: int, image_keys: Sequence[str], context: int = 0
) -> torch.Tensor:
    """A prompt's content [1 + T] int64: `context` first (what else the keys and values depend on, e.g. whether an
    image-gated adapter is on), then the token ids, image placeholders replaced by one negative value derived from
    all of the request's image keys in order (a prefix match stops at the first image unless every image is the
    same)."""
    key = torch.empty(ids.shape[0] + 1, dtype=torch.long)
    key[0] = context
    key[1:] = ids.cpu()
    if image_keys:
        digest = hashlib.sha256("|".join(image_keys).encode()).digest()
        key[1:][ids.cpu() == image_token_id] = -1 - (int.from_bytes(digest[:7], "little"))
    return key


@dataclass
class _Entry:
    key: torch.Tensor  # [1 + n]
    kv: KV
    nbytes: int


class PrefixCache:
    """LRU of (content key -> per-layer keys and values), at most `max_bytes` of tensors (0 disables it).
    Thread-safe (the model thread writes it, /metrics reads its counters)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the prefix cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = self.misses = self.evictions = 0
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, key: torch.Tensor, limit: int) -> tuple[KV | None, int]:
        """The entry sharing the longest prefix with `key` and how many of the prompt's tokens (at most `limit`)
        it covers -> (its keys and values, n); (None, 0) when none covers any token."""
        best, best_n, best_id = None, 0, None
        with self._lock:
            for entry_id, entry in self._entries.items():
                tokens = min(
                    _common(entry.key, key) - 1, limit
                )  # the first element is the context, not a token
                if tokens > best_n:
                    best, best_n, best_id = entry, tokens, entry_id
            if best is None:
                self.misses += 1
                return None, 0
            self._entries.move_to_end(best_id)
            self.hits += 1
            return best.kv, best_n

    def put(self, key: torch.Tensor, kv: KV) -> None:
        """Keep `kv` (per layer [kv_heads, n, head_dim], n = len(key) - 1) under `key`; an entry that is a prefix of
        it is replaced, and nothing is stored when an entry already holds all of it."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes or len(key) < 2:
            return
        with self._lock:
            for entry_id, entry in list(self._entries.items()):
                if _common(entry.key, key) == min(len(entry.key), len(key)):  # one is a prefix of the other
                    if len(entry.key) >= len(key):  # already held
                        self._entries.move_to_end(entry_id)
                        return
                    del self._entries[entry_id]  # the new one extends it
                    self.nbytes -= entry.nbytes
            self._entries[self._next] = _Entry(key, kv, size)
            self._next += 1
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.nbytes -= dropped.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading elements two keys share."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n
