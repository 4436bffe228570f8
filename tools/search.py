"""Live web search with ddgs (DuckDuckGo, Brave, Mojeek, ... metasearch), named fallback order and backoff.

ddgs's own ``backend="auto"`` picks engines at random; here the engines are tried one at a time in
the order given, so a run's search path is predictable and logged. A rate-limited engine is retried
with exponential backoff (tenacity); any other failure moves on to the next engine.

It also defines the query grammar every ``Web`` backend reads (``parse_query``, ``quote_phrase``): a
double-quoted phrase must appear as written; words outside quotes are plain search words. Web engines
read quotes the same way, and ``tools.corpus.fts_query`` turns the grammar into FTS5.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tools.types import SearchError, SearchHit

__all__ = ["DEFAULT_BACKENDS", "DdgsClient", "DdgsSearch", "parse_query", "quote_phrase"]

logger = logging.getLogger(__name__)

_NO_RESULTS = "No results found."  # ddgs raises DDGSException with this text when an engine finds nothing

DEFAULT_BACKENDS: tuple[str, ...] = ("duckduckgo", "brave", "mojeek", "bing")

_PHRASE = re.compile(r'"([^"]*)"')
# A bare term: word characters, optionally joined by single dots, hyphens, apostrophes or "@", so that
# a domain (fumedev.com), an address or a hyphenated word (AI-first) stays one term.
_BARE_TERM = re.compile(r"\w+(?:[.@'\u2019-]\w+)*")


def quote_phrase(text: str) -> str:
    """Return ``text`` as one quoted search phrase: ``'Acme Freight'`` -> ``'"Acme Freight"'``.

    Double quotes inside ``text`` are dropped and runs of whitespace become one space, so the result
    is always a single balanced phrase (``'Foo "Bar" Ltd'`` -> ``'"Foo Bar Ltd"'``).

    Raises:
        ValueError: ``text`` has no letter or digit (nothing to search for).
    """
    inner = " ".join(text.replace('"', " ").split())
    if not any(ch.isalnum() for ch in inner):
        raise ValueError(f"search phrase {text!r} has no letter or digit; give a name or words to search for")
    return f'"{inner}"'


def parse_query(query: str) -> tuple[list[str], list[str]]:
    """Split a search query into its quoted phrases and its bare terms (the query grammar).

    A phrase is the text between a pair of double quotes; a quote without its pair is ignored. A bare
    term is a run of word characters outside quotes, where single dots, hyphens, apostrophes and
    ``@`` join rather than split (``fumedev.com``, ``AI-first``, ``O'Reilly`` are one term each);
    everything else separates terms. Phrases and terms are lower case, whitespace collapsed, without
    duplicates, in order of appearance; those with no letter or digit are left out.

    Args:
        query: e.g. ``'"Acme Freight" news fumedev.com "?!"'``.

    Returns:
        ``(phrases, terms)``, e.g. ``(["acme freight"], ["news", "fumedev.com"])``.
    """
    phrases: dict[str, None] = {}
    for match in _PHRASE.finditer(query):
        phrase = " ".join(match.group(1).lower().split())
        if any(ch.isalnum() for ch in phrase):
            phrases.setdefault(phrase, None)
    rest = _PHRASE.sub(" ", query).replace('"', " ")
    terms: dict[str, None] = {}
    for term in _BARE_TERM.findall(rest):
        if any(ch.isalnum() for ch in term):
            terms.setdefault(term.lower(), None)
    return list(phrases), list(terms)


class DdgsClient(Protocol):
    """What ``DdgsSearch`` needs of a ``ddgs.DDGS`` instance (fakes in tests implement this)."""

    def text(self, query: str, **kwargs: Any) -> list[dict[str, Any]]:
        """Return result dicts with ``title``, ``href`` and ``body`` keys."""
        ...


def _default_client_factory(timeout: int) -> DdgsClient:
    from ddgs import DDGS

    return DDGS(timeout=timeout)


def _known_backends() -> set[str] | None:
    try:
        from ddgs.engines import ENGINES
    except Exception:  # noqa: BLE001 - a future ddgs may move this; then we trust the caller
        return None
    return set(ENGINES.get("text", {}))


class DdgsSearch:
    """Web search through ddgs with a fixed backend fallback order.

    Args:
        backends: ddgs text backends to try, in order (``"duckduckgo"``, ``"brave"``, ``"mojeek"``,
            ``"bing"``, ``"yahoo"``, ``"startpage"``, ``"wikipedia"``, ...). With the real ddgs client,
            names the installed ddgs does not offer are dropped with a warning (ddgs would otherwise
            silently fall back to random engines).
        region: ddgs region code such as ``"us-en"`` or ``"de-de"``.
        max_retries: attempts per backend when it is rate limited (>= 1).
        timeout: per-request timeout in seconds, passed to ``ddgs.DDGS``.
        client_factory: builds the client from ``timeout``; defaults to ``ddgs.DDGS``. Tests inject
            a fake here.
        backoff_initial_s: first backoff wait in seconds after a rate limit; doubles on each retry.
        backoff_max_s: longest single wait in seconds.
        sleep: how to wait (seconds); tests pass a recorder instead of ``time.sleep``.

    Raises:
        ValueError: no backend is left to try, or ``max_retries`` < 1.
    """

    def __init__(
        self,
        backends: Sequence[str] = DEFAULT_BACKENDS,
        region: str = "us-en",
        max_retries: int = 3,
        timeout: int = 10,
        *,
        client_factory: Callable[[int], DdgsClient] | None = None,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 20.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if isinstance(backends, str):
            backends = [b.strip() for b in backends.split(",") if b.strip()]
        names = list(dict.fromkeys(backends))
        if client_factory is None and (known := _known_backends()) is not None:
            unknown = [b for b in names if b not in known]
            if unknown:
                logger.warning(
                    "ddgs offers no text backend named %s; skipping (available: %s)",
                    ", ".join(unknown),
                    ", ".join(sorted(known)),
                )
            names = [b for b in names if b in known]
        if not names:
            raise ValueError(
                f"no usable search backend in {list(backends)!r}; name at least one ddgs text backend"
            )
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1, got {max_retries}")
        self.backends: tuple[str, ...] = tuple(names)
        self.region = region
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._client_factory = client_factory or _default_client_factory
        self._client: DdgsClient | None = None

    @property
    def client(self) -> DdgsClient:
        """The ddgs client, created on first use."""
        if self._client is None:
            self._client = self._client_factory(self.timeout)
        return self._client

    def _search_backend(self, query: str, max_results: int, backend: str) -> list[dict[str, Any]]:
        from ddgs.exceptions import RatelimitException
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

        retrying = Retrying(
            retry=retry_if_exception_type(RatelimitException),
            stop=stop_after_attempt(self.max_retries),
            wait=wait_exponential(multiplier=self.backoff_initial_s, max=self.backoff_max_s),
            reraise=True,
            sleep=self._sleep,
            before_sleep=lambda state: logger.info(
                "search backend %s rate limited (attempt %d of %d); backing off",
                backend,
                state.attempt_number,
                self.max_retries,
            ),
        )
        return retrying(
            self.client.text, query, max_results=max_results, backend=backend, region=self.region
        )

    def search_sync(self, query: str, max_results: int = 8) -> list[SearchHit]:
        """Blocking search: try each backend in order until one returns results.

        Args:
            query: the search text.
            max_results: at most this many hits (>= 1).

        Returns:
            Hits best first (``rank`` 0-based, ``score`` = ``1 / (rank + 1)``) from the first backend
            that had any; an empty list when no backend failed outright but none found anything
            (ddgs's "No results found.").

        Raises:
            ValueError: empty query or ``max_results`` < 1.
            SearchError: every backend failed with an error (network, rate limit after
                ``max_retries`` attempts, timeout); the message names each backend tried with its error.
        """
        from ddgs.exceptions import DDGSException

        if not query.strip():
            raise ValueError("empty search query; give the words to search for")
        if max_results < 1:
            raise ValueError(f"max_results must be >= 1, got {max_results}")
        failures: list[str] = []
        empty: list[str] = []
        for backend in self.backends:
            try:
                rows = self._search_backend(query, max_results, backend)
            except DDGSException as exc:
                if str(exc).strip() == _NO_RESULTS:
                    logger.info("search backend %s found nothing for %r", backend, query)
                    empty.append(backend)
                    continue
                logger.info("search backend %s failed for %r: %r", backend, query, exc)
                failures.append(f"{backend}: {type(exc).__name__}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - any engine failure means: try the next engine
                logger.info("search backend %s failed for %r: %r", backend, query, exc)
                failures.append(f"{backend}: {type(exc).__name__}: {exc}")
                continue
            hits = _to_hits(rows, max_results)
            logger.debug("search backend %s gave %d hits for %r", backend, len(hits), query)
            return hits
        if empty:
            logger.info("no results for %r from %s", query, ", ".join(empty))
            return []
        raise SearchError(
            f"every search backend failed for {query!r} (tried {', '.join(self.backends)}); "
            f"last error: {failures[-1]}; all: {' | '.join(failures)}"
        )

    async def search(self, query: str, max_results: int = 8) -> list[SearchHit]:
        """Async ``search_sync``: the blocking ddgs call runs in a worker thread (``asyncio.to_thread``).

        Raises:
            ValueError: empty query or ``max_results`` < 1.
            SearchError: every backend failed.
        """
        return await asyncio.to_thread(self.search_sync, query, max_results)

    def __repr__(self) -> str:
        return f"DdgsSearch(backends={self.backends!r}, region={self.region!r})"


def _to_hits(rows: list[dict[str, Any]], max_results: int) -> list[SearchHit]:
    hits: list[SearchHit] = []
    seen: set[str] = set()
    for row in rows:
        url = str(row.get("href") or row.get("url") or "").strip()
        if not url or url in seen:
            continue
        seen.add(url)
        rank = len(hits)
        hits.append(
            SearchHit(
                url=url,
                title=str(row.get("title") or ""),
                snippet=str(row.get("body") or row.get("snippet") or ""),
                rank=rank,
                score=1.0 / (rank + 1),
            )
        )
        if len(hits) >= max_results:
            break
    return hits
