"""The web demo: one static HTML/JS page (upload an image, chat, boxes drawn over it), served at `/`."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from vlmkit.infer.api import ApiError

# The page's files (package data under vlmkit/infer/static/) and the content types they are served with.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}


def static_text(name: str) -> str:
    """The text of one of the page's files."""
    if name not in STATIC_FILES:
        raise KeyError(name)
    return (resources.files("vlmkit.infer") / "static" / name).read_text(encoding="utf-8")


def add_web_routes(app: FastAPI) -> None:
    """Serve the demo page at `/` and its script and stylesheet under `/static/` (left out of the schema)."""
    security = {
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
        "script-src 'self'; connect-src 'self'",
        "X-Content-Type-Options": "nosniff",
    }

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(static_text("index.html"), headers=security)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_FILES or name == "index.html":
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return Response(static_text(name), media_type=STATIC_FILES[name], headers=security)
