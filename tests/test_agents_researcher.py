"""The researcher: query planning, URL ranking, grounding of model facts, retries, prompt injection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents import ModelOutputError, ProspectInfo, plan_queries, rank_urls, research
from agents.attribution import CompanyMatcher
from agents.prompts import EXTRACTION_SYSTEM_PROMPT
from agents.researcher import attributed_documents
from evals.realdata import load_yc_companies
from tests.test_agents_support import ACME_NEWS, HOSTILE, FakeWeb, PromptRecorder, acme_web, scripted
from tools.corpus import Corpus, CorpusWeb
from tools.corpus_import import import_csv
from tools.search import DdgsSearch
from tools.types import Document, SearchHit

PROSPECT = ProspectInfo(first_name="Dana", email="dana@acme.example", company="Acme Freight",
                        website="https://www.acme.example/")


def facts_json(*facts: tuple[str, str, str]) -> str:
    return json.dumps({"facts": [{"field": f, "value": v, "evidence": e} for f, v, e in facts]})


def sid_of(prompt: str, fragment: str) -> str:
    """The id of the prompt line containing ``fragment``."""
    line = next(ln for ln in prompt.splitlines() if fragment in ln and ln.startswith("S"))
    return line.split(":", 1)[0]


def test_plan_queries_are_phrases_on_the_name_and_the_domain() -> None:
    assert plan_queries(PROSPECT) == ['"Acme Freight"', '"acme.example"', '"Acme Freight" news']
    assert plan_queries(PROSPECT.model_copy(update={"website": ""})) == ['"Acme Freight"', '"Acme Freight" news']
    # the legal suffix is left out (pages write "Acme Freight"), a subdomain website gives its domain,
    # and quotes inside a name cannot unbalance the phrase
    odd = PROSPECT.model_copy(update={"company": 'Acme "Freight", Inc.', "website": "https://blog.acme.co.uk/x"})
    assert plan_queries(odd) == ['"Acme Freight"', '"acme.co.uk"', '"Acme Freight" news']
    with pytest.raises(ValueError, match="company"):
        plan_queries(PROSPECT.model_copy(update={"company": " "}))
    with pytest.raises(ValueError, match="no letter or digit"):
        plan_queries(PROSPECT.model_copy(update={"company": '"?"'}))


def hit(url: str, title: str = "", snippet: str = "") -> SearchHit:
    return SearchHit(url=url, title=title, snippet=snippet)


def test_rank_urls_own_domain_first_then_pages_that_name_the_company() -> None:
    hits = [
        hit("https://acmefreightco.example/", "Acme Freightco", "Acme Freightco was founded in 1999."),
        hit("https://acmefreight.io/", "Acme Freight (UK)", "Acme Freight, the Leeds haulier."),  # namesake host
        hit("https://news.example/acme", "Logistics news", "Acme Freight raised a Series A."),
        hit("https://news.example/other", "Logistics news", "Brightline raised a seed round."),
        hit("https://acme.example/about"),                       # own pages need no mention
        hit("https://www.acme.example/#top"),
        hit("https://blog.acme.example/post", "Our blog"),       # a subdomain is own
        hit("https://acme.example/about/"),
        hit("https://dir.example/acme", "Directory", "Visit acme.example for quotes."),  # names the domain
    ]
    assert rank_urls(PROSPECT, hits, max_pages=8) == [
        "https://www.acme.example/", "https://acme.example/about", "https://blog.acme.example/post",
        "https://news.example/acme", "https://dir.example/acme"]
    assert rank_urls(PROSPECT, hits, max_pages=2) == ["https://www.acme.example/", "https://acme.example/about"]
    with pytest.raises(ValueError, match="max_pages"):
        rank_urls(PROSPECT, hits, max_pages=0)


def test_rank_urls_one_word_common_name_and_near_namesakes() -> None:
    fume = ProspectInfo(first_name="Ty", email="ty@fumedev.com", company="Fume", website="https://fumedev.com")
    hits = [
        hit("https://safety.example/welding", "Welding safety", "Extract toxic fume at the source."),
        hit("https://hn.example/show", "Show HN: Fume", "Fume writes your Playwright tests."),
        hit("https://fumedev.com/"),
        hit("https://fume.example/", "Fume Inc.", "Fume Inc. sells fume hoods."),  # namesake host, named
    ]
    assert rank_urls(fume, hits) == ["https://fumedev.com/", "https://hn.example/show"]
    bright = ProspectInfo(first_name="Al", email="al@brightlane.example", company="Brightlane",
                          website="brightlane.example")
    hits = [hit("https://brightline.example/", "Brightline", "Brightline trains run to Orlando."),
            hit("https://roundup.example/w", "Week in retail AI",
                "Seed rounds for Brightline, Brightlane and Quorvanta this week.")]
    assert rank_urls(bright, hits) == ["https://brightlane.example", "https://roundup.example/w"]


def test_rank_urls_without_a_website_wants_a_mention_and_puts_lookalike_hosts_first() -> None:
    nosite = PROSPECT.model_copy(update={"website": ""})
    hits = [hit("https://news.example/a", "News", "Acme Freight hires."),
            hit("https://acmefreight.example/", "Acme Freight", "Home of Acme Freight."),
            hit("https://random.example/", "Freight news", "Acme Logistics and Freight Co.")]
    assert rank_urls(nosite, hits) == ["https://acmefreight.example/", "https://news.example/a"]


def test_attributed_documents_drop_third_party_pages_that_never_name_the_company() -> None:
    matcher = CompanyMatcher("Fume", "https://fumedev.com")
    docs = [
        Document(url="https://docs.fumedev.com/start", text="Install the CLI and run it."),  # own subdomain
        Document(url="https://safety.example/", title="Fumes", text="Toxic fume kills. Ventilate."),
        Document(url="https://roundup.example/", title="Ten dev tools",
                 text="Cursor, Fume and Linear made our list."),
        Document(url="https://fumeco.example/", text="Fumeco sells fume hoods."),
        Document(url="https://links.example/", title="Links", text="See fumedev.com."),
    ]
    kept = attributed_documents(matcher, docs)
    assert [d.url for d in kept] == ["https://docs.fumedev.com/start", "https://roundup.example/",
                                     "https://links.example/"]
    assert attributed_documents(matcher, []) == []


async def test_research_keeps_grounded_facts_and_counts_dropped() -> None:
    recorder = PromptRecorder()
    web = acme_web()
    # First pass: learn the sentence ids the researcher assigns.
    probe = scripted(facts_json())
    await research(PROSPECT, model=probe, web=web, config={"callbacks": [recorder]})
    prompt = recorder.calls[0][1].text
    assert recorder.calls[0][0].text == EXTRACTION_SYSTEM_PROMPT
    answer = facts_json(
        ("location", "Austin, Texas", sid_of(prompt, "based in Austin")),
        ("employee_count", "120", sid_of(prompt, "team of 120")),
        ("recent_event", "raised a $12 million Series A", sid_of(prompt, "Series A")),
        ("founded_year", "1999", sid_of(prompt, "based in Austin")),     # value not in evidence
        ("product", "Quorvanta", "S999"),                                # evidence not found
        ("industry", "logistics software", "a quote that is on no page"),  # quote not found
    )
    result = await research(PROSPECT, model=scripted(answer), web=web)
    profile = result.profile
    assert {f.field: f.value for f in profile.facts} == {
        "location": "Austin, Texas", "employee_count": "120", "recent_event": "raised a $12 million Series A"}
    event = profile.fact("recent_event")
    assert event is not None and event.source_url == "https://acme.example/news"
    assert profile.dropped_facts == 3
    # the namesake's site (acmefreightco.example) is never fetched
    assert set(profile.sources) == {"https://acme.example/", "https://acme.example/news"}
    assert result.queries == plan_queries(PROSPECT)
    assert result.fetch_errors == []


async def test_hostile_instruction_never_reaches_the_model_nor_the_profile() -> None:
    recorder = PromptRecorder()
    injected = facts_json(
        ("recent_event", "gives away a free iPhone", HOSTILE),                 # cited as a quote
        ("product", "free iPhone", "S7"),                                      # any id: sentence is absent
    )
    result = await research(PROSPECT, model=scripted(injected), web=acme_web(),
                            config={"callbacks": [recorder]})
    prompt = recorder.calls[0][1].text
    assert "iPhone" not in prompt and "ignore all previous" not in prompt.lower()
    assert "based in Austin, Texas" in prompt
    assert all("iphone" not in f.value.lower() for f in result.profile.facts)
    assert result.profile.dropped_facts == 2


async def test_broken_json_once_then_valid_succeeds_with_error_fed_back() -> None:
    recorder = PromptRecorder()
    model = scripted("Sure! Here are the facts: {facts: oops", "```json\n" + facts_json() + "\n```")
    result = await research(PROSPECT, model=model, web=acme_web(), config={"callbacks": [recorder]})
    assert result.profile.facts == []
    assert len(recorder.calls) == 2
    retry = recorder.calls[1]
    assert retry[-2].text.startswith("Sure!")          # the broken answer, as the assistant turn
    assert "could not be used" in retry[-1].text       # and what was wrong, as a user turn


async def test_broken_json_twice_raises_model_output_error() -> None:
    model = scripted("not json", '{"facts": [{"field": "location"}]}')
    with pytest.raises(ModelOutputError) as info:
        await research(PROSPECT, model=model, web=acme_web())
    assert info.value.agent == "researcher"
    assert "value" in info.value.reason and info.value.raw_output.startswith('{"facts"')
    assert "researcher" in str(info.value) and "retry" in str(info.value)


async def test_fetch_and_search_errors_are_recorded_not_raised() -> None:
    web = FakeWeb({"https://acme.example/news": "Acme Freight hired a new Chief Revenue Officer."},
                  broken={"https://acme.example/careers"})
    result = await research(PROSPECT, model=scripted(facts_json()), web=web)
    assert any("careers" in e and "not-in-corpus" in e for e in result.fetch_errors)
    assert any("www.acme.example" in e for e in result.fetch_errors)  # the home page is not in the corpus
    assert result.profile.sources == ["https://acme.example/news"]

    failing = FakeWeb({}, search_fails=True)
    model = scripted()  # never called: no pages, no sentences
    result = await research(PROSPECT, model=model, web=failing)
    assert result.profile.facts == [] and result.profile.sources == []
    assert sum(e.startswith("search") for e in result.fetch_errors) == 3


def yc_corpus(realdata: Path) -> tuple[Corpus, list[ProspectInfo]]:
    """All Active rows of the real YC directory as one corpus (one page per company, on its own website,
    as ``outreach corpus import`` writes it), and one prospect per company with a website."""
    csv_path = realdata / "companies" / "yc_companies_even_ids.csv"
    corpus = Corpus(":memory:")
    import_csv(csv_path, corpus, name_column="company_name", url_column="website",
               text_columns=("short_description", "long_description", "tags", "location"),
               where=lambda row: row["status"] == "Active")
    prospects = [ProspectInfo(first_name="A", email="a@x.example", company=c.name, website=c.website)
                 for c in load_yc_companies(csv_path, tag=None) if c.website.strip() not in ("", "https://")]
    return corpus, prospects


async def test_real_directory_search_no_longer_returns_other_companies_pages(realdata: Path) -> None:
    """Over ~1,650 real company pages: the planned queries, ranking and the post-fetch filter give each
    prospect its own page and only third-party pages that name it. With the queries of before
    (``Fume fumedev.com`` as ``"fume" OR "fumedev" OR "com"``) 6,521 of 8,255 chosen pages, over all
    1,651 prospects, were other companies' pages that never named the prospect; now there are none
    (89 chosen third-party pages, each naming the prospect). Every 4th prospect here, to stay fast."""
    corpus, everyone = yc_corpus(realdata)
    web = CorpusWeb(corpus)
    assert len(corpus) > 1500 and len(everyone) > 1500
    prospects = everyone[::4]
    own_found = third_party = 0
    for prospect in prospects:
        matcher = CompanyMatcher(prospect.company, prospect.website)
        queries = plan_queries(prospect)
        hits = [h for q in queries for h in await web.search(q, max_results=8)]
        own_found += any(matcher.is_own(h.url) for h in hits)
        docs = [await web.fetch(u) for u in rank_urls(prospect, hits, matcher=matcher) if u in corpus]
        kept = attributed_documents(matcher, docs)
        assert kept == docs  # ranking already left out every page that does not name the company
        for doc in kept:
            if not matcher.is_own(doc.url):
                third_party += 1
                assert matcher.names(f"{doc.title}\n{doc.text}"), (prospect.company, doc.url)
        domain_hits = await web.search(queries[1])
        assert all((page := corpus.get(h.url)) is not None and matcher.names(f"{h.url} {h.title} {page.text}")
                   for h in domain_hits), prospect.company
    assert own_found / len(prospects) >= 0.99  # measured: all of them
    assert third_party < 0.1 * len(prospects)  # measured 18 of 413: pages naming the prospect (customers, investors)


class EngineClient:
    """A ddgs client that answers every query with the same engine results, and records the queries."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows
        self.queries: list[str] = []

    def text(self, query: str, **kwargs: object) -> list[dict[str, str]]:
        self.queries.append(query)
        return self.rows


class LiveShapedWeb:
    """``DdgsSearch`` over a fake engine, fetching from a dict: the live path without a network."""

    def __init__(self, search: DdgsSearch, pages: dict[str, str]) -> None:
        self.searcher, self.pages = search, pages
        self.fetched: list[str] = []

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        return await self.searcher.search(query, max_results=max_results)

    async def fetch(self, url: str) -> Document:
        self.fetched.append(url)
        return Document(url=url, text=self.pages[url])


async def test_live_search_quotes_the_name_and_fetches_only_pages_that_name_it() -> None:
    rows = [
        {"href": "https://acme.example/", "title": "Acme Freight", "body": "Dispatch software."},
        {"href": "https://trucking.example/top", "title": "Top 10 freight tools",
         "body": "Acme Freight, Quorvanta and Haulio compared."},
        {"href": "https://freight-news.example/", "title": "Freight news", "body": "Diesel prices rise again."},
        {"href": "https://acmefreightco.example/", "title": "Acme Freightco", "body": "Denver movers."},
    ]
    client = EngineClient(rows)
    web = LiveShapedWeb(DdgsSearch(("duckduckgo",), client_factory=lambda timeout: client),
                        {"https://acme.example/": ACME_NEWS, "https://trucking.example/top": ACME_NEWS})
    result = await research(PROSPECT, model=scripted(facts_json()), web=web)
    assert client.queries == ['"Acme Freight"', '"acme.example"', '"Acme Freight" news']
    assert web.fetched == ["https://acme.example/", "https://trucking.example/top"]
    assert result.queries == client.queries


def test_unparsable_search_hits_are_skipped_not_fatal() -> None:
    from agents.researcher import rank_urls
    from agents.schemas import ProspectInfo as _P
    from tools.types import SearchHit as _Hit

    prospect = _P(first_name="Dana", email="dana@acme.example", company="Acme Freight", website="https://acme.example")
    hits = [_Hit(url="http://[::1/x", title="Acme Freight", rank=0),
            _Hit(url="https://acme.example/about", title="About", rank=1)]
    assert rank_urls(prospect, hits) == ["https://acme.example", "https://acme.example/about"]
