"""OpenAI-compatible chat server (FastAPI): the routes, Server-Sent Events and the OpenAPI document. Schemas live
in `infer/api.py`, the model thread in `infer/batching.py`, error bodies and the body guard in `infer/errors.py`,
the health checks in `infer/health.py`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image

from vlmkit.infer import api
from vlmkit.infer.api import ApiError, ChatCompletionRequest, ImageRef, ServerConfig
from vlmkit.infer.batching import Backend, BatchWorker, Job
from vlmkit.infer.decoding import BudgetError, PixelBudget, release_memory
from vlmkit.infer.engine import Engine, EngineStats
from vlmkit.infer.errors import BodyGuardMiddleware, add_error_handlers
from vlmkit.infer.generate import ChatRequest, ChatResult, Predictor, serving_dtype
from vlmkit.infer.health import health_problems
from vlmkit.infer.image_cache import ImageFeatureCache, bytes_key
from vlmkit.infer.media import EncodedImage, MediaError, MediaPolicy, decode_media, fetch_media
from vlmkit.infer.metrics import CONTENT_TYPE, ServerMetrics
from vlmkit.infer.prefix_cache import PrefixCache
from vlmkit.infer.prepack import prepack_for_serving
from vlmkit.infer.web import add_web_routes
from vlmkit.log import get_logger
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.vlm import VisionLanguageModel

logger = get_logger(__name__)

_DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks whether its client went away


class _Call:
    """The handler's side of one job: an asyncio queue fed by the worker thread."""

    def __init__(
        self,
        worker: BatchWorker,
        request: ChatRequest,
        config: GenerationConfig,
        stream: bool,
        timeout: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(event: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.job = Job(request, config, emit, stream=stream)
        self.deadline = time.monotonic() + timeout
        worker.submit(self.job)

    async def next(self, request: Request | None = None) -> tuple[str, Any]:
        """The next worker event; a timeout (or a client that went away) cancels the job."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.job.cancelled.set()
                raise ApiError(408, "request timed out", code="request_timeout")
            if request is not None and await request.is_disconnected():
                self.job.cancelled.set()
                raise ApiError(408, "client disconnected", code="client_disconnected")
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(self.events.get(), timeout=min(left, _DISCONNECT_POLL_S))


class _Images:
    """A request's images: fetched and probed, then decoded under the server's pixel budget (held until the
    answer is done), with the loads in flight tracked for /health."""

    def __init__(self, budget: PixelBudget, policy: MediaPolicy, loads: dict[object, float]) -> None:
        self.budget, self.policy, self.loads = budget, policy, loads
        self.reserved = 0
        self.keys: list[str] = []  # sha256 of each image's bytes (the image-feature cache's key)

    async def load(self, refs: Sequence[ImageRef], timeout: float) -> list[Image.Image]:
        encoded = await self._in_thread(self._fetch, refs)
        self.keys = [bytes_key(e.data) for e in encoded]
        pixels = sum(e.info.pixels for e in encoded)
        try:
            await self.budget.reserve(pixels, timeout)
        except BudgetError as err:
            if err.code == "too_large":
                raise ApiError(400, str(err), param="messages", code="image_too_large") from None
            raise ApiError(429, str(err), type="rate_limit_error", code="decode_budget_busy") from None
        self.reserved = pixels
        return await self._in_thread(self._decode, encoded, refs)

    def release(self) -> None:
        pixels, self.reserved = self.reserved, 0
        if pixels:
            self.budget.release(pixels)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        token = object()
        self.loads[token] = time.monotonic()
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            del self.loads[token]

    def _fetch(self, refs: Sequence[ImageRef]) -> list[EncodedImage]:
        return [self._checked(fetch_media, ref.url, ref) for ref in refs]

    def _decode(self, encoded: Sequence[EncodedImage], refs: Sequence[ImageRef]) -> list[Image.Image]:
        return [self._checked(decode_media, image, ref) for image, ref in zip(encoded, refs)]

    def _checked(self, fn: Callable[..., Any], arg: Any, ref: ImageRef) -> Any:
        try:
            return fn(arg, self.policy)
        except MediaError as err:
            if err.status >= 500:
                raise ApiError(err.status, str(err), type="server_error", code=err.code) from None
            raise api.media_error(err, ref.param) from None


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


_ERRORS = {status: {"model": api.ErrorResponse} for status in (400, 408, 413, 429, 503)}
_STREAM_DOC = {
    "description": "a chat.completion, or with `stream: true` Server-Sent Events: chat.completion.chunk "
    "payloads on `data:` lines, then `data: [DONE]`",
    "content": {
        "text/event-stream": {  # OpenAPI 3.1: the schema of one event
            "schema": {
                "type": "object",
                "properties": {
                    "data": {"type": "string", "description": "a chat.completion.chunk, an error, or [DONE]"}
                },
                "required": ["data"],
            }
        }
    },
}


def create_app(backend: Backend, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/models, /health (+ the web demo at / if enabled)."""
    config = config or ServerConfig()
    engine = image_cache = prefix_cache = stats = None
    if isinstance(backend, Predictor) and config.continuous_batching:
        image_cache = ImageFeatureCache(int(config.image_cache_mb * 2**20))
        prefix_cache = (
            PrefixCache(int(config.prefix_cache_mb * 2**20)) if config.prefix_cache_mb > 0 else None
        )
        stats = EngineStats()
        engine = Engine(
            backend,
            max_rows=config.max_batch,
            prefill_chunk=config.prefill_chunk,
            image_cache=image_cache,
            lean=config.lean_decode,
            prefill_together=config.prefill_together,
            prefill_burst=config.prefill_burst,
            prefix_cache=prefix_cache,
            cpu_kernels=config.cpu_kernels,
            stats=stats,
        )
    worker = BatchWorker(backend, config, engine)
    metrics = ServerMetrics(lambda: worker.queued, lambda: worker.decoding, stats, image_cache, prefix_cache)
    loads: dict[object, float] = {}  # image loads in flight -> their start

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        app.state.budget = PixelBudget(
            config.decode_budget,
            on_drain=lambda: loop.call_later(1.0, loop.run_in_executor, None, release_memory),
        )
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="vlmkit", description="OpenAI-compatible vision-language chat", lifespan=lifespan)
    app.state.worker = worker
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.config = config
    app.state.loads = loads
    app.add_middleware(BodyGuardMiddleware, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    add_error_handlers(app)
    created = int(time.time())

    @app.get("/health", response_model=api.Health, responses={503: {"model": api.Health}})
    async def health() -> JSONResponse:
        problems = health_problems(worker, loads, config)
        return JSONResponse(
            {
                "status": "unhealthy" if problems else "ok",
                "problems": problems,
                "queued": worker.queued,
                "batches": worker.generate_calls,
            },
            status_code=503 if problems else 200,
        )

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=api.ModelList)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": created, "owned_by": "vlmkit"}],
        }

    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        images = _Images(app.state.budget, config.media, loads)
        call: _Call | None = None
        streaming = False
        try:
            with worker.admitting():
                gen_config = api.generation_config(body, config)
                messages, refs = api.convert_messages(body, config)
                box_image = api.box_image(body, len(refs))
                pictures = await images.load(refs, config.request_timeout_s)
                chat_request = ChatRequest(
                    messages, pictures, gen_config, box_image=box_image, image_keys=images.keys
                )
                call = _Call(worker, chat_request, gen_config, body.stream, config.request_timeout_s)
            kind, value = await call.next(request)  # accepted by the worker, or refused
            if kind == "error":
                raise value
            meta = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": config.model_name,
            }
            finish = _Finish(box_image, [p.size for p in pictures], [ref.detail for ref in refs])
            if body.stream:  # the stream owns the job and the images from here on
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                response = _EventStream(
                    _stream(call, meta, include_usage, finish), on_close=_closer(call, images)
                )
                streaming = True
                return response
            while kind != "done":
                kind, value = await call.next(request)
                if kind == "error":
                    raise value
        except BaseException:  # refused, timed out, or the handler was cancelled: free the row
            if call is not None:
                call.job.cancelled.set()
            raise
        finally:
            if not streaming:
                images.release()
        result: ChatResult = value
        message = {"role": "assistant", "content": result.text, "boxes": api.boxes(result, box_image)}
        return {
            **meta,
            "object": "chat.completion",
            "usage": api.usage(result, finish.sizes, finish.details),
            "choices": [
                {"index": 0, "message": message, "finish_reason": api.finish_reason(result), "logprobs": None}
            ],
        }

    # the body's schema carries this server's limits (a class built here, so set as an object, not a string)
    chat_completions.__annotations__["body"] = api.request_schema(config)
    app.post(
        "/v1/chat/completions", response_model=api.ChatCompletion, responses={200: _STREAM_DOC, **_ERRORS}
    )(chat_completions)

    if config.web:
        add_web_routes(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


class _Finish:
    """What the last chunks of a stream need besides the result: the boxes' image, image sizes and details."""

    def __init__(self, box_image: int, sizes: list[tuple[int, int]], details: list[str]) -> None:
        self.box_image, self.sizes, self.details = box_image, sizes, details


class _EventStream(StreamingResponse):
    """Server-Sent Events whose `on_close` runs however the response ends (even if it never started)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _closer(call: _Call, images: _Images) -> Callable[[], None]:
    def close() -> None:  # finished, or the client went away: free the row and the images either way
        call.job.cancelled.set()
        images.release()

    return close


async def _stream(
    call: _Call, meta: dict[str, Any], include_usage: bool, finish: _Finish
) -> AsyncIterator[str]:
    """SSE chunks: the role, content deltas, a last chunk with finish_reason (+ boxes), usage, [DONE]."""

    def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        return _sse({**meta, "object": "chat.completion.chunk", "choices": [choice]})

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
            yield chunk({"boxes": api.boxes(value, finish.box_image)}, api.finish_reason(value))
            if include_usage:
                usage = api.usage(value, finish.sizes, finish.details)
                yield _sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage})
            break
    yield "data: [DONE]\n\n"


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, made true: errors are 400 with OpenAI's body (never FastAPI's 422)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


# ------------------------------------------------------------------------------------------ running


def build_predictor(
    model_dir: str | Path,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    prepack: bool = False,
    fuse: bool = True,
    cpu_kernels: bool = True,
    **kwargs: Any,
) -> Predictor:
    """Load a saved vlmkit model in `dtype` (`auto`, `bf16`, `fp32`: see `serving_dtype`) on `device` (`auto`: CUDA
    when available), optionally with its linears prepacked for oneDNN (CPU; `infer/prepack.py`), and wrap it for
    serving (kwargs go to `Predictor`). With `prepack`, `fuse` also makes each LLM decoder layer's q/k/v and
    gate/up projections one packed linear each (`fuse_projections`); with `cpu_kernels`, bf16 linears are packed for
    vlmkit's own linear where it is chosen (`kernels.linear_kernels`), else for oneDNN."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = VisionLanguageModel.from_pretrained(model_dir)
    model = model.to(device=device, dtype=serving_dtype(dtype, device))
    if prepack and device == "cpu":
        prepack_for_serving(model, fuse=fuse, cpu_kernels=cpu_kernels)
    return Predictor(model, **kwargs)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
