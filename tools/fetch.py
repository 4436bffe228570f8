"""Polite, guarded page fetching with httpx, and ``LiveWeb`` (ddgs search + fetch + extraction + snapshots).

``Fetcher.fetch`` refuses what a research bot should not touch and says why, as a ``FetchError``
reason: only http/https (``invalid-url``); hosts that resolve to private, loopback, link-local,
multicast, reserved or unspecified addresses (``private-address``, checked on every redirect hop
after DNS resolution); paths disallowed by robots.txt (``robots``); more than ``max_redirects``
redirects (``redirects``); bodies over ``max_bytes``, enforced while streaming (``too-large``);
content types other than HTML (``content-type``); HTTP 4xx/5xx (``status``); connection failures
(``unreachable``) and timeouts (``timeout``).

The address check resolves the host itself and httpx resolves it again when connecting, so a DNS
server that answers differently within milliseconds (DNS rebinding) is not stopped; run the bot
behind an egress firewall where that matters.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import Message
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit, urlunsplit
from urllib.robotparser import RobotFileParser

from pydantic import BaseModel

from tools.extract import decode_html, extract_document
from tools.types import Document, FetchError, SearchHit

if TYPE_CHECKING:
    import httpx

    from tools.search import DdgsSearch
    from tools.snapshots import SnapshotStore

__all__ = ["FetchPolicy", "FetchResult", "Fetcher", "LiveWeb", "Resolver", "is_public_address"]

logger = logging.getLogger(__name__)

#: ``async resolver(host, port) -> list of IP address strings``; raises ``OSError`` when the host is unknown.
Resolver = Callable[[str, int], Awaitable[list[str]]]

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_ROBOTS_MAX_BYTES = 512_000


@dataclass(frozen=True)
class FetchPolicy:
    """What ``Fetcher`` may fetch and how long it waits.

    Attributes:
        timeout_s: seconds allowed for each hop (connect, send, and reading the whole body).
        max_bytes: largest body accepted, in bytes (checked on ``Content-Length`` and while streaming).
        max_redirects: most redirects followed for one fetch.
        allowed_content_types: accepted media types (``Content-Type`` without parameters).
        respect_robots: obey robots.txt (fetched once per scheme and host, cached).
        allow_private: permit private, loopback and other non-public addresses (tests, intranets).
        user_agent: the ``User-Agent`` header, also the name matched in robots.txt.
    """

    timeout_s: float = 10.0
    max_bytes: int = 2_000_000
    max_redirects: int = 5
    allowed_content_types: tuple[str, ...] = ("text/html", "application/xhtml+xml")
    respect_robots: bool = True
    allow_private: bool = False
    user_agent: str = "outreach-miniatures/0.1 (+research bot)"

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"FetchPolicy.timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.max_bytes < 1:
            raise ValueError(f"FetchPolicy.max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_redirects < 0:
            raise ValueError(f"FetchPolicy.max_redirects must be >= 0, got {self.max_redirects}")


class FetchResult(BaseModel):
    """One fetched page: ``url`` as asked, ``final_url`` after redirects, ``redirects`` the hops between."""

    url: str
    final_url: str
    status_code: int
    content_type: str
    html: str
    redirects: list[str] = []


def is_public_address(address: str) -> bool:
    """True when ``address`` (an IPv4/IPv6 string, optionally with ``%scope``) is a public unicast address.

    Private, loopback, link-local, multicast, reserved and unspecified addresses are not public;
    IPv4-mapped and 6to4/Teredo-wrapped IPv6 addresses are judged by the IPv4 address inside.

    Raises:
        ValueError: ``address`` is not an IP address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None:
            ip = inner
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def _system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _media_type(content_type: str) -> tuple[str, str | None]:
    if not content_type:
        return "", None
    msg = Message()
    msg["content-type"] = content_type
    return msg.get_content_type().lower(), msg.get_param("charset")  # type: ignore[return-value]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.lower(), "", "", ""))


class Fetcher:
    """Fetches HTML pages under a ``FetchPolicy``.

    Args:
        policy: the rules; defaults to ``FetchPolicy()``.
        client: an ``httpx.AsyncClient`` to use (its redirects are followed here, by hand); when
            None, the fetcher makes one and closes it in ``aclose``.
        resolver: ``async (host, port) -> [ip, ...]`` used for the address check; defaults to the
            event loop's ``getaddrinfo``. Tests inject one to make a name look public.

    Example:
        >>> async with Fetcher(FetchPolicy(timeout_s=5)) as fetcher:
        ...     result = await fetcher.fetch("https://www.example.com/")
    """

    def __init__(
        self,
        policy: FetchPolicy | None = None,
        client: httpx.AsyncClient | None = None,
        *,
        resolver: Resolver | None = None,
    ) -> None:
        self.policy = policy or FetchPolicy()
        import httpx

        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            follow_redirects=False, headers={"User-Agent": self.policy.user_agent}
        )
        self._resolver = resolver or _system_resolver
        self._robots: dict[str, RobotFileParser | None] = {}
        self._robots_locks: dict[str, asyncio.Lock] = {}

    async def aclose(self) -> None:
        """Close the HTTP client if this fetcher created it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- checks --------------------------------------------------------------------------------
    def _check_url(self, original: str, url: str) -> tuple[str, int]:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise FetchError(original, "invalid-url", f"{url!r}: {exc}") from exc
        if parts.scheme not in ("http", "https"):
            raise FetchError(original, "invalid-url", f"{url!r}: only http and https addresses are fetched")
        if not parts.hostname:
            raise FetchError(original, "invalid-url", f"{url!r} names no host")
        return parts.hostname, port or (443 if parts.scheme == "https" else 80)

    async def _check_address(self, original: str, host: str, port: int) -> None:
        if self.policy.allow_private:
            return
        try:
            addresses = [str(ipaddress.ip_address(host.split("%", 1)[0]))]
        except ValueError:
            try:
                addresses = await self._resolver(host, port)
            except OSError as exc:
                raise FetchError(original, "unreachable", f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise FetchError(original, "unreachable", f"{host} resolves to no address")
        refused = [a for a in addresses if not is_public_address(a)]
        if refused:
            raise FetchError(
                original,
                "private-address",
                f"{host} resolves to non-public address {', '.join(refused)}; "
                "set FetchPolicy(allow_private=True) to allow it",
            )

    async def _robots_for(self, url: str) -> RobotFileParser | None:
        origin = _origin(url)
        if origin in self._robots:
            return self._robots[origin]
        lock = self._robots_locks.setdefault(origin, asyncio.Lock())
        async with lock:
            if origin not in self._robots:
                self._robots[origin] = await self._load_robots(origin)
        return self._robots[origin]

    async def _load_robots(self, origin: str) -> RobotFileParser | None:
        import httpx

        robots_url = f"{origin}/robots.txt"
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                # Redirects are not followed: their targets would escape the address check.
                async with self._client.stream(
                    "GET", robots_url, follow_redirects=False, timeout=self.policy.timeout_s
                ) as response:
                    if response.status_code != 200:
                        logger.debug(
                            "robots.txt at %s: HTTP %d, all allowed", robots_url, response.status_code)
                        return None
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > _ROBOTS_MAX_BYTES:
                            break
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            logger.debug("robots.txt at %s unreachable (%r), all allowed", robots_url, exc)
            return None
        parser = RobotFileParser(robots_url)
        parser.parse(body[:_ROBOTS_MAX_BYTES].decode("utf-8", errors="replace").splitlines())
        return parser

    async def _check_robots(self, original: str, url: str) -> None:
        if not self.policy.respect_robots:
            return
        parser = await self._robots_for(url)
        if parser is not None and not parser.can_fetch(self.policy.user_agent, url):
            raise FetchError(original, "robots", f"robots.txt of {_origin(url)} disallows {url}")

    # -- fetching ------------------------------------------------------------------------------
    async def fetch(self, url: str, *, raise_for_status: bool = True) -> FetchResult:
        """Fetch one HTML page, following redirects by hand with every check on every hop.

        Args:
            url: an absolute http(s) URL.
            raise_for_status: raise ``FetchError("status")`` for HTTP 4xx/5xx; when False such pages
                are returned (still subject to the size and content-type checks).

        Returns:
            A ``FetchResult``; ``html`` is decoded with the charset of the ``Content-Type`` header,
            else the page's ``<meta charset>``, else UTF-8 (bad bytes replaced).

        Raises:
            FetchError: with reason ``invalid-url``, ``private-address``, ``robots``, ``redirects``,
                ``too-large``, ``content-type``, ``status``, ``unreachable`` or ``timeout``.
        """
        current = url.strip()
        hops: list[str] = []
        while True:
            host, port = self._check_url(url, current)
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    await self._check_address(url, host, port)
                    await self._check_robots(url, current)
                    result = await self._get(url, current)
            except TimeoutError as exc:
                detail = f"{current} took longer than {self.policy.timeout_s} s"
                raise FetchError(url, "timeout", detail) from exc
            if isinstance(result, str):  # a redirect: ``result`` is the next address
                hops.append(current)
                if len(hops) > self.policy.max_redirects:
                    raise FetchError(
                        url, "redirects", f"more than {self.policy.max_redirects} redirects (next: {result})"
                    )
                logger.debug("redirect %s -> %s", current, result)
                current = result
                continue
            status, content_type, body, charset = result
            if status >= 400 and raise_for_status:
                raise FetchError(url, "status", f"HTTP {status} from {current}")
            return FetchResult(
                url=url,
                final_url=current,
                status_code=status,
                content_type=content_type,
                html=decode_html(body, charset),
                redirects=hops,
            )

    async def _get(self, original: str, url: str) -> str | tuple[int, str, bytes, str | None]:
        """One hop: the next address for a redirect, else ``(status, content_type, body, charset)``."""
        import httpx

        policy = self.policy
        try:
            async with self._client.stream(
                "GET",
                url,
                follow_redirects=False,
                timeout=policy.timeout_s,
                headers={"User-Agent": policy.user_agent, "Accept": "text/html,application/xhtml+xml"},
            ) as response:
                status = response.status_code
                if status in _REDIRECT_CODES and response.headers.get("location"):
                    return urljoin(url, response.headers["location"].strip())
                content_type = response.headers.get("content-type", "")
                media_type, charset = _media_type(content_type)
                if media_type and media_type not in policy.allowed_content_types:
                    raise FetchError(
                        original,
                        "content-type",
                        f"{url} is {media_type}, not one of {', '.join(policy.allowed_content_types)}",
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > policy.max_bytes:
                    detail = f"{url} declares {declared} bytes > {policy.max_bytes}"
                    raise FetchError(original, "too-large", detail)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > policy.max_bytes:
                        detail = f"{url} sent more than {policy.max_bytes} bytes"
                        raise FetchError(original, "too-large", detail)
                    chunks.append(chunk)
                body = b"".join(chunks)
                if not media_type and not body.lstrip()[:1] == b"<":
                    detail = f"{url} has no Content-Type and does not look like HTML"
                    raise FetchError(original, "content-type", detail)
                return status, media_type or "text/html", body, charset
        except httpx.TimeoutException as exc:
            raise FetchError(original, "timeout", f"{url}: {type(exc).__name__}") from exc
        except (httpx.TransportError, OSError) as exc:  # connect, DNS, protocol and TLS errors
            raise FetchError(original, "unreachable", f"{url}: {type(exc).__name__}: {exc}") from exc
        except httpx.InvalidURL as exc:
            raise FetchError(original, "invalid-url", f"{url}: {exc}") from exc


class LiveWeb:
    """The ``Web`` protocol on the live internet: ddgs search, guarded fetch, extraction, snapshots.

    Args:
        search: the search engine (``DdgsSearch`` or anything with the same ``search`` method).
        fetcher: the page fetcher.
        snapshots: when given, every fetched page (including 4xx/5xx pages) is saved, so runs can be
            replayed offline with ``SnapshotWeb``.
    """

    def __init__(self, search: DdgsSearch, fetcher: Fetcher, snapshots: SnapshotStore | None = None) -> None:
        self.searcher = search
        self.fetcher = fetcher
        self.snapshots = snapshots

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        """Search the web. Raises ``SearchError`` when every backend fails."""
        return await self.searcher.search(query, max_results=max_results)

    async def fetch(self, url: str) -> Document:
        """Fetch, snapshot and extract one page (``Document.url`` is the final URL after redirects).

        Raises:
            FetchError: as ``Fetcher.fetch``; an HTTP 4xx/5xx page is snapshotted first, then raised
                as ``status``.
        """
        result = await self.fetcher.fetch(url, raise_for_status=False)
        if self.snapshots is not None:
            await asyncio.to_thread(
                self.snapshots.save, url, result.final_url, result.status_code,
                result.content_type, result.html
            )
        if result.status_code >= 400:
            raise FetchError(url, "status", f"HTTP {result.status_code} from {result.final_url}")
        return await asyncio.to_thread(
            extract_document, result.html, result.final_url, status_code=result.status_code
        )

    async def aclose(self) -> None:
        """Close the fetcher's HTTP client."""
        await self.fetcher.aclose()
