"""What image references a server accepts (`MediaPolicy`) and the error for one it refuses (`MediaError`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.infer.decoding import DEFAULT_IMAGE_FORMATS, check_formats


class MediaError(ValueError):
    """An image reference that is refused or cannot be loaded; `code` is a short machine-readable key and
    `status` the HTTP status it deserves (503: the server, not the request, is at fault)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        self.code = code
        self.status = status
        super().__init__(message)


@dataclass
class MediaPolicy:
    """What image references a server accepts, and the limits checked before an image is fully decoded."""

    allowed_local_paths: list[Path] = field(default_factory=list)  # empty: no local files at all
    allow_remote: bool = False
    allowed_domains: list[str] = field(default_factory=list)  # "example.com" or "*.example.com"
    max_image_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_redirects: int = 3
    fetch_timeout_s: float = 10.0  # per fetch, and for reading a local file
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS  # PIL format names that may be decoded

    def __post_init__(self) -> None:
        self.image_formats = check_formats(self.image_formats)
