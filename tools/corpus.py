"""The local corpus: extracted pages in one SQLite file, full-text indexed with FTS5.

The offline default web (DESIGN.md, "Offline defaults"): ``CorpusWeb`` answers the researcher's
searches with SQLite FTS5 ``bm25()`` ranking and its fetches with the stored ``Document``, which was
extracted once, at import, by the same ``tools.extract.extract_document`` the live path uses.

Schema (one file, created on first open)::

    documents(id INTEGER PRIMARY KEY, key TEXT UNIQUE, url TEXT, data TEXT)  -- data = Document JSON
    documents_fts USING fts5(url, title, site_name, text)                    -- rowid = documents.id

``key`` is the normalised URL (see ``url_key``) so ``http://x.example/`` and ``https://x.example``
name the same page.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from core.errors import UserError
from tools.search import parse_query
from tools.types import Document, FetchError, SearchHit

__all__ = ["Corpus", "CorpusError", "CorpusWeb", "fts_query", "url_key"]

logger = logging.getLogger(__name__)

#: bm25 column weights for (url, title, site_name, text): a title match counts five text matches.
BM25_WEIGHTS: tuple[float, float, float, float] = (2.0, 5.0, 3.0, 1.0)

# A domain or e-mail address inside a phrase: words joined by dots or "@".
_ADDRESS = re.compile(r"\w+(?:[.@]\w+)+")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5(
    url, title, site_name, text, tokenize = 'unicode61 remove_diacritics 2'
);
"""


def url_key(url: str) -> str:
    """Normalise a URL into the corpus key.

    The scheme (http/https), the case of the host, a default port, the fragment and trailing
    slashes of the path are ignored; the query is kept. A URL without a scheme is read as
    ``https://``.

    Args:
        url: an absolute URL such as ``https://www.x.example/about/``, or ``www.x.example/about``.

    Returns:
        A key such as ``www.x.example/about`` (``www.x.example`` for the home page).

    Raises:
        ValueError: ``url`` is empty or names no host.
    """
    raw = url.strip()
    if not raw:
        raise ValueError("empty URL; give an address such as https://www.example.com/about")
    if "://" not in raw:
        raw = "https://" + raw.lstrip("/")
    parts = urlsplit(raw)
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"URL {url!r} names no host; give an address such as https://www.example.com/about")
    port = parts.port
    netloc = host if port in (None, 80, 443) else f"{host}:{port}"
    path = parts.path.rstrip("/")
    return f"{netloc}{path}" + (f"?{parts.query}" if parts.query else "")


def _toggle_www(key: str) -> str:
    return key[4:] if key.startswith("www.") else f"www.{key}"


def fts_query(query: str) -> str:
    """Turn a search query (``tools.search.parse_query``'s grammar) into a safe FTS5 MATCH expression.

    Every quoted phrase is required; the bare terms are joined with ``OR``, and when the query also
    has phrases at least one bare term is required too (``bm25`` ranks pages that match more, and
    rarer, terms first). A phrase or term becomes one FTS5 string, which the ``unicode61`` tokenizer
    reads as a phrase of its words: ``fumedev.com`` is the phrase ``fumedev com``, never ``fumedev``
    or ``com`` alone. Quotes, punctuation and FTS5 operators in the input (``AND``, ``NEAR``, ``*``,
    ``-``, ``:``, parentheses) are searched as words and never raise.

    Args:
        query: e.g. ``'"Acme Freight" news'``, ``'"fumedev.com"'`` or free text ``'Smith & Sons'``.

    Returns:
        An expression such as ``"acme freight" AND "news"``, ``"fumedev.com"`` or
        ``"smith" OR "sons"``; ``""`` when the query has no words.
    """
    phrases, terms = parse_query(query)
    required = [f'"{p}"' for p in phrases]
    if terms:
        either = " OR ".join(f'"{t}"' for t in terms)
        required.append(f"({either})" if phrases and len(terms) > 1 else either)
    return " AND ".join(required)


class CorpusError(UserError, RuntimeError):
    """The corpus file is unusable (not a SQLite database, damaged, cannot be opened); the message is one
    line that names the file and what to do."""


class Corpus:
    """Extracted pages in a SQLite file with an FTS5 index; safe to share between threads and tasks.

    Args:
        path: the SQLite file (created with its folder if missing), or ``":memory:"``.

    Raises:
        CorpusError: the file cannot be opened, is not a SQLite database, or this SQLite lacks FTS5.

    Example:
        >>> corpus = Corpus(tmp_path / "corpus.sqlite")
        >>> corpus.add(extract_document(html, "https://www.x.example/"))
        >>> corpus.search("x analytics austin")[0].url
        'https://www.x.example/'
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise CorpusError(
                f"corpus {self.path} is not a usable SQLite corpus ({exc}); point --corpus (setting corpus_path) "
                "at the corpus file, or move this file aside and import the pages again with `outreach corpus "
                "import`"
            ) from exc

    # -- writing -------------------------------------------------------------------------------
    def add(self, doc: Document) -> None:
        """Store one extracted document, replacing any page with the same normalised URL.

        Raises:
            ValueError: ``doc.url`` is empty or names no host.
        """
        self.add_many([doc])

    def add_many(self, docs: Iterable[Document]) -> int:
        """Store documents in one transaction (upsert by normalised URL; all or nothing).

        Args:
            docs: extracted documents; a later one with the same URL key replaces an earlier one.

        Returns:
            How many documents were written.

        Raises:
            ValueError: a document's URL is empty or names no host (nothing is written).
        """
        rows = [(url_key(doc.url), doc) for doc in docs]
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for key, doc in rows:
                    cur.execute("SELECT id FROM documents WHERE key = ?", (key,))
                    found = cur.fetchone()
                    data = doc.model_dump_json()
                    if found:
                        doc_id = found[0]
                        cur.execute(
                            "UPDATE documents SET url = ?, data = ? WHERE id = ?", (doc.url, data, doc_id)
                        )
                        cur.execute("DELETE FROM documents_fts WHERE rowid = ?", (doc_id,))
                    else:
                        cur.execute(
                            "INSERT INTO documents (key, url, data) VALUES (?, ?, ?)", (key, doc.url, data)
                        )
                        doc_id = cur.lastrowid
                    cur.execute(
                        "INSERT INTO documents_fts (rowid, url, title, site_name, text) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (doc_id, doc.url, doc.title, doc.site_name, doc.text),
                    )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        logger.debug("stored %d documents in %s", len(rows), self.path)
        return len(rows)

    # -- reading -------------------------------------------------------------------------------
    def get(self, url: str) -> Document | None:
        """Return the stored document for ``url``, or None.

        ``url`` is normalised with ``url_key`` (scheme and trailing slash ignored); when that finds
        nothing, the same address with ``www.`` added or removed is tried.

        Raises:
            ValueError: ``url`` is empty or names no host.
        """
        key = url_key(url)
        with self._lock:
            for candidate in (key, _toggle_www(key)):
                row = self._conn.execute("SELECT data FROM documents WHERE key = ?", (candidate,)).fetchone()
                if row:
                    return Document.model_validate_json(row[0])
        return None

    def search(self, query: str, max_results: int = 8) -> list[SearchHit]:
        """Full-text search, best first.

        Args:
            query: quoted phrases (required) and bare words (``fts_query``), e.g.
                ``'"Acme Freight" news'``; any other punctuation or FTS5 syntax is searched as words.
            max_results: at most this many hits (must be >= 1).

        Returns:
            Hits ranked by FTS5 ``bm25()`` with column weights ``BM25_WEIGHTS`` (title over text);
            ``score`` is ``-bm25`` (higher is better), ``snippet`` a short excerpt of the text with
            the matching words. A phrase holding an address (``"front.page"``, ``"a@b.example"``)
            matches only pages whose URL, title or text holds that address as written (any case), not
            the words ``front page``. Empty when the query has no words or no page holds every phrase.

        Raises:
            ValueError: ``max_results`` < 1.
        """
        if max_results < 1:
            raise ValueError(f"max_results must be >= 1, got {max_results}")
        match = fts_query(query)
        if not match:
            return []
        # The tokenizer reads "front.page" as the words "front page"; a page must hold the address itself.
        addresses = [a for phrase in parse_query(query)[0] for a in _ADDRESS.findall(phrase)]
        weights = ", ".join(str(w) for w in BM25_WEIGHTS)
        sql = (
            "SELECT url, title, snippet(documents_fts, 3, '', '', ' … ', 24), "
            f"bm25(documents_fts, {weights}) AS rank, text "
            "FROM documents_fts WHERE documents_fts MATCH ? ORDER BY rank" + ("" if addresses else " LIMIT ?")
        )
        hits: list[SearchHit] = []
        with self._lock:
            for url, title, snippet, rank, text in self._conn.execute(
                sql, (match,) if addresses else (match, max_results)
            ):
                page = f"{url}\n{title}\n{text}".lower()
                if not all(address in page for address in addresses):
                    continue
                hits.append(SearchHit(url=url, title=title or "", snippet=" ".join((snippet or "").split()),
                                      rank=len(hits), score=-rank))
                if len(hits) >= max_results:
                    break
        return hits

    def urls(self) -> list[str]:
        """Every stored URL, in insertion order."""
        with self._lock:
            return [row[0] for row in self._conn.execute("SELECT url FROM documents ORDER BY id")]

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM documents").fetchone()[0])

    def __contains__(self, url: object) -> bool:
        return isinstance(url, str) and self.get(url) is not None

    def close(self) -> None:
        """Close the database connection (further calls raise ``sqlite3.ProgrammingError``)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Corpus:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Corpus({self.path!r})"


class CorpusWeb:
    """The ``Web`` protocol over a ``Corpus``: offline search and fetch.

    Args:
        corpus: the local corpus to answer from.
    """

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        """Search the corpus (``Corpus.search``); never raises ``SearchError`` (no match: empty list)."""
        return self.corpus.search(query, max_results=max_results)

    async def fetch(self, url: str) -> Document:
        """Return the stored document for ``url``.

        Raises:
            FetchError: reason ``not-in-corpus`` when the corpus has no page at ``url`` (or ``url`` is
                not a valid address).
        """
        try:
            doc = self.corpus.get(url)
        except ValueError as exc:
            raise FetchError(url, "not-in-corpus", str(exc)) from exc
        if doc is None:
            raise FetchError(url, "not-in-corpus", "import the page with tools.corpus_import first")
        return doc
