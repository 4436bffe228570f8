"""Value types shared by every tool: search hits, extracted documents and the ``Web`` protocol.

The researcher agent sees the web only through ``Web``: ``CorpusWeb`` (the local SQLite FTS5
corpus, offline default) and ``LiveWeb`` (ddgs search + httpx fetch, every page snapshotted) both
implement it, and both return documents from the same extraction path (``tools.extract``).
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel, Field

__all__ = ["Document", "FetchError", "SearchError", "SearchHit", "Web"]


class SearchHit(BaseModel):
    """One search result: ``rank`` is 0-based, ``score`` higher is better (backend-specific scale)."""

    url: str
    title: str = ""
    snippet: str = ""
    rank: int = 0
    score: float = 0.0


class Document(BaseModel):
    """One page after extraction.

    ``text`` is the page's main text as markdown (trafilatura) followed by the metadata lines that
    the grounding check also accepts as evidence (``description``, schema.org JSON-LD properties
    rendered as ``"<Type> <property>: <value>"`` lines). ``html`` is the raw page as fetched.
    """

    url: str
    title: str = ""
    site_name: str = ""
    date: str = ""
    description: str = ""
    text: str = ""
    jsonld: list[dict[str, Any]] = Field(default_factory=list)
    html: str = ""
    status_code: int = 200


class SearchError(RuntimeError):
    """Every configured search backend failed; the message names them and the last error."""


class FetchError(RuntimeError):
    """A page could not be fetched (unreachable, timeout, refused by policy, too large, wrong type).

    ``url`` is the page asked for; ``reason`` a short machine-readable cause (``timeout``,
    ``unreachable``, ``robots``, ``private-address``, ``too-large``, ``content-type``, ``content-encoding``,
    ``status``, ``redirects``, ``invalid-url``, ``not-in-corpus``).
    """

    def __init__(self, url: str, reason: str, detail: str = "") -> None:
        super().__init__(f"could not fetch {url}: {reason}{': ' + detail if detail else ''}")
        self.url = url
        self.reason = reason


class Web(Protocol):
    """What the researcher needs of the web."""

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        """Return up to ``max_results`` hits, best first. Raises ``SearchError``."""
        ...

    async def fetch(self, url: str) -> Document:
        """Fetch and extract one page. Raises ``FetchError``."""
        ...
