"""Replay: stored runs re-run offline through other backends, linked to what they replay."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, col, delete, select

from finetune.datasets import build_sft_dataset
from finetune.replay import (
    RecordedAnswers,
    ReplayError,
    ReplayInputChangedError,
    messages_key,
    replay,
    replay_campaign_name,
    select_replay_runs,
)
from finetune.review import apply_review, review_queue
from graphs.models import ModelPool
from graphs.runner import add_prospects, run_campaign
from store.models import Campaign, Run, ToolCall, Trace, WebSnapshot
from tests.helpers import scripted, small_world, stored_id
from tools import CorpusWeb, SnapshotStore, url_for_html_file


def _traces(engine: Engine, campaign: str) -> list[Trace]:
    with Session(engine) as s:
        return list(s.exec(select(Trace).join(Run, col(Run.id) == col(Trace.run_id))
                           .join(Campaign, col(Campaign.id) == col(Run.campaign_id))
                           .where(Campaign.name == campaign).order_by(col(Trace.id))).all())


def _runs(engine: Engine, campaign: str) -> list[Run]:
    with Session(engine) as s:
        return list(s.exec(select(Run).join(Campaign, col(Campaign.id) == col(Run.campaign_id))
                           .where(Campaign.name == campaign).order_by(col(Run.id))).all())


def _source_of(trace: Trace, originals: dict[int, Trace]) -> Trace:
    """The trace of ``originals`` that ``trace`` replays; AssertionError when it replays none."""
    assert trace.replay_of_id is not None, f"trace {trace.id} is not a replay"
    return originals[trace.replay_of_id]


@pytest.fixture
def source(tmp_path: Path, sqlite_engine: Engine):  # type: ignore[no-untyped-def]
    """A heuristic campaign ``src`` over 4 demo companies read from the corpus; returns (engine, corpus, world)."""
    world, corpus, offer, prospects = small_world(tmp_path, n=4)
    add_prospects(sqlite_engine, "src", offer, prospects)
    report = asyncio.run(run_campaign(sqlite_engine, "src", web=CorpusWeb(corpus)))
    assert report.done == len(prospects) == 4
    return sqlite_engine, corpus, world


def test_replaying_both_agents_sees_the_same_inputs_and_links_every_trace(source) -> None:  # type: ignore[no-untyped-def]
    engine, corpus, _world = source
    report = asyncio.run(replay(engine, "src", researcher="heuristic", writer="heuristic", pages=CorpusWeb(corpus)))
    assert report.campaign == replay_campaign_name("src", "heuristic", "heuristic")
    assert report.result is not None and (report.result.done, report.result.failed) == (4, 0)
    assert not report.missing and report.recorded_answers == 0
    originals = {stored_id(t): t for t in _traces(engine, "src")}
    replayed = _traces(engine, report.campaign)
    assert len(replayed) == len(originals) == 8
    for trace in replayed:
        source_trace = _source_of(trace, originals)
        assert (trace.agent, trace.step, trace.backend) == (source_trace.agent, source_trace.step, "heuristic")
        assert trace.messages == source_trace.messages  # same pages, same prompt: nothing came from a network
        assert trace.output == source_trace.output  # the deterministic teacher answers the same
    source_runs = {r.id for r in _runs(engine, "src")}
    assert {r.replay_of_id for r in _runs(engine, report.campaign)} == source_runs
    # Rerunning the same replay resumes: nothing left to do, nothing duplicated.
    again = asyncio.run(replay(engine, "src", researcher="heuristic", writer="heuristic", pages=CorpusWeb(corpus)))
    assert again.runs == [] and len(_traces(engine, report.campaign)) == 8


def test_an_agent_without_a_spec_keeps_its_recorded_answers(source) -> None:  # type: ignore[no-untyped-def]
    engine, corpus, _world = source
    offer_draft = json.dumps({"subject": "x", "body": "y"})
    pool = ModelPool(preloaded={"openai:scripted": scripted(*[offer_draft] * 8)}, store=engine)
    report = asyncio.run(replay(engine, "src", writer="openai:scripted", pages=CorpusWeb(corpus), models=pool,
                                name="w"))
    assert report.recorded_answers == 4  # the four researcher calls were answered from the records
    traces = _traces(engine, "w")
    assert {t.agent for t in traces} == {"writer"} and all(t.backend == "openai:scripted" for t in traces)
    originals = {stored_id(t): t for t in _traces(engine, "src") if t.agent == "writer"}
    firsts = [t for t in traces if t.replay_of_id in originals]
    assert len(firsts) == 4 and all(t.messages == _source_of(t, originals).messages for t in firsts)
    # The scripted writer's emails fail validation twice: those runs are failed, with their reasons kept.
    assert {r.status for r in _runs(engine, "w")} == {"failed"}
    assert {r.researcher for r in _runs(engine, "w")} == {"heuristic"}  # the kept agent's original backend


def test_replay_of_a_replay_follows_the_chain(source) -> None:  # type: ignore[no-untyped-def]
    engine, corpus, _world = source
    first = asyncio.run(replay(engine, "src", writer="heuristic", pages=CorpusWeb(corpus), name="r1"))
    assert first.result is not None and first.result.done == 4
    assert {t.agent for t in _traces(engine, "r1")} == {"writer"}
    second = asyncio.run(replay(engine, "r1", researcher="heuristic", pages=CorpusWeb(corpus), name="r2"))
    assert second.result is not None and second.result.done == 4
    assert second.recorded_answers == 4  # r1's writer answers reused: the new profiles are the same
    r2 = _traces(engine, "r2")
    source_researcher = {t.id for t in _traces(engine, "src") if t.agent == "researcher"}
    assert {t.agent for t in r2} == {"researcher"} and {t.replay_of_id for t in r2} == source_researcher
    chain = {r.replay_of_id for r in _runs(engine, "r2")}
    assert chain == {r.id for r in _runs(engine, "r1")}


def test_a_changed_input_goes_to_the_original_backend(source) -> None:  # type: ignore[no-untyped-def]
    engine, corpus, _world = source
    pool = ModelPool(preloaded={"openai:empty": scripted(*['{"facts": []}'] * 4)}, store=engine)
    # Opted in to non-personalised emails, the writer is asked without fact tags: a prompt never recorded.
    report = asyncio.run(replay(engine, "src", researcher="openai:empty", pages=CorpusWeb(corpus), models=pool,
                                name="e", unpersonalised_emails=True))
    assert report.recorded_answers == 0  # every writer prompt changed (no facts any more)
    assert report.result is not None and report.result.no_facts == 4
    writers = [t for t in _traces(engine, "e") if t.agent == "writer"]
    assert writers and all(t.backend == "heuristic" for t in writers)
    source_writers = {t.id for t in _traces(engine, "src") if t.agent == "writer"}
    firsts = {t.run_id: t for t in reversed(writers)}.values()  # each run's first writer call
    assert {t.replay_of_id for t in firsts} == source_writers
    # A retry the source never made replays nothing.
    assert all(t.replay_of_id is None for t in writers if t not in firsts)


def test_research_that_finds_nothing_skips_the_writer_and_a_better_one_finds_facts(tmp_path, sqlite_engine) -> None:  # type: ignore[no-untyped-def]
    _world, corpus, offer, prospects = small_world(tmp_path, n=3)
    add_prospects(sqlite_engine, "nf", offer, prospects)
    pool = ModelPool(preloaded={"openai:empty": scripted(*['{"facts": []}'] * 3)}, store=sqlite_engine)
    first = asyncio.run(run_campaign(sqlite_engine, "nf", web=CorpusWeb(corpus), researcher="openai:empty",
                                     models=pool))
    assert (first.done, first.no_facts) == (0, 3)
    assert {t.agent for t in _traces(sqlite_engine, "nf")} == {"researcher"}  # no fact, no writer call
    no_facts = [r.id for r in _runs(sqlite_engine, "nf")]
    assert select_replay_runs(sqlite_engine, campaign="nf") == {"nf": no_facts}
    assert select_replay_runs(sqlite_engine, campaign="nf", no_facts_only=True) == {"nf": no_facts}
    assert select_replay_runs(sqlite_engine, campaign="nf", failed_only=True) == {}
    # Replayed through a researcher that finds facts: the writer, kept, has no recorded call to answer
    # from, so it runs on its original backend, and the runs are done.
    better = asyncio.run(replay(sqlite_engine, "nf", researcher="heuristic", pages=CorpusWeb(corpus), name="b"))
    assert better.runs == no_facts and better.result is not None and better.result.done == 3
    assert better.recorded_answers == 0
    writers = [t for t in _traces(sqlite_engine, "b") if t.agent == "writer"]
    assert writers and all(t.backend == "heuristic" and t.replay_of_id is None for t in writers)
    assert {r.status for r in _runs(sqlite_engine, "b")} == {"done"}


def test_replayed_traces_are_reviewed_and_feed_datasets(source) -> None:  # type: ignore[no-untyped-def]
    engine, corpus, _world = source
    asyncio.run(replay(engine, "src", researcher="heuristic", writer="heuristic", pages=CorpusWeb(corpus), name="d"))
    replayed = [stored_id(t) for t in _traces(engine, "d") if t.agent == "writer"]
    queue = review_queue(engine, campaign="d", agent="writer")
    assert sorted(item.trace_id for item in queue) == sorted(replayed) and len(replayed) == 4
    apply_review(engine, replayed[0], "reject")
    dataset = build_sft_dataset(engine, agent="writer", campaigns=["d"], eval_fraction=0.0)
    assert set(dataset.manifest.train_trace_ids) == set(replayed[1:])


def test_missing_snapshots_are_reported_and_the_rest_replayed(source) -> None:  # type: ignore[no-untyped-def]
    engine, _corpus, world = source
    snapshots = SnapshotStore(engine)
    root = world / "sites"
    for page in root.rglob("*.html"):
        snapshots.save(url_for_html_file(page, root), "", 200, "text/html", page.read_text(encoding="utf-8"))
    runs = _runs(engine, "src")
    with Session(engine) as s:
        fetched = {r.id: {c.input["url"] for c in s.exec(select(ToolCall).where(ToolCall.run_id == r.id,
                                                                                  ToolCall.tool == "fetch"))}
                   for r in runs}
        home = next(iter(sorted(fetched[runs[0].id])))  # one page of the first run, gone from the store
        s.exec(delete(WebSnapshot).where(col(WebSnapshot.url) == home))
        s.commit()
    expected = [r.id for r in runs if home in fetched[r.id]]
    assert runs[0].id in expected and len(expected) < len(runs)
    report = asyncio.run(replay(engine, "src", researcher="heuristic", writer="heuristic", name="s"))  # no corpus
    assert [m.run_id for m in report.missing] == expected
    assert all(m.urls == [home] and len(m.trace_ids) == 2 for m in report.missing)
    assert report.result is not None and (report.result.done, report.result.failed) == (len(runs) - len(expected), 0)
    replayed = _traces(engine, "s")
    originals = {stored_id(t): t for t in _traces(engine, "src")}
    assert len(replayed) == 2 * report.result.done
    assert all(t.messages == _source_of(t, originals).messages for t in replayed)


def test_bad_requests_are_refused_clearly(source) -> None:  # type: ignore[no-untyped-def]
    engine, corpus, _world = source
    with pytest.raises(ReplayError, match="--researcher"):
        asyncio.run(replay(engine, "src"))
    with pytest.raises(ReplayError, match="no campaign named 'nope'"):
        asyncio.run(replay(engine, "nope", writer="heuristic"))
    with pytest.raises(ReplayError, match="no finished run"):
        asyncio.run(replay(engine, "src", writer="heuristic", run_ids=[999]))
    assert _runs(engine, replay_campaign_name("src", None, "heuristic")) == []


def test_select_replay_runs_filters_by_trace(source) -> None:  # type: ignore[no-untyped-def]
    engine, corpus, _world = source
    runs = [stored_id(r) for r in _runs(engine, "src")]
    assert select_replay_runs(engine, campaign="src") == {"src": runs}
    writer = next(t for t in _traces(engine, "src") if t.agent == "writer")
    assert select_replay_runs(engine, agent="writer", trace_ids=[stored_id(writer)]) == {"src": [writer.run_id]}
    assert select_replay_runs(engine, backend="openai:gpt-4.1") == {}
    assert select_replay_runs(engine, campaign="src", failed_only=True) == {}
    assert select_replay_runs(engine, campaign="src", no_facts_only=True) == {}
    report = asyncio.run(replay(engine, "src", writer="heuristic", run_ids=[runs[1]], pages=CorpusWeb(corpus)))
    assert report.runs == [runs[1]] and [r.replay_of_id for r in _runs(engine, report.campaign)] == [runs[1]]


def test_recorded_answers_without_fallback_say_what_to_do() -> None:
    from langchain_core.messages import HumanMessage

    model = RecordedAnswers(answers={messages_key([{"role": "user", "content": "hi"}]): (7, "hello")})
    answer = model.invoke([HumanMessage("hi")])
    assert answer.text == "hello" and answer.response_metadata["recorded_trace_id"] == 7
    with pytest.raises(ReplayInputChangedError, match="replay this agent too"):
        model.invoke([HumanMessage("something else")])
