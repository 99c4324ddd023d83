"""Image references for the server: data: URLs, allow-listed local files (regular files only, read without
blocking) and http(s) URLs (`infer/remote.py`); then an allow-listed format decoded under the pixel limit."""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image

from vlmkit.data.images import ImageError, load_image
from vlmkit.infer.decoding import DecodeError, ImageInfo, probe_image
from vlmkit.infer.media_policy import MediaError, MediaPolicy
from vlmkit.infer.remote import Resolver, fetch_remote

_DATA_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*);base64,", re.I)


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes that passed every policy check, with what their header says (nothing decoded yet)."""

    data: bytes
    info: ImageInfo


def load_media(
    url: str,
    policy: MediaPolicy,
    *,
    resolver: Resolver | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Image.Image:
    """An image reference (data: URL, local path / file:// URL, http(s) URL) -> a decoded RGB image."""
    return decode_media(fetch_media(url, policy, resolver=resolver, transport=transport), policy)


def fetch_media(
    url: str,
    policy: MediaPolicy,
    *,
    resolver: Resolver | None = None,
    transport: httpx.BaseTransport | None = None,
) -> EncodedImage:
    """The bytes behind an image reference and their header: an allowed format within the pixel limit."""
    data = read_media_bytes(url, policy, resolver=resolver, transport=transport)
    try:
        info = probe_image(data, policy.image_formats)
    except DecodeError as err:
        raise MediaError(err.code, f"cannot use image: {err}") from None
    if info.pixels > policy.max_pixels:
        raise MediaError(
            "image_too_large",
            f"image is {info.width}x{info.height} pixels > the limit of {policy.max_pixels}",
        )
    return EncodedImage(data, info)


def decode_media(image: EncodedImage, policy: MediaPolicy) -> Image.Image:
    """Decode checked bytes into an RGB image (only with the decoder of the format the header named)."""
    try:
        return load_image(
            image.data,
            max_pixels=policy.max_pixels,
            max_bytes=policy.max_image_bytes,
            formats=[image.info.format],
        )
    except ImageError as err:
        code = "image_too_large" if err.reason in ("too_large", "too_many_pixels") else "invalid_image"
        raise MediaError(code, f"cannot use image: {err}") from err


def read_media_bytes(
    url: str,
    policy: MediaPolicy,
    *,
    resolver: Resolver | None = None,
    transport: httpx.BaseTransport | None = None,
) -> bytes:
    """The raw bytes behind an image reference, after every policy check (raises `MediaError`)."""
    if not isinstance(url, str) or not url:
        raise MediaError("invalid_image_url", "image_url.url must be a non-empty string")
    if "\x00" in url:
        raise MediaError("invalid_image_url", "image URL contains a NUL byte")
    if url[:5].lower() == "data:":
        return decode_data_url(url, policy.max_image_bytes)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        return fetch_remote(url, policy, resolver=resolver, transport=transport)
    if scheme == "file" or not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url):
        return read_local(url, policy)
    raise MediaError("unsupported_image_url", f"unsupported image URL scheme {scheme!r}")


# ------------------------------------------------------------------------------------------ data: URLs


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """`data:[<mime>][;k=v]*;base64,<payload>` -> bytes; the size is checked before decoding."""
    m = _DATA_RE.match(url)
    if m is None:
        raise MediaError("invalid_image_url", "data URL must look like data:image/<type>;base64,<data>")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise MediaError("invalid_image_url", f"data URL has non-image type {mime!r}")
    payload = "".join(url[m.end() :].split())  # tolerate line-wrapped base64
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise MediaError("image_too_large", f"image data exceeds {max_bytes} bytes")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError("invalid_image_url", f"data URL is not valid base64: {err}") from err
    if not data:
        raise MediaError("invalid_image", "data URL holds no bytes")
    if len(data) > max_bytes:
        raise MediaError("image_too_large", f"image data has {len(data)} bytes > {max_bytes}")
    return data


# ---------------------------------------------------------------------------------------- local files


def local_path(url: str, roots: Sequence[Path]) -> Path:
    """The real path (symlinks resolved) of a local path or file:// URL, if it lies under one of `roots`."""
    if not roots:
        raise MediaError("local_media_disabled", "local image paths are disabled on this server")
    if url[:5].lower() == "file:":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise MediaError("invalid_image_url", "file:// URLs must name a local path (file:///abs/path)")
        raw = unquote(parts.path)
    else:
        raw = url
    if "\x00" in raw or not raw:
        raise MediaError("invalid_image_url", "invalid local path")
    try:
        real = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise MediaError("local_media_refused", _REFUSED) from None
    for root in roots:
        real_root = Path(root).expanduser().resolve()
        if real == real_root or real.is_relative_to(real_root):
            return real
    raise MediaError("local_media_refused", _REFUSED)


_REFUSED = "local image not found or not allowed"
_NOT_REGULAR = "local image is not a regular file"


def read_local(url: str, policy: MediaPolicy) -> bytes:
    """Read an allowed local file: regular files only (no directory, FIFO, device), opened without blocking and
    without following a symlink swapped in since the path was resolved, read within `fetch_timeout_s`."""
    path = local_path(url, policy.allowed_local_paths)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # refuse before opening: opening a device may act
            raise MediaError("local_media_refused", _NOT_REGULAR)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        if err.errno in (errno.EMFILE, errno.ENFILE):
            raise MediaError("server_out_of_files", "the server cannot open files right now", 503) from None
        raise MediaError("local_media_refused", _REFUSED) from None
    try:
        st = os.fstat(fd)  # the file actually opened
        if not stat.S_ISREG(st.st_mode):
            raise MediaError("local_media_refused", _NOT_REGULAR)
        if st.st_size > policy.max_image_bytes:
            raise MediaError(
                "image_too_large", f"image file has {st.st_size} bytes > {policy.max_image_bytes}"
            )
        return _read_fd(fd, policy.max_image_bytes, time.monotonic() + policy.fetch_timeout_s)
    finally:
        os.close(fd)


def _read_fd(fd: int, max_bytes: int, deadline: float) -> bytes:
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise MediaError("local_media_refused", "reading the local image took too long")
        try:
            chunk = os.read(fd, min(2**20, max_bytes + 1 - size))
        except BlockingIOError:
            time.sleep(0.01)
            continue
        except OSError:
            raise MediaError("local_media_refused", "local image cannot be read") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise MediaError("image_too_large", f"image file exceeds {max_bytes} bytes")
        chunks.append(chunk)
