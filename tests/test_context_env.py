"""The backend a run names is the backend that answers: the environment never replaces a given spec."""

from __future__ import annotations

import asyncio

from sqlmodel import Session, select

from graphs.context import CampaignContext
from graphs.runner import add_prospects, run_campaign
from store.models import Run, Trace
from tests.helpers import small_world
from tools import CorpusWeb


def test_context_keeps_the_spec_it_is_given(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    world, corpus, offer, _ = small_world(tmp_path, n=2)
    monkeypatch.setenv("OUTREACH_WRITER", "openai:from-env@http://127.0.0.1:9/v1")
    monkeypatch.setenv("OUTREACH_RESEARCHER", "openai:from-env@http://127.0.0.1:9/v1")
    context = CampaignContext(offer=offer, web=CorpusWeb(corpus), researcher="heuristic", writer="heuristic")
    assert (context.researcher, context.writer) == ("heuristic", "heuristic")


def test_run_with_env_set_is_answered_by_the_backend_it_records(monkeypatch, tmp_path, sqlite_engine):  # type: ignore[no-untyped-def]
    # Before the fix the context swapped an explicit ``heuristic`` for $OUTREACH_WRITER while the run and its
    # traces still said ``heuristic``; here the env names a server nobody listens on, so using it would fail.
    world, corpus, offer, prospects = small_world(tmp_path, n=2)
    monkeypatch.setenv("OUTREACH_WRITER", "openai:from-env@http://127.0.0.1:9/v1")
    add_prospects(sqlite_engine, "c", offer, prospects)
    report = asyncio.run(run_campaign(sqlite_engine, "c", web=CorpusWeb(corpus), writer="heuristic"))
    assert (report.done, report.failed) == (len(prospects), 0)
    with Session(sqlite_engine) as session:
        assert {r.writer for r in session.exec(select(Run)).all()} == {"heuristic"}
        assert {t.backend for t in session.exec(select(Trace)).all()} == {"heuristic"}
