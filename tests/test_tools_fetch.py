"""Fetcher and LiveWeb against a real HTTP server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import Engine

from tools.fetch import Fetcher, FetchPolicy, LiveWeb, is_public_address
from tools.snapshots import SnapshotStore, SnapshotWeb
from tools.types import FetchError, SearchHit

PAGE = (
    "<html><head><title>Acme Anvils</title></head><body><article>"
    + "<p>Acme builds anvils in Springfield and employs 42 people.</p>" * 5
    + "</article></body></html>"
)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    requests: list[str] = []  # replaced per server

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

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.requests.append(self.path)
        path = self.path
        port = self.server.server_address[1]
        if path == "/robots.txt":
            self.send_body(200, b"User-agent: *\nDisallow: /private\n", "text/plain")
        elif path in ("/page", "/private/page"):
            self.send_body(200, PAGE.encode())
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


@pytest.fixture
def server() -> Iterator[tuple[str, list[str]]]:
    requests: list[str] = []
    handler = type("RecordingHandler", (Handler,), {"requests": requests})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


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
