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
from collections.abc import Sequence

import torch

from vlmkit.infer.byte_lru import ByteLRU
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


class PrefixCache(ByteLRU[int, tuple[torch.Tensor, KV]]):
    """LRU of (content key -> per-layer keys and values), at most `max_bytes` of tensors (0 disables it).
    Thread-safe (the model thread writes it, /metrics reads its counters)."""

    kind = "prefix cache"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self._next = 0  # the next entry's id

    def match(self, key: torch.Tensor, limit: int) -> tuple[KV | None, int]:
        """The entry sharing the longest prefix with `key` and how many of the prompt's tokens (at most `limit`)
        it covers -> (its keys and values, n); (None, 0) when none covers any token."""
        best_id, best_n = None, 0
        with self._lock:
            for entry_id, ((entry_key, _), _) in self._items.items():
                # the first element is the context, not a token
                tokens = min(_common(entry_key, key) - 1, limit)
                if tokens > best_n:
                    best_id, best_n = entry_id, tokens
            if best_id is None:
                self._miss()
                return None, 0
            return self._hit(best_id)[1], best_n

    def put(self, key: torch.Tensor, kv: KV) -> None:
        """Keep `kv` (per layer [kv_heads, n, head_dim], n = len(key) - 1) under `key`; an entry that is a prefix of
        it is replaced, and nothing is stored when an entry already holds all of it."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes or len(key) < 2:
            return
        with self._lock:
            for entry_id, ((entry_key, _), _) in list(self._items.items()):
                if _common(entry_key, key) == min(len(entry_key), len(key)):  # one is a prefix of the other
                    if len(entry_key) >= len(key):  # already held
                        self._items.move_to_end(entry_id)
                        return
                    self._drop(entry_id)  # the new one extends it
            self._store(self._next, (key, kv), size)
            self._next += 1


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading elements two keys share."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n
