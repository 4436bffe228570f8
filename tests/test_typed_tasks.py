"""Typed tasks end to end: stored with every trace, read back from old traces' prompts by the one legacy
parser, and answered by the heuristic teacher from their data (codes, not wording)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, inspect, text
from sqlmodel import Session, col, select

from agents import HeuristicChatModel, render, validate_email
from agents.legacy_tasks import task_from_messages, trace_task
from agents.researcher import build_extraction_messages
from agents.schemas import EmailDraft, Fact, Offer, Profile, ProspectInfo
from agents.writer import build_writer_messages, writer_messages, writing_task
from core.tasks import ExtractionTask, FailedCheck, WritingTask, dump_task, load_task
from finetune.datasets import build_sft_dataset
from finetune.replay import replay
from graphs.models import ModelPool
from graphs.recorder import call_task
from graphs.runner import add_prospects, run_campaign
from store.migrations import migrate
from store.models import Campaign, Run, Trace
from tests.helpers import scripted, small_world
from tools import CorpusWeb

SPAM_DRAFT = json.dumps({"subject": "Act now", "body": "Buy now, {{first_name}}: {{product}} is guaranteed."})


def _traces(engine: Engine, campaign: str) -> list[Trace]:
    with Session(engine) as s:
        return list(s.exec(select(Trace).join(Run, col(Run.id) == col(Trace.run_id))
                           .join(Campaign, col(Campaign.id) == col(Run.campaign_id))
                           .where(Campaign.name == campaign).order_by(col(Trace.id))).all())


@pytest.fixture
def campaigns(tmp_path: Path, sqlite_engine: Engine) -> tuple[Engine, Any]:
    """``src``: 3 demo companies through the heuristic; ``bad``: 1 whose writer writes spam twice (so its
    second writer call carries the first's failed checks as feedback)."""
    _world, corpus, offer, prospects = small_world(tmp_path, n=4)
    add_prospects(sqlite_engine, "src", offer, prospects[:3])
    asyncio.run(run_campaign(sqlite_engine, "src", web=CorpusWeb(corpus)))
    add_prospects(sqlite_engine, "bad", offer, prospects[3:])
    pool = ModelPool(preloaded={"openai:bad": scripted(SPAM_DRAFT, SPAM_DRAFT)})
    asyncio.run(run_campaign(sqlite_engine, "bad", web=CorpusWeb(corpus), writer="openai:bad", models=pool))
    return sqlite_engine, corpus


def test_every_trace_stores_the_task_its_prompt_was_rendered_from(campaigns: tuple[Engine, Any]) -> None:
    engine, _corpus = campaigns
    traces = _traces(engine, "src") + _traces(engine, "bad")
    assert len(traces) == 3 * 2 + 1 + 2
    for trace in traces:
        assert trace.task is not None, trace.id
        task = load_task(trace.task)
        assert isinstance(task, ExtractionTask if trace.agent == "researcher" else WritingTask)
        messages = build_extraction_messages(task) if isinstance(task, ExtractionTask) else writer_messages(task)
        from langchain_core.messages import convert_to_openai_messages

        assert convert_to_openai_messages(messages) == trace.messages  # the prompt is the task rendered
        # The one legacy parser reads the same task back from the prompt (what old traces rely on).
        assert task_from_messages(trace.messages) == task
    retry = _traces(engine, "bad")[-1]
    feedback = load_task(retry.task).feedback  # type: ignore[union-attr]
    assert {c.code for c in feedback} >= {"spam", "no_fact"} and any(c.subject == "buy now" for c in feedback)


def test_old_traces_without_a_task_still_build_datasets_and_replay(campaigns: tuple[Engine, Any]) -> None:
    engine, corpus = campaigns
    stored = {t.id: t.task for t in _traces(engine, "src")}
    with Session(engine) as s:  # as if recorded before traces.task existed
        s.exec(text("UPDATE traces SET task = NULL"))  # type: ignore[call-overload]
        s.commit()
    assert all(t.task is None for t in _traces(engine, "src"))
    for agent in ("researcher", "writer"):
        ds = build_sft_dataset(engine, agent=agent, campaigns=["src"], eval_fraction=0.0, near_dup_threshold=2)
        assert len(ds.train) == 3
        for trace_id, row in zip(ds.manifest.train_trace_ids, ds.train, strict=True):
            assert row["task"] == stored[trace_id]
    # The researcher keeps its recorded answers (found by their messages), the writer is asked again.
    report = asyncio.run(replay(engine, "src", writer="heuristic", pages=CorpusWeb(corpus)))
    assert report.result is not None and report.result.done == 3 and report.recorded_answers == 3
    replayed = _traces(engine, report.campaign)
    originals = {t.id: t for t in _traces(engine, "src")}
    assert len(replayed) == 3 and all(t.task is not None for t in replayed)
    for trace in replayed:
        source = originals[trace.replay_of_id]  # type: ignore[index]
        assert trace.output == source.output and trace.task == stored[source.id]


def test_migration_6_adds_the_column_to_an_old_store(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    migrate(engine)
    messages = [{"role": "user", "content": "Company: Acme\nWebsite: https://acme.example\n\nSentences:\n"
                 "Source 1: https://acme.example/\nS1: Acme was founded in 2012."}]
    with engine.begin() as conn:  # back to a store made before migration 6, holding one old trace
        conn.execute(text("ALTER TABLE traces DROP COLUMN task"))
        conn.execute(text("DELETE FROM schema_migrations WHERE version = 6"))
        conn.execute(text("INSERT INTO traces (agent, step, backend, messages, output, input_tokens, output_tokens, "
                          "latency_ms, cost_usd, created_at) VALUES ('researcher', 'research', 'heuristic', "
                          ":m, '{}', 0, 0, 0, 0, '2026-01-01 00:00:00')"), {"m": json.dumps(messages)})
    assert "task" not in {c["name"] for c in inspect(engine).get_columns("traces")}
    assert migrate(engine) == [6]
    assert migrate(engine) == []  # applied once
    with Session(engine) as s:
        old = s.exec(select(Trace)).one()
    assert old.task is None
    task = trace_task(old)
    assert isinstance(task, ExtractionTask) and task.company == "Acme" and task.sentences[0].id == "S1"
    assert len(task.fields) == 8  # a prompt without a field list asked for every field


OFFER = Offer(sender_name="Sam Lee", sender_company="Routewise", product="Routewise Dispatch",
              value_proposition="It assigns routes automatically so dispatchers plan in minutes.",
              call_to_action="Would you be open to a 15-minute call next week?",
              problems_solved=["manual route planning", "late deliveries"],
              proof_point="Northwind cut planning by 40%.")
PROSPECT = ProspectInfo(first_name="Dana", title="VP Operations", email="dana@acme.example", company="Acme Freight")
PROFILE = Profile(company="Acme Freight", facts=[
    Fact(field="pain_point", value="late deliveries", evidence="e", source_url="u"),
    Fact(field="location", value="Austin, Texas", evidence="e", source_url="u")])


def _draft(feedback: tuple[FailedCheck, ...]) -> EmailDraft:
    task = writing_task(OFFER, PROSPECT, PROFILE, feedback)
    return EmailDraft.model_validate_json(HeuristicChatModel().invoke(writer_messages(task), task=task).text)


def test_rewording_a_validation_message_does_not_change_the_retry() -> None:
    long_subject = "An urgent and very long subject line about all the delivery routes of Acme Freight in Texas"
    bad = EmailDraft(subject=long_subject,
                     body="Hi {{first_name}}, act now. " + "word " * 230)
    result = validate_email(bad, render(bad, PROSPECT, PROFILE, OFFER), PROSPECT, PROFILE, OFFER)
    codes = {c.code for c in result.failed}
    assert {"too_long", "subject_too_long", "spam", "no_fact"} <= codes
    first, retry = _draft(()), _draft(tuple(result.failed))
    assert retry != first and retry.subject == "Quick question"
    reworded = tuple(c.model_copy(update={"detail": f"check {i} failed"}) for i, c in enumerate(result.failed))
    assert _draft(reworded) == retry
    # The prompt shows the new wording; the answer follows the codes.
    assert "- check 0 failed" in build_writer_messages(OFFER, PROSPECT, PROFILE, reworded)[2].text


def test_a_calls_task_is_read_from_its_invocation_params() -> None:
    task = writing_task(OFFER, PROSPECT, PROFILE)
    assert call_task({"task": task}) == dump_task(task)
    assert call_task({"task": dump_task(task)}) == dump_task(task)
    assert call_task({}, {"task": task}) == dump_task(task)
    assert call_task({"task": {"kind": "poem"}}) is None and call_task(None) is None
