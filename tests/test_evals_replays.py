"""The replay comparison: figures on both sides, from the store, for a replay that changed things."""

from __future__ import annotations

import asyncio
import json

import pytest

from evals.replays import compare_replay
from finetune.replay import replay
from graphs.models import ModelPool
from graphs.runner import add_prospects, run_campaign
from tests.helpers import scripted, small_world
from tools import CorpusWeb


def test_a_researcher_that_finds_nothing_shows_in_every_figure(tmp_path, sqlite_engine) -> None:  # type: ignore[no-untyped-def]
    _world, corpus, offer, prospects = small_world(tmp_path, n=3)
    add_prospects(sqlite_engine, "src", offer, prospects)
    asyncio.run(run_campaign(sqlite_engine, "src", web=CorpusWeb(corpus)))
    pool = ModelPool(preloaded={"openai:empty": scripted(*['{"facts": []}'] * 6)}, store=sqlite_engine)
    asyncio.run(replay(sqlite_engine, "src", researcher="openai:empty", pages=CorpusWeb(corpus), models=pool,
                       name="empty"))
    comparison = compare_replay(sqlite_engine, "empty")
    assert comparison.source_campaigns == ["src"] and comparison.runs == 3
    # No verified fact, no email: the writer is never asked, so only the researcher is compared.
    (researcher,) = comparison.agents
    assert (researcher.agent, researcher.source_backends, researcher.replay_backends) == (
        "researcher", ["heuristic"], ["openai:empty"])
    no_facts = researcher.row("runs without a verified fact")
    assert (no_facts.source, no_facts.replay) == (0, 3)
    kept = researcher.row("facts kept")
    assert kept.source is not None and kept.source > 0 and kept.replay == 0
    assert researcher.row("fields agreeing with the source").replay == 0.0
    assert researcher.row("identical inputs").replay == 1.0  # same pages seen
    assert researcher.row("identical outputs").replay == 0.0
    assert researcher.row("schema-valid answers").replay == 1.0
    assert [r.metric for r in researcher.rows if r.metric.startswith("dropped: ")] == [
        "dropped: ungrounded", "dropped: misattributed", "dropped: bad value"]

    # Opted in to non-personalised emails, the writer's input changed (no fact tags), so it ran on its
    # original backend and its emails differ and use no fact.
    asyncio.run(replay(sqlite_engine, "src", researcher="openai:empty", pages=CorpusWeb(corpus), models=pool,
                       name="plain", unpersonalised_emails=True))
    researcher, writer = compare_replay(sqlite_engine, "plain").agents
    assert researcher.row("runs without a verified fact").replay == 3
    assert writer.replay_backends == ["heuristic"] and writer.row("identical inputs").replay == 0.0
    assert writer.row("rubric all-pass rate").source == 1.0
    assert writer.row("valid-email rate").replay == 1.0 and writer.row("facts used per email").replay == 0
    similarity = writer.row("text similarity to the source").replay
    assert similarity is None or similarity < 1.0
    with pytest.raises(KeyError, match="not a replay"):
        compare_replay(sqlite_engine, "src")
    with pytest.raises(KeyError, match="no campaign named"):
        compare_replay(sqlite_engine, "nope")


def test_drops_by_reason_on_both_sides(tmp_path, sqlite_engine) -> None:  # type: ignore[no-untyped-def]
    _world, corpus, offer, prospects = small_world(tmp_path, n=2)
    add_prospects(sqlite_engine, "src", offer, prospects)
    asyncio.run(run_campaign(sqlite_engine, "src", web=CorpusWeb(corpus)))
    # S1 exists in every prompt; a value that is not in it is ungrounded, an unknown sentence id too.
    answer = json.dumps({"facts": [{"field": "location", "evidence": "S1", "value": "Atlantis"},
                                   {"field": "industry", "evidence": "S999", "value": "software"}]})
    pool = ModelPool(preloaded={"openai:wrong": scripted(answer, answer)}, store=sqlite_engine)
    asyncio.run(replay(sqlite_engine, "src", researcher="openai:wrong", pages=CorpusWeb(corpus), models=pool,
                       name="wrong"))
    (researcher,) = compare_replay(sqlite_engine, "wrong").agents
    assert researcher.row("facts dropped").replay == 4 and researcher.row("dropped: ungrounded").replay == 4
    assert researcher.row("dropped: misattributed").replay == 0
    assert researcher.row("grounded-fact rate").replay == 0.0
