"""The served API: settings, OpenAI-shaped errors, pydantic request/response schemas, and the mapping of a request
onto a `ChatRequest` (messages, generation settings) and of a `ChatResult` onto the response.

Over 400 lines: the OpenAI request/response schemas are one contract (each field's validation next to the
others); splitting them would scatter it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.data.images import gpt4v_image_tokens
from vlmkit.infer.generate import ChatResult
from vlmkit.infer.media import MediaError, MediaPolicy
from vlmkit.models.generation import GenerationConfig

MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy decoding (and logits / T would overflow)


@dataclass
class ServerConfig:
    """Serving limits; every one is checked before a request reaches the model."""

    model_name: str = "vlmkit"
    max_batch: int = 32  # rows decoding together (continuous batching), or requests per generate call
    batch_window_ms: float = 30.0  # an idle server starts once no request has arrived for this long...
    batch_max_wait_ms: float = 100.0  # ...or this long after its first request (while others are admitted)
    continuous_batching: bool = (
        True  # requests join / leave the running batch at every step (Predictor backends)
    )
    prefill_chunk: int = 256  # prompt tokens prefilled per step while other rows decode
    lean_decode: bool = True  # Llama-family LLMs run through infer/lean.py (continuous batching only)
    cpu_kernels: bool = True  # with lean_decode: decode steps by infer/kernels.py where they build
    prefill_together: bool = True  # with lean_decode: whole prompts starting in a step in one LLM call
    prefill_burst: int = 1024  # ...of at most this many prompt tokens while nothing decodes
    image_cache_mb: float = 256.0  # image-feature cache (visual tokens by image bytes), LRU; 0: off
    prefix_cache_mb: float = 64.0  # keys and values of earlier prompts and answers, LRU; 0: off
    model_cpus: int | None = None  # pin the model thread to this many cores (None: not pinned)
    # compute threads for prefilling (compute-bound; the streams wait for the step anyway), unpinned; None: the
    # model's threads, as for decoding
    prefill_threads: int | None = None
    max_queue: int = 256  # queued requests beyond this get HTTP 429
    default_max_tokens: int = 256
    max_tokens_limit: int = 2048  # larger `max_tokens` is refused
    max_prompt_tokens: int = 4096  # rendered prompt length, image placeholders included
    max_images_per_request: int = 8
    max_messages: int = 256
    max_stop_strings: int = 4
    max_body_bytes: int = 32 * 2**20
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (slow clients are cut off)
    request_timeout_s: float = 300.0  # queueing + generation; the row is cancelled after it
    stall_timeout_s: float = (
        120.0  # /health reports a batch (or an image load) that made no progress this long
    )
    min_free_fds: int = 32  # /health reports fewer free file descriptors than this
    # decoded pixels all requests may hold at once (None: one request at its limits, max_images x max_pixels)
    max_decoded_pixels: int | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    web: bool = True  # serve the web demo at /

    @property
    def decode_budget(self) -> int:
        if self.max_decoded_pixels is not None:
            return self.max_decoded_pixels
        return self.max_images_per_request * self.media.max_pixels


# ---------------------------------------------------------------------------------------------- errors


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
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.message, self.type, self.param, self.code = message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def media_error(err: MediaError, param: str) -> ApiError:
    return ApiError(400, str(err), param=param, code=err.code)


def generation_failed(err: BaseException) -> ApiError:
    return ApiError(400, f"generation failed: {err}", code="generation_failed")


# ------------------------------------------------------------------------------------- request schema

_STRICT = ConfigDict(strict=True)  # "true" is not a boolean, "5" is not an integer


class ImageURL(BaseModel):
    model_config = _STRICT

    url: str
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="OpenAI's setting; vlmkit reports its GPT-4V token count in usage"
    )


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = _STRICT

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request that vlmkit serves (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM-style extension; 0 or -1: off")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    ignore_eos: bool = Field(False, description="vLLM-style extension: always generate max_tokens tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    box_image: int | None = Field(
        None,
        description="vlmkit extension: the image (0-based, negative from the end) the answer's boxes "
        "refer to; default: the last image of the conversation",
    )


def request_schema(config: ServerConfig) -> type[ChatCompletionRequest]:
    """`ChatCompletionRequest` with this server's limits in its JSON schema (the OpenAPI document tells them)."""
    limits = {
        "max_tokens": {"maximum": config.max_tokens_limit},
        "max_completion_tokens": {"maximum": config.max_tokens_limit},
    }

    config_dict = ConfigDict(extra="ignore", strict=True, json_schema_extra=_limits(limits))
    namespace = {
        "model_config": config_dict,
        "__module__": __name__,
        "__doc__": ChatCompletionRequest.__doc__,
    }
    return type("ChatCompletionRequest", (ChatCompletionRequest,), namespace)  # the same name in the document


def _limits(limits: dict[str, dict[str, Any]]) -> Any:
    def extra(schema: dict[str, Any]) -> None:
        for name, bounds in limits.items():
            prop = schema["properties"][name]
            for option in prop.get("anyOf", [prop]):
                if option.get("type") == "integer":
                    option.update(bounds)

    return extra


# ------------------------------------------------------------------------------------ response schema


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Box(BaseModel):
    ref: str | None
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels")
    image: int = Field(description="index of the request's image the box is on, as uploaded")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    gpt4v_image_tokens: int = Field(description="what GPT-4V/4o would count for the images at their `detail`")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    boxes: list[Box]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    usage: Usage
    choices: list[Choice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    problems: list[str] = Field(description="why the server cannot serve (empty when ok)")
    queued: int
    batches: int


# ------------------------------------------------------------------------------- request -> ChatRequest


def generation_config(body: ChatCompletionRequest, config: ServerConfig) -> GenerationConfig:
    """The request's sampling settings (limits checked)."""
    for param in ("max_tokens", "max_completion_tokens"):  # each is checked, though the second wins
        value = getattr(body, param)
        if value is not None and value > config.max_tokens_limit:
            raise ApiError(
                400,
                f"{param}={value} exceeds the limit of {config.max_tokens_limit}",
                param=param,
                code="max_tokens_exceeded",
            )
    default = min(config.default_max_tokens, config.max_tokens_limit)
    max_tokens = body.max_completion_tokens or body.max_tokens or default
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
        do_sample=temperature >= MIN_TEMPERATURE,
        temperature=temperature if temperature >= MIN_TEMPERATURE else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        stop_strings=stops,
        eos_token_ids=[-1] if body.ignore_eos else [],
    )


@dataclass
class ImageRef:
    """One image of a request: where it comes from, where it is in the request, and its `detail`."""

    url: str
    param: str
    detail: str = "auto"


def convert_messages(
    body: ChatCompletionRequest, config: ServerConfig
) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """OpenAI messages -> vlmkit messages (image parts in order) and a reference to each image."""
    if len(body.messages) > config.max_messages:
        raise ApiError(
            400, f"at most {config.max_messages} messages", param="messages", code="too_many_messages"
        )
    messages, refs, chars = [], [], 0
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
            refs.append(ImageRef(part.image_url.url, f"{where}.image_url.url", part.image_url.detail))
            parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    if len(refs) > config.max_images_per_request:
        raise ApiError(
            400,
            f"{len(refs)} images > the limit of {config.max_images_per_request} per request",
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
    return messages, refs


def box_image(body: ChatCompletionRequest, num_images: int) -> int:
    """The image (0-based, from the start) that the answer's boxes are mapped onto: the last one unless the
    request names one."""
    if body.box_image is None or num_images == 0:  # without images there are no boxes to map
        return max(num_images - 1, 0)
    if not -num_images <= body.box_image < num_images:
        raise ApiError(
            400,
            f"box_image={body.box_image} but the request has {num_images} image(s)",
            param="box_image",
            code="invalid_value",
        )
    return body.box_image % num_images


# ---------------------------------------------------------------------------------- ChatResult -> response


def boxes(result: ChatResult, image: int) -> list[dict[str, Any]]:
    return [
        {"ref": ref, "box": [round(v, 2) for v in box.to_xyxy()], "image": image} for ref, box in result.boxes
    ]


def usage(result: ChatResult, image_sizes: list[tuple[int, int]], details: list[str]) -> dict[str, Any]:
    gpt4v = sum(gpt4v_image_tokens(w, h, d) for (w, h), d in zip(image_sizes, details))
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "gpt4v_image_tokens": gpt4v},
    }


def finish_reason(result: ChatResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"
