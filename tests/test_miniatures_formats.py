"""The sentence-tags answer format: extraction tasks split per sentence, rows made from teacher answers and
assembled into the agent's JSON."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agents.grounding import NumberedSentences, Sentence
from agents.researcher import build_extraction_messages, extraction_task
from agents.schemas import FACT_FIELDS, ExtractionOutput, ProspectInfo
from core.tasks import ExtractionTask, dump_task
from miniatures.formats import assemble_extraction, parse_tag, row_task, sentence_messages, sentence_rows

OWN, OTHER = "https://www.amberbrook.example/", "https://highmere.example/"
SENTENCES = [Sentence("S1", "# Amberbrook Analytics", OWN, 1), Sentence("S2", "Founded: 2016", OWN, 1),
             Sentence("S3", "Organization foundingDate: 2016", OWN, 1),
             Sentence("S4", "The company employs 6 people.", OWN, 1),
             Sentence("S5", "Highmere Data was founded in 2016.", OTHER, 2),
             Sentence("S6", "Highmere Data has offices in Cork.", OTHER, 2)]


def _task() -> ExtractionTask:
    prospect = ProspectInfo(first_name="Ana", email="ana@amberbrook.example", company="Amberbrook Analytics",
                            website="https://www.amberbrook.example/")
    return extraction_task(prospect, NumberedSentences(SENTENCES, [OWN, OTHER]))


def _messages() -> list[dict[str, str]]:
    return [{"role": "system" if m.type == "system" else "user", "content": str(m.content)}
            for m in build_extraction_messages(_task())]


def _row(answer: object, *, with_task: bool = True) -> dict[str, object]:
    row: dict[str, object] = {"messages": [*_messages(), {"role": "assistant", "content": json.dumps(answer)}]}
    if with_task:
        row["task"] = dump_task(_task())
    return row


def test_sentence_prompts_name_the_company_and_the_pages_host() -> None:
    assert sentence_messages("Amberbrook Analytics", "https://www.amberbrook.example/x", "Founded: 2016") == [
        {"role": "user",
         "content": "Company: Amberbrook Analytics\nSource: amberbrook.example\nSentence: Founded: 2016"}]
    assert row_task(_row({"facts": []})) == _task()
    assert row_task({"messages": []}) is None and row_task({"task": {"kind": "writing"}}) is None


def test_rows_tag_cited_sentences_and_own_site_sentences_stating_the_same_value() -> None:
    answer = {"facts": [{"field": "founded_year", "evidence": "S2", "value": "2016"},
                        {"field": "employee_count", "evidence": "S4", "value": "6"}]}
    rows = sentence_rows(_row(answer), negative_fraction=1.0, rng=random.Random(0))
    answers = [r["messages"][-1]["content"] for r in rows]
    # S3 (own site) states the cited year word for word; "6" is too short to spread (it is in "2016" too).
    # S5 states it too, but about another company on another page: neither a label nor a "-" row.
    assert answers == ["-", "founded_year | 2016", "founded_year | 2016", "employee_count | 6", "-"]
    assert [r["messages"][0]["content"].rsplit("Sentence: ", 1)[1] for r in rows][-1] == SENTENCES[5].text
    assert rows[0]["messages"][0]["role"] == "user" and len(rows[0]["messages"]) == 2
    fewer = sentence_rows(_row(answer), negative_fraction=0.01, rng=random.Random(0))
    assert [r["messages"][-1]["content"] for r in fewer] == answers[1:4]
    assert sentence_rows(_row("not json"), negative_fraction=1.0, rng=random.Random(0)) == []


def test_a_label_is_never_copied_onto_another_companys_sentence() -> None:
    # Cited on a third-party page: the same value on the same page (another company's) is not labelled.
    answer = {"facts": [{"field": "location", "evidence": "S6", "value": "offices in Cork"}]}
    ostra = _task().sentences[5].model_copy(update={"id": "S7", "text": "Ostra has offices in Cork."})
    task = _task().model_copy(update={"sentences": (*_task().sentences, ostra)})
    rows = sentence_rows({"messages": _row(answer)["messages"]}, negative_fraction=1.0, rng=random.Random(0),
                         task=task)
    tagged = [(r["messages"][0]["content"].rsplit("Sentence: ", 1)[1], r["messages"][-1]["content"]) for r in rows]
    assert ("Highmere Data has offices in Cork.", "location | offices in Cork") in tagged
    assert all(text != "Ostra has offices in Cork." for text, _answer in tagged)


def test_rows_read_the_task_not_the_prompt() -> None:
    answer = {"facts": [{"field": "founded_year", "evidence": "S2", "value": "2016"}]}
    # Without a task nothing is split (an old dataset row: the trainer reads its task with the legacy parser).
    assert sentence_rows(_row(answer, with_task=False), negative_fraction=1.0, rng=random.Random(0)) == []
    # A task that lists other fields: facts of unlisted fields teach nothing.
    only_people = _task().model_copy(update={"fields": _task().fields[4:5]})
    rows = sentence_rows(_row(answer), negative_fraction=1.0, rng=random.Random(0), task=only_people)
    assert {r["messages"][-1]["content"] for r in rows} == {"-"}


def test_assembly_keeps_the_first_sentence_per_listed_field() -> None:
    text = assemble_extraction(["S1", "S2", "S3", "S4"],
                               ["-", "founded_year | 2016", "founded_year | 2017", "revenue | 5"], FACT_FIELDS)
    assert ExtractionOutput.model_validate_json(text).model_dump() == {
        "facts": [{"field": "founded_year", "evidence": "S2", "value": "2016"}]}
    assert parse_tag(" location | Cork, Ireland ") == ("location", "Cork, Ireland")
    assert parse_tag("-") is None and parse_tag("location: Cork") is None


def test_a_sentence_tags_miniature_answers_extraction_json(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from miniatures.local import BASE_ADAPTER, LocalEngine, LocalMiniatureChatModel
    from tests.miniature_fixtures import build_tiny_base

    engine = LocalEngine(str(build_tiny_base(tmp_path / "base")), device="cpu", batch_window_ms=20.0)
    try:
        chat = LocalMiniatureChatModel(engine=engine, adapter=BASE_ADAPTER, answer_format="sentence-tags")
        from langchain_core.messages import HumanMessage, SystemMessage

        messages, task = _messages(), _task()
        answer = chat.invoke([SystemMessage(content=messages[0]["content"]),
                              HumanMessage(content=messages[1]["content"])], task=task)
        facts = ExtractionOutput.model_validate_json(str(answer.content)).facts
        sentences = {s.id: s.text for s in task.sentences}
        assert all(f.field in FACT_FIELDS and f.value in sentences[f.evidence] for f in facts)
        assert len({f.field for f in facts}) == len(facts)
        one = engine.prompt_ids(sentence_messages("Amberbrook Analytics", "https://www.amberbrook.example/",
                                                  "Founded: 2016"))
        usage = answer.usage_metadata
        assert usage is not None and usage["input_tokens"] > 5 * len(one) // 2  # summed over the 6 sentences
        plain = chat.invoke([HumanMessage(content="Write to the company.")])  # not an extraction: asked as is
        assert plain.usage_metadata is not None and plain.usage_metadata["input_tokens"] < usage["input_tokens"]
    finally:
        engine.close()


def test_a_miniature_trained_without_system_prompt_is_asked_without_it(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from langchain_core.messages import HumanMessage, SystemMessage

    from miniatures.local import BASE_ADAPTER, LocalEngine, LocalMiniatureChatModel
    from tests.miniature_fixtures import build_tiny_base

    engine = LocalEngine(str(build_tiny_base(tmp_path / "base")), device="cpu", max_new_tokens=3)
    try:
        user = [{"role": "user", "content": "Write to the company."}]
        messages = [SystemMessage(content="You write one short email."), HumanMessage(content=user[0]["content"])]
        lean = LocalMiniatureChatModel(engine=engine, adapter=BASE_ADAPTER, system_prompt=False).invoke(messages)
        full = LocalMiniatureChatModel(engine=engine, adapter=BASE_ADAPTER).invoke(messages)
        assert lean.usage_metadata is not None and full.usage_metadata is not None
        assert lean.usage_metadata["input_tokens"] == len(engine.prompt_ids(user))
        assert full.usage_metadata["input_tokens"] > lean.usage_metadata["input_tokens"]
    finally:
        engine.close()
