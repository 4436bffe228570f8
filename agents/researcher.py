"""The researcher agent: finds pages about a prospect's company and extracts grounded facts.

Steps (DESIGN.md, "Grounding by construction"): plan 2-3 search queries by rule, search, rank
candidate URLs (the prospect's own domain first; other pages only when they name the company; never a
near-namesake's site), fetch concurrently, split and filter the untrusted page text into numbered
sentences, make one model call that cites sentence ids (its typed task, ``core.tasks.ExtractionTask``,
goes with the call), and keep only facts whose evidence resolves and contains the value.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agents.attribution import CompanyMatcher, company_core_name, registrable_domain
from agents.grounding import NumberedSentences, ground_facts, host_of, number_sentences
from agents.parsing import ainvoke_structured
from agents.prompts import EXTRACTION_SYSTEM_PROMPT, FIELD_DESCRIPTIONS, render_extraction_user
from agents.schemas import FACT_FIELDS, ExtractionOutput, Profile, ProspectInfo, ResearchResult
from core.tasks import ExtractionTask, FieldSpec
from tools.search import quote_phrase
from tools.types import Document, FetchError, SearchError, SearchHit, Web

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import BaseMessage
    from langchain_core.runnables import RunnableConfig

__all__ = [
    "attributed_documents",
    "build_extraction_messages",
    "extraction_task",
    "plan_queries",
    "rank_urls",
    "research",
]

logger = logging.getLogger(__name__)

_SEARCH_RESULTS = 8
_NAMESAKE_RATIO = 0.6
_NON_WORD = re.compile(r"[\W_]+")


def plan_queries(prospect: ProspectInfo) -> list[str]:
    """Return the search queries for ``prospect``, by rule (2 or 3 of them), in the query grammar of
    ``tools.search.parse_query`` (quoted phrases must appear as written; the same text goes to ddgs).

    With ``name`` the company name without its legal suffix (``company_core_name``) and ``domain`` the
    registrable domain of the website: ``'"{name}"'``; ``'"{domain}"'`` when the prospect has a
    website (one phrase, so a corpus never searches ``com`` alone; it finds the own site by its
    address and third-party pages that name the domain); ``'"{name}" news'`` (news that names the
    company). E.g. ``['"Acme Freight"', '"acme.example"', '"Acme Freight" news']``.

    Raises:
        ValueError: the prospect has no company name (or one without a letter or digit).
    """
    company = prospect.company.strip()
    if not company:
        raise ValueError(f"prospect {prospect.email!r} has no company name; fill the 'company' column")
    try:
        name = quote_phrase(company_core_name(company))
    except ValueError as exc:
        raise ValueError(f"prospect {prospect.email!r}: company name {company!r} has no letter or digit; "
                         "fill the 'company' column with the company's name") from exc
    queries = [name]
    domain = registrable_domain(prospect.website)
    if domain:
        queries.append(quote_phrase(domain))
    queries.append(f"{name} news")
    return queries


def _slug(text: str) -> str:
    """Letters and digits of ``text`` in lower case (``"Acme-Freight.io"`` -> ``"acmefreightio"``)."""
    return _NON_WORD.sub("", text.casefold())


def _resembles(host: str, company_slug: str) -> bool:
    """True when the host's registrable name (``acmefreightco`` of ``www.acmefreightco.co.uk``) looks
    like the company name: one contains the other, or ``difflib`` similarity >= ``_NAMESAKE_RATIO``."""
    name = _slug(registrable_domain(host).split(".", 1)[0])
    if not name or not company_slug:
        return False
    if name in company_slug or company_slug in name:
        return True
    return difflib.SequenceMatcher(None, name, company_slug).ratio() >= _NAMESAKE_RATIO


def _canonical(url: str) -> str:
    """Dedup key: host without ``www.``, path without trailing slash, query; scheme and fragment ignored
    ('' for an unparsable URL, which is then skipped)."""
    try:
        parts = urlsplit(url.strip() if "//" in url else f"//{url.strip()}")
    except ValueError:
        return ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{host_of(url)}{parts.path.rstrip('/')}{query}"


def rank_urls(prospect: ProspectInfo, hits: Sequence[SearchHit], *, max_pages: int = 5,
              matcher: CompanyMatcher | None = None) -> list[str]:
    """Choose up to ``max_pages`` unique URLs to fetch, best first.

    Attribution decides what may be fetched (``agents.attribution.CompanyMatcher``):

    0. the prospect's website home page (in the spelling a search hit used, if any), then the hits on
       its registrable domain, subdomains included (``blog.acme.example``), in search order;
    1. third-party hits whose title or snippet names the company (name or domain, whole words), in
       search order.

    Never chosen: a third-party hit whose title and snippet do not name the company (a page about
    someone else, or about the common word the name also is), and any hit on another host whose name
    resembles the company's (``acmefreightco.example`` for Acme Freight at ``acme.example``): that is a
    namesake company's own site, where the name names the namesake. Without a website nothing is own:
    hits naming the company on hosts resembling its name rank first, then the other hits naming it.

    Args:
        prospect: The prospect (its ``website`` defines the own domain, ``company`` the names).
        hits: Search hits from all queries, in the order found (duplicates allowed).
        max_pages: Most URLs returned (>= 1).
        matcher: The prospect's ``CompanyMatcher`` when the caller has one (built from ``prospect``
            otherwise).

    Returns:
        URLs to fetch.

    Raises:
        ValueError: ``max_pages`` < 1.
    """
    if max_pages < 1:
        raise ValueError(f"max_pages must be at least 1, got {max_pages}")
    matcher = matcher or CompanyMatcher(prospect.company, prospect.website)
    company_slug = _slug(company_core_name(prospect.company))
    home = prospect.website.strip()
    if home and "//" not in home:
        home = f"https://{home}"
    # The home page comes first; when search found it under another spelling (www., trailing
    # slash), the spelling the search backend knows is fetched.
    named = {_canonical(h.url) for h in hits if h.url and matcher.names(f"{h.title}\n{h.snippet}")}
    hit_urls = [h.url.split("#", 1)[0] for h in hits if h.url]
    found = {_canonical(u): u for u in reversed(hit_urls)}
    candidates = ([found.get(_canonical(home), home)] if home else []) + hit_urls
    scored: list[tuple[int, int, str]] = []
    seen: set[str] = set()
    for order, url in enumerate(candidates):
        key = _canonical(url)
        if not url or key in seen or not host_of(url):
            continue
        seen.add(key)
        if matcher.is_own(url):
            tier = 0
        elif key not in named:
            logger.debug("rank %s: skipping %s (search hit does not name the company)", prospect.company, url)
            continue
        elif not matcher.own_domain:
            tier = 0 if _resembles(host_of(url), company_slug) else 1
        elif _resembles(host_of(url), company_slug):
            logger.debug("rank %s: skipping %s (a near-namesake's host)", prospect.company, url)
            continue
        else:
            tier = 1
        scored.append((tier, order, url))
    scored.sort()
    return [url for _tier, _order, url in scored[:max_pages]]


def attributed_documents(matcher: CompanyMatcher, documents: Sequence[Document]) -> list[Document]:
    """Keep the fetched documents that may be about the company, in input order.

    A document on the company's own registrable domain (``matcher.is_own``) is kept; a third-party
    document is kept only when its title or text names the company (``matcher.names``: name or
    domain, whole words), so a page about another company, a near-namesake or the common word the
    name also is never reaches the prompt. Grounding still checks each sentence.

    Args:
        matcher: The prospect's ``CompanyMatcher``.
        documents: Fetched documents.

    Returns:
        The kept documents; each dropped one is logged at INFO with its URL.
    """
    kept: list[Document] = []
    for doc in documents:
        if matcher.is_own(doc.url) or matcher.names(f"{doc.title}\n{doc.text}"):
            kept.append(doc)
        else:
            logger.info("research %s: dropped %s (a third-party page that never names the company)",
                        matcher.company, doc.url)
    return kept


def extraction_task(prospect: ProspectInfo, numbered: NumberedSentences,
                    fields: Sequence[str] = FACT_FIELDS) -> ExtractionTask:
    """The researcher's typed task: fill ``fields`` about the prospect's company from ``numbered``.

    Args:
        prospect: whose company (name and website as given, outer whitespace removed).
        numbered: the numbered sentences shown to the model (``agents.grounding.number_sentences``).
        fields: the profile fields asked for, in prompt order, each described by ``FIELD_DESCRIPTIONS``.

    Raises:
        ValueError: a field is not one of ``agents.schemas.FACT_FIELDS``.
    """
    unknown = [f for f in fields if f not in FIELD_DESCRIPTIONS]
    if unknown:
        raise ValueError(f"unknown profile field(s) {unknown}; ask for fields of {', '.join(FACT_FIELDS)}")
    return ExtractionTask(
        company=prospect.company.strip(),
        website=prospect.website.strip(),
        fields=tuple(FieldSpec(name=f, description=FIELD_DESCRIPTIONS[f]) for f in fields),
        sentences=numbered.task_sentences(),
    )


def build_extraction_messages(task: ExtractionTask) -> list[BaseMessage]:
    """Build the extraction prompt of ``task``: ``EXTRACTION_SYSTEM_PROMPT`` and the user message
    ``agents.prompts.render_extraction_user`` renders (company, website, field list, numbered sentences
    by source)."""
    from langchain_core.messages import HumanMessage, SystemMessage

    return [SystemMessage(content=EXTRACTION_SYSTEM_PROMPT), HumanMessage(content=render_extraction_user(task))]


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
        The profile (``sources`` = fetched URLs attributed to the company: its own site, or third-party
        pages that name it; ``drop_reasons`` = model facts that failed grounding, by reason, and
        ``dropped_facts`` their total), the queries used and the fetch/search errors as strings.

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
    matcher = CompanyMatcher(prospect.company, prospect.website)
    urls = rank_urls(prospect, hits, max_pages=max_pages, matcher=matcher)
    documents: list[Document] = []
    for fetched in await asyncio.gather(*(_fetch(web, u) for u in urls)):
        if isinstance(fetched, FetchError):
            errors.append(str(fetched))
        else:
            documents.append(fetched)
    for err in errors:
        logger.info("research %s: %s", prospect.company, err)

    documents = attributed_documents(matcher, documents)
    profile = Profile(
        company=prospect.company, website=prospect.website, sources=[d.url for d in documents]
    )
    numbered = number_sentences(documents, own_host=host_of(prospect.website))
    if not numbered.sentences:
        logger.warning("research %s: no usable page text (%d page(s) fetched); profile has no facts",
                       prospect.company, len(documents))
        return ResearchResult(profile=profile, queries=queries, fetch_errors=errors)

    task = extraction_task(prospect, numbered)
    output = await ainvoke_structured(model, build_extraction_messages(task), ExtractionOutput,
                                      agent="researcher", config=config, task=task)
    facts, drops = ground_facts(output, numbered, documents, matcher=matcher)
    profile.facts = facts
    profile.drop_reasons = drops
    profile.dropped_facts = sum(drops.values())
    logger.info("research %s: %d fact(s) kept, dropped %s, %d sentence(s) from %d page(s)",
                prospect.company, len(facts), drops or "none", len(numbered.sentences), len(documents))
    return ResearchResult(profile=profile, queries=queries, fetch_errors=errors)
