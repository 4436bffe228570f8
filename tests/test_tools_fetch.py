"""Fetcher and LiveWeb against a real HTTP server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest
from sqlalchemy import Engine

from agents import HeuristicChatModel, research
from agents.schemas import ProspectInfo
from tools.content_coding import ACCEPT_ENCODING, SUPPORTED_CODINGS, BoundedDecoder, ContentCodingError
from tools.fetch import Fetcher, FetchPolicy, LiveWeb, is_public_address
from tools.snapshots import SnapshotStore, SnapshotWeb
from tools.types import FetchError, SearchHit

PAGE = (
    "<html><head><title>Acme Anvils</title></head><body><article>"
    + "<p>Acme builds anvils in Springfield and employs 42 people.</p>" * 5
    + "</article></body></html>"
)
GIB = 1 << 30
MIB = 1 << 20


def zlib_zeros(coding: str, size: int) -> bytes:
    """A gzip (RFC 1952) or zlib ("deflate", RFC 1950) stream of ``size`` zero bytes (a multiple of 1 MiB),
    made fast: after a full flush the compressor starts afresh, so one compressed MiB repeats byte for byte."""
    block = bytes(MIB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31 if coding == "gzip" else 15)
    head = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush()  # the last (empty) block, then the trailer, which is rewritten for ``size``
    count = size // MIB
    if coding == "gzip":
        crc = 0
        for _ in range(count):
            crc = zlib.crc32(block, crc)
        trailer = struct.pack("<II", crc, size & 0xFFFF_FFFF)
        return head + repeated * (count - 1) + end[:-8] + trailer
    return head + repeated * (count - 1) + end[:-4] + struct.pack(">I", (size % 65521) << 16 | 1)  # Adler-32


def zstd_zeros(size: int) -> bytes:
    """A zstd stream of ``size`` zero bytes (a multiple of 8 MiB): 8 MiB frames one after another."""
    import zstandard

    frame = zstandard.ZstdCompressor(level=19).compress(bytes(8 * MIB))
    return frame * (size // (8 * MIB))


@functools.cache
def bomb(coding: str) -> bytes:
    """A body of about 1 MB (gzip, deflate) or 35 KB (zstd) that decodes to 1 GiB of zero bytes."""
    return zstd_zeros(GIB) if coding == "zstd" else zlib_zeros(coding, GIB)


def encode(body: bytes, coding: str) -> bytes:
    """``body`` in one content coding; ``raw-deflate`` is a bare RFC 1951 stream, zstd two frames."""
    if coding in ("gzip", "x-gzip"):
        return zlib.compress(body, wbits=31)
    if coding == "deflate":
        return zlib.compress(body)
    if coding == "raw-deflate":
        return zlib.compress(body, wbits=-15)
    if coding == "zstd":
        import zstandard

        half = len(body) // 2
        return zstandard.ZstdCompressor().compress(body[:half]) + zstandard.ZstdCompressor().compress(body[half:])
    raise AssertionError(coding)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    requests: list[str] = []  # replaced per server
    accept_encodings: list[str] = []  # replaced per server
    robots = "rules"  # how /robots.txt answers: rules, 404, 429, 500, 503, drop, hops:N, to:URL, bomb:CODING

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
        pass

    def send_body(
        self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8", length: bool = True
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_encoded(self, body: bytes, coding: str, content_type: str = "text/html") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Encoding", coding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def answer_robots(self) -> None:
        mode, _, arg = self.robots.partition(":")
        if mode == "rules":
            self.send_body(200, b"User-agent: *\nDisallow: /private\n", "text/plain")
        elif mode.isdigit():
            self.send_body(int(mode), b"<html><body>no robots here</body></html>")
        elif mode == "drop":  # close the connection without an answer
            self.close_connection = True
        elif mode == "hops":  # int(arg) redirects in all
            self.redirect(f"/robots-hop/{int(arg) - 1}" if int(arg) > 1 else "/robots-rules.txt")
        elif mode == "to":
            self.redirect(arg)
        elif mode == "bomb":
            self.send_encoded(bomb(arg), arg, "text/plain")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.requests.append(self.path)
        self.accept_encodings.append(self.headers.get("Accept-Encoding", ""))
        path = self.path
        port = cast(ThreadingHTTPServer, self.server).server_port
        if path == "/robots.txt":
            self.answer_robots()
        elif path.startswith("/robots-hop/"):
            n = int(path.rsplit("/", 1)[1])
            self.redirect(f"/robots-hop/{n - 1}" if n > 1 else "/robots-rules.txt")
        elif path == "/robots-rules.txt":
            self.send_body(200, b"User-agent: *\nDisallow: /private\n", "text/plain")
        elif path in ("/", "/page", "/private/page"):
            self.send_body(200, PAGE.encode())
        elif path.startswith("/enc/"):  # /enc/<coding>[,<coding>...]: PAGE in codings applied in that order
            body = PAGE.encode()
            codings = path[len("/enc/"):].split(",")
            for coding in codings:
                body = encode(body, coding)
            self.send_encoded(body, ", ".join("deflate" if c == "raw-deflate" else c for c in codings))
        elif path.startswith("/bomb/"):
            coding = path.rsplit("/", 1)[1]
            self.send_encoded(bomb(coding), coding)
        elif path == "/brotli":
            self.send_encoded(b"\x8b\x03\x80<html></html>\x03", "br")
        elif path == "/corrupt-gzip":
            self.send_encoded(b"\x1f\x8b\x08\x00" + b"not gzip at all" * 10, "gzip")
        elif path == "/to-bad-idna":
            self.redirect("http://xn--a.example/page")
        elif path == "/latin":
            self.send_body(
                200,
                "<html><body><p>Über uns: Bäckerei</p></body></html>".encode("latin-1"),
                "text/html; charset=iso-8859-1",
            )
        elif path.startswith("/hop/"):
            n = int(path.rsplit("/", 1)[1])
            self.redirect(f"/hop/{n - 1}" if n > 0 else "/page")
        elif path == "/big-declared":
            self.send_body(200, b"<html><body>" + b"x" * 50_000 + b"</body></html>")
        elif path == "/big-streamed":
            self.send_body(200, b"<html><body>" + b"y" * 50_000 + b"</body></html>", length=False)
        elif path == "/pdf":
            self.send_body(200, b"%PDF-1.4", "application/pdf")
        elif path == "/slow":
            time.sleep(1.0)
            self.send_body(200, PAGE.encode())
        elif path == "/missing":
            self.send_body(404, b"<html><body><p>Not found</p></body></html>")
        elif path == "/to-loopback":
            self.redirect(f"http://127.0.0.1:{port}/page")
        elif path == "/to-intranet":
            self.redirect("http://intranet.corp.test/secrets")
        else:
            self.send_body(500, b"unexpected path")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when the fetcher hangs up early (bombs, timeouts), as it is meant to."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(**handler_attributes: Any) -> Iterator[tuple[str, type[Handler]]]:
    """Run ``Handler`` (with ``handler_attributes`` and fresh request logs) on a loopback port."""
    attributes = {"requests": [], "accept_encodings": [], **handler_attributes}
    handler: type[Handler] = type("RecordingHandler", (Handler,), attributes)
    httpd = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[tuple[str, list[str]]]:
    with serve() as (base, handler):
        yield base, handler.requests


LOCAL = FetchPolicy(allow_private=True, timeout_s=2.0, max_bytes=10_000, max_redirects=3)


async def expect_error(fetcher: Fetcher, url: str, reason: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        await fetcher.fetch(url)
    assert info.value.reason == reason, str(info.value)
    return info.value


async def test_normal_page(server: tuple[str, list[str]]) -> None:
    base, requests = server
    async with Fetcher(LOCAL) as fetcher:
        result = await fetcher.fetch(f"{base}/page")
        again = await fetcher.fetch(f"{base}/latin")
    assert result.status_code == 200 and result.final_url == f"{base}/page"
    assert result.content_type == "text/html" and "employs 42 people" in result.html
    assert again.html.count("Über uns: Bäckerei") == 1  # decoded with the header's charset
    assert requests.count("/robots.txt") == 1  # fetched once per host, then cached


async def test_redirects_are_followed_up_to_the_cap(server: tuple[str, list[str]]) -> None:
    base, _ = server
    async with Fetcher(LOCAL) as fetcher:
        ok = await fetcher.fetch(f"{base}/hop/2")  # hop/2 -> hop/1 -> hop/0 -> page: 3 redirects
        assert ok.final_url == f"{base}/page" and ok.redirects == [f"{base}/hop/{n}" for n in (2, 1, 0)]
        error = await expect_error(fetcher, f"{base}/hop/3", "redirects")
    assert error.url == f"{base}/hop/3"


async def test_size_cap_on_declared_and_streamed_bodies(server: tuple[str, list[str]]) -> None:
    base, _ = server
    async with Fetcher(LOCAL) as fetcher:
        assert "declares" in str(await expect_error(fetcher, f"{base}/big-declared", "too-large"))
        assert "sent more than 10000 bytes" in str(
            await expect_error(fetcher, f"{base}/big-streamed", "too-large")
        )


async def test_content_type_robots_status_and_timeout(server: tuple[str, list[str]]) -> None:
    base, requests = server
    async with Fetcher(LOCAL) as fetcher:
        await expect_error(fetcher, f"{base}/pdf", "content-type")
        await expect_error(fetcher, f"{base}/private/page", "robots")
        await expect_error(fetcher, f"{base}/missing", "status")
        missing = await fetcher.fetch(f"{base}/missing", raise_for_status=False)
        assert missing.status_code == 404 and "Not found" in missing.html
    assert "/private/page" not in requests
    async with Fetcher(FetchPolicy(allow_private=True, timeout_s=0.3)) as fast:
        start = time.perf_counter()
        await expect_error(fast, f"{base}/slow", "timeout")
        assert time.perf_counter() - start < 0.9
    async with Fetcher(FetchPolicy(allow_private=True, respect_robots=False)) as rude:
        assert (await rude.fetch(f"{base}/private/page")).status_code == 200


async def test_unreachable_and_invalid_urls() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with Fetcher(LOCAL) as fetcher:
        await expect_error(fetcher, f"http://127.0.0.1:{port}/", "unreachable")
        await expect_error(fetcher, "ftp://example.com/file", "invalid-url")
        await expect_error(fetcher, "not a url", "invalid-url")


async def test_default_policy_refuses_loopback(server: tuple[str, list[str]]) -> None:
    base, requests = server
    async with Fetcher() as fetcher:
        error = await expect_error(fetcher, f"{base}/page", "private-address")
    assert "127.0.0.1" in str(error) and "allow_private" in str(error)
    assert requests == []  # refused before any request, robots.txt included


async def test_default_policy_refuses_a_private_redirect_hop(server: tuple[str, list[str]]) -> None:
    """``localhost`` is made to look public, so the first hop is really fetched; the redirect to
    127.0.0.1 (an IP literal) and to a name resolving to 10.x must then be refused."""
    base, requests = server
    port = int(base.rsplit(":", 1)[1])
    resolved: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return {"localhost": ["93.184.216.34"], "intranet.corp.test": ["10.1.2.3"]}[host]

    async with Fetcher(FetchPolicy(), resolver=resolver) as fetcher:
        await expect_error(fetcher, f"http://localhost:{port}/to-loopback", "private-address")
        error = await expect_error(fetcher, f"http://localhost:{port}/to-intranet", "private-address")
    assert "10.1.2.3" in str(error)
    assert "/to-loopback" in requests and "/to-intranet" in requests  # the first hops were served
    assert "/page" not in requests and "/secrets" not in requests  # the private hops never were
    assert resolved == ["localhost", "localhost", "intranet.corp.test"]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("10.0.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:127.0.0.1", False),
        ("fc00::1", False),
        ("100.64.0.1", False),  # carrier-grade NAT (RFC 6598)
        ("100.100.100.200", False),  # a cloud metadata address inside it
        ("100.127.255.254", False),
        ("100.128.0.1", True),  # just outside 100.64.0.0/10
        ("::ffff:100.100.100.200", False),  # IPv4-mapped
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
        ("::7f00:1", False),  # IPv4-compatible ::127.0.0.1
        ("0.1.2.3", False),
        ("255.255.255.255", False),
        ("192.0.0.8", False),
        ("192.0.2.1", False),  # documentation
        ("198.18.0.1", False),  # benchmarking
        ("2001:db8::1", False),
        ("ff02::1", False),
        ("ff0e::1", False),  # global-scope multicast
        ("fec0::1", False),  # site-local
        ("::", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


class FakeSearch:
    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        return [SearchHit(url="https://acme.example/", title=query)][:max_results]


async def test_live_web_extracts_snapshots_and_replays(
    server: tuple[str, list[str]], sqlite_engine: Engine
) -> None:
    base, _ = server
    store = SnapshotStore(sqlite_engine)
    web = LiveWeb(FakeSearch(), Fetcher(LOCAL), store)  # type: ignore[arg-type]
    assert (await web.search("acme", max_results=1))[0].title == "acme"
    doc = await web.fetch(f"{base}/hop/0")
    assert doc.url == f"{base}/page" and "employs 42 people" in doc.text and doc.title == "Acme Anvils"
    with pytest.raises(FetchError) as info:
        await web.fetch(f"{base}/missing")
    assert info.value.reason == "status"
    await web.aclose()

    snap = store.latest(f"{base}/hop/0")
    assert snap is not None and snap.final_url == f"{base}/page" and snap.status_code == 200
    missing = store.latest(f"{base}/missing")
    assert missing is not None and missing.status_code == 404 and "Not found" in missing.html

    replay = SnapshotWeb(sqlite_engine)
    assert await replay.fetch(f"{base}/hop/0") == doc  # same document as the live run, offline


# -- content codings and decompression bombs ----------------------------------------------------------------

def test_bomb_builders_make_what_they_say() -> None:
    """The fast gzip/deflate/zstd builders give valid streams of the stated size (checked at 8 MiB)."""
    assert zlib.decompress(zlib_zeros("gzip", 8 * MIB), wbits=31) == bytes(8 * MIB)  # CRC-32 and size checked
    assert zlib.decompress(zlib_zeros("deflate", 8 * MIB)) == bytes(8 * MIB)  # Adler-32 checked
    if "zstd" in SUPPORTED_CODINGS:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(zstd_zeros(16 * MIB), read_across_frames=True)
        assert reader.read(32 * MIB) == bytes(16 * MIB)
    assert len(bomb("gzip")) < 1_100_000 and len(bomb("deflate")) < 1_100_000


@pytest.mark.parametrize("coding", ["gzip", "deflate", "zstd"])
def test_bounded_decoder_stops_a_bomb_fed_at_once(coding: str) -> None:
    if coding not in SUPPORTED_CODINGS:
        pytest.skip(f"{coding} is not supported here")
    body = bomb(coding)
    limit = 2_000_000
    decoder = BoundedDecoder(coding, limit)
    tracemalloc.start()
    try:
        out = decoder.decode(body)  # the whole 1 GiB body in one call
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.exceeded and len(out) == decoder.produced == limit and out == bytes(limit)
    # At most the limit plus one piece decoded, the decompressor's own buffers and the cut copy handed
    # back: a few times the limit, whatever the body decodes to (1 GiB here).
    assert peak < 3 * limit + 1 * MIB, peak


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "raw-deflate", "zstd", "deflate,gzip", "gzip,zstd"])
async def test_encoded_pages_are_decoded(server: tuple[str, list[str]], coding: str) -> None:
    if any(c == "zstd" and c not in SUPPORTED_CODINGS for c in coding.split(",")):
        pytest.skip("zstd is not supported here")
    base, _ = server
    async with Fetcher(LOCAL) as fetcher:
        result = await fetcher.fetch(f"{base}/enc/{coding}")
    assert result.html == PAGE


async def test_accept_encoding_names_what_is_decoded() -> None:
    with serve() as (base, handler):
        async with Fetcher(LOCAL) as fetcher:
            await fetcher.fetch(f"{base}/page")
    assert handler.requests == ["/robots.txt", "/page"]
    assert handler.accept_encodings == [ACCEPT_ENCODING] * 2
    assert ACCEPT_ENCODING.startswith("gzip, deflate") and "br" not in ACCEPT_ENCODING


def test_bounded_decoder_cuts_at_the_limit_and_refuses_unknown_codings() -> None:
    page = PAGE.encode()
    exact = BoundedDecoder("gzip", len(page))
    assert exact.decode(encode(page, "gzip")) == page and not exact.exceeded
    short = BoundedDecoder(" GZIP , identity", len(page) - 1)
    assert short.decode(encode(page, "gzip")) == page[:-1] and short.exceeded
    assert BoundedDecoder("", 5).decode(b"abcdefg") == b"abcde"
    for coding in ("br", "compress", "gzip, br"):
        with pytest.raises(ContentCodingError, match="not supported"):
            BoundedDecoder(coding, 10)
    with pytest.raises(ContentCodingError, match="invalid gzip"):
        BoundedDecoder("gzip", 10).decode(b"\x1f\x8b\x08\x00garbage" * 4)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "zstd"])
async def test_a_decompression_bomb_is_refused_at_the_cap(server: tuple[str, list[str]], coding: str) -> None:
    """A body of 35 KB (zstd) or 1 MB (gzip, deflate) that decodes to 1 GiB is refused at the 2 MB cap with
    little memory: the issue measured peaks of 2.1 GB (zstd), 134 MB (gzip) and 198 MB (deflate)."""
    if coding not in SUPPORTED_CODINGS:
        pytest.skip(f"{coding} is not supported here")
    base, _ = server
    bomb(coding)  # built before measuring
    policy = FetchPolicy(allow_private=True, respect_robots=False)
    async with Fetcher(policy) as fetcher:
        tracemalloc.start()
        try:
            error = await expect_error(fetcher, f"{base}/bomb/{coding}", "too-large")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert f"sent more than {policy.max_bytes} bytes ({coding})" in str(error)
    assert peak < 4 * policy.max_bytes + 2 * MIB, peak


async def test_a_robots_bomb_is_read_up_to_its_limit() -> None:
    coding = "zstd" if "zstd" in SUPPORTED_CODINGS else "gzip"
    bomb(coding)
    with serve(robots=f"bomb:{coding}") as (base, handler):
        async with Fetcher(LOCAL) as fetcher:
            tracemalloc.start()
            try:
                result = await fetcher.fetch(f"{base}/private/page")  # 500 KiB of zero bytes: no rules
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert result.status_code == 200 and handler.requests == ["/robots.txt", "/private/page"]
    assert peak < 8 * MIB, peak


async def test_unsupported_or_corrupt_codings_are_refused(server: tuple[str, list[str]]) -> None:
    base, _ = server
    async with Fetcher(LOCAL) as fetcher:
        assert "'br' is not supported" in str(await expect_error(fetcher, f"{base}/brotli", "content-encoding"))
        assert "invalid gzip data" in str(await expect_error(fetcher, f"{base}/corrupt-gzip", "content-encoding"))


# -- addresses and URLs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["100.100.100.200", "100.64.0.1", "::ffff:169.254.169.254", "0.0.0.0"])
async def test_names_resolving_to_non_global_addresses_are_refused(
    server: tuple[str, list[str]], address: str
) -> None:
    base, requests = server
    port = int(base.rsplit(":", 1)[1])

    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", address]  # one bad address is enough

    async with Fetcher(FetchPolicy(), resolver=resolver) as fetcher:
        error = await expect_error(fetcher, f"http://localhost:{port}/page", "private-address")
        await expect_error(fetcher, f"http://{f'[{address}]' if ':' in address else address}/page", "private-address")
    assert address in str(error) and requests == []


BAD_URLS = [
    "http://xn--a.example/page",  # IDNA: punycode that decodes to a disallowed code point
    "http://xn--ls8h.example/",  # IDNA 2008 refuses emoji
    "http://\u2603.example/",  # a snowman host
    "http://\u200b.example/",  # a zero-width space host
    "http://[::1/",  # unclosed IPv6 literal
    "http://example.com:99999/",  # port out of range
    "http://example.com:port/",
]


@pytest.mark.parametrize("url", BAD_URLS)
async def test_unparsable_urls_and_bad_idna_hosts_are_fetch_errors(url: str) -> None:
    resolved: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["93.184.216.34"]

    async with Fetcher(FetchPolicy(), resolver=resolver) as fetcher:
        await expect_error(fetcher, url, "invalid-url")
    async with Fetcher(LOCAL) as fetcher:  # no address check: the URL is still refused before any request
        await expect_error(fetcher, url, "invalid-url")
    assert resolved == []


async def test_a_redirect_to_a_bad_idna_host_and_idna_hosts_that_are_fine(server: tuple[str, list[str]]) -> None:
    base, requests = server
    port = int(base.rsplit(":", 1)[1])
    resolved: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    async with Fetcher(LOCAL) as fetcher:
        error = await expect_error(fetcher, f"{base}/to-bad-idna", "invalid-url")
    assert "not valid IDNA" in str(error) and requests == ["/robots.txt", "/to-bad-idna"]
    async with Fetcher(FetchPolicy(), resolver=resolver) as fetcher:  # refused as loopback after IDNA encoding
        await expect_error(fetcher, f"http://bücher.example:{port}/page", "private-address")
    assert resolved == ["xn--bcher-kva.example"]  # the resolver is given the ASCII form httpx connects to


async def test_live_web_and_research_survive_bad_urls(server: tuple[str, list[str]]) -> None:
    """Search hits with bad IDNA hosts are one fetch error each; research keeps the good pages."""
    base, _ = server
    bad = ["http://xn--a.example/acme-anvils", "http://\u2603.example/acme-anvils"]

    class Search:
        async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
            hits = [SearchHit(url=f"{base}/page", title="Acme Anvils")]
            hits += [SearchHit(url=u, title="Acme Anvils review", snippet="Acme Anvils builds anvils.") for u in bad]
            return hits[:max_results]

    web = LiveWeb(Search(), Fetcher(LOCAL))  # type: ignore[arg-type]
    for url in bad:
        with pytest.raises(FetchError) as info:
            await web.fetch(url)
        assert info.value.reason == "invalid-url"
    prospect = ProspectInfo(first_name="Wile", email="wile@acme.example", company="Acme Anvils", website=base)
    result = await research(prospect, model=HeuristicChatModel(), web=web)
    await web.aclose()
    assert f"{base}/page" in result.profile.sources and result.profile.facts
    for url in bad:
        assert sum(e.startswith(f"could not fetch {url}: invalid-url") for e in result.fetch_errors) == 1


# -- robots.txt (RFC 9309) ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("robots", "allowed"),
    [
        ("404", True),  # 4xx: unavailable, everything allowed (section 2.3.1.3)
        ("403", True),
        ("429", False),  # too many requests: read as 5xx
        ("500", False),  # 5xx: unreachable, complete disallow (section 2.3.1.4)
        ("503", False),
    ],
)
async def test_robots_status_codes(robots: str, allowed: bool) -> None:
    with serve(robots=robots) as (base, handler):
        async with Fetcher(LOCAL) as fetcher:
            if allowed:
                assert (await fetcher.fetch(f"{base}/page")).status_code == 200
            else:
                error = await expect_error(fetcher, f"{base}/page", "robots")
                assert "RFC 9309" in str(error)
                await expect_error(fetcher, f"{base}/private/page", "robots")
    assert handler.requests == ["/robots.txt"] + (["/page"] if allowed else [])  # asked once, cached


@pytest.mark.parametrize(("hops", "obeyed"), [(1, True), (5, True), (6, False)])
async def test_robots_redirects_are_followed_up_to_five(hops: int, obeyed: bool) -> None:
    """robots.txt -> /robots-hop/N-1 -> ... -> /robots-rules.txt (Disallow: /private): ``hops`` redirects.
    After more than five the file is unavailable, so everything is allowed (section 2.3.1.2)."""
    with serve(robots=f"hops:{hops}") as (base, handler):
        async with Fetcher(LOCAL) as fetcher:
            assert (await fetcher.fetch(f"{base}/page")).status_code == 200
            if obeyed:
                await expect_error(fetcher, f"{base}/private/page", "robots")
            else:
                assert (await fetcher.fetch(f"{base}/private/page")).status_code == 200
    assert ("/robots-rules.txt" in handler.requests) is obeyed
    assert handler.requests.count("/robots.txt") == 1


async def test_robots_redirect_to_a_bad_idna_host_disallows_all() -> None:
    with serve(robots="to:http://xn--a.example/robots.txt") as (base, handler):
        async with Fetcher(LOCAL) as fetcher:
            error = await expect_error(fetcher, f"{base}/page", "robots")
    assert "could not be read" in str(error) and handler.requests == ["/robots.txt"]


async def test_robots_redirect_to_a_private_address_disallows_all() -> None:
    with serve(robots="to:http://127.0.0.1:9/robots.txt") as (base, handler):
        port = int(base.rsplit(":", 1)[1])

        async def resolver(host: str, port: int) -> list[str]:
            return ["93.184.216.34"]  # localhost looks public; the redirect's 127.0.0.1 is a literal

        async with Fetcher(FetchPolicy(), resolver=resolver) as fetcher:
            error = await expect_error(fetcher, f"http://localhost:{port}/page", "robots")
    assert "could not be read" in str(error) and handler.requests == ["/robots.txt"]


async def test_unreachable_robots_refuses_the_page_and_asks_again() -> None:
    with serve(robots="drop") as (base, handler):
        async with Fetcher(LOCAL) as fetcher:
            error = await expect_error(fetcher, f"{base}/page", "unreachable")
            await expect_error(fetcher, f"{base}/page", "unreachable")
    assert "robots.txt" in str(error) and "RFC 9309" in str(error)
    assert handler.requests == ["/robots.txt", "/robots.txt"]  # never the page; not cached
