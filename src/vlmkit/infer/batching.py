"""The server's one model thread. With an `Engine` (a `Predictor` backend) it batches continuously: a request joins
the running decode batch at the next step and leaves it when it ends. Any other backend (`Backend.generate` only,
e.g. a test stub) is served in windows: queued requests are pulled within a short window, grouped by sampling
settings and decoded group by group, each in one `generate` call. Either way each row's text streams to its own
handler."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vlmkit.infer.api import ApiError, ServerConfig, generation_failed
from vlmkit.infer.engine import Engine, RowSink
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
    arrived: float = field(default_factory=time.monotonic)  # queued at (time to first token counts from here)

    @property
    def key(self) -> tuple[Any, ...]:
        key = sampling_key(self.config)
        if self.config.do_sample and self.config.seed is not None:
            key = (*key, id(self))  # a seeded sample runs alone, so its output does not depend on batch-mates
        return key


class BatchWorker:
    """The one thread that owns the model (see the module docstring): with `engine`, continuous batching; without,
    windows of requests decoded in `backend.generate` calls."""

    def __init__(self, backend: Backend, config: ServerConfig, engine: Engine | None = None) -> None:
        self.backend = backend
        self.config = config
        self.engine = engine
        self.cpus: set[int] | None = None  # the cores the model thread is pinned to (None: not pinned)
        self.allowed: set[int] = set()  # the cores the process may use
        self.model_threads = 1  # compute threads of a step in which rows decode (`_threads`)
        self.generate_calls = 0  # generate calls (windows), or decode steps (engine)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=config.max_queue)
        self._lock = threading.Lock()
        self._admitting = 0  # requests between arrival and the queue
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None  # set while the worker serves a batch
        self._progress = time.monotonic()  # last sign of life from the model (a decode step)
        self._window_size = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Requests not yet decoding: in the queue, or (engine) waiting for their prefill."""
        return self._queue.qsize() + (self.engine.queued if self.engine is not None else 0)

    @property
    def decoding(self) -> int:
        """Rows in the running decode batch (engine), or in the window being decoded."""
        if self.engine is not None:
            return len(self.engine.rows)
        return self._window_size

    def stalled_for(self) -> float:
        """Seconds the batch in progress has gone without a decode step (0 when idle)."""
        if self._busy_since is None:
            return 0.0
        return time.monotonic() - max(self._progress, self._busy_since)

    def start(self) -> None:
        if not self.alive:
            self._stopping.clear()
            target = self._run if self.engine is None else self._run_engine
            self._thread = threading.Thread(target=target, name="vlmkit-generate", daemon=True)
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

    # ------------------------------------------------------------------------- continuous batching
    def _run_engine(self) -> None:
        engine = self.engine
        assert engine is not None
        self._pin()
        engine.on_phase = self._threads
        while True:
            if not engine.busy:
                self._busy_since = None
                if self._stopping.is_set():
                    return
                first = self._queue.get()
                if first is None:
                    continue
                self._busy_since = self._progress = time.monotonic()
                # requests that arrive together are prefilled together; their images are encoded meanwhile (tower
                # work the burst's prefill would otherwise do after the window)
                self._collect(first, on_job=self._admit, work=engine.encode_next)
                del first
                jobs = []
            else:
                jobs = self._drain()
            for job in jobs:
                self._admit(job)
            del jobs  # the requests' images must not outlive their rows while the worker waits
            try:
                engine.step()
            except Exception as err:  # never let a step kill the worker
                logger.exception("engine step failed")
                engine.fail(err)
            self.generate_calls += 1
            self._progress = time.monotonic()

    def _threads(self, prefill: bool) -> None:
        """Compute threads for the engine's next phase: `config.prefill_threads` on all allowed cores for prefilling
        (compute-bound), the model's threads on their pinned cores for decoding."""
        if not self.config.prefill_threads:
            return
        want = self.config.prefill_threads if prefill else self.model_threads
        if want == torch.get_num_threads():
            return
        if prefill and self.cpus:
            os.sched_setaffinity(0, self.allowed)  # compute threads started now may run on every core
        torch.set_num_threads(want)
        if not prefill and self.cpus:
            os.sched_setaffinity(0, self.cpus)

    def _pin(self) -> None:
        """Pin the model thread (and the compute threads it starts) to `config.model_cpus` cores, as vLLM's CPU
        backend binds its engine: no migrations between decode steps."""
        self.model_threads = torch.get_num_threads()
        n = self.config.model_cpus
        if not n or not hasattr(os, "sched_setaffinity"):
            return
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) <= 1:
            return
        self.allowed = set(allowed)
        if self.config.prefill_threads:
            # start the prefill's compute threads unpinned (they keep the cores they start with)
            torch.set_num_threads(self.config.prefill_threads)
            torch.randn(1 << 20).exp_()
            torch.set_num_threads(self.model_threads)
        self.cpus = set(allowed[: min(n, len(allowed))])
        os.sched_setaffinity(0, self.cpus)  # 0: this thread only (Linux)
        logger.info("model thread pinned to CPU(s) %s", sorted(self.cpus))

    def _drain(self) -> list[Job]:
        """What is queued now (no waiting); nothing once stopping."""
        jobs: list[Job] = []
        while not self._stopping.is_set():
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                jobs.append(job)
        return jobs

    def _admit(self, job: Job) -> None:
        """Tokenize a job's prompt, check its length and hand it to the engine."""
        if job.cancelled.is_set():
            return
        assert self.engine is not None
        try:  # the tokenizer is used by this thread only
            row = self.engine.prepare(job.request, job.config)
        except Exception as err:  # a prompt the template or tokenizer refuses fails only its own request
            job.emit(
                ("error", ApiError(400, f"invalid prompt: {err}", param="messages", code="invalid_prompt"))
            )
            return
        if row.prompt_tokens > self.config.max_prompt_tokens:
            msg = f"prompt has {row.prompt_tokens} tokens > the limit of {self.config.max_prompt_tokens}"
            job.emit(("error", ApiError(400, msg, param="messages", code="context_length_exceeded")))
            return
        row.arrived = job.arrived
        job.emit(("accepted", row.prompt_tokens))

        def on_text(delta: str) -> None:
            job.streamed = True
            job.emit(("text", delta))

        def on_error(err: Exception) -> None:
            job.emit(("error", generation_failed(err)))

        sink = RowSink(
            on_text=on_text if job.stream else None,  # a non-streaming handler wants only the result
            on_done=lambda result: job.emit(("done", result)),
            on_error=on_error,
            cancelled=job.cancelled.is_set,
        )
        self.engine.add(row, sink)

    # ------------------------------------------------------------------------------ windows
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

    def _collect(
        self,
        first: Job,
        on_job: Callable[[Job], None] | None = None,
        work: Callable[[], bool] | None = None,
    ) -> list[Job]:
        """The batch that starts with `first`: more requests until `batch_window_ms` passes without one (longer,
        up to `batch_max_wait_ms`, while requests are still being admitted), or `max_batch` is reached. `on_job`
        takes each request as it comes; `work()` runs between arrivals while it has something to do (True)."""
        window = self.config.batch_window_ms / 1000
        start = last = time.monotonic()
        cap = start + max(self.config.batch_max_wait_ms, self.config.batch_window_ms) / 1000
        jobs = [first]
        if on_job is not None:
            on_job(first)
        while len(jobs) < self.config.max_batch:
            worked = work is not None and work()
            now = time.monotonic()
            until = cap if self._admitting > 0 else min(cap, last + window)
            try:
                if now >= until or worked:
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
            if on_job is not None:
                on_job(job)
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
            self._window_size = len(group)
            try:
                self._generate(group)
            finally:
                self._window_size = 0

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
