"""The researcher: query planning, URL ranking, grounding of model facts, retries, prompt injection."""

from __future__ import annotations

import json

import pytest

from agents import ModelOutputError, ProspectInfo, plan_queries, rank_urls, research
from agents.prompts import EXTRACTION_SYSTEM_PROMPT
from tests.test_agents_support import HOSTILE, FakeWeb, PromptRecorder, acme_web, scripted
from tools.types import SearchHit

PROSPECT = ProspectInfo(first_name="Dana", email="dana@acme.example", company="Acme Freight",
                        website="https://www.acme.example/")


def facts_json(*facts: tuple[str, str, str]) -> str:
    return json.dumps({"facts": [{"field": f, "value": v, "evidence": e} for f, v, e in facts]})


def sid_of(prompt: str, fragment: str) -> str:
    """The id of the prompt line containing ``fragment``."""
    line = next(ln for ln in prompt.splitlines() if fragment in ln and ln.startswith("S"))
    return line.split(":", 1)[0]


def test_plan_queries_by_rule() -> None:
    assert plan_queries(PROSPECT) == ["Acme Freight", "Acme Freight acme.example", "Acme Freight news"]
    assert plan_queries(PROSPECT.model_copy(update={"website": ""})) == ["Acme Freight", "Acme Freight news"]
    with pytest.raises(ValueError, match="company"):
        plan_queries(PROSPECT.model_copy(update={"company": " "}))


def test_rank_urls_own_host_first_namesakes_last() -> None:
    hits = [SearchHit(url=u) for u in (
        "https://acmefreightco.example/", "https://news.example/acme", "https://acme.example/about",
        "https://www.acme.example/#top", "https://acme.example/about/")]
    assert rank_urls(PROSPECT, hits, max_pages=5) == [
        "https://www.acme.example/", "https://acme.example/about", "https://news.example/acme",
        "https://acmefreightco.example/"]
    assert rank_urls(PROSPECT, hits[:3], max_pages=2) == [
        "https://www.acme.example/", "https://acme.example/about"]
    with pytest.raises(ValueError, match="max_pages"):
        rank_urls(PROSPECT, hits, max_pages=0)


async def test_research_keeps_grounded_facts_and_counts_dropped() -> None:
    recorder = PromptRecorder()
    web = acme_web()
    # First pass: learn the sentence ids the researcher assigns.
    probe = scripted(facts_json())
    await research(PROSPECT, model=probe, web=web, config={"callbacks": [recorder]})
    prompt = recorder.calls[0][1].content
    assert recorder.calls[0][0].content == EXTRACTION_SYSTEM_PROMPT
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
    assert profile.fact("recent_event").source_url == "https://acme.example/news"
    assert profile.dropped_facts == 3
    assert set(profile.sources) == {"https://acme.example/", "https://acme.example/news",
                                    "https://acmefreightco.example/"}
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
    prompt = recorder.calls[0][1].content
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
    assert retry[-2].content.startswith("Sure!")          # the broken answer, as the assistant turn
    assert "could not be used" in retry[-1].content       # and what was wrong, as a user turn


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
