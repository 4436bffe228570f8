"""Polite, guarded page fetching with httpx, and ``LiveWeb`` (ddgs search + fetch + extraction + snapshots).

``Fetcher.fetch`` refuses what a research bot should not touch and says why, as a ``FetchError``
reason: anything but an http/https URL that httpx parses and whose host is valid IDNA
(``invalid-url``); hosts that resolve to any address that is not globally reachable
(``private-address``, see ``is_public_address``; checked on every redirect hop after DNS resolution);
paths robots.txt disallows, read as RFC 9309 says (``robots``); more than ``max_redirects`` redirects
(``redirects``); bodies over ``max_bytes`` as sent or as decoded, counted while streaming, so a
compressed bomb stops at the cap (``too-large``); content codings other than gzip, deflate and zstd,
or bytes invalid in theirs (``content-encoding``); content types other than HTML (``content-type``);
HTTP 4xx/5xx (``status``); connection failures (``unreachable``) and timeouts (``timeout``).

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
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urljoin
from urllib.robotparser import RobotFileParser

from pydantic import BaseModel

from tools.content_coding import ACCEPT_ENCODING, BoundedDecoder, ContentCodingError
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
#: robots.txt bytes parsed: RFC 9309 section 2.5 asks crawlers to parse at least 500 KiB.
_ROBOTS_MAX_BYTES = 512_000
#: robots.txt redirects followed: RFC 9309 section 2.3.1.2 asks for at least five.
_ROBOTS_MAX_REDIRECTS = 5
#: RFC 6052 well-known NAT64 prefix: its last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: IANA special-purpose ranges that are not globally reachable but that ``is_global`` calls global on
#: Python releases before the registry update of CPython gh-113171 (3.11.10, 3.12.4).
_NOT_GLOBAL = (ipaddress.IPv4Network("192.0.0.0/24"),)


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
    """True when ``address`` (an IPv4/IPv6 string, optionally with ``%scope``) is a global unicast address.

    Public means ``ipaddress``'s ``is_global`` (the IANA special-purpose registries: not private,
    loopback, link-local, unspecified, shared/carrier-grade NAT ``100.64.0.0/10`` with the cloud
    metadata address ``100.100.100.200``, documentation, benchmarking and the like), and not multicast,
    reserved, IPv6 site-local or ``192.0.0.0/24``. IPv4-mapped, NAT64 (``64:ff9b::/96``, RFC 6052),
    6to4 and Teredo IPv6 addresses are judged by the IPv4 address inside.

    Raises:
        ValueError: ``address`` is not an IP address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
        if inner is not None:
            ip = inner
        elif ip.is_site_local:
            return False
    return (
        ip.is_global
        and not ip.is_multicast
        and not ip.is_reserved
        and not any(ip in network for network in _NOT_GLOBAL)
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


class _Target(NamedTuple):
    """Where httpx will connect for a URL: the ASCII (IDNA-encoded) host, the port, and the origin
    ``scheme://host[:port]`` that robots.txt is fetched for."""

    host: str
    port: int
    origin: str


@dataclass(frozen=True)
class _Robots:
    """What one origin's robots.txt allows: its parsed ``rules``, or without rules ``allow_all``."""

    rules: RobotFileParser | None = None
    allow_all: bool = True

    @classmethod
    def parse(cls, body: bytes) -> _Robots:
        parser = RobotFileParser()
        parser.parse(body.decode("utf-8", errors="replace").splitlines())  # UTF-8: RFC 9309 section 2.3
        return cls(parser)

    def allows(self, user_agent: str, url: str) -> bool:
        return self.rules.can_fetch(user_agent, url) if self.rules is not None else self.allow_all


async def _read_body(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Read ``response``'s body, undoing its ``Content-Encoding``, and keep at most ``limit`` bytes.

    Bytes are counted as they stream, both as sent and as decoded (``BoundedDecoder``), so no more
    than ``limit`` plus one decoded piece is ever held, whatever the compression ratio.

    Returns:
        ``(body, more)``: the decoded body (at most ``limit`` bytes) and whether the server sent more
        than ``limit`` bytes, encoded or decoded (reading stops there).

    Raises:
        ContentCodingError: a coding other than ``SUPPORTED_CODINGS``, or bytes invalid in it.
    """
    decoder = BoundedDecoder(response.headers.get("content-encoding", ""), limit)
    chunks: list[bytes] = []
    sent = 0
    async for raw in response.aiter_raw():
        sent += len(raw)
        chunks.append(decoder.decode(raw))
        if decoder.exceeded or sent > limit:
            return b"".join(chunks), True
    return b"".join(chunks), False


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
        self._robots: dict[str, _Robots] = {}
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
    def _check_url(self, original: str, url: str) -> _Target:
        """Parse ``url`` as httpx will; raise ``FetchError("invalid-url")`` for anything it cannot fetch."""
        import httpx

        try:
            parsed = httpx.URL(url)
            parsed.host  # noqa: B018 - decodes the IDNA host, raising on labels such as ``xn--a``
            host = parsed.raw_host.decode("ascii")
            netloc = parsed.netloc.decode("ascii")
        except (httpx.InvalidURL, ValueError) as exc:  # idna.IDNAError is a UnicodeError, a ValueError
            raise FetchError(original, "invalid-url", f"{url!r}: {exc}") from exc
        if parsed.scheme not in ("http", "https"):
            raise FetchError(original, "invalid-url", f"{url!r}: only http and https addresses are fetched")
        if not host:
            raise FetchError(original, "invalid-url", f"{url!r} names no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if port > 65535:
            raise FetchError(original, "invalid-url", f"{url!r}: port {port} is out of range 0-65535")
        return _Target(host, port, f"{parsed.scheme}://{netloc}")

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

    async def _robots_for(self, original: str, origin: str) -> _Robots:
        """The robots.txt rules of ``origin``, loaded once per fetcher (see ``_load_robots``)."""
        if origin in self._robots:
            return self._robots[origin]
        lock = self._robots_locks.setdefault(origin, asyncio.Lock())
        async with lock:
            if origin not in self._robots:
                self._robots[origin] = await self._load_robots(original, origin)
        return self._robots[origin]

    async def _load_robots(self, original: str, origin: str) -> _Robots:
        """Fetch and parse ``origin``'s robots.txt as RFC 9309 section 2.3.1 says.

        - 2xx (section 2.3.1.1): the rules are parsed, up to ``_ROBOTS_MAX_BYTES`` (section 2.5);
        - 3xx (section 2.3.1.2): up to five redirects are followed, to any host, each hop passing the
          URL and address checks; after more than five the file is unavailable (allow all); a hop the
          checks refuse (a private address, an invalid URL or IDNA host) counts as unreachable
          (disallow all);
        - 4xx (section 2.3.1.3, "unavailable"): everything is allowed, except 429 Too Many Requests,
          which is a server asking for less traffic and is read as 5xx (as Google's crawler does);
        - 5xx (section 2.3.1.4, "unreachable"): complete disallow; an undecodable body too.

        A network failure or timeout is unreachable as well (section 2.3.1.4): the page is refused as
        ``unreachable`` or ``timeout`` and, unlike HTTP answers, the outcome is not cached, so the next
        page of the host asks again.

        Raises:
            FetchError: ``unreachable`` or ``timeout`` for ``original`` when robots.txt cannot be reached.
        """
        import httpx

        try:
            return await self._robots_hops(original, f"{origin}/robots.txt")
        except httpx.TimeoutException as exc:
            detail = f"robots.txt of {origin} took longer than {self.policy.timeout_s} s"
            raise FetchError(original, "timeout", detail) from exc
        except UnicodeError as exc:  # httpx reads a redirect's Location even when not following it
            logger.info("robots.txt of %s redirects to a host that is not valid IDNA (%s): all disallowed",
                        origin, exc)
            return _Robots(allow_all=False)
        except (httpx.TransportError, OSError) as exc:
            detail = (f"robots.txt of {origin} unreachable ({type(exc).__name__}: {exc}); "
                      "RFC 9309 section 2.3.1.4 disallows the whole site while it is")
            raise FetchError(original, "unreachable", detail) from exc

    async def _robots_hops(self, original: str, url: str) -> _Robots:
        """Ask for robots.txt at ``url``, following redirects; statuses read as ``_load_robots`` says."""
        robots_url = url
        for hop in range(_ROBOTS_MAX_REDIRECTS + 1):
            if hop:  # the first hop is the page's own origin, whose address was just checked
                try:
                    target = self._check_url(original, url)
                    await self._check_address(original, target.host, target.port)
                except FetchError as exc:
                    if exc.reason == "unreachable":
                        raise
                    logger.info("robots.txt %s redirects to %s, refused (%s): all disallowed", robots_url, url, exc)
                    return _Robots(allow_all=False)
            async with self._client.stream(
                "GET", url, follow_redirects=False, timeout=self.policy.timeout_s,
                headers={"User-Agent": self.policy.user_agent, "Accept-Encoding": ACCEPT_ENCODING},
            ) as response:
                status = response.status_code
                location = response.headers.get("location", "").strip()
                if status in _REDIRECT_CODES and location:
                    url = urljoin(url, location)
                    continue
                if 200 <= status < 300:
                    try:
                        body, more = await _read_body(response, _ROBOTS_MAX_BYTES)
                    except ContentCodingError as exc:
                        logger.info("robots.txt at %s undecodable (%s): all disallowed", url, exc)
                        return _Robots(allow_all=False)
                    if more:
                        logger.debug("robots.txt at %s: only its first %d bytes are read (RFC 9309 2.5)",
                                     url, _ROBOTS_MAX_BYTES)
                    return _Robots.parse(body)
                if status >= 500 or status == 429:
                    logger.info("robots.txt at %s: HTTP %d, all disallowed (RFC 9309 2.3.1.4)", url, status)
                    return _Robots(allow_all=False)
                logger.debug("robots.txt at %s: HTTP %d, all allowed (RFC 9309 2.3.1.3)", url, status)
                return _Robots(allow_all=True)
        logger.debug("robots.txt %s: more than %d redirects, all allowed", robots_url, _ROBOTS_MAX_REDIRECTS)
        return _Robots(allow_all=True)

    async def _check_robots(self, original: str, url: str, origin: str) -> None:
        if not self.policy.respect_robots:
            return
        robots = await self._robots_for(original, origin)
        if not robots.allows(self.policy.user_agent, url):
            why = "" if robots.rules is not None else " (it could not be read: RFC 9309 section 2.3.1.4)"
            raise FetchError(original, "robots", f"robots.txt of {origin} disallows {url}{why}")

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
                ``too-large``, ``content-encoding``, ``content-type``, ``status``, ``unreachable`` or
                ``timeout``.
        """
        current = url.strip()
        hops: list[str] = []
        while True:
            target = self._check_url(url, current)
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    await self._check_address(url, target.host, target.port)
                    await self._check_robots(url, current, target.origin)
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
                headers={
                    "User-Agent": policy.user_agent,
                    "Accept": "text/html,application/xhtml+xml",
                    "Accept-Encoding": ACCEPT_ENCODING,
                },
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
                try:
                    body, more = await _read_body(response, policy.max_bytes)
                except ContentCodingError as exc:
                    raise FetchError(original, "content-encoding", f"{url}: {exc}") from exc
                if more:
                    coding = response.headers.get("content-encoding", "")
                    detail = f"{url} sent more than {policy.max_bytes} bytes" + (f" ({coding})" if coding else "")
                    raise FetchError(original, "too-large", detail)
                if not media_type and not body.lstrip()[:1] == b"<":
                    detail = f"{url} has no Content-Type and does not look like HTML"
                    raise FetchError(original, "content-type", detail)
                return status, media_type or "text/html", body, charset
        except httpx.TimeoutException as exc:
            raise FetchError(original, "timeout", f"{url}: {type(exc).__name__}") from exc
        except (httpx.TransportError, OSError) as exc:  # connect, DNS, protocol and TLS errors
            raise FetchError(original, "unreachable", f"{url}: {type(exc).__name__}: {exc}") from exc
        except UnicodeError as exc:  # httpx reads a redirect's Location even when not following it
            detail = f"{url} redirects to a host that is not valid IDNA: {exc}"
            raise FetchError(original, "invalid-url", detail) from exc


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
