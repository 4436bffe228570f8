"""Requests to servers carry the task's grammar and explicit greedy settings; only ``#outreach`` (the project's own
server) gets the task itself, as ``outreach_task``.

A loopback fake OpenAI-compatible server started here records each request body.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from core.tasks import ExtractionTask, FieldSpec, MergeTag, OfferBrief, Sentence, WritingTask, dump_task, load_task
from evals.fake_teacher import FakeTeacher
from miniatures.grammar import answer_grammar, json_schema
from miniatures.remote import TASK_FIELD, build_remote_chat_model, request_fields, server_kind
from miniatures.specs import BackendSpecError, parse_backend_spec

TASK = ExtractionTask(company="Acme", website="https://acme.example/",
                      fields=(FieldSpec(name="location", description="where"),),
                      sentences=(Sentence(id="S1", text="Acme is based in Cork.", source_url="https://acme.example/"),))
WRITING = WritingTask(offer=OfferBrief(sender_title="AE", product="P", value_proposition="v", call_to_action="c",
                                       opt_out_line="o"),
                      merge_tags=(MergeTag(name="first_name", description="the first name"),))


@pytest.fixture
def recorder() -> Iterator[FakeTeacher]:
    """A loopback fake server that keeps each request body; the messages here are no agent's task, so it
    answers them with an empty extraction."""
    server = FakeTeacher(latency_s=0, answer_unknown='{"facts": []}', keep_bodies=True)
    server.start()
    yield server
    server.stop()


def _sent(recorder: FakeTeacher, spec: str, task: Any, *, asynchronous: bool = False) -> dict[str, Any]:
    import asyncio

    model = build_remote_chat_model(parse_backend_spec(spec))
    if asynchronous:
        asyncio.run(model.ainvoke([HumanMessage("extract")], task=task))
    else:
        model.invoke([HumanMessage("extract")], task=task)
    return recorder.bodies[-1]


def test_vllm_gets_the_lark_grammar_and_no_repetition_penalty(recorder: FakeTeacher) -> None:
    body = _sent(recorder, f"vllm:adapter@{recorder.url}", TASK)
    assert body["structured_outputs"] == {"grammar": answer_grammar(TASK)}
    assert (body["temperature"], body["top_p"], body["repetition_penalty"]) == (0, 1.0, 1.0)
    assert "task" not in body and "guided_grammar" not in body and "response_format" not in body
    writing = _sent(recorder, f"vllm:adapter@{recorder.url}", WRITING, asynchronous=True)
    assert writing["structured_outputs"] == {"grammar": answer_grammar(WRITING)} and "task" not in writing


def test_llama_cpp_gets_grammar_and_repeat_penalty(recorder: FakeTeacher) -> None:
    body = _sent(recorder, f"openai:m@{recorder.url}#llama.cpp", TASK)
    assert body["grammar"] == answer_grammar(TASK) and body["grammar"].startswith("%llguidance {}")
    assert (body["temperature"], body["top_p"], body["repeat_penalty"]) == (0, 1.0, 1.0)
    assert "task" not in body and "structured_outputs" not in body


def test_own_server_kind_and_openai_default(recorder: FakeTeacher) -> None:
    own = _sent(recorder, f"openai:m@{recorder.url}#vllm", WRITING)
    assert own["structured_outputs"] == {"grammar": answer_grammar(WRITING)}
    body = _sent(recorder, f"openai:m@{recorder.url}", TASK)
    assert body["response_format"] == {"type": "json_schema", "json_schema": json_schema(TASK)}
    assert "task" not in body and "structured_outputs" not in body and "grammar" not in body
    assert body["temperature"] == 0 and body["top_p"] == 1.0
    plain = build_remote_chat_model(parse_backend_spec(f"vllm:a@{recorder.url}"))
    plain.invoke([HumanMessage("hello")])  # no task: greedy settings only
    assert "structured_outputs" not in recorder.bodies[-1] and recorder.bodies[-1]["repetition_penalty"] == 1.0


def test_outreach_kind_sends_the_task_with_the_grammar(recorder: FakeTeacher) -> None:
    """The project's own server gets what vLLM gets plus the task as core.tasks.dump_task JSON, read back equal."""
    for task, asynchronous in ((TASK, False), (WRITING, True)):
        body = _sent(recorder, f"openai:m@{recorder.url}#outreach", task, asynchronous=asynchronous)
        assert body[TASK_FIELD] == dump_task(task) and body[TASK_FIELD]["kind"] == task.kind
        assert load_task(body[TASK_FIELD]) == task
        assert body["structured_outputs"] == {"grammar": answer_grammar(task)}
        assert (body["temperature"], body["top_p"], body["repetition_penalty"]) == (0, 1.0, 1.0)
        assert "response_format" not in body and "grammar" not in body
    plain = build_remote_chat_model(parse_backend_spec(f"openai:m@{recorder.url}#outreach"))
    plain.invoke([HumanMessage("hello")])  # no task: greedy settings only, no task field
    assert TASK_FIELD not in recorder.bodies[-1] and "structured_outputs" not in recorder.bodies[-1]
    for kind in ("vllm", "llama.cpp", "openai", "ollama"):  # no other kind gets the task
        assert TASK_FIELD not in request_fields(kind, TASK).get("extra_body", {})


def test_server_kind_from_spec() -> None:
    assert server_kind(parse_backend_spec("vllm:a@http://h:8000/v1")) == "vllm"
    assert server_kind(parse_backend_spec("ollama:llama3")) == "ollama"
    assert server_kind(parse_backend_spec("openai:gpt-4o-mini")) == "openai"
    assert server_kind(parse_backend_spec("openai:m@http://h:8080/v1#LLAMA.CPP")) == "llama.cpp"
    assert server_kind(parse_backend_spec("openai:m@http://h:8000/v1#outreach")) == "outreach"
    with pytest.raises(BackendSpecError, match="names no server kind"):
        build_remote_chat_model(parse_backend_spec("openai:m@http://h:8080/v1#tgi"))
