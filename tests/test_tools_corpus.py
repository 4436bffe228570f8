"""The local corpus: upsert, URL normalisation, FTS5 ranking, hostile queries, a larger corpus, CorpusWeb."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tools.corpus import Corpus, CorpusWeb, fts_query, url_key
from tools.extract import extract_document
from tools.types import Document, FetchError


def doc(url: str, title: str, text: str, **kw: object) -> Document:
    return Document(url=url, title=title, text=text, **kw)  # type: ignore[arg-type]


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    c = Corpus(tmp_path / "sub" / "corpus.sqlite")
    c.add_many(
        [
            doc("https://www.brightlane.example/", "Brightlane Analytics", "Demand forecasting for grocers."),
            doc(
                "https://www.brightlane.example/about",
                "About us",
                "Brightlane was founded in Austin in 2015.",
            ),
            doc(
                "https://smith-sons.example/", "Smith & Sons", 'The "AI-first" tool shop NEAR you: hammers*.'
            ),
            doc("https://other.example/blog", "Blog", "We compare Brightlane and others in this post."),
        ]
    )
    return c


def test_url_key_ignores_scheme_trailing_slash_case_and_default_port() -> None:
    assert url_key("https://www.X.example/") == url_key("http://www.x.example") == "www.x.example"
    assert url_key("https://x.example:443/a/") == url_key("x.example/a") == "x.example/a"
    assert url_key("https://x.example/a?b=1#frag") == "x.example/a?b=1"
    assert url_key("http://x.example:8080/") == "x.example:8080"
    with pytest.raises(ValueError, match="names no host"):
        url_key("https:///path")
    with pytest.raises(ValueError, match="empty URL"):
        url_key("  ")


def test_get_normalises_and_upserts(corpus: Corpus, tmp_path: Path) -> None:
    assert len(corpus) == 4
    home = corpus.get("http://www.brightlane.example")
    assert home is not None and home.title == "Brightlane Analytics"
    assert corpus.get("https://brightlane.example/about") is not None  # www. added
    assert corpus.get("https://www.brightlane.example/missing") is None
    corpus.add(doc("https://www.brightlane.example", "Brightlane (new)", "Now serving bakeries."))
    assert len(corpus) == 4
    assert corpus.get("https://www.brightlane.example/").title == "Brightlane (new)"  # type: ignore[union-attr]
    # the old text is gone from the index, the new one is in it
    assert not corpus.search("grocers")
    assert corpus.search("bakeries")[0].url == "https://www.brightlane.example"
    corpus.close()
    reopened = Corpus(tmp_path / "sub" / "corpus.sqlite")
    assert len(reopened) == 4 and "https://smith-sons.example" in reopened


def test_add_many_is_all_or_nothing(corpus: Corpus) -> None:
    with pytest.raises(ValueError, match="names no host"):
        corpus.add_many([doc("https://new.example/", "New", "fresh"), doc("https:///bad", "Bad", "x")])
    assert len(corpus) == 4 and corpus.get("https://new.example/") is None


def test_search_ranks_title_over_text(corpus: Corpus) -> None:
    hits = corpus.search("Brightlane")
    assert [h.rank for h in hits] == list(range(len(hits)))
    assert hits[0].url == "https://www.brightlane.example/"  # title (and url) match beats text-only
    assert hits[-1].url == "https://other.example/blog"
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    assert "Brightlane" in hits[-1].snippet
    assert len(corpus.search("Brightlane", max_results=1)) == 1
    with pytest.raises(ValueError, match="max_results"):
        corpus.search("x", max_results=0)


@pytest.mark.parametrize(
    "query",
    [
        "Smith & Sons",
        '"AI-first"',
        "NEAR: you",
        "hammers*",
        "AND OR NOT",
        "(unbalanced",
        "-",
        "",
        "a\"b'c",
        "ü:^",
        '"unbalanced',
        '"" "" ""',
        '"AND" "NEAR" "OR"',
        '"Smith & Sons" -x',
        'x\x00y',
        '"*" "^" ":"',
        "example.com",
    ],
)
def test_hostile_queries_never_raise(corpus: Corpus, query: str) -> None:
    hits = corpus.search(query)
    if query in ("Smith & Sons", '"AI-first"', "hammers*"):
        assert hits and hits[0].url == "https://smith-sons.example/"


def test_fts_query_grammar_phrases_required_bare_words_ranked() -> None:
    assert fts_query('"Acme Freight" news') == '"acme freight" AND "news"'
    assert fts_query('"Acme Freight" news funding') == '"acme freight" AND ("news" OR "funding")'
    assert fts_query('"fumedev.com"') == '"fumedev.com"'  # one FTS5 string: the phrase "fumedev com"
    assert fts_query("Fume fumedev.com") == '"fume" OR "fumedev.com"'  # a bare domain stays one term
    assert fts_query('Smith & Sons "AI-first"') == '"ai-first" AND ("smith" OR "sons")'
    assert fts_query('"?!" news "" NEAR(') == '"news" OR "near"'  # empty phrases are left out
    assert fts_query("?!") == ""


def test_phrase_queries_name_the_company_not_its_parts(tmp_path: Path) -> None:
    """Real shapes: many pages mention a ".com" and "news"; a one-word name that is also a common word;
    a near-namesake; a round-up naming the company among others."""
    c = Corpus(tmp_path / "c.sqlite")
    c.add_many(
        [doc(f"https://shop{i}.example/", f"Shop {i}", f"Order at shop{i}.com. Our news.") for i in range(30)]
        + [
            doc("https://fumedev.com/", "Fume", "Fume writes end-to-end tests for your web app."),
            doc("https://safety.example/", "Welding safety news", "Toxic fume extraction. Fume hoods save lungs."),
            doc("https://hn.example/1", "Show HN", "Fume (fumedev.com) news: it now writes Playwright tests."),
            doc("https://www.brightline.example/", "Brightline", "Brightline trains. Latest news."),
            doc("https://roundup.example/w", "This week", "News: Brightlane, Brightline and Quorvanta raised."),
            doc("https://acmefreightco.example/", "Acme Freightco", "Acme Freightco news from Denver."),
            doc("https://freight.example/", "Freight", "Freight news: Acme and others. Acme freight costs."),
            doc("https://acme.example/", "Acme Freight", "Acme Freight news: a Series A."),
        ]
    )
    urls = lambda q: {h.url for h in c.search(q, max_results=50)}  # noqa: E731
    assert urls('"fumedev.com"') == {"https://fumedev.com/", "https://hn.example/1"}  # no "com" pages
    assert urls('"Fume" news') == {"https://safety.example/", "https://hn.example/1"}  # both say "fume" and news
    assert urls('"Brightlane" news') == {"https://roundup.example/w"}
    assert urls('"Acme Freight" news') == {"https://acme.example/", "https://freight.example/"}  # words in order
    assert c.search('"Acme Freight"')[0].url == "https://acme.example/"  # the title match first
    # free text keeps its forgiving reading: any word, best first
    assert c.search("shop7 news")[0].url == "https://shop7.example/"


def test_an_address_in_a_phrase_must_appear_as_written(tmp_path: Path) -> None:
    """The tokenizer reads "front.page" as "front page"; a domain query must not match those words."""
    c = Corpus(tmp_path / "c.sqlite")
    c.add_many([
        doc("https://www.forage.xyz/", "Forage", "Payments for the front page of every grocer."),
        doc("https://front.page/", "FrontPage", "A trading community for India."),
        doc("https://blog.example/", "Blog", "We love FRONT.PAGE and frontpage.in."),
        doc("https://myfront.page/", "Myfront", "Another site."),
    ])
    assert [h.url for h in c.search('"front.page"')] == ["https://front.page/", "https://blog.example/"]
    assert [h.rank for h in c.search('"front.page"')] == [0, 1]
    assert len(c.search('"front.page"', max_results=1)) == 1
    assert len(c.search('"front page"')) == 3  # the words, wherever they stand


def test_real_directory_domain_query_returns_only_that_company(realdata: Path) -> None:
    """All Active YC rows as one corpus: the old ``"{company} {host}"`` query returned other companies'
    descriptions through ``com`` (3,802 of 4,354 hits for these 551 companies); ``'"{domain}"'`` returns
    the company's own page and pages that write its domain, nothing else."""
    from agents.attribution import registrable_domain
    from tools.corpus_import import import_csv

    c = Corpus(":memory:")
    import_csv(realdata / "companies" / "yc_companies_even_ids.csv", c, name_column="company_name",
               url_column="website", text_columns=("short_description", "long_description"),
               where=lambda row: row["status"] == "Active")
    urls = c.urls()
    assert len(urls) > 1500
    foreign = total = 0
    for url in urls[::3]:
        domain = registrable_domain(url)
        hits = c.search(f'"{domain}"')
        assert any(h.url == url for h in hits), domain
        for h in hits:
            total += 1
            page = c.get(h.url)
            assert page is not None
            foreign += domain not in f"{h.url} {page.text}".lower()
    assert foreign == 0 and total < 1.1 * len(urls[::3])


def test_search_over_thousands_of_docs_is_fast(tmp_path: Path) -> None:
    c = Corpus(tmp_path / "big.sqlite")
    words = ["retail", "logistics", "fintech", "health", "energy", "robotics", "media", "legal"]
    c.add_many(
        doc(
            f"https://c{i}.example/",
            f"Company {i} {words[i % 8]}",
            f"We do {words[i % 8]} and {words[(i * 3) % 8]}. Founded in {1990 + i % 30} with {i} employees.",
        )
        for i in range(2000)
    )
    assert len(c) == 2000
    hits = c.search("robotics employees founded 2005")
    assert len(hits) == 8


async def test_corpus_web_fetch_returns_the_extracted_document(tmp_path: Path) -> None:
    html = (
        "<html><head><title>Acme</title></head><body><article>"
        + "<p>Acme builds anvils in Ohio.</p>" * 5
        + "</article></body></html>"
    )
    extracted = extract_document(html, "https://acme.example/")
    c = Corpus(tmp_path / "c.sqlite")
    c.add(extracted)
    web = CorpusWeb(c)
    fetched = await web.fetch("http://acme.example")
    assert fetched == extracted
    hits = await web.search("anvils Ohio", max_results=3)
    assert hits[0].url == "https://acme.example/"
    with pytest.raises(FetchError) as info:
        await web.fetch("https://acme.example/missing")
    assert info.value.reason == "not-in-corpus"
    # concurrent use from tasks and threads shares one connection safely
    results = await asyncio.gather(*(asyncio.to_thread(c.search, "anvils") for _ in range(20)))
    assert all(r[0].url == "https://acme.example/" for r in results)
