"""Layer 1: the researcher's web. Search (ddgs, local corpus), fetch (httpx, guarded), extraction
(trafilatura + JSON-LD), web snapshots and corpus import. No LLMs here.

Three implementations of ``Web`` (``tools.types.Web``), all returning documents from the same
extraction path (``extract_document``):

- ``CorpusWeb``: the local SQLite FTS5 corpus (offline default);
- ``LiveWeb``: ddgs search + guarded httpx fetch, every page snapshotted;
- ``SnapshotWeb``: stored snapshots (and, for replays, ``RecordedSearch``: the recorded searches).
"""

from tools.corpus import Corpus, CorpusWeb, fts_query, url_key
from tools.corpus_import import (
    CsvImportReport,
    column_label,
    import_csv,
    import_html,
    import_warc,
    url_for_html_file,
)
from tools.extract import decode_html, extract_document, jsonld_evidence_lines, parse_jsonld
from tools.fetch import Fetcher, FetchPolicy, FetchResult, LiveWeb, is_public_address
from tools.search import DEFAULT_BACKENDS, DdgsSearch
from tools.snapshots import RecordedSearch, SnapshotStore, SnapshotWeb
from tools.types import Document, FetchError, SearchError, SearchHit, Web

__all__ = [
    "DEFAULT_BACKENDS",
    "Corpus",
    "CorpusWeb",
    "CsvImportReport",
    "DdgsSearch",
    "Document",
    "FetchError",
    "FetchPolicy",
    "FetchResult",
    "Fetcher",
    "LiveWeb",
    "SearchError",
    "RecordedSearch",
    "SearchHit",
    "SnapshotStore",
    "SnapshotWeb",
    "Web",
    "column_label",
    "decode_html",
    "extract_document",
    "fts_query",
    "import_csv",
    "import_html",
    "import_warc",
    "is_public_address",
    "jsonld_evidence_lines",
    "parse_jsonld",
    "url_for_html_file",
    "url_key",
]
