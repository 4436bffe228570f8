"""The sentence-tags answer format: extraction prompts split per sentence, rows made from teacher answers,
answers held to a tag grammar and assembled into the agent's JSON."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agents.prompts import EXTRACTION_SYSTEM_PROMPT
from agents.researcher import build_extraction_messages
from agents.schemas import FACT_FIELDS, ExtractionOutput, ProspectInfo
from miniatures.constrained import run_grammar
from miniatures.formats import (
    TagGrammar,
    assemble_extraction,
    parse_extraction_prompt,
    parse_tag,
    sentence_messages,
    sentence_rows,
)

SENTENCES = """Source 1: https://www.amberbrook.example/
S1: # Amberbrook Analytics
S2: Founded: 2016
S3: Organization foundingDate: 2016
S4: The company employs 6 people.

Source 2: https://highmere.example/
S5: Highmere Data was founded in 2017."""


def _messages() -> list[dict[str, str]]:
    prospect = ProspectInfo(first_name="Ana", email="ana@amberbrook.example", company="Amberbrook Analytics",
                            website="https://www.amberbrook.example/")
    return [{"role": "system" if m.type == "system" else "user", "content": str(m.content)}
            for m in build_extraction_messages(prospect, SENTENCES)]


def test_the_researchers_prompt_is_read_back_with_fields_and_sources() -> None:
    prompt = parse_extraction_prompt(_messages())
    assert prompt is not None and prompt.company == "Amberbrook Analytics" and prompt.fields == FACT_FIELDS
    assert prompt.sentences[1] == ("S2", "https://www.amberbrook.example/", "Founded: 2016")
    assert prompt.sentences[4] == ("S5", "https://highmere.example/", "Highmere Data was founded in 2017.")
    assert parse_extraction_prompt([{"role": "system", "content": EXTRACTION_SYSTEM_PROMPT}]) is None
    assert sentence_messages("Amberbrook Analytics", "https://www.amberbrook.example/x", "Founded: 2016") == [
        {"role": "user",
         "content": "Company: Amberbrook Analytics\nSource: amberbrook.example\nSentence: Founded: 2016"}]


def test_rows_tag_cited_sentences_and_sentences_stating_the_same_value() -> None:
    answer = {"facts": [{"field": "founded_year", "evidence": "S2", "value": "2016"},
                        {"field": "employee_count", "evidence": "S4", "value": "6"}]}
    row = {"messages": [*_messages(), {"role": "assistant", "content": json.dumps(answer)}]}
    rows = sentence_rows(row, negative_fraction=1.0, rng=random.Random(0))
    answers = [r["messages"][-1]["content"] for r in rows]
    # S3 states the cited year word for word; "6" is too short to spread (it is in "2016" too)
    assert answers == ["-", "founded_year | 2016", "founded_year | 2016", "employee_count | 6", "-"]
    assert rows[0]["messages"][0]["role"] == "user" and len(rows[0]["messages"]) == 2
    fewer = sentence_rows(row, negative_fraction=0.01, rng=random.Random(0))
    assert [r["messages"][-1]["content"] for r in fewer] == answers[1:4]
    assert sentence_rows({"messages": [*_messages(), {"role": "assistant", "content": "not json"}]},
                         negative_fraction=1.0, rng=random.Random(0)) == []


def test_assembly_keeps_the_first_sentence_per_listed_field() -> None:
    text = assemble_extraction(["S1", "S2", "S3", "S4"],
                               ["-", "founded_year | 2016", "founded_year | 2017", "revenue | 5"], FACT_FIELDS)
    assert ExtractionOutput.model_validate_json(text).model_dump() == {
        "facts": [{"field": "founded_year", "evidence": "S2", "value": "2016"}]}
    assert parse_tag(" location | Cork, Ireland ") == ("location", "Cork, Ireland")
    assert parse_tag("-") is None and parse_tag("location: Cork") is None


def test_tag_grammar_allows_a_dash_or_a_field_and_a_span() -> None:
    grammar = TagGrammar("The company employs 6 people.", FACT_FIELDS)
    done = run_grammar(grammar, "-")
    assert done is not None and grammar.can_stop(done)
    span = run_grammar(grammar, "employee_count | 6")
    assert span is not None and grammar.can_stop(span)
    blank = run_grammar(grammar, "employee_count | ")
    assert blank is not None and not grammar.can_stop(blank)
    for bad in ("revenue", "employee_count | 7", "employee_count: 6", "-x"):
        assert run_grammar(grammar, bad) is None, bad


def test_a_sentence_tags_miniature_answers_extraction_json(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from miniatures.local import BASE_ADAPTER, LocalEngine, LocalMiniatureChatModel
    from tests.miniature_fixtures import build_tiny_base

    engine = LocalEngine(str(build_tiny_base(tmp_path / "base")), device="cpu", batch_window_ms=20.0)
    try:
        chat = LocalMiniatureChatModel(engine=engine, adapter=BASE_ADAPTER, answer_format="sentence-tags")
        from langchain_core.messages import HumanMessage, SystemMessage

        messages = _messages()
        answer = chat.invoke([SystemMessage(content=messages[0]["content"]),
                              HumanMessage(content=messages[1]["content"])])
        facts = ExtractionOutput.model_validate_json(str(answer.content)).facts
        parsed = parse_extraction_prompt(messages)
        assert parsed is not None
        sentences = {sid: text for sid, _url, text in parsed.sentences}
        assert all(f.field in FACT_FIELDS and f.value in sentences[f.evidence] for f in facts)
        assert len({f.field for f in facts}) == len(facts)
        one = engine.prompt_ids(sentence_messages("Amberbrook Analytics", "https://www.amberbrook.example/",
                                                  "Founded: 2016"))
        usage = answer.usage_metadata
        assert usage is not None and usage["input_tokens"] > 4 * len(one) // 2  # summed over the 5 sentences
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
