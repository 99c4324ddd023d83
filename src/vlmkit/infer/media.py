"""Safe image fetching for the server: data: URLs, allow-listed local paths, SSRF-checked http(s) downloads;
then an allow-listed format decoded under the pixel limit."""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import httpx
from PIL import Image

from vlmkit.data.images import ImageError, load_image
from vlmkit.infer.decoding import DEFAULT_IMAGE_FORMATS, DecodeError, ImageInfo, check_formats, probe_image
from vlmkit.log import get_logger

logger = get_logger(__name__)

Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> IP address strings

# Names that resolve to instance-metadata services on some clouds (their IPs are refused anyway).
_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST_RE = re.compile(r"^[a-z0-9.\-_]+$")  # an IDNA-encoded DNS name (IP literals are handled apart)
# inet_aton's other spellings of an IPv4 address: 2130706433, 0x7f.1, 0177.0.0.1 ...
_NUMERIC_HOST_RE = re.compile(r"^(0x[0-9a-f]*|\d+)(\.(0x[0-9a-f]*|\d+)){0,3}$")
_DATA_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*);base64,", re.I)


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


# ------------------------------------------------------------------------------------------ http(s)


@dataclass(frozen=True)
class RemoteTarget:
    """A validated http(s) URL: parsed once, with the IP address the fetch must connect to."""

    parts: SplitResult
    host: str  # lower-case IDNA host name (or IP literal)
    port: int
    ip: str

    @property
    def connect_url(self) -> str:
        """The URL with the validated IP in place of the host name (the Host header carries the name)."""
        ip = f"[{self.ip}]" if ":" in self.ip else self.ip
        path = self.parts.path or "/"
        query = f"?{self.parts.query}" if self.parts.query else ""
        return f"{self.parts.scheme}://{ip}:{self.port}{path}{query}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.parts.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def system_resolver(host: str, port: int) -> list[str]:
    """Every address DNS gives for `host` (IPv4 and IPv6)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def blocked_reason(ip: str) -> str | None:
    """Why an address must never be fetched from (loopback, private, link-local, ...), or None if public."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None and (reason := blocked_reason(str(embedded))):
            return f"embeds {embedded}: {reason}"
    checks = (
        ("loopback", addr.is_loopback),
        ("unspecified", addr.is_unspecified),
        ("link-local / cloud metadata", addr.is_link_local),
        ("multicast", addr.is_multicast),
        ("private", addr.is_private),
        ("reserved", addr.is_reserved),
        ("not globally routable", not addr.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def _normalise_host(hostname: str) -> str:
    host = hostname.lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise MediaError("media_url_refused", "image URL host is not a valid domain name") from None
    if not host or not _HOST_RE.match(host):
        raise MediaError("media_url_refused", "image URL host is not a valid domain name")
    if _NUMERIC_HOST_RE.match(host):
        raise MediaError("media_url_refused", "image URL host is a non-canonical IP address")
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def validate_remote_url(url: str, policy: MediaPolicy, resolver: Resolver | None = None) -> RemoteTarget:
    """Parse `url` once and check scheme, host allow-list and every DNS answer; returns where to connect."""
    if not policy.allow_remote:
        raise MediaError("remote_media_disabled", "fetching images over http(s) is disabled on this server")
    if "\\" in url or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise MediaError("media_url_refused", "image URL contains a backslash, space or control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise MediaError("media_url_refused", "image URL cannot be parsed") from None
    if parts.scheme not in ("http", "https"):
        raise MediaError("media_url_refused", f"image URL scheme {parts.scheme!r} is not http(s)")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise MediaError("media_url_refused", "image URLs must not carry credentials (user@host)")
    if not parts.hostname:
        raise MediaError("media_url_refused", "image URL has no host")
    host = _normalise_host(parts.hostname)
    port = port or (443 if parts.scheme == "https" else 80)
    if host in _METADATA_HOSTS or not _host_allowed(host, policy.allowed_domains):
        raise MediaError("media_url_refused", f"host {host!r} is not in --allowed-media-domains")
    try:
        addresses = [host] if _is_ip(host) else list((resolver or system_resolver)(host, port))
    except (OSError, UnicodeError):
        raise MediaError("media_fetch_failed", f"cannot resolve host {host!r}") from None
    if not addresses:
        raise MediaError("media_fetch_failed", f"host {host!r} has no address")
    for ip in addresses:  # all answers must be public: a mixed answer is a rebinding attempt
        if reason := blocked_reason(ip):
            raise MediaError("media_url_refused", f"host {host!r} resolves to a forbidden address ({reason})")
    return RemoteTarget(parts, host, port, addresses[0].split("%", 1)[0])


def fetch_remote(
    url: str,
    policy: MediaPolicy,
    *,
    resolver: Resolver | None = None,
    transport: httpx.BaseTransport | None = None,
) -> bytes:
    """GET an allowed http(s) image: connect to the validated IP, follow redirects by hand (re-validating
    every hop, at most `policy.max_redirects`), and stop reading past `policy.max_image_bytes`."""
    target = validate_remote_url(url, policy, resolver)
    client_args: dict[str, Any] = {"timeout": policy.fetch_timeout_s, "follow_redirects": False}
    with httpx.Client(transport=transport, trust_env=False, **client_args) as client:
        for _ in range(policy.max_redirects + 1):
            location = _fetch_once(client, target, policy)
            if isinstance(location, bytes):
                return location
            target = validate_remote_url(urljoin(target.parts.geturl(), location), policy, resolver)
    raise MediaError("media_fetch_failed", f"more than {policy.max_redirects} redirects")


def _fetch_once(client: httpx.Client, target: RemoteTarget, policy: MediaPolicy) -> bytes | str:
    """One request: the body (bytes) or the redirect location (str)."""
    headers = {"Host": target.host_header, "Accept": "image/*", "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": target.host} if target.parts.scheme == "https" else {}
    try:
        with client.stream("GET", target.connect_url, headers=headers, extensions=extensions) as resp:
            if resp.status_code in (301, 302, 303, 307, 308):
                location = resp.headers.get("location")
                if not location:
                    raise MediaError("media_fetch_failed", "redirect without a Location header")
                return location
            if resp.status_code != 200:
                raise MediaError("media_fetch_failed", f"image URL answered HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > policy.max_image_bytes:
                raise MediaError("image_too_large", f"image is {declared} bytes > {policy.max_image_bytes}")
            chunks, size = [], 0
            deadline = time.monotonic() + policy.fetch_timeout_s
            for chunk in resp.iter_raw():
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise MediaError("media_fetch_failed", "image download took too long")
                if size > policy.max_image_bytes:
                    raise MediaError("image_too_large", f"image exceeds {policy.max_image_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as err:
        logger.debug("fetch of %s failed: %s", target.host, err)
        raise MediaError("media_fetch_failed", f"cannot fetch image from {target.host!r}") from None
