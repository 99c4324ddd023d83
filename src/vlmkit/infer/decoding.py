"""Decoding untrusted image bytes for the server: an allow-list of formats, a JPEG completeness check, and a
global budget of decoded pixels shared by concurrent requests (memory handed back once it drains)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import io
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import simplejpeg
from PIL import Image, UnidentifiedImageError

from vlmkit.log import get_logger

logger = get_logger(__name__)

# PIL format names decoded by default: no FITS, EPS (Ghostscript), PSD, TIFF, ... unless a server asks for them.
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class DecodeError(ValueError):
    """Image bytes refused before or while decoding; `code` is a short machine-readable key."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class ImageInfo:
    """What the header of an image says, before any pixel is decoded."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def known_formats() -> set[str]:
    """Every format name PIL can decode here."""
    Image.init()
    return set(Image.OPEN)


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Upper-cased format names, each one PIL knows (raises ValueError naming the unknown ones)."""
    names = tuple(f.upper() for f in formats)
    unknown = sorted(set(names) - known_formats())
    if unknown or not names:
        raise ValueError(
            f"unknown image format(s) {', '.join(unknown) or '(none given)'}; "
            f"PIL knows: {', '.join(sorted(known_formats()))}"
        )
    return names


def sniff_format(data: bytes) -> str | None:
    """The format whose signature the first bytes match (PIL's prefix checks only: no header is parsed)."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if accept is not None and accept(prefix):
            return name
    return None


def probe_image(data: bytes, formats: Sequence[str]) -> ImageInfo:
    """The format and size from the header (nothing decoded); refuses formats outside `formats`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=list(formats)) as img:
                info = ImageInfo(str(img.format), *img.size)
        except UnidentifiedImageError:
            other = sniff_format(data)
            if other is None:
                raise DecodeError("invalid_image", "not a recognised image") from None
            raise DecodeError(
                "unsupported_image_format",
                f"{other} images are not accepted here (only {', '.join(formats)})",
            ) from None
        except Image.DecompressionBombError as err:
            raise DecodeError("image_too_large", str(err)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise DecodeError("invalid_image", f"cannot read the image header: {err}") from None
    if info.width <= 0 or info.height <= 0:
        raise DecodeError("invalid_image", f"invalid image size {info.width}x{info.height}")
    if info.format == "JPEG":
        check_jpeg_complete(data)
    return info


def check_jpeg_complete(data: bytes) -> None:
    """Refuse a JPEG whose entropy-coded data ends before the size its header declares (libjpeg would fill the
    rest with grey: a few KB could decode to 40 MP). libjpeg-turbo reads it at 1/8 scale, warnings as errors."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="gray", min_height=1, min_width=1, min_factor=8, strict=True)
    except ValueError as err:
        if "premature end" in str(err).lower():
            raise DecodeError("invalid_image", f"JPEG data ends before the image does ({err})") from None
        logger.debug("tolerating a JPEG warning: %s", err)  # e.g. extraneous bytes before a marker


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it in its arenas otherwise)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


class BudgetError(Exception):
    """A reservation that cannot be made: `code` is "too_large" (never fits) or "timeout"."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class PixelBudget:
    """Decoded pixels that all requests may hold at once. A request reserves the pixels of all its images in
    one go (first come, first served, so small requests cannot starve a large one) and releases them once its
    answer is done; when the budget drains after at least `drain_after` pixels were held, `on_drain` runs (to
    hand the memory back). Used from one event loop."""

    def __init__(
        self, total: int, on_drain: Callable[[], None] | None = None, drain_after: int = 16_000_000
    ) -> None:
        if total <= 0:
            raise ValueError(f"the pixel budget must be positive, got {total}")
        self.total = total
        self.used = 0
        self.peak = 0
        self.on_drain = on_drain
        self.drain_after = drain_after
        self._held = 0  # pixels reserved since the budget last drained
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def reserve(self, pixels: int, timeout: float) -> None:
        """Wait (at most `timeout` s) until `pixels` fit, and take them."""
        if pixels > self.total:
            raise BudgetError(
                "too_large", f"the images have {pixels} pixels > the server's decode budget of {self.total}"
            )
        if not self._waiters and self.used + pixels <= self.total:
            self._take(pixels)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, max(timeout, 0.0))
        except BaseException as err:
            if future.done() and not future.cancelled():
                self.release(pixels)  # granted just as the wait ended
            else:
                with contextlib.suppress(ValueError):  # already dropped by `_wake`
                    self._waiters.remove(entry)
                self._wake()  # the head may have been blocking smaller requests behind it
            if isinstance(err, asyncio.TimeoutError):
                raise BudgetError("timeout", "timed out waiting for image decoding capacity") from None
            raise

    def release(self, pixels: int) -> None:
        """Give back a reservation."""
        self.used -= pixels
        if self.used < 0:
            raise RuntimeError("released more pixels than were reserved")
        self._wake()
        if self.used == 0 and self._held >= self.drain_after:
            self._held = 0
            if self.on_drain is not None:
                self.on_drain()

    def _take(self, pixels: int) -> None:
        self.used += pixels
        self._held += pixels
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.total:
            pixels, future = self._waiters.popleft()
            if not future.done():
                self._take(pixels)
                future.set_result(None)
