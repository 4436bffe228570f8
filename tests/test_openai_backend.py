"""The ``openai:`` backend against a real OpenAI-compatible HTTP server on loopback, started here.

The server answers ``POST /v1/chat/completions`` by running the heuristic teacher on the request's
messages, so a campaign through ``openai:heuristic@http://127.0.0.1:PORT/v1`` must write exactly the
emails the in-process ``heuristic`` backend writes, with token usage taken from the response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlmodel import Session, select

from evals.fake_teacher import FakeTeacher
from graphs.runner import add_prospects, run_campaign
from store.models import EmailRecord, Trace
from tests.helpers import small_world
from tools import CorpusWeb


@pytest.fixture
def openai_server() -> Iterator[FakeTeacher]:
    teacher = FakeTeacher(latency_s=0, keep_bodies=True)
    teacher.start()
    yield teacher
    teacher.stop()


def test_campaign_over_openai_compatible_server_matches_in_process(tmp_path, sqlite_engine, openai_server):
    _, corpus, offer, prospects = small_world(tmp_path, n=3)
    spec = f"openai:heuristic@{openai_server.url}"
    add_prospects(sqlite_engine, "remote", offer, prospects)
    add_prospects(sqlite_engine, "local", offer, prospects)
    remote = asyncio.run(run_campaign(sqlite_engine, "remote", web=CorpusWeb(corpus), researcher=spec, writer=spec))
    local = asyncio.run(run_campaign(sqlite_engine, "local", web=CorpusWeb(corpus)))
    assert remote.done == local.done == len(prospects)
    assert len(openai_server.bodies) == 2 * len(prospects)
    assert all(r["model"] == "heuristic" and r["temperature"] == 0 for r in openai_server.bodies)
    with Session(sqlite_engine) as s:
        emails = s.exec(select(EmailRecord).order_by(EmailRecord.run_id)).all()
        traces = s.exec(select(Trace).where(Trace.backend == spec)).all()
    half = len(emails) // 2
    assert [(e.subject, e.body) for e in emails[:half]] == [(e.subject, e.body) for e in emails[half:]]
    assert len(traces) == 2 * len(prospects)
    assert all(t.input_tokens > 0 and t.output_tokens > 0 and t.latency_ms > 0 for t in traces)


def test_a_second_event_loop_reaches_the_same_server(tmp_path, sqlite_engine, openai_server):
    """Two campaigns, each in its own ``asyncio.run``, over one base URL: the second must not reuse an HTTP
    client bound to the first (closed) loop, which failed its runs with "Event loop is closed"."""
    _, corpus, offer, prospects = small_world(tmp_path, n=2)
    spec = f"openai:heuristic@{openai_server.url}"
    reports = []
    for campaign in ("first", "second"):
        add_prospects(sqlite_engine, campaign, offer, prospects)
        reports.append(asyncio.run(run_campaign(sqlite_engine, campaign, web=CorpusWeb(corpus), researcher=spec,
                                                writer=spec, concurrency=1)))
    assert [(r.done, r.failed) for r in reports] == [(len(prospects), 0), (len(prospects), 0)]
