"""Turn one HTML page into a ``Document``: main text (trafilatura), metadata and schema.org JSON-LD.

Every page, live or from the local corpus, goes through ``extract_document`` so that the researcher
sees the same text whichever web it uses. ``Document.text`` is the main text as markdown followed by
metadata lines that the grounding check also accepts as evidence::

    <main text as markdown>

    Description: <meta description>
    Organization name: Brightlane Analytics
    Organization address.addressLocality: Austin
    Organization numberOfEmployees.value: 120

Every string of the document (text, title, site name, description, JSON-LD values) is normalised
with ``tools.textnorm.normalize_page_text`` (NFKC, invisible characters removed, look-alike letters
folded), so the corpus stores what the live path produces and no reader sees hidden characters.

Main-text extraction is trafilatura's (Barbaresi, "Trafilatura: A Web Scraping Library and
Command-Line Tool for Text Discovery and Extraction", ACL 2021); when it finds nothing (tiny pages)
the visible text of ``<body>`` is used instead, so a page with words never yields empty text.
"""

from __future__ import annotations

import html as html_lib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

from tools.textnorm import normalize_page_text
from tools.types import Document

__all__ = ["ORGANIZATION_TYPES", "decode_html", "extract_document", "jsonld_evidence_lines", "parse_jsonld"]

logger = logging.getLogger(__name__)

#: schema.org types treated as "Organization-like" (their scalar properties become evidence lines).
#: Any type whose name ends in ``Organization``, ``Business``, ``Corporation`` or ``Store`` counts too.
ORGANIZATION_TYPES: frozenset[str] = frozenset(
    {
        "Organization",
        "Corporation",
        "LocalBusiness",
        "OnlineBusiness",
        "OnlineStore",
        "NGO",
        "Consortium",
        "Airline",
        "ProfessionalService",
        "Brand",
    }
)
_ORG_SUFFIXES = ("Organization", "Business", "Corporation", "Store")

_MAX_JSONLD_LINES = 200
_MAX_VALUE_CHARS = 1000
_WS = re.compile(r"\s+")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_INVISIBLE_TAGS = ("script", "style", "noscript", "template", "svg", "head")


def decode_html(data: bytes, declared_charset: str | None = None, *, strict: bool = False) -> str:
    """Decode raw page bytes to text.

    Tries, in order, ``declared_charset`` (e.g. from a ``Content-Type`` header), a ``<meta charset>``
    in the first 4 KB, then UTF-8.

    Args:
        data: the page as bytes.
        declared_charset: a charset named by the transport, or None.
        strict: raise instead of replacing undecodable bytes with U+FFFD.

    Returns:
        The decoded text.

    Raises:
        UnicodeDecodeError: ``strict`` is set and no candidate charset decodes ``data``.
    """
    candidates: list[str] = []
    if declared_charset:
        candidates.append(declared_charset.strip().strip("\"'"))
    if match := _META_CHARSET.search(data[:4096]):
        candidates.append(match.group(1).decode("ascii", "ignore"))
    candidates.append("utf-8")
    last_error: UnicodeDecodeError | None = None
    for name in candidates:
        try:
            return data.decode(name)
        except LookupError:
            logger.debug("unknown charset %r, trying the next one", name)
        except UnicodeDecodeError as exc:
            last_error = exc
    if strict:
        assert last_error is not None
        raise last_error
    return data.decode("utf-8", errors="replace")


def _collapse(value: str) -> str:
    return _WS.sub(" ", value).strip()


def _flatten_graph(obj: Any) -> Iterator[dict[str, Any]]:
    """Yield the top-level nodes of a parsed JSON-LD value (lists and ``@graph`` expanded)."""
    if isinstance(obj, list):
        for item in obj:
            yield from _flatten_graph(item)
    elif isinstance(obj, dict):
        graph = obj.get("@graph")
        if isinstance(graph, list | dict):
            context = obj.get("@context")
            for node in _flatten_graph(graph):
                if context is not None and "@context" not in node:
                    node = {"@context": context, **node}
                yield node
            rest = {k: v for k, v in obj.items() if k != "@graph"}
            if any(not k.startswith("@") for k in rest):
                yield rest
        else:
            yield obj


def parse_jsonld(tree: Any, *, url: str = "") -> list[dict[str, Any]]:
    """Parse every ``<script type="application/ld+json">`` block of a page.

    Args:
        tree: an lxml HTML element (the parsed page).
        url: the page's address, used only in log messages.

    Returns:
        The JSON-LD nodes as a flat list of dicts: top-level lists are expanded and each node of an
        ``@graph`` becomes its own dict (carrying the enclosing ``@context``). Blocks that are not valid
        JSON are skipped with a warning.
    """
    nodes: list[dict[str, Any]] = []
    for script in tree.iter("script"):
        kind = (script.get("type") or "").strip().lower()
        if kind != "application/ld+json":
            continue
        raw = (script.text or "").strip()
        if not raw:
            continue
        # Some CMSs wrap the JSON in HTML comments or CDATA markers.
        raw = re.sub(r"^\s*(<!--|/\*<!\[CDATA\[\*/|<!\[CDATA\[)|(-->|/\*\]\]>\*/|\]\]>)\s*$", "", raw)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            logger.warning("ignoring broken JSON-LD block on %s: %s", url or "(page)", exc)
            continue
        nodes.extend(_flatten_graph(value))
    return nodes


def _normalized_json(obj: Any) -> Any:
    """``obj`` (parsed JSON) with every string, keys included, passed through ``normalize_page_text``."""
    if isinstance(obj, str):
        return normalize_page_text(obj)
    if isinstance(obj, list):
        return [_normalized_json(item) for item in obj]
    if isinstance(obj, dict):
        return {normalize_page_text(k): _normalized_json(v) for k, v in obj.items()}
    return obj


def _types(node: dict[str, Any]) -> list[str]:
    value = node.get("@type")
    values = value if isinstance(value, list) else [value]
    # "http://schema.org/Organization" and "schema:Organization" name the same type.
    return [re.split(r"[/:#]", v)[-1] for v in values if isinstance(v, str) and v]


def _org_type(node: dict[str, Any]) -> str | None:
    for name in _types(node):
        if name in ORGANIZATION_TYPES or name.endswith(_ORG_SUFFIXES):
            return name
    return None


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if isinstance(value, str):
        text = _collapse(html_lib.unescape(value))
        return text[:_MAX_VALUE_CHARS] if text else None
    return None


def _flatten_properties(obj: Any, prefix: str, depth: int = 0) -> Iterator[tuple[str, str]]:
    if depth > 4:
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key.startswith("@"):
                continue
            yield from _flatten_properties(value, f"{prefix}.{key}" if prefix else key, depth + 1)
    elif isinstance(obj, list):
        for item in obj:
            yield from _flatten_properties(item, prefix, depth + 1)
    elif prefix and (text := _scalar_text(obj)) is not None:
        yield prefix, text


def _organization_nodes(obj: Any, depth: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(type, node)`` for Organization-like nodes, searching inside other nodes too
    (e.g. the ``publisher`` of a ``WebPage``); an Organization's own nested objects are not searched."""
    if depth > 6:
        return
    if isinstance(obj, dict):
        if org_type := _org_type(obj):
            yield org_type, obj
            return
        for key, value in obj.items():
            if not key.startswith("@") or key == "@graph":
                yield from _organization_nodes(value, depth + 1)
    elif isinstance(obj, list):
        for item in obj:
            yield from _organization_nodes(item, depth + 1)


def jsonld_evidence_lines(nodes: list[dict[str, Any]]) -> list[str]:
    """Render the scalar properties of Organization-like JSON-LD nodes as evidence lines.

    Args:
        nodes: JSON-LD nodes as returned by ``parse_jsonld``.

    Returns:
        Lines ``"<@type> <property>: <value>"`` with nested objects flattened with dots (e.g.
        ``"Organization address.addressLocality: Austin"``); list items each get their own line;
        duplicates are dropped and at most 200 lines are returned.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for org_type, node in _organization_nodes(nodes):
        for prop, value in _flatten_properties(node, ""):
            line = f"{org_type} {prop}: {value}"
            if line not in seen:
                seen.add(line)
                lines.append(line)
                if len(lines) >= _MAX_JSONLD_LINES:
                    return lines
    return lines


def _visible_body_text(tree: Any) -> str:
    """Whitespace-collapsed visible text of ``<body>`` (scripts, styles and templates removed)."""
    from copy import deepcopy

    bodies = tree.xpath("//body") if tree.tag != "body" else [tree]
    root = deepcopy(bodies[0] if bodies else tree)
    for element in list(root.iter(*_INVISIBLE_TAGS)):
        parent = element.getparent()
        if parent is not None:
            tail = element.tail
            parent.remove(element)
            if tail:  # keep the text that follows the removed element
                prev = parent[-1] if len(parent) else None
                if prev is not None:
                    prev.tail = (prev.tail or "") + " " + tail
                else:
                    parent.text = (parent.text or "") + " " + tail
    # text_content() glues adjacent blocks together; iterating text nodes keeps word boundaries.
    return _collapse(" ".join(t for t in root.itertext() if t and t.strip()))


def _parse(html: str) -> Any:
    import lxml.html
    from trafilatura import load_html

    tree = load_html(html)
    if tree is not None:
        return tree
    # trafilatura refuses fragments ("<p>hi</p>"); parse those as a document body instead.
    try:
        return lxml.html.document_fromstring(f"<html><body>{html}</body></html>")
    except Exception:  # noqa: BLE001 - lxml raises several types for garbage; an empty page is the answer
        logger.debug("could not parse HTML", exc_info=True)
        return None


def extract_document(html: str, url: str, *, status_code: int = 200) -> Document:
    """Extract a page's main text, metadata and JSON-LD into a ``Document``.

    Args:
        html: the page as text (decode bytes with ``decode_html`` first).
        url: the page's address (final URL after redirects); stored on the document and given to
            trafilatura for metadata.
        status_code: the HTTP status the page came with.

    Returns:
        A ``Document`` whose ``text`` is trafilatura's markdown of the main content (with
        ``favor_recall=True``, tables kept, links and comments dropped), or the visible body text when
        trafilatura finds nothing, followed by a blank line and the evidence lines (``Description:``
        and Organization-like JSON-LD properties, see ``jsonld_evidence_lines``). ``title``,
        ``site_name``, ``date`` (ISO ``YYYY-MM-DD``) and ``description`` come from trafilatura's
        metadata (meta tags, OpenGraph, JSON-LD, htmldate); empty strings when absent. Every string
        but ``html`` (the raw page) is normalised (``normalize_page_text``), JSON-LD values and
        keys included. Alt text and other attributes are not part of the text. An empty
        or unparsable page gives a document with empty text, never an exception.

    Raises:
        TypeError: ``html`` is not a ``str``.
    """
    if not isinstance(html, str):
        raise TypeError(f"extract_document needs the page as str, got {type(html).__name__}; decode bytes "
                        "with tools.extract.decode_html first")
    if not html.strip():
        return Document(url=url, html=html, status_code=status_code)
    tree = _parse(html)
    if tree is None:
        return Document(url=url, html=html, status_code=status_code)

    jsonld = [_normalized_json(node) for node in parse_jsonld(tree, url=url)]

    from trafilatura import bare_extraction, extract_metadata
    from trafilatura.xml import xmltotxt

    main_text = ""
    meta: Any = None
    try:
        result = bare_extraction(
            tree,
            url=url,
            output_format="markdown",
            favor_recall=True,
            include_comments=False,
            include_tables=True,
            include_links=False,
            include_images=False,
            with_metadata=True,
        )
    except Exception:  # noqa: BLE001 - a trafilatura bug must not lose the page; fall back below
        logger.warning("trafilatura failed on %s; using the visible body text", url, exc_info=True)
        result = None
    if result is not None:
        meta = result
        body = getattr(result, "body", None)  # a trafilatura Document (never a dict: as_dict is off)
        if body is not None:
            main_text = xmltotxt(body, True).strip()
    if meta is None:
        try:
            meta = extract_metadata(tree, url)
        except Exception:  # noqa: BLE001
            logger.debug("metadata extraction failed on %s", url, exc_info=True)
    if not main_text:
        main_text = _visible_body_text(tree)

    def field(name: str) -> str:
        value = getattr(meta, name, None) if meta is not None else None
        return _collapse(normalize_page_text(str(value))) if value else ""

    title, description = field("title"), field("description")
    if not title:
        titles = tree.xpath("//title/text()")
        title = _collapse(normalize_page_text(titles[0])) if titles else ""
    main_text = normalize_page_text(main_text)

    evidence = ([f"Description: {description}"] if description else []) + jsonld_evidence_lines(jsonld)
    text = main_text
    if evidence:
        text = f"{main_text}\n\n" + "\n".join(evidence) if main_text else "\n".join(evidence)
    return Document(
        url=url,
        title=title,
        site_name=field("sitename"),
        date=field("date"),
        description=description,
        text=text,
        jsonld=jsonld,
        html=html,
        status_code=status_code,
    )
