"""OpenAI-compatible chat server (FastAPI): one worker thread batches queued requests into shared decodes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.infer.generate import ChatRequest, ChatResult, Predictor, sampling_key
from vlmkit.infer.media import MediaError, MediaPolicy, load_media
from vlmkit.log import get_logger
from vlmkit.models.generation import GenerationConfig

logger = get_logger(__name__)

_MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy decoding (and logits / T would overflow)


# ------------------------------------------------------------------------------------------ settings


@dataclass
class ServerConfig:
    """Serving limits; every one is checked before a request reaches the model."""

    model_name: str = "vlmkit"
    max_batch: int = 8  # requests decoded together in one Predictor.generate call
    batch_window_ms: float = 10.0  # a batch starts once no request has arrived for this long...
    batch_max_wait_ms: float = 100.0  # ...or this long after its first request (while others are admitted)
    max_queue: int = 256  # queued requests beyond this get HTTP 429
    default_max_tokens: int = 256
    max_tokens_limit: int = 2048  # larger `max_tokens` is refused
    max_prompt_tokens: int = 4096  # rendered prompt length, image placeholders included
    max_images_per_request: int = 8
    max_messages: int = 256
    max_stop_strings: int = 4
    max_body_bytes: int = 32 * 2**20
    request_timeout_s: float = 300.0  # queueing + generation; the row is cancelled after it
    media: MediaPolicy = field(default_factory=MediaPolicy)
    web: bool = True  # serve the web demo at /


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


# ---------------------------------------------------------------------------------------- API errors


class ApiError(StarletteHTTPException):
    """A request refused with an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message)
        self.message, self.type, self.param, self.code = message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code)


def _media_error(err: MediaError, param: str) -> ApiError:
    return ApiError(400, str(err), param=param, code=err.code)


# ---------------------------------------------------------------------------------------- API schema


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request that vlmkit serves (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM-style extension; 0 or -1: off")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1)
    ignore_eos: bool = Field(False, description="vLLM-style extension: always generate max_tokens tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None


# ------------------------------------------------------------------------------------------- worker


@dataclass(eq=False)
class Job:
    """One queued request; `emit` delivers worker events to its handler (thread-safe)."""

    request: ChatRequest
    config: GenerationConfig
    emit: Callable[[tuple[str, Any]], None]
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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

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
            try:
                self._serve(jobs)
            except Exception as err:  # never let one batch kill the worker
                logger.exception("batch failed")
                for job in jobs:
                    job.emit(("error", ApiError(400, f"generation failed: {err}", code="generation_failed")))

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
                job.emit(
                    (
                        "error",
                        ApiError(400, f"invalid prompt: {err}", param="messages", code="invalid_prompt"),
                    )
                )
                continue
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
            group[row].streamed = True
            group[row].emit(("text", delta))

        try:
            self.generate_calls += 1
            results = self.backend.generate(
                [job.request for job in group],
                on_text=on_text,
                should_stop=lambda row: group[row].cancelled.is_set(),
            )
        except Exception as err:
            logger.warning("generation failed for a batch of %d: %s", len(group), err)
            if len(group) > 1:  # find the request that fails; the others are served again on their own
                for job in group:
                    if job.streamed:
                        job.emit(
                            ("error", ApiError(400, f"generation failed: {err}", code="generation_failed"))
                        )
                    else:
                        self._generate([job])
                return
            group[0].emit(("error", ApiError(400, f"generation failed: {err}", code="generation_failed")))
            return
        for job, result in zip(group, results):
            job.emit(("done", result))


# --------------------------------------------------------------------------------------- requests


def _generation_config(body: ChatCompletionRequest, config: ServerConfig) -> GenerationConfig:
    max_tokens = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise ApiError(
            400,
            f"{param}={max_tokens} exceeds the limit of {config.max_tokens_limit}",
            param=param,
            code="max_tokens_exceeded",
        )
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > config.max_stop_strings or any(not s or len(s) > 256 for s in stops):
        raise ApiError(
            400,
            f"stop takes at most {config.max_stop_strings} non-empty strings of <= 256 chars",
            param="stop",
            code="invalid_stop",
        )
    sampling_asked = body.top_p is not None or body.top_k not in (None, 0, -1)
    temperature = body.temperature if body.temperature is not None else (1.0 if sampling_asked else 0.0)
    return GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=temperature >= _MIN_TEMPERATURE,
        temperature=temperature if temperature >= _MIN_TEMPERATURE else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        stop_strings=stops,
        eos_token_ids=[-1] if body.ignore_eos else [],
    )


def _convert_messages(
    body: ChatCompletionRequest, config: ServerConfig
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages -> vlmkit messages (image parts in order) and the (URL, param) of each image."""
    if len(body.messages) > config.max_messages:
        raise ApiError(
            400, f"at most {config.max_messages} messages", param="messages", code="too_many_messages"
        )
    messages, urls, chars = [], [], 0
    for i, msg in enumerate(body.messages):
        role = "system" if msg.role == "developer" else msg.role
        parts: list[dict[str, Any]] = []
        content = msg.content if msg.content is not None else ""
        for j, part in enumerate(
            [TextPart(type="text", text=content)] if isinstance(content, str) else content
        ):
            where = f"messages[{i}].content" if isinstance(content, str) else f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                try:
                    part.text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(
                        400, "text is not valid Unicode", param=where, code="invalid_text"
                    ) from None
                chars += len(part.text)
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise ApiError(
                    400,
                    "images are only accepted in user messages",
                    param=where,
                    code="invalid_image_position",
                )
            urls.append((part.image_url.url, f"{where}.image_url.url"))
            parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    if len(urls) > config.max_images_per_request:
        raise ApiError(
            400,
            f"{len(urls)} images > the limit of {config.max_images_per_request} per request",
            param="messages",
            code="too_many_images",
        )
    if chars > config.max_prompt_tokens * 16:  # cheap bound before the worker tokenizes
        raise ApiError(
            400,
            f"prompt text too long ({chars} characters)",
            param="messages",
            code="context_length_exceeded",
        )
    if messages[-1]["role"] == "assistant":
        raise ApiError(
            400, "the last message must not be from the assistant", param="messages", code="invalid_messages"
        )
    return messages, urls


def _load_images(urls: list[tuple[str, str]], policy: MediaPolicy) -> list[Any]:
    images = []
    for url, param in urls:
        try:
            images.append(load_media(url, policy))
        except MediaError as err:
            raise _media_error(err, param) from None
    return images


def _boxes(result: ChatResult) -> list[dict[str, Any]]:
    return [{"ref": ref, "box": [round(v, 2) for v in box.to_xyxy()]} for ref, box in result.boxes]


def _usage(result: ChatResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _finish_reason(result: ChatResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


# --------------------------------------------------------------------------------------------- app


class _Call:
    """The handler's side of one job: an asyncio queue fed by the worker thread."""

    def __init__(
        self, worker: BatchWorker, request: ChatRequest, config: GenerationConfig, timeout: float
    ) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(event: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.job = Job(request, config, emit)
        self.deadline = time.monotonic() + timeout
        worker.submit(self.job)

    async def next(self, request: Request | None = None) -> tuple[str, Any]:
        """The next worker event; a timeout (or a client that went away) cancels the job."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.job.cancelled.set()
                raise ApiError(408, "request timed out", code="request_timeout")
            try:
                return await asyncio.wait_for(self.events.get(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.job.cancelled.set()
                    raise ApiError(408, "client disconnected", code="client_disconnected") from None


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(backend: Backend, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/models, /health (+ the web demo at / if enabled)."""
    config = config or ServerConfig()
    worker = BatchWorker(backend, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="vlmkit", description="OpenAI-compatible vision-language chat", lifespan=lifespan)
    app.state.worker = worker
    app.state.config = config
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    _add_error_handlers(app)
    created = int(time.time())

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        return JSONResponse(
            {
                "status": "ok" if ok else "worker_down",
                "queued": worker.queued,
                "batches": worker.generate_calls,
            },
            status_code=200 if ok else 503,
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": created, "owned_by": "vlmkit"}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        with worker.admitting():
            gen_config = _generation_config(body, config)
            messages, urls = _convert_messages(body, config)
            images = await run_in_threadpool(_load_images, urls, config.media)
            chat_request = ChatRequest(messages, images, gen_config)
            call = _Call(worker, chat_request, gen_config, config.request_timeout_s)
        try:
            kind, value = await call.next(request)  # accepted by the worker, or refused
            if kind == "error":
                raise value
            meta = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": config.model_name,
            }
            if body.stream:  # the stream owns the job from here on
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(
                    _stream(call, meta, include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            while kind != "done":
                kind, value = await call.next(request)
                if kind == "error":
                    raise value
        except BaseException:  # refused, timed out, or the handler was cancelled: free the row
            call.job.cancelled.set()
            raise
        result: ChatResult = value
        message = {"role": "assistant", "content": result.text, "boxes": _boxes(result)}
        return {
            **meta,
            "object": "chat.completion",
            "usage": _usage(result),
            "choices": [
                {"index": 0, "message": message, "finish_reason": _finish_reason(result), "logprobs": None}
            ],
        }

    if config.web:
        from vlmkit.infer.web import add_web_routes

        add_web_routes(app)
    return app


async def _stream(call: _Call, meta: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: the role, content deltas, a last chunk with finish_reason (+ boxes), usage, [DONE]."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse(
            {
                **meta,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                kind, value = await call.next()
            except ApiError as err:
                yield _sse(err.body())
                break
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "error":
                yield _sse(value.body())
                break
            elif kind == "done":
                yield chunk({"boxes": _boxes(value)}, _finish_reason(value))
                if include_usage:
                    yield _sse(
                        {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)}
                    )
                break
        yield "data: [DONE]\n\n"
    finally:
        call.job.cancelled.set()  # finished, or the client went away: free the row either way


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):
            return exc.response()
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = (
            f"{param}: {first.get('msg', 'invalid request')}"
            if param
            else first.get("msg", "invalid request")
        )
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
        return ApiError(400, message, param=param, code=code).response()


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` (HTTP 413), by Content-Length and while streaming."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        too_large = ApiError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await too_large.response()(scope, receive, send)
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited, send)


# ------------------------------------------------------------------------------------------ running


def build_predictor(model_dir: str | Path, **kwargs: Any) -> Predictor:
    """Load a saved vlmkit model and wrap it for serving (kwargs go to `Predictor`)."""
    from vlmkit.models.vlm import VisionLanguageModel

    return Predictor(VisionLanguageModel.from_pretrained(model_dir), **kwargs)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


class ServerThread:
    """Run an app with uvicorn in a background thread on a free port (tests, benchmarks, the web demo)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server failed to start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def iter_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse `data:` lines of an SSE stream into JSON payloads (stops at [DONE])."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
