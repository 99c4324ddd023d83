"""The server's one model thread: it pulls queued requests within a short window, groups them by sampling
settings and decodes each group in one `Backend.generate` call, streaming each row's text to its own handler."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlmkit.infer.api import ApiError, ServerConfig, generation_failed
from vlmkit.infer.generate import ChatRequest, ChatResult, sampling_key
from vlmkit.log import get_logger
from vlmkit.models.generation import GenerationConfig

logger = get_logger(__name__)


class Backend(Protocol):
    """What the server needs from a model: `Predictor` implements it (tests inject stubs)."""

    def prompt_length(self, messages: Sequence[dict[str, Any]], images: Sequence[Any] = ()) -> int: ...

    def generate(
        self,
        requests: Sequence[ChatRequest],
        config: GenerationConfig | None = None,
        streamer: Callable[..., None] | None = None,
        on_text: Callable[[int, str], None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
    ) -> list[ChatResult]: ...


@dataclass(eq=False)
class Job:
    """One queued request; `emit` delivers worker events to its handler (thread-safe): ("accepted", prompt
    tokens), ("text", delta) when `stream`, then ("done", ChatResult) or ("error", ApiError)."""

    request: ChatRequest
    config: GenerationConfig
    emit: Callable[[tuple[str, Any]], None]
    stream: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False  # some text already went out

    @property
    def key(self) -> tuple[Any, ...]:
        key = sampling_key(self.config)
        if self.config.do_sample and self.config.seed is not None:
            key = (*key, id(self))  # a seeded sample runs alone, so its output does not depend on batch-mates
        return key


class BatchWorker:
    """The one thread that owns the model: pulls every queued request within a short window (up to
    `max_batch`), groups them by sampling settings and decodes each group in one `generate` call."""

    def __init__(self, backend: Backend, config: ServerConfig) -> None:
        self.backend = backend
        self.config = config
        self.generate_calls = 0
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=config.max_queue)
        self._lock = threading.Lock()
        self._admitting = 0  # requests between arrival and the queue
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None  # set while the worker serves a batch
        self._progress = time.monotonic()  # last sign of life from the model (a decode step)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def stalled_for(self) -> float:
        """Seconds the batch in progress has gone without a decode step (0 when idle)."""
        if self._busy_since is None:
            return 0.0
        return time.monotonic() - max(self._progress, self._busy_since)

    def start(self) -> None:
        if not self.alive:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="vlmkit-generate", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, then refuse whatever is still queued."""
        if self._thread is None:
            return
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wake the worker if it is waiting
        self._thread.join(timeout)
        self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(("error", ApiError(503, "the server is shutting down", type="server_error")))

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise ApiError(503, "the generation worker is not running", type="server_error")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                429, "too many queued requests; retry later", type="rate_limit_error", code="queue_full"
            ) from None

    @contextlib.contextmanager
    def admitting(self) -> Iterator[None]:
        """Mark a request as on its way (validating, loading images) so a forming batch waits for it."""
        with self._lock:
            self._admitting += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitting -= 1

    def _run(self) -> None:
        while not self._stopping.is_set():
            first = self._queue.get()
            if first is None:
                continue
            jobs = self._collect(first)
            self._busy_since = self._progress = time.monotonic()
            try:
                self._serve(jobs)
            except Exception as err:  # never let one batch kill the worker
                logger.exception("batch failed")
                for job in jobs:
                    job.emit(("error", generation_failed(err)))
            finally:
                self._busy_since = None
                del first, jobs  # the batch's images must not outlive it while the worker waits

    def _collect(self, first: Job) -> list[Job]:
        """The batch that starts with `first`: more requests until `batch_window_ms` passes without one (longer,
        up to `batch_max_wait_ms`, while requests are still being admitted), or `max_batch` is reached."""
        window = self.config.batch_window_ms / 1000
        start = last = time.monotonic()
        cap = start + max(self.config.batch_max_wait_ms, self.config.batch_window_ms) / 1000
        jobs = [first]
        while len(jobs) < self.config.max_batch:
            now = time.monotonic()
            until = cap if self._admitting > 0 else min(cap, last + window)
            try:
                if now >= until:
                    job = self._queue.get_nowait()  # whatever is already queued still joins
                else:
                    job = self._queue.get(timeout=min(until - now, window))
            except queue.Empty:
                if now >= until:
                    break
                continue
            if job is None:  # stopping: serve what we have
                break
            jobs.append(job)
            last = time.monotonic()
        return jobs

    def _serve(self, jobs: list[Job]) -> None:
        ready: dict[tuple[Any, ...], list[Job]] = {}
        for job in jobs:
            if job.cancelled.is_set():
                continue
            try:  # the tokenizer is used by this thread only
                n = self.backend.prompt_length(job.request.messages, job.request.images)
            except Exception as err:  # a prompt the template or tokenizer refuses fails only its own request
                error = ApiError(400, f"invalid prompt: {err}", param="messages", code="invalid_prompt")
                job.emit(("error", error))
                continue
            self._progress = time.monotonic()
            if n > self.config.max_prompt_tokens:
                msg = f"prompt has {n} tokens > the limit of {self.config.max_prompt_tokens}"
                job.emit(("error", ApiError(400, msg, param="messages", code="context_length_exceeded")))
                continue
            job.emit(("accepted", n))
            ready.setdefault(job.key, []).append(job)
        for group in ready.values():
            self._generate(group)

    def _generate(self, group: list[Job]) -> None:
        def on_text(row: int, delta: str) -> None:
            if group[row].stream:  # a non-streaming handler wants only the result
                group[row].streamed = True
                group[row].emit(("text", delta))

        def should_stop(row: int) -> bool:  # polled every decode step: the model is alive
            self._progress = time.monotonic()
            return group[row].cancelled.is_set()

        try:
            self.generate_calls += 1
            results = self.backend.generate(
                [job.request for job in group], on_text=on_text, should_stop=should_stop
            )
        except Exception as err:
            logger.warning("generation failed for a batch of %d: %s", len(group), err)
            if len(group) > 1:  # find the request that fails; the others are served again on their own
                for job in group:
                    if job.streamed:
                        job.emit(("error", generation_failed(err)))
                    else:
                        self._generate([job])
                return
            group[0].emit(("error", generation_failed(err)))
            return
        for job, result in zip(group, results):
            job.emit(("done", result))
