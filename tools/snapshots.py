"""Web snapshots: every page ``LiveWeb`` fetched, stored as it was; ``SnapshotWeb`` replays them offline.

``RecordedSearch`` answers searches with the result URLs that recorded runs got (their ``search``
tool calls), so a replay ranks and fetches the same pages without a search engine.

Snapshots live in the store's ``web_snapshots`` table (``store.models.WebSnapshot``): requested URL,
final URL after redirects, HTTP status, content type, raw HTML and the fetch time (UTC). Replays
extract the stored HTML with the same ``tools.extract.extract_document`` the live path used, so a
replayed run reads exactly the text the original run read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import or_
from sqlmodel import Session, col, select

from store.models import ToolCall, WebSnapshot
from tools.extract import extract_document
from tools.types import Document, FetchError, SearchError, SearchHit, Web

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["RecordedSearch", "SearchBackend", "SnapshotStore", "SnapshotWeb"]

logger = logging.getLogger(__name__)


class SearchBackend(Protocol):
    """Anything that can search (``DdgsSearch``, ``CorpusWeb``, ``LiveWeb``)."""

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        """Return up to ``max_results`` hits, best first. Raises ``SearchError``."""
        ...


def _variants(url: str) -> list[str]:
    """``url`` and the same address with/without a trailing slash and with the other of http/https."""
    base = url.strip()
    forms = [base, base.rstrip("/") if base.endswith("/") else base + "/"]
    swapped = []
    for form in forms:
        if form.startswith("https://"):
            swapped.append("http://" + form.removeprefix("https://"))
        elif form.startswith("http://"):
            swapped.append("https://" + form.removeprefix("http://"))
    return list(dict.fromkeys(forms + swapped))


class SnapshotStore:
    """Saves and finds fetched pages in the store's ``web_snapshots`` table.

    Args:
        engine: a store engine (``store.open_store(...)``), already migrated.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def save(self, url: str, final_url: str, status_code: int, content_type: str, html: str) -> int:
        """Store one fetched page and return its snapshot id.

        Args:
            url: the address asked for.
            final_url: the address after redirects (``url`` when there were none).
            status_code: the HTTP status.
            content_type: the media type, e.g. ``text/html``.
            html: the decoded page.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database refused the write (nothing is stored).
        """
        snapshot = WebSnapshot(
            url=url, final_url=final_url or url, status_code=status_code, content_type=content_type, html=html
        )
        with Session(self.engine) as session:
            session.add(snapshot)
            session.commit()
            session.refresh(snapshot)
        assert snapshot.id is not None
        logger.debug("snapshot %d: %s (HTTP %d, %d chars)", snapshot.id, url, status_code, len(html))
        return snapshot.id

    def latest(self, url: str) -> WebSnapshot | None:
        """The newest snapshot of ``url``, or None.

        A snapshot matches when its requested or final URL is ``url``, allowing for a trailing
        slash and for http versus https; among matches the newest fetch wins.
        """
        forms = _variants(url)
        statement = (
            select(WebSnapshot)
            .where(or_(col(WebSnapshot.url).in_(forms), col(WebSnapshot.final_url).in_(forms)))
            .order_by(col(WebSnapshot.fetched_at).desc(), col(WebSnapshot.id).desc())
            .limit(1)
        )
        with Session(self.engine, expire_on_commit=False) as session:
            snapshot = session.exec(statement).first()
            if snapshot is not None:
                session.expunge(snapshot)
        return snapshot

    def count(self) -> int:
        """How many snapshots are stored."""
        from sqlalchemy import func

        with Session(self.engine) as session:
            return int(session.exec(select(func.count()).select_from(WebSnapshot)).one())


class SnapshotWeb:
    """The ``Web`` protocol answered from stored snapshots only (offline replays).

    Args:
        engine: the store engine holding the snapshots.
        search: where searches go (``RecordedSearch`` for a replay); None means searching raises
            ``SearchError``.
        pages: where a page without a snapshot is fetched from instead (the ``CorpusWeb`` an offline
            campaign read: the corpus is the stored copy of its web); None means only snapshots.
    """

    def __init__(self, engine: Engine, search: SearchBackend | None = None, pages: Web | None = None) -> None:
        self.store = SnapshotStore(engine)
        self.searcher = search
        self.pages = pages

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        """Delegate to the configured search backend.

        Raises:
            SearchError: no search backend was given, or it failed.
        """
        if self.searcher is None:
            raise SearchError(
                f"cannot search {query!r}: this SnapshotWeb replays stored pages only; give it a search "
                "backend (e.g. CorpusWeb) to search"
            )
        return await self.searcher.search(query, max_results=max_results)

    async def fetch(self, url: str) -> Document:
        """Extract the newest snapshot of ``url`` (``Document.url`` is its final URL), else ask ``pages``.

        Raises:
            FetchError: ``not-in-snapshot`` when no snapshot matches and ``pages`` has no such page
                either; ``status`` when the stored page was an HTTP 4xx/5xx answer (as the live fetch
                raised then).
        """
        snapshot = await asyncio.to_thread(self.store.latest, url)
        if snapshot is None and self.pages is not None:
            try:
                return await self.pages.fetch(url)
            except FetchError as exc:
                raise FetchError(url, "not-in-snapshot", f"no stored snapshot, and {exc}") from exc
        if snapshot is None:
            raise FetchError(url, "not-in-snapshot", "no stored snapshot; fetch it live first")
        if snapshot.status_code >= 400:
            raise FetchError(url, "status", f"HTTP {snapshot.status_code} (stored snapshot {snapshot.id})")
        page_url = snapshot.final_url or snapshot.url
        status = snapshot.status_code
        return await asyncio.to_thread(extract_document, snapshot.html, page_url, status_code=status)


class RecordedSearch:
    """Searches answered from the ``search`` tool calls recorded for some runs (a ``SearchBackend``).

    Each query returns the hits its recorded call got, in the recorded order, with their titles and
    snippets (the researcher ranks third-party pages by whether these name the company); calls recorded
    before hits were stored give URLs only, so their third-party pages do not rank in a replay. When several
    of the runs recorded the
    same query, the newest call wins. A query recorded as failed raises ``SearchError`` with the
    recorded error; a query never recorded raises ``SearchError`` naming it.

    Args:
        engine: the store holding the tool calls.
        run_ids: the runs whose recorded searches answer.
    """

    def __init__(self, engine: Engine, run_ids: Iterable[int]) -> None:
        self._answers: dict[str, list[SearchHit] | str] = {}
        ids = list(run_ids)
        statement = (
            select(ToolCall)
            .where(ToolCall.tool == "search", col(ToolCall.run_id).in_(ids))
            .order_by(col(ToolCall.id))
        )
        with Session(engine) as session:
            for call in session.exec(statement):
                query = str(call.input.get("query", ""))
                self._answers[query] = call.error if call.error else _recorded_hits(call.output)

    def __len__(self) -> int:
        return len(self._answers)

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        """The recorded hits for ``query`` (at most ``max_results``).

        Raises:
            SearchError: the query was not recorded for these runs, or its recorded call failed.
        """
        answer = self._answers.get(query)
        if answer is None:
            raise SearchError(f"no recorded search for {query!r} in the replayed runs")
        if isinstance(answer, str):
            raise SearchError(f"recorded search {query!r} failed: {answer}")
        return answer[:max_results]


def _recorded_hits(output: dict[str, Any]) -> list[SearchHit]:
    """The hits of a recorded ``search`` tool call's output: ``hits`` (url, title, snippet) when stored, else
    the bare ``urls`` of older records."""
    rows = output.get("hits")
    if isinstance(rows, list):
        return [SearchHit(url=str(r.get("url", "")), title=str(r.get("title") or ""),
                          snippet=str(r.get("snippet") or ""), rank=i)
                for i, r in enumerate(rows) if isinstance(r, dict)]
    return [SearchHit(url=str(u), rank=i) for i, u in enumerate(output.get("urls", []))]
