"""The review queue (finetune.review) and the terminal review (`outreach review`), on a real heuristic campaign.

The store holds two campaigns run through the real graph: ``c`` (three prospects, heuristic researcher and
writer, all valid) and ``bad`` (one prospect whose writer is a scripted model that writes spam twice, so the run
fails validation and has two writer traces).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import pytest
from rich.console import Console
from sqlalchemy import Engine
from sqlmodel import col, select
from typer.testing import CliRunner

from finetune.datasets import build_sft_dataset
from finetune.review import (
    ReviewInputError,
    ReviewItem,
    ReviewNotFoundError,
    apply_review,
    editable_text,
    load_item,
    output_from_editable,
    queue_trace_ids,
    review_counts,
    review_queue,
    validate_edit,
)
from graphs.models import ModelPool
from graphs.runner import add_prospects, run_campaign
from outreach.cli import app
from store import FactRecord, ProfileRecord, Review, Trace, session_scope
from tests.helpers import scripted, small_world
from tools import CorpusWeb

BAD_DRAFT = json.dumps({"subject": "Hi", "body": "Buy now. {{first_name}}"})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 4-company demo world in a corpus (built once per module: it is the slow part)."""
    return small_world(tmp_path_factory.mktemp("review-world"), n=4)


def fill_store(engine: Engine, world: Any) -> None:
    """Run campaign ``c`` (3 prospects, heuristic) and ``bad`` (1 prospect, a writer that fails validation)."""
    _dir, corpus, offer, prospects = world
    add_prospects(engine, "c", offer, prospects[:3])
    asyncio.run(run_campaign(engine, "c", web=CorpusWeb(corpus), concurrency=1))
    add_prospects(engine, "bad", offer, prospects[3:4])
    pool = ModelPool(preloaded={"openai:bad": scripted(BAD_DRAFT, BAD_DRAFT)})
    asyncio.run(run_campaign(engine, "bad", web=CorpusWeb(corpus), writer="openai:bad", models=pool))


@pytest.fixture
def store(engine: Engine, world: Any) -> Engine:
    fill_store(engine, world)
    return engine


def _reviews(engine: Engine) -> list[Review]:
    with session_scope(engine) as s:
        return list(s.exec(select(Review).order_by(col(Review.id))).all())


def _items(engine: Engine, **kw: Any) -> dict[tuple[str, str], list[ReviewItem]]:
    out: dict[tuple[str, str], list[ReviewItem]] = {}
    for item in review_queue(engine, failed_first=False, **kw):
        out.setdefault((item.campaign, item.kind), []).append(item)
    return out


# --------------------------------------------------------------------------- queue, filters, counts


def test_queue_holds_the_last_trace_of_each_run_and_agent_failed_first(store: Engine) -> None:
    queue = review_queue(store)
    assert len(queue) == 8  # 4 runs x (profile + email)
    assert [(i.campaign, i.failed) for i in queue[:2]] == [("bad", True), ("bad", True)]
    assert all(not i.failed and i.campaign == "c" for i in queue[2:])
    assert [i.trace_id for i in queue[2:]] == sorted(i.trace_id for i in queue[2:])
    with session_scope(store) as s:
        writer_traces = s.exec(select(Trace).where(Trace.agent == "writer", Trace.backend == "openai:bad")
                               .order_by(col(Trace.id))).all()
    assert len(writer_traces) == 2  # the spam draft, then the retry after validation feedback
    bad_email = next(i for i in queue if i.kind == "email" and i.failed)
    assert bad_email.trace_id == writer_traces[-1].id and bad_email.backend == "openai:bad"
    assert bad_email.run_status == "failed" and bad_email.email is not None and not bad_email.email.valid
    assert bad_email.email.errors and not all(bad_email.email.checks.values())
    good = next(i for i in queue if i.kind == "email" and not i.failed)
    assert good.email is not None and good.email.valid and "{{" in good.email.body_template
    assert "{{" not in good.email.body and good.prospect.first_name in good.email.body
    profile = next(i for i in queue if i.kind == "profile" and not i.failed)
    assert profile.agent == "researcher" and profile.profile is not None and profile.profile.facts
    assert all(f.value.lower() in f.evidence.lower() and f.source_url.startswith("http")
               for f in profile.profile.facts)
    assert profile.profile.sources and profile.review is None and profile.prospect.company == profile.profile.company
    assert json.loads(profile.output)["facts"]
    # without failed-first the order is plain trace order
    assert queue_trace_ids(store, failed_first=False) == sorted(i.trace_id for i in queue)
    assert [i.trace_id for i in review_queue(store, limit=3)] == [i.trace_id for i in queue[:3]]


def test_filters_and_counts(store: Engine) -> None:
    assert {i.kind for i in review_queue(store, agent="writer")} == {"email"}
    assert len(review_queue(store, agent="researcher")) == 4
    assert {i.campaign for i in review_queue(store, campaign="bad")} == {"bad"}
    assert [i.kind for i in review_queue(store, backend="openai:bad")] == ["email"]
    assert review_queue(store, campaign="nope") == []
    counts = review_counts(store)
    assert counts.as_dict() == {"total": 8, "reviewed": 0, "approved": 0, "edited": 0, "rejected": 0, "left": 8,
                                "failed": 2}
    assert counts.by_agent["writer"]["total"] == 4 and counts.by_agent["researcher"]["failed"] == 1
    assert review_counts(store, campaign="bad", agent="writer").total == 1
    with pytest.raises(ReviewInputError, match="'judge'"):
        review_queue(store, agent="judge")


# --------------------------------------------------------------------------- actions and the dataset


def test_approve_edit_reject_become_training_decisions(store: Engine) -> None:
    emails = _items(store)[("c", "email")]
    approved, edited, rejected = emails
    text = editable_text(edited).replace("\n\n", "\n\nA short note first.\n\n", 1)
    new_output = output_from_editable("email", text)
    apply_review(store, approved.trace_id, "approve", reviewer="ana")
    review = apply_review(store, edited.trace_id, "edit", edited_output=new_output, reviewer="ana", note="warmer")
    apply_review(store, rejected.trace_id, "reject", reviewer="ana", note="off tone")

    rows = _reviews(store)
    assert [(r.trace_id, r.status) for r in rows] == [(approved.trace_id, "approved"), (edited.trace_id, "edited"),
                                                      (rejected.trace_id, "rejected")]
    assert all(r.email_id is not None and r.profile_id is None and r.reviewer == "ana" for r in rows)
    assert rows[1].email_id == edited.email.id and rows[1].note == "warmer"  # type: ignore[union-attr]
    stored = json.loads(review.edited_output or "")
    assert list(stored) == ["subject", "body"] and stored["body"].count("A short note first.") == 1
    assert stored["subject"] == json.loads(edited.output)["subject"]

    counts = review_counts(store)
    assert (counts.reviewed, counts.approved, counts.edited, counts.rejected, counts.left) == (3, 1, 1, 1, 5)
    assert {i.trace_id for i in review_queue(store)}.isdisjoint({r.trace_id for r in rows})
    everything = {i.trace_id: i for i in review_queue(store, unreviewed_only=False)}
    assert everything[edited.trace_id].status == "edited" and everything[approved.trace_id].status == "approved"
    assert "A short note first." in editable_text(everything[edited.trace_id])  # editing again starts from the edit

    ds = build_sft_dataset(store, agent="writer", review="any", eval_fraction=0, near_dup_threshold=2)
    targets = dict(zip(ds.manifest.train_trace_ids, (r["messages"][-1]["content"] for r in ds.train), strict=True))
    assert rejected.trace_id not in targets
    assert targets[edited.trace_id] == review.edited_output
    assert targets[approved.trace_id] == approved.output

    # the latest review decides and history is kept
    apply_review(store, rejected.trace_id, "approve")
    assert len(_reviews(store)) == 4
    ds = build_sft_dataset(store, agent="writer", review="any", eval_fraction=0, near_dup_threshold=2)
    assert rejected.trace_id in ds.manifest.train_trace_ids


def test_profile_edit_is_checked_against_the_prompt_sentences(store: Engine) -> None:
    item = _items(store)[("c", "profile")][0]
    facts = json.loads(item.output)["facts"]
    assert len(facts) >= 3
    kept = {"facts": facts[1:]}  # drop a fact the reviewer thinks is wrong
    review = apply_review(store, item.trace_id, "edit", edited_output=json.dumps(kept), reviewer="bo")
    assert review.profile_id == item.profile.id and review.email_id is None  # type: ignore[union-attr]
    assert json.loads(review.edited_output or "") == kept
    assert list(json.loads(review.edited_output or "")["facts"][0]) == list(facts[1])  # the agent's key order
    ds = build_sft_dataset(store, agent="researcher", review="any", eval_fraction=0, near_dup_threshold=2)
    row = ds.train[ds.manifest.train_trace_ids.index(item.trace_id)]
    assert row["messages"][-1]["content"] == review.edited_output

    first = facts[0]
    bad_edits = {
        "not a sentence id": {**first, "evidence": "S999"},
        "value does not occur": {**first, "value": first["value"] + " Holdings"},
        "quote": {**first, "evidence": "a quote instead of an id"},
        "unknown field": {**first, "field": "revenue"},
    }
    for name, fact in bad_edits.items():
        with pytest.raises(ReviewInputError) as info:
            apply_review(store, item.trace_id, "edit", edited_output=json.dumps({"facts": [fact]}))
        assert "fact 1" in str(info.value), name
    with pytest.raises(ReviewInputError, match="already has a fact"):
        apply_review(store, item.trace_id, "edit", edited_output=json.dumps({"facts": [first, first]}))
    with pytest.raises(ReviewInputError, match="researcher output JSON"):
        apply_review(store, item.trace_id, "edit", edited_output='{"facts": "none"}')
    assert len(_reviews(store)) == 1  # only the valid edit was written


def test_edits_are_checked_against_the_traces_task(store: Engine) -> None:
    queue = _items(store)
    email, profile = queue[("c", "email")][0], queue[("c", "profile")][0]
    with session_scope(store) as s:
        trace = s.get(Trace, email.trace_id)
        assert trace is not None and trace.task is not None and trace.task["kind"] == "writing"
        # The writer was offered these tags only: a tag the run could fill but the task did not offer is refused.
        trace.task = {**trace.task, "merge_tags": [t for t in trace.task["merge_tags"] if t["name"] != "first_name"]}
        research = s.get(Trace, profile.trace_id)
        assert research is not None and research.task is not None and research.task["kind"] == "extraction"
        research.task = None  # a trace recorded before tasks were stored: its task is read back from the prompt
    draft = json.loads(email.output)
    assert "{{first_name}}" in draft["body"]
    with pytest.raises(ReviewInputError, match=r"not offered .*\{\{first_name\}\}"):
        apply_review(store, email.trace_id, "edit", edited_output=email.output)
    facts = json.loads(profile.output)["facts"]
    apply_review(store, profile.trace_id, "edit", edited_output=json.dumps({"facts": facts[1:]}))
    with pytest.raises(ReviewInputError, match="fact 1"):
        apply_review(store, profile.trace_id, "edit",
                     edited_output=json.dumps({"facts": [{**facts[0], "evidence": "S999"}]}))


def test_drops_are_shown_by_reason(store: Engine) -> None:
    from outreach.cli_review import render_item

    item = _items(store)[("c", "profile")][0]
    with session_scope(store) as s:
        record = s.get(ProfileRecord, item.profile.id)  # type: ignore[union-attr]
        assert record is not None
        record.dropped_facts, record.drop_reasons = 5, {"misattributed": 2, "ungrounded": 1}
    loaded = load_item(store, item.trace_id)
    assert loaded.profile is not None and loaded.profile.drop_reasons == {"misattributed": 2, "ungrounded": 1}
    # Two drops were stored before reasons were recorded: they are counted, not given a reason.
    assert loaded.profile.drops_text == ("5 fact(s) dropped (ungrounded 1, misattributed 2, "
                                         "reason not recorded 2)")
    console = Console(width=200, record=True)
    console.print(render_item(loaded, 0, 1))
    assert "5 fact(s) dropped (ungrounded 1, misattributed 2, reason not recorded 2)" in console.export_text()
    clean = dataclasses.replace(loaded.profile, dropped_facts=0, drop_reasons={})
    assert clean.drops_text == "0 fact(s) dropped"


def test_bad_actions_and_missing_traces_write_nothing(store: Engine) -> None:
    queue = _items(store)
    email = queue[("c", "email")][0]
    draft = json.loads(email.output)
    with pytest.raises(ReviewInputError, match=r"\{\{compny\}\}"):
        apply_review(store, email.trace_id, "edit",
                     edited_output=json.dumps({**draft, "body": draft["body"] + " {{compny}}"}))
    with pytest.raises(ReviewInputError, match="writer output JSON"):
        apply_review(store, email.trace_id, "edit", edited_output="just some words")
    with pytest.raises(ReviewInputError, match="non-empty subject"):
        apply_review(store, email.trace_id, "edit", edited_output=json.dumps({"subject": " ", "body": "x"}))
    with pytest.raises(ReviewInputError, match="empty"):
        apply_review(store, email.trace_id, "edit")
    with pytest.raises(ReviewInputError, match="takes no edited output"):
        apply_review(store, email.trace_id, "approve", edited_output=email.output)
    with pytest.raises(ReviewInputError, match="unknown review action 'publish'"):
        apply_review(store, email.trace_id, "publish")
    with pytest.raises(ReviewNotFoundError) as info:
        apply_review(store, 424242, "approve")
    assert "424242" in str(info.value) and "outreach review" in str(info.value) and info.value.trace_id == 424242
    with pytest.raises(ReviewNotFoundError):
        load_item(store, 424242)
    with session_scope(store) as s:
        superseded = s.exec(select(Trace.id).where(Trace.backend == "openai:bad").order_by(col(Trace.id))).first()
    with pytest.raises(ReviewNotFoundError, match="superseded"):
        apply_review(store, int(superseded or 0), "reject")
    assert _reviews(store) == []
    # a valid edit of the failed email checks out (validate_edit writes nothing either)
    failed = queue[("bad", "email")][0]
    fixed = validate_edit(store, failed.trace_id, email.output)
    assert json.loads(fixed) == draft and _reviews(store) == []


def test_editable_text_round_trips(store: Engine) -> None:
    queue = _items(store)
    email = queue[("c", "email")][0]
    text = editable_text(email)
    assert text.startswith("Subject: ") and "\n\n" in text
    assert json.loads(output_from_editable("email", text)) == json.loads(email.output)
    assert json.loads(output_from_editable("email", text.replace("\n", "\r\n"))) == json.loads(email.output)
    assert output_from_editable("email", email.output) == email.output.strip()  # JSON is taken as is
    with pytest.raises(ReviewInputError, match="Subject"):
        output_from_editable("email", "Hello there\n\nbody")
    with pytest.raises(ReviewInputError, match="empty"):
        output_from_editable("profile", "  \n")
    profile = queue[("c", "profile")][0]
    ptext = editable_text(profile)
    assert ptext.count("\n") == len(json.loads(profile.output)["facts"]) + 2  # one fact per line
    assert json.loads(output_from_editable("profile", ptext)) == json.loads(profile.output)


def test_a_reviewed_failed_run_can_be_retried(store: Engine, world: Any) -> None:
    bad = _items(store)[("bad", "email")][0]
    apply_review(store, bad.trace_id, "reject")
    _dir, corpus, _offer, _prospects = world
    pool = ModelPool(preloaded={"openai:bad": scripted(BAD_DRAFT, BAD_DRAFT)})
    asyncio.run(run_campaign(store, "bad", web=CorpusWeb(corpus), writer="openai:bad", models=pool,
                             retry_failed=True))
    assert [r.trace_id for r in _reviews(store)] == [bad.trace_id]  # the review survives the rerun


# --------------------------------------------------------------------------- terminal


@pytest.fixture
def cli_store(sqlite_engine: Engine, world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("OUTREACH_CONFIG", str(tmp_path / "empty.toml"))
    fill_store(sqlite_engine, world)
    return sqlite_engine


def _invoke(engine: Engine, *args: str, keys: str) -> Any:
    result = CliRunner().invoke(app, ["review", "--store", engine.url.render_as_string(hide_password=False),
                                      "--reviewer", "cli", *args], input=keys, env={"COLUMNS": "200"})
    return result


def test_terminal_review_with_single_keys(cli_store: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    with session_scope(cli_store) as s:  # hostile page text must not drive the terminal
        fact = s.exec(select(FactRecord).order_by(col(FactRecord.id))).first()
        assert fact is not None
        fact.evidence = fact.evidence + " \x1b[2J[red]boo[/red]"
    seen: list[str] = []

    def fake_edit(text: str, **_: Any) -> str | None:
        seen.append(text)
        if len(seen) == 1:
            assert text.startswith("Subject: ")  # the writer's templates, ready to edit
            return "Subject: broken\n\nHi {{nickname}}"
        if len(seen) == 2:
            assert text == "Subject: broken\n\nHi {{nickname}}"  # the rejected edit is kept for another try
            return None  # closed without saving
        return seen[0].replace("\n\n", "\n\nAdded by the reviewer.\n\n", 1)

    monkeypatch.setattr(click, "edit", fake_edit)
    # order (failed first): bad profile, bad email, then c: profile, email, profile, email, ...
    # keys: ? help, x unknown, a approve | e (bad tag) e (cancelled) e (saved) | r reject | s skip | q quit
    result = _invoke(cli_store, keys="?xa" + "eee" + "r" + "s" + "q")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "a approve" in out and "unknown key 'x'" in out
    assert "{{nickname}}" in out and "edit not saved" in out and "edit cancelled" in out
    assert "this session: approved 1, edited 1, rejected 1, skipped 1" in out
    assert "reviewed 3" in out and "left 5" in out
    assert "\x1b" not in out and "[red]boo[/red]" in out  # shown as text, control characters replaced
    rows = _reviews(cli_store)
    assert [r.status for r in rows] == ["approved", "edited", "rejected"] and {r.reviewer for r in rows} == {"cli"}
    assert "Added by the reviewer." in json.loads(rows[1].edited_output or "")["body"]
    ds = build_sft_dataset(cli_store, agent="writer", review="any", valid_only=False, eval_fraction=0,
                           near_dup_threshold=2)
    row = ds.train[ds.manifest.train_trace_ids.index(int(rows[1].trace_id or 0))]
    assert row["messages"][-1]["content"] == rows[1].edited_output

    # filters, and nothing left for this agent after reviewing everything
    result = _invoke(cli_store, "--agent", "writer", "--campaign", "c", keys="aaaa")
    assert result.exit_code == 0 and "this session: approved 3" in result.output
    result = _invoke(cli_store, "--agent", "writer", "--campaign", "c", keys="")
    assert result.exit_code == 0 and "nothing to review" in result.output
    assert _invoke(cli_store, "--agent", "judge", keys="").exit_code == 2
    # the web page refuses a non-loopback address without a token, before anything starts
    result = _invoke(cli_store, "--web", "--host", "0.0.0.0", keys="")
    assert result.exit_code == 2 and "--token" in result.output
