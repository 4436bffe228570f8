"""The ``writer-brief`` answer format: a short brief rendered from the writing task, the teacher's answers with the
offer's texts as offer tags, written back before the answer leaves the backend; training rows and the local
backend use the same brief."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agents.heuristic import write_email
from agents.schemas import Fact, Offer, Profile, ProspectInfo
from agents.writer import writer_messages, writing_task
from core.tasks import FailedCheck, WritingTask, dump_task
from miniatures.formats import (
    ANSWER_FORMATS,
    OFFER_TAGS,
    WRITER_BRIEF,
    brief_answer,
    brief_messages,
    brief_row,
    expand_offer_tags,
    offer_tag_values,
)

OFFER = Offer(
    sender_name="Ilse Varnum", sender_title="Account Executive", sender_company="Tallyfold",
    product="Tallyfold Signals",
    value_proposition="Tallyfold Signals spots the accounts that are ready to buy.",
    call_to_action="Would a 15-minute call next week be worth it?",
    problems_solved=["finding the accounts that are ready to buy", "expanding into a market without local contacts"],
    proof_point='Brightline\'s team booked 30% more "real" meetings.',
    cta_style="meeting",
)


def _task(offer: Offer = OFFER, title: str = "Head of Growth", facts: bool = True) -> WritingTask:
    prospect = ProspectInfo(first_name="Ada", last_name="Lovel", title=title, email="ada@acme.example",
                            company="Acme Freight", website="https://acme.example")
    kept = [("location", "Omaha, Nebraska"), ("recent_event", "expanded into the Netherlands")] if facts else []
    profile = Profile(company=prospect.company, website=prospect.website, facts=[
        Fact(field=f, value=v, evidence=f"S{j}", source_url=prospect.website) for j, (f, v) in enumerate(kept)])
    return writing_task(offer, prospect, profile)


def _row(task: WritingTask) -> dict[str, object]:
    messages = [{"role": "system" if m.type == "system" else "user", "content": str(m.content)}
                for m in writer_messages(task)]
    answer = json.dumps(write_email(task), ensure_ascii=False)
    return {"messages": [*messages, {"role": "assistant", "content": answer}], "task": dump_task(task)}


def test_the_brief_holds_what_changes_per_prospect_and_offer() -> None:
    task = _task()
    (message,) = brief_messages(task)
    assert message["role"] == "user"
    assert message["content"].splitlines() == [
        "Title: Head of Growth",
        "Offer: Tallyfold Signals spots the accounts that are ready to buy.",
        "Solves: finding the accounts that are ready to buy; expanding into a market without local contacts",
        "Proof: yes",
        "Ask: meeting",
        "Tags: first_name last_name company title sender_name sender_company product",
        "fact.location: Omaha, Nebraska",
        "fact.recent_event: expanded into the Netherlands",
    ]
    bare = _task(OFFER.model_copy(update={"proof_point": "", "problems_solved": [], "cta_style": ""}), title="",
                 facts=False)
    lines = brief_messages(bare)[0]["content"].splitlines()
    assert lines[0] == "Title: -" and "Proof: no" in lines
    assert not any(line.startswith(("Solves:", "Ask:", "fact.")) for line in lines)
    retry = task.model_copy(update={"feedback": (FailedCheck(code="too_long", detail="the body is too long"),
                                                 FailedCheck(code="too_long", detail="the body is too long"))})
    assert brief_messages(retry)[0]["content"].endswith("\nFix: the body is too long")
    # About a quarter of the agent's own prompt.
    agent_chars = sum(len(str(m.content)) for m in writer_messages(task))
    assert len(message["content"]) * 3 < agent_chars


def test_teacher_answers_round_trip_through_offer_tags() -> None:
    task = _task()
    answer = json.dumps(write_email(task), ensure_ascii=False)
    brief = brief_answer(answer, task)
    assert brief is not None
    body = json.loads(brief)["body"]
    assert "{{cta}}" in body and "{{opt_out}}" in body and "{{proof}}" in body
    assert OFFER.call_to_action not in body and OFFER.proof_point not in body
    assert expand_offer_tags(brief, task) == answer  # quotes in the proof point are JSON-escaped back
    assert brief_answer("not json", task) is None and brief_answer('{"subject": 1, "body": "x"}', task) is None
    # A cut-short answer is expanded as far as it goes; a tag whose text is blank is left for validation.
    assert expand_offer_tags('{"subject": "x", "body": "{{cta}} and {{pro', task).endswith("worth it? and {{pro")
    no_proof = _task(OFFER.model_copy(update={"proof_point": ""}))
    assert "proof" not in offer_tag_values(no_proof)
    assert expand_offer_tags("{{proof}}", no_proof) == "{{proof}}"
    assert set(OFFER_TAGS) == {"cta", "proof", "opt_out"} and WRITER_BRIEF in ANSWER_FORMATS


def test_rows_are_made_from_the_rows_task() -> None:
    task = _task()
    row = brief_row(_row(task))
    assert row is not None
    assert row["messages"][0] == brief_messages(task)[0]
    assert row["messages"][1]["role"] == "assistant" and "{{cta}}" in row["messages"][1]["content"]
    assert row["task"] == dump_task(task)
    assert brief_row({"messages": _row(task)["messages"]}) is None  # no task
    extraction = {"messages": _row(task)["messages"], "task": {"kind": "extraction", "company": "A", "website": "w",
                                                              "fields": [], "sentences": []}}
    assert brief_row(extraction) is None
    messages = [*writer_messages(task)]
    broken = {"messages": [{"role": "user", "content": str(messages[-1].content)},
                           {"role": "assistant", "content": "no json"}], "task": dump_task(task)}
    assert brief_row(broken) is None


def test_training_reads_brief_rows(tmp_path: Path) -> None:
    """``TrainConfig(answer_format="writer-brief")``: the dataset's rows become brief rows before training; a
    dataset without writing tasks is refused with the format named."""
    from finetune.config import TrainConfig
    from finetune.train import _load_rows

    rows = [_row(_task()), _row(_task(title="CFO"))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = TrainConfig(base_model="b", dataset_dir=str(tmp_path), output_dir=str(tmp_path / "o"),
                         answer_format="writer-brief", system_prompt=False)
    train, evals, _manifest = _load_rows(config)
    assert [r["messages"][0]["content"].splitlines()[0] for r in train] == ["Title: Head of Growth", "Title: CFO"]
    assert evals == [] and all(len(r["messages"]) == 2 for r in train)
    bare = [{"messages": r["messages"]} for r in rows]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bare), encoding="utf-8")
    with pytest.raises(ValueError, match="writer-brief"):
        _load_rows(config)


def test_the_local_backend_asks_the_brief_and_answers_the_agents_json() -> None:
    pytest.importorskip("llguidance")
    from miniatures.grammar import email_grammar
    from miniatures.local import Generation, LocalMiniatureChatModel

    task = _task()
    engine: Any = SimpleNamespace(constrained=True)
    brief = LocalMiniatureChatModel.model_construct(engine=engine, adapter="w", answer_format=WRITER_BRIEF,
                                                    system_prompt=False, craft_grammar=False)
    plain = LocalMiniatureChatModel.model_construct(engine=engine, adapter="w", answer_format="json",
                                                    system_prompt=False, craft_grammar=False)
    chat = [{"role": "system", "content": "rules"}, {"role": "user", "content": "the agent's prompt"}]
    assert brief._asked(chat, task) == brief_messages(task)
    assert plain._asked(chat, task) == [chat[1]]
    assert brief._asked(chat, None) == [chat[1]]  # no task: the chat as it is
    assert brief._grammar(task, None) == email_grammar(task, tuple(offer_tag_values(task)))
    assert plain._grammar(task, None) == email_grammar(task)
    answer = brief_answer(json.dumps(write_email(task), ensure_ascii=False), task)
    assert answer is not None
    generation = Generation(text=answer, input_tokens=10, output_tokens=20, latency_ms=1.0, finish_reason="stop")
    assert brief._expanded(generation, task).text == json.dumps(write_email(task), ensure_ascii=False)
    assert plain._expanded(generation, task) is generation
