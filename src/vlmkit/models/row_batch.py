"""Continuous batching at the model level: a KV cache with one slot per row, rows that join a running decode batch
after their own (chunked) prefill and leave it at any step.

`RowBatch` knows nothing about a fusion: what the LLM call needs besides the embeddings travels as the fusion's
keyword arguments, which the fusion's `window` (a chunk of a prompt), `join` (rows decoding together from now on),
`select` (the rows that stay) and `advance` (one more token) carry (see models/fusion/base.py).

The cache (`SlotCache`, a transformers `Cache`) keeps preallocated per-layer buffers [slots, kv_heads, capacity,
head_dim]. Decode rows occupy slots 0..n-1, so a decode step attends over views of the buffers (no copy); each row
writes its new keys at its own position and a [n, 1, 1, L] mask hides what lies beyond each row's length. The row
being prefilled lives in the last slot and is copied into slot n when it joins; a row that leaves takes the last
row's place (one copy), so joining and leaving never realign the other rows. Several whole prompts can also be
prefilled in one call (`prefill_many`, for a step function that returns each row's logits at its own last position):
right-padded, straight into the free slots n, n+1, ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from vlmkit.models.fusion import Fusion, LLMInputs

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, dict[str, Any]], Any]
# per decoder layer: keys, values [kv_heads, n, head_dim] of one row
KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Plan:
    """Where the current call writes: rows `slots` (a slice of slots, or one slot), each from its own position
    `starts` [b]; the call attends over the first `length` positions."""

    slots: slice = field(default_factory=lambda: slice(0, 0))
    starts: torch.Tensor | None = None
    length: int = 0
    rows: torch.Tensor | None = None  # decode: the slots as indices [b]
    flat: torch.Tensor | None = (
        None  # decode: where each (row, head) writes in a [slots * H * capacity, D] view
    )
    last: torch.Tensor | None = (
        None  # several prompts in one call: each row's last position [b], whose logits count
    )


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values: [slots, kv_heads, capacity, head_dim] buffers written in place."""

    is_sliding = False

    def __init__(self, plan: _Plan, slots: int, capacity: int) -> None:
        super().__init__()
        self.plan, self.slots, self.capacity = plan, slots, capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        shape = (self.slots, key_states.shape[1], self.capacity, key_states.shape[3])
        self.keys = key_states.new_zeros(shape)  # zeros: masked positions must not hold NaN (0 * NaN = NaN)
        self.values = value_states.new_zeros(*shape[:3], value_states.shape[3])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value states [b, H, t, D] of the planned rows -> their keys/values so far [b, H, length, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.plan
        if key_states.shape[2] == 1:  # decode: every row writes one position of its own
            b, heads, capacity, dim = (
                key_states.shape[0],
                self.keys.shape[1],
                self.keys.shape[2],
                self.keys.shape[3],
            )
            if plan.flat is None:  # computed once per call, shared by the layers
                head = torch.arange(heads, device=key_states.device)
                plan.flat = ((plan.rows[:, None] * heads + head) * capacity + plan.starts[:, None]).reshape(
                    -1
                )
            self.keys.view(-1, dim).index_copy_(0, plan.flat, key_states.reshape(b * heads, dim))
            self.values.view(-1, self.values.shape[3]).index_copy_(
                0, plan.flat, value_states.reshape(b * heads, self.values.shape[3])
            )
        else:  # a prompt chunk of one row
            start = int(plan.starts[0])
            end = start + key_states.shape[2]
            self.keys[plan.slots, :, start:end] = key_states
            self.values[plan.slots, :, start:end] = value_states
        return self.keys[plan.slots, :, : plan.length], self.values[plan.slots, :, : plan.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.plan.length, 0

    def get_seq_length(self) -> int:
        return self.plan.length

    def get_max_length(self) -> int:
        return -1

    def grow(self, capacity: int) -> None:
        if self.is_initialized and capacity > self.keys.shape[2]:
            pad = capacity - self.keys.shape[2]
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, pad))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, pad))
        self.capacity = max(self.capacity, capacity)

    def move(self, src: int, dst: int, length: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :length] = self.keys[src, :, :length]
            self.values[dst, :, :length] = self.values[src, :, :length]

    def write(self, slot: int, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """keys/values [H, >= length, D] of one row -> the first `length` positions of `slot`."""
        if not self.is_initialized:
            self.lazy_initialization(keys[None, :, :0], values[None, :, :0])
        self.keys[slot, :, :length] = keys[:, :length]
        self.values[slot, :, :length] = values[:, :length]


class SlotCache(Cache):
    """A transformers `Cache` whose rows live in fixed slots of preallocated buffers (see the module docstring)."""

    def __init__(self, num_layers: int, slots: int, capacity: int = 256) -> None:
        self.plan = _Plan()
        super().__init__(layers=[SlotLayer(self.plan, slots, capacity) for _ in range(num_layers)])
        self.slots = slots

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def reserve(self, length: int) -> None:
        """Room for `length` positions per slot (capacity doubles, so growing is amortised)."""
        if length > self.capacity:
            capacity = max(2 * self.capacity, -(-length // 64) * 64)
            for layer in self.layers:
                layer.grow(capacity)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`."""
        for layer in self.layers:
            layer.move(src, dst, length)

    def write(self, slot: int, kv: KV, length: int) -> None:
        """The first `length` positions of a row's keys and values (`kv`, e.g. a cached prompt prefix) -> `slot`."""
        self.reserve(length)
        for layer, (keys, values) in zip(self.layers, kv):
            layer.write(slot, keys, values, length)

    def read(self, slot: int, length: int) -> KV:
        """A copy of the first `length` positions of `slot`'s keys and values (nothing for an unused cache)."""
        return [
            (layer.keys[slot, :, :length].clone(), layer.values[slot, :, :length].clone())
            for layer in self.layers
            if layer.is_initialized
        ]

    @property
    def nbytes(self) -> int:
        return sum(
            x.numel() * x.element_size()
            for lay in self.layers
            if lay.is_initialized
            for x in (lay.keys, lay.values)
        )


@dataclass
class _Prefill:
    """The row being prefilled: its prompt's LLM inputs [1, T, D] and how many tokens are in the cache."""

    inputs: LLMInputs
    done: int = 0

    @property
    def length(self) -> int:
        return self.inputs.embeds.shape[1]


class RowBatch:
    """Rows decoding one token per step together, each with its own KV slot, position and fusion inputs.

    `begin` + `prefill` (in chunks) + `admit` bring a row in; `decode` runs one step for every row; `remove` lets
    rows go. Tokens are the caller's business: `decode` takes each row's newest token and returns logits.
    """

    def __init__(
        self,
        step: StepFn,
        embed: Callable[[torch.Tensor], torch.Tensor],
        fusion: Fusion,
        num_layers: int,
        max_rows: int,
        capacity: int = 256,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.step_fn, self.embed, self.fusion = step, embed, fusion
        self.num_layers, self.max_rows, self.initial_capacity = num_layers, max_rows, capacity
        self.cache = SlotCache(num_layers, max_rows + 1, capacity)  # the last slot: the row being prefilled
        self.lengths: list[int] = []  # tokens in the cache, per decode row
        self.kwargs: dict[str, Any] = {}  # the fusion's arguments of the next decode call
        self.pending: _Prefill | None = None
        self._joining: dict[str, Any] | None = None
        self._group: list[int] | None = None  # prompt lengths of the rows prefilled by `prefill_many`
        # several whole prompts in one call needs a step function that returns each row's logits at `plan.last`
        self.multi_prefill = bool(getattr(step, "selects_rows", False))

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def full(self) -> bool:
        return self.size >= self.max_rows

    def begin(self, inputs: LLMInputs, prefix: KV | None = None, reuse: int = 0) -> None:
        """Start prefilling a new row: `inputs` hold its whole prompt (one row: embeds [1, T, D]); with `prefix`
        (keys and values of a prompt starting like this one), its first `reuse` positions are copied instead of
        prefilled."""
        if self.pending is not None:
            raise RuntimeError("a row is already being prefilled")
        if inputs.embeds.shape[0] != 1 or inputs.embeds.shape[1] < 1:
            raise ValueError(f"a row's prompt must be [1, T>=1, D]; got {tuple(inputs.embeds.shape)}")
        reuse = self._reuse(inputs, prefix, reuse)
        if reuse:
            self.cache.write(self.cache.slots - 1, prefix, reuse)  # type: ignore[arg-type]
        self.pending = _Prefill(inputs, done=reuse)

    def prefill(self, budget: int) -> tuple[int, torch.Tensor | None]:
        """Feed up to `budget` prompt tokens of the pending row -> (tokens fed, logits [V] of its last prompt token
        once the whole prompt is in, else None)."""
        row = self.pending
        if row is None:
            raise RuntimeError("no row is being prefilled")
        start, end = row.done, min(row.length, row.done + max(1, budget))
        self.cache.reserve(end)
        slot = self.cache.slots - 1
        positions = torch.arange(start, end, device=row.inputs.embeds.device)  # [t]
        keys = torch.arange(end, device=positions.device)
        mask = (keys[None, :] <= positions[:, None])[None, None]  # [1, 1, t, end]: causal, from `start`
        kwargs = self.fusion.window(row.inputs.kwargs, start, end)
        self._plan(slice(slot, slot + 1), positions[:1], end)
        out = self.step_fn(row.inputs.embeds[:, start:end], mask, positions[None], self.cache, kwargs)
        self.fusion.check(kwargs)
        row.done = end
        if end < row.length:
            return end - start, None
        self._joining = self.fusion.advance(row.inputs.kwargs, True)
        return end - start, out.logits[0, -1]

    def admit(self) -> int:
        """The fully prefilled row joins the decode batch (its cache copied into the next free slot); returns its
        row index."""
        row = self.pending
        if row is None or row.done < row.length or self._joining is None:
            raise RuntimeError("no fully prefilled row to admit")
        if self.full:
            raise RuntimeError(f"the decode batch is full ({self.max_rows} rows)")
        index = self.size
        self.cache.move(self.cache.slots - 1, index, row.length)
        self.kwargs = self.fusion.join([self.kwargs, self._joining], [index, 1])
        self.lengths.append(row.length)
        self.pending, self._joining = None, None
        return index

    def prefill_many(
        self, inputs: list[LLMInputs], prefixes: list[KV] | None = None, reuse: int = 0
    ) -> torch.Tensor:
        """Prefill several whole prompts (embeds [1, T_i, D] each, no fusion keyword arguments) in one call, right-
        padded, straight into the next free decode slots -> each row's logits [k, V] of its last prompt token. Then
        `admit_many` says which rows join. Needs `multi_prefill` (the step function honours `plan.last`). With
        `prefixes` (one per row), every row's first `reuse` positions are copied from its prefix instead."""
        if not self.multi_prefill:
            raise RuntimeError("this step function cannot prefill several prompts in one call")
        if self.pending is not None or self._group is not None:
            raise RuntimeError("a row is already being prefilled")
        k = len(inputs)
        if k < 1 or self.size + k > self.max_rows:
            raise ValueError(f"{k} prompts do not fit in the {self.max_rows - self.size} free rows")
        if any(x.kwargs or x.embeds.shape[0] != 1 or x.embeds.shape[1] < 1 for x in inputs):
            raise ValueError("prefill_many takes prompts [1, T>=1, D] without fusion keyword arguments")
        lengths = [int(x.embeds.shape[1]) for x in inputs]
        if prefixes is None or len(prefixes) != k:
            reuse = 0
        reuse = min([reuse] + [self._reuse(x, p, reuse) for x, p in zip(inputs, prefixes or [None] * k)])
        length = max(lengths)
        self.cache.reserve(length)
        if reuse:
            for i, prefix in enumerate(prefixes):  # type: ignore[arg-type]
                self.cache.write(self.size + i, prefix, reuse)
        first = inputs[0].embeds
        embeds = first.new_zeros(k, length - reuse, first.shape[2])
        for i, x in enumerate(inputs):
            embeds[i, : lengths[i] - reuse] = x.embeds[0, reuse:]
        keys = torch.arange(length, device=first.device)
        positions = keys[reuse:]  # [t]
        last = torch.tensor(lengths, device=first.device) - 1  # [k]
        # causal, and no key past a row's prompt (a padded query still sees its row's prompt: no empty row)
        mask = (keys[None, :] <= positions[:, None])[None] & (keys[None, :] <= last[:, None])[:, None]
        self._plan(slice(self.size, self.size + k), torch.full_like(last, reuse), length)
        self.cache.plan.last = last - reuse
        out = self.step_fn(embeds, mask[:, None], positions[None].expand(k, -1), self.cache, {})
        self._group = lengths
        return out.logits[:, -1]

    def admit_many(self, keep: list[bool]) -> None:
        """The rows of `prefill_many` with `keep` true join the decode batch, in order (the others are dropped)."""
        lengths, self._group = self._group, None
        if lengths is None or len(keep) != len(lengths):
            raise RuntimeError("admit_many follows prefill_many, with one flag per row")
        base, joined = self.size, 0
        for i, (kept, length) in enumerate(zip(keep, lengths)):
            if kept:
                if base + i != self.size:
                    self.cache.move(base + i, self.size, length)
                self.lengths.append(length)
                joined += 1
        if joined:
            self.kwargs = self.fusion.join([self.kwargs, {}], [base, joined])

    @staticmethod
    def _reuse(inputs: LLMInputs, prefix: KV | None, reuse: int) -> int:
        """How many positions of a prompt a prefix may give: all it covers but the last prompt token (its logits
        are needed), none with fusion keyword arguments (their layers see more than the cache)."""
        if prefix is None or not prefix or inputs.kwargs:
            return 0
        return max(0, min(reuse, inputs.embeds.shape[1] - 1, prefix[0][0].shape[1]))

    def discard(self) -> None:
        """Drop the row being prefilled (cancelled, or its prefill failed)."""
        self.pending, self._joining = None, None

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n] (each row's newest token, not yet in the cache) -> logits [n, V] for the token after it."""
        n = self.size
        if tokens.shape != (n,):
            raise ValueError(f"decode takes one token per row ({n}); got {tuple(tokens.shape)}")
        lengths = torch.tensor(self.lengths, device=tokens.device)  # [n]: the new token's position
        length = max(self.lengths) + 1
        self.cache.reserve(length)
        mask = (torch.arange(length, device=tokens.device)[None, :] <= lengths[:, None])[:, None, None]
        self._plan(slice(0, n), lengths, length)
        out = self.step_fn(self.embed(tokens[:, None]), mask, lengths[:, None], self.cache, self.kwargs)
        self.fusion.check(self.kwargs)
        self.lengths = [x + 1 for x in self.lengths]
        self.kwargs = self.fusion.advance(self.kwargs, True)
        return out.logits[:, -1]

    def remove(self, rows: set[int] | list[int]) -> list[int]:
        """Let `rows` go; the last rows fill their places. Returns, for each remaining row in its new place, its
        old index."""
        dead = set(rows)
        if not dead:
            return list(range(self.size))
        alive = [i for i in range(self.size) if i not in dead]
        order = list(range(len(alive)))
        movers = [i for i in alive if i >= len(alive)]
        holes = [i for i in range(len(alive)) if i in dead]
        for hole, mover in zip(holes, movers):
            self.cache.move(mover, hole, self.lengths[mover])
            order[hole] = mover
        self.lengths = [self.lengths[i] for i in order]
        if order:
            index = torch.tensor(order, dtype=torch.long)
            self.kwargs = self.fusion.select(self.kwargs, index)
        else:
            self.kwargs = {}
        return order

    def release(self) -> None:
        """With no rows left, give back a cache that grew past its initial size."""
        if self.size == 0 and self.pending is None and self.cache.capacity > self.initial_capacity:
            self.cache = SlotCache(self.num_layers, self.max_rows + 1, self.initial_capacity)

    def _plan(self, slots: slice, starts: torch.Tensor, length: int) -> None:
        plan = self.cache.plan
        plan.slots, plan.starts, plan.length = slots, starts, length
        plan.rows = torch.arange(slots.start, slots.stop, device=starts.device)
        plan.flat = plan.last = None
