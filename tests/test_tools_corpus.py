"""The local corpus: upsert, URL normalisation, FTS5 ranking, hostile queries, speed, CorpusWeb."""

from __future__ import annotations

import asyncio
import time
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
    ],
)
def test_hostile_queries_never_raise(corpus: Corpus, query: str) -> None:
    hits = corpus.search(query)
    if query in ("Smith & Sons", '"AI-first"', "hammers*"):
        assert hits and hits[0].url == "https://smith-sons.example/"


def test_fts_query_quotes_every_word() -> None:
    assert fts_query('Smith & Sons "AI-first"') == '"smith" OR "sons" OR "ai" OR "first"'
    assert fts_query("?!") == ""


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
    start = time.perf_counter()
    for _ in range(20):
        hits = c.search("robotics employees founded 2005")
    per_query = (time.perf_counter() - start) / 20
    assert len(hits) == 8
    assert per_query < 0.05  # measured ~2 ms


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
