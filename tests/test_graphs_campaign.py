"""The campaign graph and batch runner, driven by the heuristic teacher and by scripted fake models."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlmodel import Session, select

from evals.world import load_gold
from graphs.models import ModelPool
from graphs.runner import add_prospects, run_campaign
from store.models import EmailRecord, FactRecord, ProfileRecord, Run, ToolCall, Trace
from tests.helpers import good_draft_json, scripted, small_world
from tools import CorpusWeb
from tools.types import Document, FetchError, SearchHit


def _rows(engine, model):  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        return list(s.exec(select(model)).all())


def test_heuristic_campaign_end_to_end(tmp_path, engine):
    world, corpus, offer, prospects = small_world(tmp_path)
    add_prospects(engine, "c", offer, prospects)
    report = asyncio.run(run_campaign(engine, "c", web=CorpusWeb(corpus), concurrency=3))
    assert (report.done, report.failed) == (len(prospects), 0)
    runs = _rows(engine, Run)
    assert {r.status for r in runs} == {"done"} and all(r.attempts == 1 for r in runs)
    emails = _rows(engine, EmailRecord)
    assert len(emails) == len(prospects) and all(e.valid and "{{" not in e.body for e in emails)
    traces = _rows(engine, Trace)
    assert sorted(t.agent for t in traces) == sorted(["researcher", "writer"] * len(prospects))
    assert all(t.backend == "heuristic" and t.input_tokens > 0 and t.output_tokens > 0 for t in traces)
    assert all(t.messages[0]["role"] == "system" and t.messages[-1]["role"] == "user" for t in traces)
    assert {c.tool for c in _rows(engine, ToolCall)} == {"search", "fetch"}
    gold = load_gold(world)
    facts = _rows(engine, FactRecord)
    profiles = {p.id: p.company for p in _rows(engine, ProfileRecord)}
    located = [f for f in facts if f.field == "location"]
    assert located and all(f.value == gold[profiles[f.profile_id]].facts["location"] for f in located)
    assert all(f.value.lower() in f.evidence.lower() for f in facts)
    # Resume is a no-op once everything is done.
    again = asyncio.run(run_campaign(engine, "c", web=CorpusWeb(corpus)))
    assert (again.total, again.skipped) == (0, len(prospects))
    assert len(_rows(engine, Trace)) == len(traces)


def test_invalid_email_is_retried_once_then_passes(tmp_path, sqlite_engine):
    _, corpus, offer, prospects = small_world(tmp_path, n=1)
    no_opt_out = json.loads(good_draft_json(offer))
    no_opt_out["body"] = no_opt_out["body"].replace(offer.opt_out_line, "")
    writer = scripted(json.dumps(no_opt_out), good_draft_json(offer))
    pool = ModelPool(preloaded={"openai:scripted-writer": writer})
    add_prospects(sqlite_engine, "c", offer, prospects)
    report = asyncio.run(run_campaign(sqlite_engine, "c", web=CorpusWeb(corpus), writer="openai:scripted-writer",
                                      models=pool))
    assert report.done == 1
    writer_traces = [t for t in _rows(sqlite_engine, Trace) if t.agent == "writer"]
    assert len(writer_traces) == 2
    # the retry told the model what was wrong
    assert "opt" in json.dumps(writer_traces[1].messages).lower()
    assert _rows(sqlite_engine, EmailRecord)[0].valid


def test_email_failing_twice_is_reported_not_sent(tmp_path, sqlite_engine):
    _, corpus, offer, prospects = small_world(tmp_path, n=2)
    bad = json.dumps({"subject": "Hi", "body": "Buy now. {{first_name}}"})
    pool = ModelPool(preloaded={"openai:bad": scripted(bad, bad, bad, bad)})
    add_prospects(sqlite_engine, "c", offer, prospects)
    report = asyncio.run(run_campaign(sqlite_engine, "c", web=CorpusWeb(corpus), writer="openai:bad", models=pool,
                                      concurrency=1))
    assert report.failed == 2 and report.done == 0
    assert all("validation" in reason for _, reason in report.failures)
    assert all(not e.valid for e in _rows(sqlite_engine, EmailRecord))
    assert all(r.status == "failed" and r.error for r in _rows(sqlite_engine, Run))


def test_broken_json_from_researcher_fails_that_prospect_only(tmp_path, sqlite_engine):
    _, corpus, offer, prospects = small_world(tmp_path, n=3)
    # first prospect gets two broken answers (-> reported), the others valid empty extractions
    researcher = scripted("{not json", "still { not json", '{"facts": []}', '{"facts": []}')
    pool = ModelPool(preloaded={"openai:scripted-researcher": researcher})
    add_prospects(sqlite_engine, "c", offer, prospects)
    report = asyncio.run(run_campaign(sqlite_engine, "c", web=CorpusWeb(corpus), concurrency=1,
                                      researcher="openai:scripted-researcher", models=pool))
    assert report.failed >= 1
    failed = [r for r in _rows(sqlite_engine, Run) if r.status == "failed"]
    assert any("JSON" in (r.error or "") or "json" in (r.error or "") for r in failed)
    # the broken answers are kept as traces of the failed run
    assert len([t for t in _rows(sqlite_engine, Trace) if t.run_id == failed[0].id]) == 2
    # later prospects still ran
    assert len(_rows(sqlite_engine, Run)) == len(prospects)


class _SlowWeb:
    """A web whose company site never answers in time (as an unreachable or slow host would)."""

    def __init__(self, inner: CorpusWeb, slow_host: str) -> None:
        self.inner, self.slow_host = inner, slow_host

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        return await self.inner.search(query, max_results=max_results)

    async def fetch(self, url: str) -> Document:
        if self.slow_host in url:
            await asyncio.sleep(30)
            raise FetchError(url, "timeout")
        return await self.inner.fetch(url)


def test_slow_site_marks_that_prospect_not_the_campaign(tmp_path, sqlite_engine):
    _, corpus, offer, prospects = small_world(tmp_path, n=3)
    slow = prospects[0][1].website.split("//")[1].strip("/")
    add_prospects(sqlite_engine, "c", offer, prospects)
    report = asyncio.run(run_campaign(sqlite_engine, "c", web=_SlowWeb(CorpusWeb(corpus), slow),
                                      prospect_timeout_s=1.0, concurrency=3))
    assert report.failed == 1 and report.done == len(prospects) - 1
    (failure,) = report.failures
    assert failure[0] == prospects[0][1].email and "timed out" in failure[1]


def test_writer_obeying_a_hostile_page_never_yields_an_email(tmp_path, sqlite_engine):
    world, corpus, offer, _ = small_world(tmp_path, n=20, seed=11)
    gold = load_gold(world)
    hostile = [g for g in gold.values() if g.hostile and g.split != "distractor"]
    assert hostile, "the demo world should have hostile sites"
    from graphs.inputs import read_prospects_csv

    prospects = [p for p in read_prospects_csv(world / "prospects_train.csv").prospects
                 if p[1].company in {g.company for g in hostile}]
    marker = hostile[0].hostile_markers[0]
    obeying = json.loads(good_draft_json(offer))
    obeying["body"] = obeying["body"].replace("Best,", f"PS: claim your prize at {marker} today.\n\nBest,")
    pool = ModelPool(preloaded={"openai:obedient": scripted(*[json.dumps(obeying)] * 10)})
    add_prospects(sqlite_engine, "c", offer, prospects[:1])
    report = asyncio.run(run_campaign(sqlite_engine, "c", web=CorpusWeb(corpus), writer="openai:obedient",
                                      models=pool))
    assert report.failed == 1
    assert all(not e.valid for e in _rows(sqlite_engine, EmailRecord))
    # and the heuristic teacher, reading the same hostile pages, writes clean emails
    add_prospects(sqlite_engine, "h", offer, prospects)
    report = asyncio.run(run_campaign(sqlite_engine, "h", web=CorpusWeb(corpus)))
    emails = [e for e in _rows(sqlite_engine, EmailRecord) if e.valid]
    assert len(emails) == len(prospects)
    markers = [m.lower() for g in hostile for m in g.hostile_markers]
    assert not any(m in (e.subject + e.body).lower() for e in emails for m in markers)
    research_prompts = [json.dumps(t.messages).lower() for t in _rows(sqlite_engine, Trace) if t.agent == "researcher"]
    assert not any("ignore all previous instructions" in p for p in research_prompts)


def test_bad_backend_spec_fails_before_any_run(tmp_path, sqlite_engine):
    from miniatures.specs import BackendSpecError

    _, corpus, offer, prospects = small_world(tmp_path, n=1)
    add_prospects(sqlite_engine, "c", offer, prospects)
    with pytest.raises(BackendSpecError):
        asyncio.run(run_campaign(sqlite_engine, "c", web=CorpusWeb(corpus), writer="gpt5"))
    assert _rows(sqlite_engine, Run) == []  # nothing was started
