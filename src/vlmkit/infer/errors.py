"""The HTTP edge of the server: every refusal as OpenAI's error body (validation errors as 400, never FastAPI's
422; `Allow` kept on 405), and a guard on request bodies (size, and time to arrive)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.infer.api import ApiError


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):
            return exc.response()
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()  # of a union, the deepest error says what is wrong (not "is not a str")
        first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_branch(str(p))]
        param = ".".join(loc) or None
        message = (
            f"{param}: {first.get('msg', 'invalid request')}"
            if param
            else first.get("msg", "invalid request")
        )
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
        return ApiError(400, message, param=param, code=code).response()


def _union_branch(part: str) -> bool:
    """A pydantic location part that names a branch of a union, not a field ("str", "list[...]")."""
    return "[" in part or part in ("str", "int", "float", "bool", "none")


class BodyGuardMiddleware:
    """Refuses request bodies over `max_bytes` (HTTP 413, by Content-Length and while streaming) and cuts off a
    client whose body has not fully arrived `timeout_s` after its headers (HTTP 408)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

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
        received, deadline, done = 0, time.monotonic() + self.timeout_s, False

        async def guarded() -> dict[str, Any]:
            nonlocal received, done
            if done:  # the body is in: what follows is the wait for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise ApiError(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s",
                    code="body_timeout",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
                done = not message.get("more_body", False)
            return message

        await self.app(scope, guarded, send)
