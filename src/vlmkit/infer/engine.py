"""Continuous batching for the server: a request joins the running decode batch at the next step and leaves it
when it ends, each row with its own sampling settings; prompts are prefilled in chunks under a per-step token
budget, so a long prompt does not stall the streams already decoding.

One `Engine.step()` = (a) drop cancelled rows, (b) prefill waiting rows, first come first served, up to
`prefill_chunk` prompt tokens (unlimited while nothing decodes), each fully prefilled row sampling its first token
and joining the batch (with `prefill_together`, rows whose whole prompts fit are prefilled in one LLM call), (c) one
decode step for every row in the batch. Only the model thread calls it.

Over 400 lines: the three parts of a step (cancellation, prefill one by one or together with the images encoded
ahead, decode) and the inputs they build all read and move the same rows, slots and stats; the model-level half
(the KV slots) is in models/row_batch.py and the LLM forward in infer/lean.py.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmkit.data.processor import Layout
from vlmkit.infer import kernels
from vlmkit.infer.generate import ChatRequest, ChatResult, Predictor, TextStream
from vlmkit.infer.image_cache import ImageFeatureCache, model_fingerprint, pixels_key
from vlmkit.infer.lean import LeanLLM
from vlmkit.infer.prefix_cache import PrefixCache, content_key
from vlmkit.log import get_logger
from vlmkit.models.fusion import LLMInputs
from vlmkit.models.generation import GenerationConfig, select_rows
from vlmkit.models.row_batch import KV, RowBatch
from vlmkit.models.vlm import check_image_tokens
from vlmkit.precision import autocast_context

logger = get_logger(__name__)


@dataclass
class RowSink:
    """Where a row's events go (called on the model thread): text deltas, the result, or an error; `cancelled`
    is polled every step."""

    on_text: Callable[[str], None] | None = None
    on_done: Callable[[ChatResult], None] = lambda result: None
    on_error: Callable[[Exception], None] = lambda err: None
    cancelled: Callable[[], bool] = lambda: False
    on_first_token: Callable[[], None] | None = None


@dataclass(eq=False)
class Row:
    """One request inside the engine: its prompt (token ids), settings, text stream and timing."""

    request: ChatRequest
    config: GenerationConfig
    ids: torch.Tensor  # [T] prompt token ids, placeholders expanded
    layouts: list[Layout]
    sink: RowSink = field(default_factory=RowSink)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    token: int | None = None  # the newest token, fed to the next decode step
    arrived: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    visual: torch.Tensor | None = None  # its images' visual tokens, once encoded ahead of its prefill
    inputs: LLMInputs | None = None  # its LLM inputs, once made (for a prefill with other rows)
    solo: bool = False  # prefilled alone (a prefill with other rows failed)
    tried: bool = False  # its images were encoded (or tried) while the server gathered a burst
    content: torch.Tensor | None = None  # its prompt's content key (prefix cache), once made
    cacheable: bool = False  # its keys and values may go to the prefix cache when it ends

    @property
    def prompt_tokens(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class EngineStats:
    """Counters and recent timings for /metrics (written by the model thread, read by the server)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decoded_rows: int = 0  # rows over all decode steps (decoded_rows / decode_steps: the mean batch size)
    prefill_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    finished: collections.Counter = field(default_factory=collections.Counter)
    ttft: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    itl: collections.deque = field(default_factory=lambda: collections.deque(maxlen=16384))
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=65536))  # (t, tokens)
    observers: list[Callable[[str, float], None]] = field(default_factory=list)

    def observe(self, kind: str, seconds: float) -> None:
        (self.ttft if kind == "ttft" else self.itl).append(seconds)
        for observer in self.observers:
            observer(kind, seconds)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [n for t, n in list(self.recent) if now - t <= window]
        return sum(recent) / window


class Engine:
    """Continuous batching over a `Predictor`'s model and processor (see the module docstring).

    `add(request, config, sink)` queues a request (tokenized at once: `Row.prompt_tokens`), `step()` advances
    everything by one decode step, `busy` says whether anything is left to do.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_rows: int = 8,
        prefill_chunk: int = 256,
        image_cache: ImageFeatureCache | None = None,
        stats: EngineStats | None = None,
        encode_ahead: bool = True,
        lean: bool = True,
        prefill_together: bool = True,
        prefill_burst: int = 1024,
        prefix_cache: PrefixCache | None = None,
        cpu_kernels: bool = True,
    ) -> None:
        """`encode_ahead`: encode the images of rows starting in a step in one tower call (`_encode_ahead`);
        `lean`: run a Llama-family LLM through the lean forward (`infer/lean.py`; the model's own forward where it
        does not apply); `prefill_together`: with the lean forward, prefill the whole prompts of rows starting in a
        step in one LLM call (`_prefill_together`), at most `prefill_chunk` prompt tokens per call while other rows
        decode and `prefill_burst` while none does (a burst of arrivals: docs/serving.md); `prefix_cache`: reuse
        the keys and values of earlier prompts (and answers) that a new prompt starts with (infer/prefix_cache.py);
        `cpu_kernels`: with the lean forward, decode steps by infer/kernels.py where they build (not
        bit-identical to PyTorch's ops)."""
        if prefill_chunk < 1 or prefill_burst < 1:
            raise ValueError(
                f"prefill_chunk and prefill_burst must be >= 1, got {prefill_chunk}, {prefill_burst}"
            )
        self.predictor = predictor
        self.model = predictor.model
        self.processor = predictor.processor
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk
        self.encode_ahead = encode_ahead
        self.prefill_together = prefill_together
        self.prefill_burst = prefill_burst
        self.image_cache = image_cache
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.max_bytes > 0 else None
        self.stats = stats or EngineStats()
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vision_dtype = next(self.model.vision.parameters()).dtype
        self.fingerprint = (
            model_fingerprint(self.model, self.processor.images, self.dtype) if image_cache else ""
        )
        self.eos = list(self.model.llm.eos_token_ids)
        self.waiting: collections.deque[Row] = collections.deque()
        self.rows: list[Row] = []  # the decode batch, in RowBatch order
        self.prefilling: Row | None = None
        self.lean = LeanLLM.build(self.model, kernels=cpu_kernels) if lean else None
        ops = kernels.load() if cpu_kernels and self.device.type == "cpu" else None
        if ops is not None:
            kernels.swap_activations(self.model.vision, ops)
        self.batch = self._new_batch()
        # called with True before a step's prefill, False before its decode (the server sets compute threads)
        self.on_phase: Callable[[bool], None] = lambda prefill: None

    def _new_batch(self) -> RowBatch:
        model = self.model
        step = self.lean or model._step
        return RowBatch(step, model.llm.embed, model.fusion, len(model.llm.layers), self.max_rows)

    # ------------------------------------------------------------------------------------ requests
    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows or self.prefilling)

    @property
    def queued(self) -> int:
        """Requests waiting for their prefill (the one being prefilled included)."""
        return len(self.waiting) + (self.prefilling is not None)

    def prepare(self, request: ChatRequest, config: GenerationConfig | None = None) -> Row:
        """Tokenize a request (no pixels yet: those are processed when its prefill starts)."""
        config = request.config or config or GenerationConfig()
        images = request.images
        tiles = [self.processor.images.num_tiles(im.size) for im in images]
        prompt = self.processor.render(request.messages, tiles)
        ids = self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        layouts = [self.processor.images.layout(im.size) for im in images]
        return Row(request, config, torch.tensor(ids, dtype=torch.long), layouts)

    def add(self, row: Row, sink: RowSink | None = None) -> Row:
        """Queue a prepared row; it joins the batch at a coming step."""
        if sink is not None:
            row.sink = sink
        eos = row.config.eos_token_ids or self.eos
        incremental = row.sink.on_text is not None
        row.stream = TextStream(
            self.model.tokenizer,
            eos,
            row.config.stop_strings,
            row.config.max_new_tokens,
            incremental=incremental,
        )
        if row.config.do_sample and row.config.seed is not None:
            row.generator = torch.Generator(device=self.device).manual_seed(row.config.seed)
        self.stats.prompt_tokens += row.prompt_tokens
        self.waiting.append(row)
        return row

    def fail(self, err: Exception) -> None:
        """Give every row an error and start over with an empty batch (after an unexpected failure)."""
        rows = [*self.rows, *([self.prefilling] if self.prefilling else []), *self.waiting]
        self.rows, self.prefilling, self.waiting = [], None, collections.deque()
        self.batch = self._new_batch()
        for row in rows:
            row.sink.on_error(err)

    # ------------------------------------------------------------------------------------ stepping
    def step(self) -> None:
        """One scheduling step (see the module docstring)."""
        self._drop_cancelled()
        with torch.no_grad(), autocast_context(self.predictor.precision, self.device.type):
            if self.waiting or self.prefilling is not None:
                self.on_phase(True)
                self._prefill(self.prefill_chunk if self.rows else None)
            if self.rows:
                self.on_phase(False)
                self._decode()
        if not self.busy:
            self.batch.release()

    def _drop_cancelled(self) -> None:
        dead = [i for i, row in enumerate(self.rows) if row.sink.cancelled()]
        if dead:
            rows = [self.rows[i] for i in dead]
            self._remove(dead)
            for row in rows:
                self._finish(row, cancelled=True)
        if self.prefilling is not None and self.prefilling.sink.cancelled():
            self.batch.discard()
            row, self.prefilling = self.prefilling, None
            self._finish(row, cancelled=True)
        for row in [r for r in self.waiting if r.sink.cancelled()]:
            self.waiting.remove(row)
            self._finish(row, cancelled=True)

    def _prefill(self, budget: int | None) -> None:
        """Prefill waiting rows (first come, first served) within `budget` prompt tokens (None: no limit)."""
        left = budget if budget is not None else float("inf")
        if self.encode_ahead:
            self._encode_ahead(left)
        while left > 0 and (self.prefilling is not None or (self.waiting and not self.batch.full)):
            if self.prefilling is None and self.prefill_together and self.batch.multi_prefill:
                used = self._prefill_together(left)
                if used:
                    left -= used
                    continue
            if self.prefilling is None:
                row = self.waiting.popleft()
                if row.config.max_new_tokens < 1:  # nothing to generate
                    self._finish(row)
                    continue
                try:
                    inputs = row.inputs or self._inputs(row)
                    prefix, reuse = self._prefix(row, inputs)
                    self.batch.begin(inputs, prefix, reuse)
                    self.stats.reused_tokens += self.batch.pending.done  # type: ignore[union-attr]
                    row.inputs = None
                except Exception as err:
                    self._refuse(row, err)
                    continue
                self.prefilling = row
            row = self.prefilling
            try:
                with self._gate([row]):
                    used, logits = self.batch.prefill(int(min(left, 1 << 30)))
            except Exception as err:
                logger.exception("prefill failed")
                self.batch.discard()
                self.prefilling = None
                row.sink.on_error(err)
                continue
            left -= used
            self.stats.prefill_tokens += used
            if logits is None:
                continue
            self.prefilling = None
            token = int(select_rows(logits[None].float(), [row.config], [row.generator])[0])
            if self._push(row, token):
                self.batch.discard()
                self._finish(row)
            else:
                self.batch.admit()
                self.rows.append(row)

    @staticmethod
    def _refuse(row: Row, err: Exception) -> None:
        """A request whose inputs cannot be prepared (an image the processor refuses, ...) fails alone."""
        logger.warning("request refused while preparing its inputs: %s", err)
        row.sink.on_error(err)

    def _prefill_together(self, budget: float) -> int:
        """Prefill the whole prompts of the first waiting rows in one LLM call (right-padded, `RowBatch.
        prefill_many`): as many as free rows allow within `budget` and `prefill_chunk` prompt tokens (so a step
        never stalls the decoding rows longer than one chunk would, and a burst of arrivals gets its first tokens
        group by group), rows without fusion keyword arguments only. Returns the prompt tokens prefilled (0: fewer
        than two rows qualified; the caller goes on row by row)."""
        budget = min(budget, self._group_tokens())
        free = self.max_rows - self.batch.size
        rows: list[Row] = []
        tokens = 0
        for row in list(self.waiting):
            if (
                len(rows) >= free
                or tokens + row.prompt_tokens > budget
                or row.solo
                or row.config.max_new_tokens < 1
            ):
                break
            if row.inputs is None:
                try:
                    row.inputs = self._inputs(row)
                except Exception as err:
                    self.waiting.remove(row)
                    self._refuse(row, err)
                    continue
            if row.inputs.kwargs:  # e.g. xattn images: prefilled alone
                break
            rows.append(row)
            tokens += row.prompt_tokens
        if len(rows) < 2:
            return 0
        for _ in rows:
            self.waiting.popleft()
        matches = [self._prefix(row, row.inputs) for row in rows]  # type: ignore[arg-type]
        reuse = min(n for _, n in matches)
        prefixes = [kv for kv, _ in matches] if reuse else None
        try:
            with self._gate(rows):
                logits = self.batch.prefill_many(
                    [row.inputs for row in rows],  # type: ignore[misc]
                    prefixes,  # type: ignore[arg-type]
                    reuse,
                )
        except Exception:  # which row broke it is unknown: each goes again on its own
            logger.exception("prefill of %d rows together failed; prefilling them one by one", len(rows))
            for row in reversed(rows):
                row.solo = True
                self.waiting.appendleft(row)
            return 0
        self.stats.prefill_tokens += tokens - reuse * len(rows)
        self.stats.reused_tokens += reuse * len(rows)
        next_tokens = select_rows(logits.float(), [r.config for r in rows], [r.generator for r in rows])
        done = [self._push(row, token) for row, token in zip(rows, next_tokens.tolist())]
        self.batch.admit_many([not d for d in done])
        for row, finished in zip(rows, done):
            row.inputs = None
            if finished:
                self._finish(row)
            else:
                self.rows.append(row)
        return tokens

    def _encode_ahead(self, budget: float) -> None:
        """Encode the images of the waiting rows whose whole prompt is prefilled in this step (as far as free rows
        and the token budget go, and at most `prefill_chunk` prompt tokens' worth of rows: a burst of requests is
        encoded in groups, so the first rows' first tokens do not wait for every tower, and a step never does more
        tower work than one row at a time would) in one tower call instead of one call per row. A failure leaves
        it to each row."""
        budget = min(budget, self._group_tokens())
        free = self.max_rows - self.batch.size - (self.prefilling is not None)
        tokens = 0 if self.prefilling is None else self.prefilling.prompt_tokens
        starting: list[Row] = []
        for row in self.waiting:
            if len(starting) >= free or tokens + row.prompt_tokens > budget:
                break
            starting.append(row)
            tokens += row.prompt_tokens
        rows = [row for row in starting if row.request.images and row.visual is None]
        if len(rows) < 2:
            return
        try:
            for row, visual in zip(rows, self._visuals([row.request for row in rows])):
                row.visual = visual
        except Exception as err:  # a bad image: each row meets its own error when its prefill starts
            logger.debug("images not encoded ahead: %s", err)

    def encode_next(self) -> bool:
        """Encode the images of the first waiting request whose images are not encoded yet (while an idle server
        gathers a burst: `BatchWorker._collect`'s work); False when there is none. A failure is left to its prefill."""
        row = next((r for r in self.waiting if r.request.images and r.visual is None and not r.tried), None)
        if row is None:
            return False
        row.tried = True
        with torch.no_grad(), autocast_context(self.predictor.precision, self.device.type):
            try:
                row.visual = self._visuals([row.request])[0]
            except Exception as err:  # a bad image: its own prefill meets the error
                logger.debug("images not encoded while gathering: %s", err)
        return True

    def _group_tokens(self) -> int:
        """The most prompt tokens prefilled (and images encoded) in one call: `prefill_chunk` while rows decode
        (their next token waits for it), `prefill_burst` while none does (nobody waits but the arrivals)."""
        return self.prefill_chunk if self.rows else max(self.prefill_chunk, self.prefill_burst)

    def _decode(self) -> None:
        tokens = torch.tensor([row.token for row in self.rows], device=self.device)
        try:
            with self._gate(self.rows):
                logits = self.batch.decode(tokens).float()  # [n, V]
        except Exception as err:  # which row broke it is unknown: every row of the step fails
            logger.exception("decode step failed for a batch of %d", len(self.rows))
            rows, self.rows = self.rows, []
            self.batch = self._new_batch()
            for row in rows:
                row.sink.on_error(err)
            return
        self.stats.decode_steps += 1
        self.stats.decoded_rows += len(self.rows)
        next_tokens = select_rows(logits, [r.config for r in self.rows], [r.generator for r in self.rows])
        done = [
            i for i, (row, token) in enumerate(zip(self.rows, next_tokens.tolist())) if self._push(row, token)
        ]
        if done:
            rows = [self.rows[i] for i in done]
            self._keep_prefixes(done)
            self._remove(done)
            for row in rows:
                self._finish(row)

    # ------------------------------------------------------------------------------------ prefix cache
    def _prefix(self, row: Row, inputs: LLMInputs) -> tuple[KV | None, int]:
        """The cached keys and values a row's prompt may start from and how many positions they cover."""
        if self.prefix_cache is None or inputs.kwargs:  # fusion arguments (xattn): layers see more than KV
            return None, 0
        row.cacheable = True
        return self.prefix_cache.match(self._content(row), row.prompt_tokens - 1)

    def _content(self, row: Row) -> torch.Tensor:
        if row.content is None:
            request = row.request
            keys = list(request.image_keys or [])
            if len(keys) != len(request.images):
                keys = [pixels_key(im) for im in request.images]
            # an image-gated adapter changes every position's keys: rows with and without images differ
            context = 0 if self.model.lora_gate is None else 1 + bool(request.images)
            row.content = content_key(row.ids, self.model.image_token_id, keys, context)
        return row.content

    def _keep_prefixes(self, indices: Sequence[int]) -> None:
        """Before rows leave: their prompt and answer keys and values (all but the newest token, not yet fed)
        go to the prefix cache."""
        if self.prefix_cache is None:
            return
        for i in indices:
            row = self.rows[i]
            length = self.batch.lengths[i]
            if not row.cacheable or row.content is None:
                continue
            answer = torch.tensor(row.stream.tokens[: length - row.prompt_tokens], dtype=torch.long)  # type: ignore[union-attr]
            key = torch.cat([row.content, answer])
            if len(key) == length + 1:
                self.prefix_cache.put(key, self.batch.cache.read(i, length))

    def _gate(self, rows: Sequence[Row]) -> Any:
        """An image-gated LoRA (`lora.gate: image`) acts only on the rows whose request has an image."""
        with_image = torch.tensor([bool(row.request.images) for row in rows], device=self.device)
        return self.model.image_rows(with_image)

    def _remove(self, indices: Sequence[int]) -> None:
        order = self.batch.remove(indices)
        self.rows = [self.rows[i] for i in order]

    def _push(self, row: Row, token: int) -> bool:
        """Feed a sampled token to the row's stream; True once the row is done."""
        now = time.monotonic()
        if row.last_token_at is None:
            self.stats.observe("ttft", now - row.arrived)
            if row.sink.on_first_token is not None:
                row.sink.on_first_token()
        else:
            self.stats.observe("itl", now - row.last_token_at)
        row.last_token_at = now
        self.stats.generated_tokens += 1
        self.stats.recent.append((now, 1))
        row.token = token
        delta = row.stream.push(token)
        if delta and row.sink.on_text is not None:
            row.sink.on_text(delta)
        return row.stream.done

    def _finish(self, row: Row, cancelled: bool = False) -> None:
        stream = row.stream
        if cancelled:
            stream.cancel()
        delta = stream.finish()
        if delta and row.sink.on_text is not None:
            row.sink.on_text(delta)
        reason = stream.finish_reason or "length"
        self.stats.finished[reason] += 1
        boxes = self.predictor.boxes(stream.text, row.layouts, row.request.box_image)
        row.sink.on_done(
            ChatResult(stream.text, stream.tokens, row.prompt_tokens, len(stream.tokens), reason, boxes)
        )

    # ------------------------------------------------------------------------------------ inputs
    def _inputs(self, row: Row) -> Any:
        """The row's LLM inputs [1, T, D]: text embeddings and its images' visual tokens, merged by the fusion."""
        ids = row.ids.to(self.device)[None]  # [1, T]
        visual = row.visual if row.visual is not None else self._visuals([row.request])[0]  # [tiles, M, D]
        row.visual = None
        model = self.model
        is_image = ids == model.image_token_id  # [1, T]
        n = 0 if visual is None else len(visual)  # tower inputs (AnyRes tiles count one each)
        check_image_tokens(is_image.sum(dim=1).tolist(), [n], n, model.tokens_per_image(), None)
        return model.fusion.merge(is_image, model.llm.embed(ids), visual)

    def _visuals(self, requests: Sequence[ChatRequest]) -> list[torch.Tensor | None]:
        """Each request's visual tokens [tiles, M, D] (None without images), from the cache or the tower + bridge:
        the misses of all requests encoded in one call."""
        images = [im for request in requests for im in request.images]
        keys: list[str] = []
        for request in requests:
            own = list(request.image_keys or [])
            if len(own) != len(request.images):
                own = [pixels_key(im) if self.image_cache is not None else "" for im in request.images]
            keys += own
        found: list[torch.Tensor | None] = [None] * len(images)
        if self.image_cache is not None:
            found = [self.image_cache.get(f"{self.fingerprint}:{key}") for key in keys]
        missing = [i for i, vis in enumerate(found) if vis is None]
        if missing:
            pixels = [self.processor.pixels(images[i])[0] for i in missing]  # [tiles, 3, S, S] each
            visual = self.model.encode_images(
                torch.cat(pixels).to(self.device, self.vision_dtype)
            )  # [sum, M, D]
            for i, part in zip(missing, visual.split([p.shape[0] for p in pixels])):
                found[i] = part
                if self.image_cache is not None:
                    self.image_cache.put(f"{self.fingerprint}:{keys[i]}", part)
        out: list[torch.Tensor | None] = []
        for request in requests:
            mine, found = found[: len(request.images)], found[len(request.images) :]
            out.append(torch.cat(mine) if mine else None)  # type: ignore[arg-type]
        return out
