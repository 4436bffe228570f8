"""The researcher agent: finds pages about a prospect's company and extracts grounded facts.

Steps (DESIGN.md, "Grounding by construction"): plan 2-3 search queries by rule, search, rank
candidate URLs (the prospect's own host first, near-namesake hosts last), fetch concurrently, split
and filter the untrusted page text into numbered sentences, make one model call that cites
sentence ids, and keep only facts whose evidence resolves and contains the value.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agents.grounding import ground_facts, host_of, number_sentences
from agents.parsing import ainvoke_structured
from agents.prompts import EXTRACTION_SYSTEM_PROMPT, EXTRACTION_USER_TEMPLATE, FIELD_DESCRIPTIONS
from agents.schemas import FACT_FIELDS, ExtractionOutput, Profile, ProspectInfo, ResearchResult
from tools.types import Document, FetchError, SearchError, SearchHit, Web

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import BaseMessage
    from langchain_core.runnables import RunnableConfig

__all__ = [
    "build_extraction_messages",
    "plan_queries",
    "rank_urls",
    "research",
]

logger = logging.getLogger(__name__)

_SEARCH_RESULTS = 8
_NAMESAKE_RATIO = 0.6
_COMPANY_SUFFIXES = re.compile(
    r"\b(?:inc|llc|ltd|limited|gmbh|corp|corporation|co|company|sa|sas|plc|ag|bv|oy|ab)\b\.?", re.IGNORECASE
)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def plan_queries(prospect: ProspectInfo) -> list[str]:
    """Return the search queries for ``prospect``, by rule (2 or 3 of them).

    ``"{company}"``, ``"{company} {host}"`` when the prospect has a website, and ``"{company} news"``.

    Raises:
        ValueError: the prospect has no company name.
    """
    company = prospect.company.strip()
    if not company:
        raise ValueError(f"prospect {prospect.email!r} has no company name; fill the 'company' column")
    queries = [company]
    host = host_of(prospect.website)
    if host:
        queries.append(f"{company} {host}")
    queries.append(f"{company} news")
    return queries


def _slug(text: str) -> str:
    return _NON_ALNUM.sub("", _COMPANY_SUFFIXES.sub(" ", text.lower()))


def _resembles(host: str, company_slug: str) -> bool:
    """True when the host's registrable name looks like the company name."""
    labels = host.split(".")
    name = _NON_ALNUM.sub("", labels[-2] if len(labels) >= 2 else labels[0])
    if not name or not company_slug:
        return False
    if name in company_slug or company_slug in name:
        return True
    return difflib.SequenceMatcher(None, name, company_slug).ratio() >= _NAMESAKE_RATIO


def _canonical(url: str) -> str:
    """Dedup key: host without ``www.``, path without trailing slash, query; scheme and fragment ignored."""
    parts = urlsplit(url.strip() if "//" in url else f"//{url.strip()}")
    query = f"?{parts.query}" if parts.query else ""
    return f"{host_of(url)}{parts.path.rstrip('/')}{query}"


def rank_urls(prospect: ProspectInfo, hits: Sequence[SearchHit], *, max_pages: int = 5) -> list[str]:
    """Choose up to ``max_pages`` unique URLs to fetch, best first.

    Order: the prospect's website home page (in the spelling a search hit used, if any), then pages
    on the same host (ignoring ``www.``), then
    other hosts (news, directories) in search order, and last the hosts whose name only resembles
    the company's (near-namesake companies). Without a website, hosts resembling the company name
    rank first instead.

    Args:
        prospect: The prospect (its ``website`` defines the own host).
        hits: Search hits from all queries, in the order found (duplicates allowed).
        max_pages: Most URLs returned (>= 1).

    Returns:
        URLs to fetch.

    Raises:
        ValueError: ``max_pages`` < 1.
    """
    if max_pages < 1:
        raise ValueError(f"max_pages must be at least 1, got {max_pages}")
    own = host_of(prospect.website)
    company_slug = _slug(prospect.company)
    home = prospect.website.strip()
    if home and "//" not in home:
        home = f"https://{home}"
    # The home page comes first; when search found it under another spelling (www., trailing
    # slash), the spelling the search backend knows is fetched.
    hit_urls = [h.url.split("#", 1)[0] for h in hits if h.url]
    found = {_canonical(u): u for u in reversed(hit_urls)}
    candidates = ([found.get(_canonical(home), home)] if home else []) + hit_urls
    scored: list[tuple[int, int, str]] = []
    seen: set[str] = set()
    for order, url in enumerate(candidates):
        key = _canonical(url)
        if not url or key in seen:
            continue
        seen.add(key)
        host = host_of(url)
        if not host:
            continue
        if own:
            tier = 0 if host == own else (2 if _resembles(host, company_slug) else 1)
        else:
            tier = 0 if _resembles(host, company_slug) else 1
        scored.append((tier, order, url))
    scored.sort()
    return [url for _tier, _order, url in scored[:max_pages]]


def build_extraction_messages(prospect: ProspectInfo, sentences_block: str) -> list[BaseMessage]:
    """Build the extraction prompt: ``EXTRACTION_SYSTEM_PROMPT`` and a user message from
    ``EXTRACTION_USER_TEMPLATE`` (company, website, field list, numbered sentences by source)."""
    from langchain_core.messages import HumanMessage, SystemMessage

    fields = "\n".join(f"- {name}: {FIELD_DESCRIPTIONS[name]}" for name in FACT_FIELDS)
    user = EXTRACTION_USER_TEMPLATE.format(
        company=prospect.company.strip(),
        website=prospect.website.strip() or "(unknown)",
        fields=fields,
        sentences=sentences_block,
    )
    return [SystemMessage(content=EXTRACTION_SYSTEM_PROMPT), HumanMessage(content=user)]


async def _search(web: Web, query: str) -> list[SearchHit] | SearchError:
    try:
        return await web.search(query, max_results=_SEARCH_RESULTS)
    except SearchError as exc:
        return exc


async def _fetch(web: Web, url: str) -> Document | FetchError:
    try:
        return await web.fetch(url)
    except FetchError as exc:
        return exc


async def research(
    prospect: ProspectInfo,
    *,
    model: BaseChatModel,
    web: Web,
    config: RunnableConfig | None = None,
    max_pages: int = 5,
) -> ResearchResult:
    """Research ``prospect``'s company and return a grounded profile.

    Searches run concurrently, then the chosen pages are fetched concurrently. A ``SearchError`` or
    ``FetchError`` is recorded in ``ResearchResult.fetch_errors`` and research continues with what it
    has; with no usable sentences the model is not called and the profile has no facts. The model is
    called once (plus one retry on an unparseable answer) with ``config`` forwarded.

    Args:
        prospect: Who to research (``company`` required; ``website`` strongly recommended).
        model: The researcher's chat model (teacher or miniature); never built here.
        web: Search and fetch (``tools.types.Web``).
        config: Run config of the graph node (callbacks record the trace).
        max_pages: Most pages fetched (>= 1).

    Returns:
        The profile (``sources`` = fetched URLs, ``dropped_facts`` = model facts that failed
        grounding), the queries used and the fetch/search errors as strings.

    Raises:
        ValueError: no company name, or ``max_pages`` < 1.
        ModelOutputError: the model's answer was not valid JSON twice.
    """
    queries = plan_queries(prospect)
    errors: list[str] = []
    hits: list[SearchHit] = []
    for query, result in zip(
        queries, await asyncio.gather(*(_search(web, q) for q in queries)), strict=True
    ):
        if isinstance(result, SearchError):
            errors.append(f"search {query!r}: {result}")
        else:
            hits.extend(result)
    urls = rank_urls(prospect, hits, max_pages=max_pages)
    documents: list[Document] = []
    for fetched in await asyncio.gather(*(_fetch(web, u) for u in urls)):
        if isinstance(fetched, FetchError):
            errors.append(str(fetched))
        else:
            documents.append(fetched)
    for err in errors:
        logger.info("research %s: %s", prospect.company, err)

    profile = Profile(
        company=prospect.company, website=prospect.website, sources=[d.url for d in documents]
    )
    numbered = number_sentences(documents, own_host=host_of(prospect.website))
    if not numbered.sentences:
        logger.warning("research %s: no usable page text (%d page(s) fetched); profile has no facts",
                       prospect.company, len(documents))
        return ResearchResult(profile=profile, queries=queries, fetch_errors=errors)

    messages = build_extraction_messages(prospect, numbered.format())
    output = await ainvoke_structured(model, messages, ExtractionOutput, agent="researcher", config=config)
    facts, dropped = ground_facts(output, numbered, documents)
    profile.facts = facts
    profile.dropped_facts = dropped
    logger.info("research %s: %d fact(s) kept, %d dropped, %d sentence(s) from %d page(s)",
                prospect.company, len(facts), dropped, len(numbered.sentences), len(documents))
    return ResearchResult(profile=profile, queries=queries, fetch_errors=errors)
