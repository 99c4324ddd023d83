"""SSRF-checked http(s) image downloads: the URL parsed once, an allow-listed host whose every DNS answer is
public, a connection to the validated address, redirects followed (and checked again) by hand, a size cap."""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from vlmkit.infer.media_policy import MediaError, MediaPolicy
from vlmkit.log import get_logger

logger = get_logger(__name__)

Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> IP address strings

# Names that resolve to instance-metadata services on some clouds (their IPs are refused anyway).
_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST_RE = re.compile(r"^[a-z0-9.\-_]+$")  # an IDNA-encoded DNS name (IP literals are handled apart)
# inet_aton's other spellings of an IPv4 address: 2130706433, 0x7f.1, 0177.0.0.1 ...
_NUMERIC_HOST_RE = re.compile(r"^(0x[0-9a-f]*|\d+)(\.(0x[0-9a-f]*|\d+)){0,3}$")


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
