"""Image references for the server: data: URLs, allow-listed local files, SSRF-checked http(s) fetches.

Nothing here leaves the machine: DNS is a fake resolver and HTTP an `httpx.MockTransport`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from vlmkit.infer.media import MediaError, MediaPolicy, decode_data_url, load_media, read_media_bytes
from vlmkit.infer.remote import blocked_reason, fetch_remote, validate_remote_url

from conftest import random_image

PUBLIC_IP = "93.184.216.34"
DNS = {
    "allowed.example": [PUBLIC_IP],
    "cdn.allowed.example": ["2606:4700::6810:84e5"],
    "rebind.allowed.example": ["10.0.0.7"],
    "mixed.allowed.example": [PUBLIC_IP, "127.0.0.1"],
    "metadata.allowed.example": ["169.254.169.254"],
}


class FakeDNS:
    """A resolver that answers from a table and records every lookup."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in DNS:
            raise OSError(f"no such host {host}")
        return DNS[host]


class FakeWeb:
    """An `httpx.MockTransport` handler routing (Host header, path) -> (status, headers, body); records every
    request it sees. Bodies are streamed, as from a real socket."""

    def __init__(self, routes: dict[tuple[str, str], tuple[int, dict[str, str], bytes]]) -> None:
        self.routes = routes
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        status, headers, body = self.routes.get((request.headers["host"], request.url.path), (404, {}, b""))
        return httpx.Response(status, headers=headers, content=iter([body]))

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    random_image(0, size).save(buf, "PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _remote(**kw) -> MediaPolicy:
    return MediaPolicy(allow_remote=True, allowed_domains=["allowed.example", "*.allowed.example"], **kw)


# ------------------------------------------------------------------------------------------ data: URLs


def test_data_url_image_decodes_to_original_size():
    image = load_media(_data_url(_png((40, 30))), MediaPolicy())
    assert image.size == (40, 30) and image.mode == "RGB"


@pytest.mark.parametrize(
    "url, code",
    [
        ("data:image/png;base64,@@@@", "invalid_image_url"),
        ("data:text/html;base64,PGgxPg==", "invalid_image_url"),
        ("data:image/png,rawbytes", "invalid_image_url"),
        (_data_url(b"not an image at all"), "invalid_image"),
    ],
)
def test_bad_data_urls_are_refused(url, code):
    with pytest.raises(MediaError) as err:
        load_media(url, MediaPolicy())
    assert err.value.code == code


def test_data_url_size_is_checked_before_decoding(monkeypatch):
    def no_decode(*a, **k):
        raise AssertionError("decoded an oversized payload")

    monkeypatch.setattr(base64, "b64decode", no_decode)
    with pytest.raises(MediaError) as err:
        decode_data_url("data:image/png;base64," + "A" * 4000, max_bytes=1000)
    assert err.value.code == "image_too_large"


def test_pixel_limit_is_checked_from_the_header():
    # a small PNG whose header claims 100000 x 100000 pixels (decoding it would need 30 GB)
    png = bytearray(_png())
    png[16:24] = struct.pack(">II", 100_000, 100_000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    with pytest.raises(MediaError) as err:
        load_media(_data_url(bytes(png)), MediaPolicy(max_pixels=1_000_000))
    assert err.value.code == "image_too_large"


def _encoded(fmt: str, size=(24, 16), **save) -> bytes:
    buf = io.BytesIO()
    random_image(1, size).save(buf, fmt, **save)
    return buf.getvalue()


def _fits() -> bytes:
    """A minimal 8-bit 4x4 FITS file (PIL decodes FITS unless told not to)."""
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    2",
        "NAXIS1  =                    4",
        "NAXIS2  =                    4",
        "END",
    ]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode("ascii")
    return header + bytes(range(16)).ljust(2880, b"\0")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_the_default_formats_decode(fmt):
    image = load_media(_data_url(_encoded(fmt)), MediaPolicy())
    assert image.size == (24, 16) and image.mode == "RGB"


@pytest.mark.parametrize("name, data", [("FITS", _fits()), ("EPS", EPS), ("TIFF", _encoded("TIFF"))])
def test_formats_outside_the_allow_list_are_refused_before_decoding(name, data, monkeypatch):
    from PIL import Image

    Image.init()
    opened = []
    factory, accept = Image.OPEN[name]

    def spy(*args):
        opened.append(name)
        return factory(*args)

    monkeypatch.setitem(Image.OPEN, name, (spy, accept))
    with pytest.raises(MediaError) as err:
        load_media(_data_url(data), MediaPolicy())
    assert err.value.code == "unsupported_image_format"
    assert opened == []  # the format's decoder was never even tried


def test_the_format_allow_list_is_configurable():
    tiff = _data_url(_encoded("TIFF"))
    assert load_media(tiff, MediaPolicy(image_formats=("png", "tiff"))).size == (24, 16)
    with pytest.raises(MediaError):
        load_media(_data_url(_encoded("BMP")), MediaPolicy(image_formats=("png", "tiff")))
    with pytest.raises(ValueError, match="NOPE"):
        MediaPolicy(image_formats=("png", "nope"))


def test_an_animated_gif_gives_its_first_frame():
    frames = [random_image(i, (20, 10)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = load_media(_data_url(buf.getvalue()), MediaPolicy())
    expected = load_media(_data_url(_encoded_frame(frames[0])), MediaPolicy())
    assert first.size == (20, 10) and list(first.getdata()) == list(expected.getdata())


def _encoded_frame(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "GIF")
    return buf.getvalue()


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_a_jpeg_whose_data_ends_early_is_refused(keep):
    data = _encoded("JPEG", (400, 300), quality=95)
    assert load_media(_data_url(data), MediaPolicy()).size == (400, 300)
    cut = data[: int(len(data) * keep)] + b"\xff\xd9"  # scan data cut short, then an end-of-image marker
    with pytest.raises(MediaError) as err:
        load_media(_data_url(cut), MediaPolicy())
    assert err.value.code == "invalid_image" and "ends before" in str(err.value)


# ---------------------------------------------------------------------------------------- local files


@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png((8, 8)))
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "inside.png").symlink_to(root / "sub" / "ok.png")
    return root


def test_local_paths_are_off_by_default(media_root):
    with pytest.raises(MediaError) as err:
        read_media_bytes(str(media_root / "sub" / "ok.png"), MediaPolicy())
    assert err.value.code == "local_media_disabled"


def test_local_paths_and_file_urls_under_the_allowed_root(media_root):
    policy = MediaPolicy(allowed_local_paths=[media_root])
    assert load_media(str(media_root / "sub" / "ok.png"), policy).size == (40, 30)
    assert load_media(f"file://{media_root}/sub/ok.png", policy).size == (40, 30)
    assert load_media(f"file://localhost{media_root}/inside.png", policy).size == (40, 30)  # symlink inside


@pytest.mark.parametrize(
    "ref",
    [
        "{root}/../secret.png",  # traversal
        "{root}/sub/../../secret.png",
        "file://{root}/%2e%2e/secret.png",  # encoded traversal
        "{root}/escape.png",  # symlink pointing out of the root
        "file://{root}/escape.png",
        "file://evil.example{root}/sub/ok.png",  # a remote file URL
        "/etc/passwd",
        "{root}/missing.png",
    ],
)
def test_local_paths_outside_the_root_are_refused(media_root, ref):
    policy = MediaPolicy(allowed_local_paths=[media_root])
    with pytest.raises(MediaError) as err:
        read_media_bytes(ref.format(root=media_root), policy)
    assert err.value.code in ("local_media_refused", "invalid_image_url")


def test_local_file_size_limit(media_root):
    policy = MediaPolicy(allowed_local_paths=[media_root], max_image_bytes=100)
    with pytest.raises(MediaError) as err:
        read_media_bytes(str(media_root / "sub" / "ok.png"), policy)
    assert err.value.code == "image_too_large"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_directory_is_refused_without_leaking_a_file_descriptor(media_root):
    policy = MediaPolicy(allowed_local_paths=[media_root])
    before = _open_fds()
    for ref in [str(media_root / "sub"), f"file://{media_root}/sub", str(media_root)] * 20:
        with pytest.raises(MediaError) as err:
            load_media(ref, policy)
        assert err.value.code == "local_media_refused" and "regular file" in str(err.value)
    assert _open_fds() == before


def test_a_fifo_is_refused_at_once_without_blocking(media_root):
    fifo = media_root / "pipe.png"
    os.mkfifo(fifo)
    policy = MediaPolicy(allowed_local_paths=[media_root])
    before = _open_fds()
    pool = ThreadPoolExecutor(1)
    future = pool.submit(load_media, str(fifo), policy)
    try:
        with pytest.raises(MediaError) as err:
            future.result(timeout=5)  # a blocking open() of a FIFO never returns
        assert err.value.code == "local_media_refused" and "regular file" in str(err.value)
        assert _open_fds() == before
    finally:
        _unblock_readers(fifo)
        pool.shutdown(wait=True)


def _unblock_readers(fifo) -> None:
    """Open the FIFO for writing (once a reader waits, this succeeds), so a blocked reader can finish."""
    for _ in range(50):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader left
            return
        time.sleep(0.01)


def test_unknown_schemes_are_refused():
    for url in ("ftp://allowed.example/a.png", "gopher://x/", "javascript:alert(1)"):
        with pytest.raises(MediaError) as err:
            read_media_bytes(url, _remote())
        assert err.value.code == "unsupported_image_url"


# ------------------------------------------------------------------------------------------- SSRF


def test_remote_media_is_off_by_default():
    dns, web = FakeDNS(), FakeWeb({})
    with pytest.raises(MediaError) as err:
        read_media_bytes("http://allowed.example/a.png", MediaPolicy(), resolver=dns, transport=web.transport)
    assert err.value.code == "remote_media_disabled"
    assert not dns.lookups and not web.seen


SSRF_PROBES = [
    "http://127.0.0.1/x",
    "http://[::1]/x",
    "http://169.254.169.254/latest",
    "http://10.0.0.1/x",
    "http://2130706433/",  # decimal 127.0.0.1
    "http://0x7f.0.0.1/",  # hex
    "http://0177.0.0.1/",  # octal
    "http://127.1/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
    "http://allowed.example\\@127.0.0.1/",  # backslash confusion
    "http://allowed.example@127.0.0.1/",  # credentials
    "http://allowed.example:80@127.0.0.1/",
    "http://localhost/x",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://rebind.allowed.example/x",  # allowed name, private address
    "http://mixed.allowed.example/x",  # one public and one loopback answer
    "http://metadata.allowed.example/latest",
    "http://evil.example/x",  # not allow-listed
    "http://allowed.example.evil.example/x",
    "http://127.0.0.%31/",
    "http://allowed.example /x",
]


@pytest.mark.parametrize("url", SSRF_PROBES)
def test_ssrf_probes_are_refused_before_any_connection(url):
    dns, web = FakeDNS(), FakeWeb({})
    # even with the raw addresses allow-listed, the address checks must refuse them
    policy = MediaPolicy(
        allow_remote=True,
        allowed_domains=[
            "allowed.example",
            "*.allowed.example",
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "10.0.0.1",
            "2130706433",
            "localhost",
            "::ffff:127.0.0.1",
        ],
    )
    with pytest.raises(MediaError) as err:
        read_media_bytes(url, policy, resolver=dns, transport=web.transport)
    assert err.value.code in ("media_url_refused", "media_fetch_failed")
    assert web.seen == []  # refused before any request was made


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.100.100.200",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",
        "64:ff9b::a00:1",
        "fe80::1%eth0",
    ],
)
def test_non_public_addresses_are_blocked(ip):
    assert blocked_reason(ip) is not None


@pytest.mark.parametrize("ip", [PUBLIC_IP, "8.8.8.8", "2606:4700::6810:84e5"])
def test_public_addresses_pass(ip):
    assert blocked_reason(ip) is None


def test_fetch_connects_to_the_validated_ip_with_the_host_header():
    png = _png()
    web = FakeWeb({("allowed.example", "/img.png"): (200, {}, png)})
    data = fetch_remote(
        "http://allowed.example/img.png?x=1", _remote(), resolver=FakeDNS(), transport=web.transport
    )
    assert data == png
    (request,) = web.seen
    assert request.url.host == PUBLIC_IP and request.url.query == b"x=1"
    assert request.headers["host"] == "allowed.example"


def test_wildcard_domains_and_ipv6_answers():
    target = validate_remote_url("https://cdn.allowed.example:8443/a.png", _remote(), FakeDNS())
    assert target.ip == "2606:4700::6810:84e5"
    assert target.connect_url == "https://[2606:4700::6810:84e5]:8443/a.png"
    assert target.host_header == "cdn.allowed.example:8443"
    with pytest.raises(MediaError):  # "*.allowed.example" does not match a look-alike suffix
        validate_remote_url("https://notallowed.example/a.png", _remote(), FakeDNS())


def test_redirect_to_loopback_is_refused():
    web = FakeWeb({("allowed.example", "/a.png"): (302, {"location": "http://127.0.0.1/"}, b"")})
    with pytest.raises(MediaError) as err:
        fetch_remote("http://allowed.example/a.png", _remote(), resolver=FakeDNS(), transport=web.transport)
    assert err.value.code == "media_url_refused"
    assert [r.url.host for r in web.seen] == [PUBLIC_IP]  # the loopback hop was never requested


@pytest.mark.parametrize(
    "location",
    [
        "http://rebind.allowed.example/x",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
        "http://allowed.example\\@127.0.0.1/",
        "http://evil.example/",
    ],
)
def test_every_redirect_hop_is_revalidated(location):
    web = FakeWeb({("allowed.example", "/a.png"): (301, {"location": location}, b"")})
    with pytest.raises(MediaError):
        fetch_remote("http://allowed.example/a.png", _remote(), resolver=FakeDNS(), transport=web.transport)
    assert len(web.seen) == 1


def test_relative_redirects_are_followed_up_to_the_limit():
    png = _png()
    hop = {"location": "/next.png"}
    web = FakeWeb(
        {("allowed.example", "/a.png"): (302, hop, b""), ("allowed.example", "/next.png"): (200, {}, png)}
    )
    assert (
        fetch_remote("http://allowed.example/a.png", _remote(), resolver=FakeDNS(), transport=web.transport)
        == png
    )

    loop = FakeWeb({("allowed.example", "/a.png"): (302, {"location": "/a.png"}, b"")})
    with pytest.raises(MediaError, match="redirects"):
        fetch_remote("http://allowed.example/a.png", _remote(), resolver=FakeDNS(), transport=loop.transport)
    assert len(loop.seen) == 4  # the first request + 3 redirects


def test_download_size_is_capped_while_streaming():
    def endless():
        while True:
            yield b"x" * 4096

    class Streaming(FakeWeb):
        def __call__(self, request):
            self.seen.append(request)
            return httpx.Response(200, content=endless())  # no Content-Length

    web = Streaming({})
    with pytest.raises(MediaError) as err:
        fetch_remote(
            "http://allowed.example/big",
            _remote(max_image_bytes=50_000),
            resolver=FakeDNS(),
            transport=web.transport,
        )
    assert err.value.code == "image_too_large"

    declared = FakeWeb({("allowed.example", "/big"): (200, {"content-length": "999999999"}, b"")})
    with pytest.raises(MediaError) as err:
        fetch_remote(
            "http://allowed.example/big", _remote(), resolver=FakeDNS(), transport=declared.transport
        )
    assert err.value.code == "image_too_large"


def test_http_errors_become_media_errors():
    web = FakeWeb({})
    with pytest.raises(MediaError) as err:
        fetch_remote("http://allowed.example/missing", _remote(), resolver=FakeDNS(), transport=web.transport)
    assert err.value.code == "media_fetch_failed" and "404" in str(err.value)
    with pytest.raises(MediaError) as err:
        fetch_remote(
            "http://unknown.allowed.example/x", _remote(), resolver=FakeDNS(), transport=web.transport
        )
    assert err.value.code == "media_fetch_failed"


# ------------------------------------------------------------------------------------ the pixel budget


def test_a_pixel_budget_admits_what_fits_and_queues_the_rest_in_order():
    from vlmkit.infer.decoding import PixelBudget

    async def scenario() -> list[str]:
        budget = PixelBudget(100)
        order: list[str] = []

        async def request(name: str, pixels: int, hold: float) -> None:
            await budget.reserve(pixels, timeout=5)
            order.append(f"+{name}")
            assert budget.used <= budget.total
            await asyncio.sleep(hold)
            budget.release(pixels)
            order.append(f"-{name}")

        first = asyncio.create_task(request("a", 60, 0.05))
        await asyncio.sleep(0.01)
        big = asyncio.create_task(request("big", 90, 0.01))  # waits for a...
        await asyncio.sleep(0.01)
        small = asyncio.create_task(
            request("small", 30, 0.01)
        )  # ...and so does this one, though it would fit
        await asyncio.gather(first, big, small)
        assert budget.used == 0 and budget.peak == 90 and budget.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["+a", "-a", "+big", "-big", "+small", "-small"]


def test_a_pixel_budget_refuses_what_never_fits_and_gives_up_after_its_timeout():
    from vlmkit.infer.decoding import BudgetError, PixelBudget

    async def scenario() -> None:
        budget = PixelBudget(100)
        with pytest.raises(BudgetError) as err:
            await budget.reserve(101, timeout=5)
        assert err.value.code == "too_large" and budget.used == 0
        await budget.reserve(80, timeout=1)
        with pytest.raises(BudgetError) as err:
            await budget.reserve(50, timeout=0.05)
        assert err.value.code == "timeout" and budget.waiting == 0 and budget.used == 80
        waiter = asyncio.create_task(budget.reserve(20, timeout=1))  # the timed-out one left no trace
        await asyncio.sleep(0)
        assert waiter.done() and budget.used == 100
        budget.release(100)

    asyncio.run(scenario())


def test_memory_is_handed_back_when_the_budget_drains_after_a_large_hold():
    from vlmkit.infer.decoding import PixelBudget

    async def scenario() -> list[int]:
        drains: list[int] = []
        budget = PixelBudget(1000, on_drain=lambda: drains.append(budget.used), drain_after=500)
        for pixels in (100, 200):  # 300 held in all: not worth a trim
            await budget.reserve(pixels, timeout=1)
        budget.release(300)
        assert drains == []
        await budget.reserve(400, timeout=1)
        await budget.reserve(300, timeout=1)
        budget.release(400)
        assert drains == []  # not drained yet
        budget.release(300)
        return drains

    assert asyncio.run(scenario()) == [0]  # once, when nothing was held any more
