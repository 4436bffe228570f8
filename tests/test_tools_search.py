"""DdgsSearch with a fake ddgs client: fallback order, rate-limit backoff, final SearchError."""

from __future__ import annotations

from typing import Any

import pytest
from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

from tools.search import DdgsSearch, parse_query, quote_phrase
from tools.types import SearchError


class FakeDDGS:
    """Plays a script per backend: a list of results or exceptions, consumed one per call."""

    def __init__(self, script: dict[str, list[Any]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[tuple[str, str, int, str]] = []

    def text(self, query: str, **kwargs: Any) -> list[dict[str, Any]]:
        backend = kwargs["backend"]
        self.calls.append((backend, query, kwargs["max_results"], kwargs["region"]))
        outcome = self.script[backend].pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


ROWS = [
    {"title": "Brightlane", "href": "https://brightlane.example/", "body": "Forecasting"},
    {"title": "dup", "href": "https://brightlane.example/", "body": "same url"},
    {"title": "About", "href": "https://brightlane.example/about", "body": "Austin"},
]


def make(
    fake: FakeDDGS, backends: tuple[str, ...] = ("duckduckgo", "brave", "mojeek"), **kw: Any
) -> DdgsSearch:
    return DdgsSearch(backends, client_factory=lambda timeout: fake, sleep=lambda s: None, **kw)


async def test_first_backend_that_answers_wins_in_the_given_order() -> None:
    fake = FakeDDGS(
        {
            "duckduckgo": [DDGSException("dns failure")],
            "brave": [TimeoutException("timed out")],
            "mojeek": [ROWS],
        }
    )
    hits = await make(fake, region="de-de").search("brightlane austin", max_results=5)
    assert [c[0] for c in fake.calls] == ["duckduckgo", "brave", "mojeek"]
    assert fake.calls[0][1:] == ("brightlane austin", 5, "de-de")
    assert [h.url for h in hits] == ["https://brightlane.example/", "https://brightlane.example/about"]
    assert [h.rank for h in hits] == [0, 1] and hits[0].score > hits[1].score
    assert hits[1].snippet == "Austin"


async def test_rate_limit_is_retried_with_backoff_then_succeeds() -> None:
    fake = FakeDDGS({"duckduckgo": [RatelimitException("202"), RatelimitException("202"), ROWS[:1]]})
    search = make(fake, backends=("duckduckgo", "brave"), max_retries=3)
    hits = search.search_sync("q")
    assert [c[0] for c in fake.calls] == ["duckduckgo"] * 3
    assert hits[0].title == "Brightlane"


async def test_rate_limit_exhausts_retries_then_moves_on() -> None:
    fake = FakeDDGS({"duckduckgo": [RatelimitException("202")] * 2, "brave": [ROWS[2:]]})
    hits = make(fake, backends=("duckduckgo", "brave"), max_retries=2).search_sync("q")
    assert [c[0] for c in fake.calls] == ["duckduckgo", "duckduckgo", "brave"]
    assert hits[0].url.endswith("/about")


def test_backoff_waits_grow_exponentially() -> None:
    waits: list[float] = []
    fake = FakeDDGS({"duckduckgo": [RatelimitException("r")] * 3 + [ROWS[:1]]})
    search = DdgsSearch(
        ("duckduckgo",),
        max_retries=4,
        client_factory=lambda t: fake,
        backoff_initial_s=0.5,
        sleep=waits.append,
    )
    assert search.search_sync("q")[0].title == "Brightlane"
    assert waits == [0.5, 1.0, 2.0]


async def test_all_backends_failing_raises_search_error_naming_each() -> None:
    fake = FakeDDGS(
        {
            "duckduckgo": [DDGSException("dns failure")],
            "brave": [RatelimitException("slow down")] * 2,
            "mojeek": [RuntimeError("boom")],
        }
    )
    with pytest.raises(SearchError) as info:
        await make(fake, max_retries=2).search("brightlane")
    message = str(info.value)
    assert "tried duckduckgo, brave, mojeek" in message
    assert "last error: mojeek: RuntimeError: boom" in message
    assert "brave: RatelimitException: slow down" in message


def test_no_results_everywhere_is_an_empty_list_not_an_error() -> None:
    fake = FakeDDGS(
        {"duckduckgo": [DDGSException("No results found.")], "brave": [DDGSException("No results found.")]}
    )
    assert make(fake, backends=("duckduckgo", "brave")).search_sync("zzqx") == []


def test_bad_arguments_are_refused() -> None:
    fake = FakeDDGS({})
    with pytest.raises(ValueError, match="empty search query"):
        make(fake).search_sync("  ")
    with pytest.raises(ValueError, match="max_results"):
        make(fake).search_sync("q", max_results=0)
    with pytest.raises(ValueError, match="max_retries"):
        make(fake, max_retries=0)
    with pytest.raises(ValueError, match="no usable search backend"):
        DdgsSearch(("nosuchengine",))  # real ddgs client: unknown names are dropped
    assert DdgsSearch(("nosuchengine", "duckduckgo")).backends == ("duckduckgo",)
    assert fake.calls == []


def test_quoted_phrases_reach_the_engine_as_written() -> None:
    fake = FakeDDGS({"duckduckgo": [ROWS]})
    make(fake).search_sync('"Acme Freight" news')
    assert fake.calls[0][1] == '"Acme Freight" news'


def test_quote_phrase_always_gives_one_balanced_phrase() -> None:
    assert quote_phrase("Acme Freight") == '"Acme Freight"'
    assert quote_phrase(' Foo "Bar"\n Ltd ') == '"Foo Bar Ltd"'
    assert quote_phrase("fumedev.com") == '"fumedev.com"'
    with pytest.raises(ValueError, match="no letter or digit"):
        quote_phrase('" - "')


@pytest.mark.parametrize(
    ("query", "phrases", "terms"),
    [
        ('"Acme Freight" news', ["acme freight"], ["news"]),
        ('"fumedev.com"', ["fumedev.com"], []),
        ("Fume fumedev.com", [], ["fume", "fumedev.com"]),
        ("O'Reilly AI-first dana@acme.example", [], ["o'reilly", "ai-first", "dana@acme.example"]),
        ('"A  B" "a b" x X', ["a b"], ["x"]),              # whitespace collapsed, duplicates dropped
        ('"unbalanced words', [], ["unbalanced", "words"]),  # a lone quote is ignored
        ('"?!" "" _ & NEAR(x)', [], ["near", "x"]),          # nothing without a letter or digit
    ],
)
def test_parse_query_grammar(query: str, phrases: list[str], terms: list[str]) -> None:
    assert parse_query(query) == (phrases, terms)
