"""Fill a ``Corpus`` from HTML files, CSV tables of companies and WARC web archives.

Every page goes through ``tools.extract.extract_document`` once, here, so that a fetch from the
corpus returns the ``Document`` the live path would have produced from the same HTML.

Folder convention for HTML files: ``<root>/<host>/<path>.html`` is the page ``https://<host>/<path>``;
``index.html`` is the folder's own page (``<root>/<host>/index.html`` -> ``https://<host>/``,
``<root>/<host>/a/index.html`` -> ``https://<host>/a``).
"""

from __future__ import annotations

import ast
import contextlib
import csv
import html as html_lib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tools.corpus import Corpus, url_key
from tools.extract import decode_html, extract_document
from tools.textnorm import normalize_page_text
from tools.types import Document

__all__ = ["CsvImportReport", "column_label", "import_csv", "import_html", "import_warc", "url_for_html_file"]

logger = logging.getLogger(__name__)

_HTML_SUFFIXES = (".html", ".htm")
_BATCH = 500
#: Fewer pages than this are extracted in the calling process: starting workers would cost more than they save.
_POOL_MIN_PAGES = 200


def url_for_html_file(path: Path, root: Path) -> str:
    """The page address of an HTML file under ``root`` (see the module's folder convention).

    Args:
        path: the file, e.g. ``world/sites/www.brightlane.example/about.html``.
        root: the folder holding one subfolder per host, e.g. ``world/sites``.

    Returns:
        The URL, e.g. ``https://www.brightlane.example/about``.

    Raises:
        ValueError: ``path`` is not inside ``root`` or lies directly in it (no host folder).
    """
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError as exc:
        raise ValueError(f"{path} is not inside {root}; put it under <root>/<host>/ or pass url=") from exc
    parts = relative.parts
    if len(parts) < 2:
        raise ValueError(f"{path} lies directly in {root}; put it in a host folder <root>/<host>/<page>.html")
    host, *folders, filename = parts
    stem = filename.rsplit(".", 1)[0]
    segments = folders if stem == "index" else [*folders, stem]
    return f"https://{host}/" + "/".join(segments)


_HOST = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+(:\d+)?$", re.IGNORECASE)


def _looks_like_host(name: str) -> bool:
    return bool(_HOST.match(name)) and not name.lower().endswith(_HTML_SUFFIXES)


def _host_root(file: Path) -> Path | None:
    """The parent of the nearest ancestor folder of ``file`` named like a host, or None."""
    for folder in file.resolve().parents:
        if _looks_like_host(folder.name):
            return folder.parent
    return None


def _read_html(path: Path) -> str | None:
    try:
        return decode_html(path.read_bytes(), strict=True)
    except UnicodeDecodeError as exc:
        logger.warning("skipping %s: cannot decode it (%s); re-save it as UTF-8", path, exc)
    except OSError as exc:
        logger.warning("skipping %s: cannot read it (%s)", path, exc)
    return None


def _extract_file(item: tuple[Path, str]) -> Document | None:
    """One file read and extracted (``tools.extract``), or None when it cannot be read (logged)."""
    file, page_url = item
    text = _read_html(file)
    return None if text is None else extract_document(text, page_url)


def import_html(path: Path, corpus: Corpus, *, url: str | None = None, root: Path | None = None,
                workers: int = 1) -> int:
    """Import one HTML file or every ``.html``/``.htm`` file under a folder.

    Args:
        path: a file or a folder.
        corpus: where the extracted documents go.
        url: the address of a single file; without it the folder convention is used with ``root``.
            Not allowed with a folder.
        root: the folder holding one subfolder per host. Defaults, for a folder, to ``path`` (or its
            parent when ``path`` itself is named like a host, e.g. ``www.x.example``) and, for a single
            file, to the parent of its nearest ancestor folder named like a host.
        workers: processes that extract pages (trafilatura, about 15 ms a page on one core); the documents
            are stored in file order whatever the count. Under 200 pages, or 1: in this process.

    Returns:
        How many pages were imported. Files that cannot be decoded or read, and files in a folder
        that fit no ``<root>/<host>/`` path, are logged with their path and skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``url`` given with a folder, a single file without ``url`` whose address
            cannot be told from its path, or ``workers`` < 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no HTML file or folder at {path}")
    pairs: list[tuple[Path, str]] = []
    if path.is_dir():
        if url is not None:
            raise ValueError(
                f"url= names one page, but {path} is a folder; drop url= to use <root>/<host>/<path>.html"
            )
        root = root or (path.parent if _looks_like_host(path.name) else path)
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _HTML_SUFFIXES):
            try:
                pairs.append((file, url_for_html_file(file, root)))
            except ValueError as exc:
                logger.warning("skipping %s: %s", file, exc)
    else:
        if url is None:
            root = root or _host_root(path)
            if root is None:
                raise ValueError(
                    f"cannot tell the address of {path}: pass url=, or root= the folder that holds "
                    "<host>/<path>.html"
                )
        pairs = [(path, url or url_for_html_file(path, root))]  # type: ignore[arg-type]
    docs: list[Document] = []
    imported = 0
    with contextlib.ExitStack() as stack:
        extracted: Iterator[Document | None] = map(_extract_file, pairs)
        if workers > 1 and len(pairs) >= _POOL_MIN_PAGES:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork where there is one: the workers only extract (no thread pools to inherit), and a caller's script
            # needs no `if __name__ == "__main__"` guard as it would with spawn.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)))
            extracted = pool.map(_extract_file, pairs, chunksize=32)  # in file order
        for doc in extracted:
            if doc is None:
                continue
            docs.append(doc)
            if len(docs) >= _BATCH:
                imported += corpus.add_many(docs)
                docs = []
    imported += corpus.add_many(docs)
    logger.info("imported %d of %d HTML files from %s", imported, len(pairs), path)
    return imported


@dataclass
class CsvImportReport:
    """What ``import_csv`` did.

    Attributes:
        imported: documents written to the corpus.
        rows_read: data rows read (not counting the header).
        filtered: rows the ``where`` filter left out.
        skipped: ``(row_number, reason)`` for rows that could not be imported; row numbers count the
            header as row 1, so the first data row is row 2 (a spreadsheet's numbering).
        duplicates: row numbers whose URL repeated an earlier row's (the later row wins).
    """

    imported: int = 0
    rows_read: int = 0
    filtered: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)


def column_label(name: str) -> str:
    """``year_founded`` -> ``Year founded``; ``teamSize`` -> ``Team size``."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name.strip())
    words = re.sub(r"[_\-\s]+", " ", spaced).strip().lower()
    return words[:1].upper() + words[1:]


_FLOAT_INT = re.compile(r"^-?\d+\.0+$")


def _cell_text(value: str | None) -> str:
    """A CSV cell as one normalised line: whitespace collapsed, ``2019.0`` -> ``2019``, ``['a', 'b']`` -> ``a, b``."""
    text = " ".join(normalize_page_text(value or "").split())
    if not text or text.lower() in ("nan", "none", "null"):
        return ""
    if _FLOAT_INT.match(text):
        return text.split(".", 1)[0]
    if text.startswith("[") and text.endswith("]"):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(items, list | tuple) and all(isinstance(i, str | int | float) for i in items):
            return ", ".join(" ".join(str(i).split()) for i in items if str(i).strip())
    return text


def _normalise_url(value: str) -> str:
    url = value.strip()
    if url and "://" not in url:
        url = "https://" + url.lstrip("/")
    return url


def _row_html(title: str, url: str, lines: list[tuple[str, str]]) -> str:
    e = html_lib.escape
    items = "\n".join(f"<p><b>{e(label)}:</b> {e(value)}</p>" for label, value in lines)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title></head>\n"
        f"<body><h1>{e(title)}</h1>\n<p><a href=\"{e(url, quote=True)}\">{e(url)}</a></p>\n"
        f"{items}\n</body></html>"
    )


def import_csv(
    path: Path,
    corpus: Corpus,
    *,
    name_column: str,
    url_column: str,
    text_columns: Sequence[str],
    where: Callable[[dict[str, str]], bool] | None = None,
    limit: int | None = None,
) -> CsvImportReport:
    """Import one document per CSV row (e.g. a company directory).

    Each document has ``url`` from ``url_column`` (``https://`` added when it has no scheme),
    ``title`` from ``name_column``, ``site_name`` the URL's host, ``text`` one line
    ``"<Column label>: <value>"`` per non-empty text column (``column_label``; floats such as
    ``2019.0`` written ``2019``, Python-list strings such as ``['b2b', 'saas']`` written ``b2b, saas``)
    and ``html`` a minimal page with the same lines. Names and values are normalised with
    ``tools.textnorm.normalize_page_text``, as ``extract_document`` does for pages.

    Args:
        path: a UTF-8 CSV file with a header row (quoted multi-line fields are fine).
        corpus: where the documents go.
        name_column: column with the page title (e.g. the company name).
        url_column: column with the website.
        text_columns: columns rendered into the text, in this order.
        where: keep only rows for which this returns True (rows are dicts keyed by header).
        limit: import at most this many rows (after ``where``).

    Returns:
        A ``CsvImportReport``; rows without a name or URL are listed in ``skipped`` with their row
        numbers and not imported.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a named column is not in the header (the message lists the header), or
            ``limit`` < 0.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CSV file at {path}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    report = CsvImportReport()
    docs: dict[str, Document] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in (name_column, url_column, *text_columns) if c not in header]
        if missing:
            raise ValueError(
                f"{path} has no column {', '.join(map(repr, missing))}; its columns are {header}"
            )
        labels = {c: column_label(c) for c in text_columns}
        kept = 0
        for row_number, row in enumerate(_rows(reader), start=2):
            if limit is not None and kept >= limit:
                break
            report.rows_read += 1
            if where is not None and not where(row):
                report.filtered += 1
                continue
            name = " ".join(normalize_page_text(row.get(name_column) or "").split())
            url = _normalise_url(row.get(url_column) or "")
            host = urlsplit(url).hostname if url else None
            if not name or not url or not host:
                problem = "no name" if not name else "no URL" if not url else f"URL {url!r} names no host"
                report.skipped.append((row_number, f"{problem} (columns {name_column!r}, {url_column!r})"))
                continue
            lines = [(labels[c], v) for c in text_columns if (v := _cell_text(row.get(c)))]
            doc = Document(
                url=url,
                title=name,
                site_name=host,
                text="\n".join(f"{label}: {value}" for label, value in lines),
                html=_row_html(name, url, lines),
            )
            key = url_key(url)
            if key in docs:
                report.duplicates.append(row_number)
            docs[key] = doc
            kept += 1
    report.imported = corpus.add_many(docs.values())
    if report.skipped:
        logger.warning(
            "%s: skipped %d rows without name or URL (rows %s)",
            path,
            len(report.skipped),
            ", ".join(str(n) for n, _ in report.skipped[:20]) + (" ..." if len(report.skipped) > 20 else ""),
        )
    logger.info("imported %d documents from %d rows of %s", report.imported, report.rows_read, path)
    return report


def _rows(reader: csv.DictReader[str]) -> Iterator[dict[str, str]]:
    for row in reader:
        yield {k: v for k, v in row.items() if k is not None}


def import_warc(path: Path, corpus: Corpus) -> int:
    """Import every HTML ``response`` record of a WARC file (gzip or plain).

    Args:
        path: the ``.warc`` or ``.warc.gz`` file.
        corpus: where the extracted documents go (``Document.url`` = ``WARC-Target-URI``,
            ``status_code`` from the recorded HTTP status).

    Returns:
        How many pages were imported; non-HTML responses and other record types are skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        warcio.exceptions.ArchiveLoadFailed: the file is not a WARC archive.
    """
    from warcio.archiveiterator import ArchiveIterator

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no WARC file at {path}")
    imported = 0
    docs: list[Document] = []
    with path.open("rb") as stream:
        for record in ArchiveIterator(stream):
            if record.rec_type != "response" or record.http_headers is None:
                continue
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            content_type = record.http_headers.get_header("Content-Type") or ""
            media_type = content_type.split(";", 1)[0].strip().lower()
            if media_type not in ("text/html", "application/xhtml+xml") or not url:
                continue
            charset_match = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", content_type, re.IGNORECASE)
            body = record.content_stream().read()
            try:
                status = int(record.http_headers.get_statuscode() or 200)
            except ValueError:
                status = 200
            html = decode_html(body, charset_match.group(1) if charset_match else None)
            docs.append(extract_document(html, url, status_code=status))
            if len(docs) >= _BATCH:
                imported += corpus.add_many(docs)
                docs = []
    imported += corpus.add_many(docs)
    logger.info("imported %d HTML pages from %s", imported, path)
    return imported
