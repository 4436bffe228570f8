"""Requests to servers carry the task's grammar and explicit greedy settings, never the task itself.

A loopback fake OpenAI-compatible server started here records each request body.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from core.tasks import ExtractionTask, FieldSpec, MergeTag, OfferBrief, Sentence, WritingTask
from miniatures.grammar import answer_grammar, json_schema
from miniatures.remote import build_remote_chat_model, server_kind
from miniatures.specs import BackendSpecError, parse_backend_spec

TASK = ExtractionTask(company="Acme", website="https://acme.example/",
                      fields=(FieldSpec(name="location", description="where"),),
                      sentences=(Sentence(id="S1", text="Acme is based in Cork.", source_url="https://acme.example/"),))
WRITING = WritingTask(offer=OfferBrief(sender_title="AE", product="P", value_proposition="v", call_to_action="c",
                                       opt_out_line="o"),
                      merge_tags=(MergeTag(name="first_name", description="the first name"),))


class _Recorder(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        payload = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": '{"facts": []}'}}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def recorder() -> Iterator[str]:
    _Recorder.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _sent(spec: str, task: Any, *, asynchronous: bool = False) -> dict[str, Any]:
    import asyncio

    model = build_remote_chat_model(parse_backend_spec(spec))
    if asynchronous:
        asyncio.run(model.ainvoke([HumanMessage("extract")], task=task))
    else:
        model.invoke([HumanMessage("extract")], task=task)
    return _Recorder.bodies[-1]


def test_vllm_gets_the_lark_grammar_and_no_repetition_penalty(recorder: str) -> None:
    body = _sent(f"vllm:adapter@{recorder}", TASK)
    assert body["structured_outputs"] == {"grammar": answer_grammar(TASK)}
    assert (body["temperature"], body["top_p"], body["repetition_penalty"]) == (0, 1.0, 1.0)
    assert "task" not in body and "guided_grammar" not in body and "response_format" not in body
    writing = _sent(f"vllm:adapter@{recorder}", WRITING, asynchronous=True)
    assert writing["structured_outputs"] == {"grammar": answer_grammar(WRITING)} and "task" not in writing


def test_llama_cpp_gets_grammar_and_repeat_penalty(recorder: str) -> None:
    body = _sent(f"openai:m@{recorder}#llama.cpp", TASK)
    assert body["grammar"] == answer_grammar(TASK) and body["grammar"].startswith("%llguidance {}")
    assert (body["temperature"], body["top_p"], body["repeat_penalty"]) == (0, 1.0, 1.0)
    assert "task" not in body and "structured_outputs" not in body


def test_own_server_kind_and_openai_default(recorder: str) -> None:
    assert _sent(f"openai:m@{recorder}#vllm", WRITING)["structured_outputs"] == {"grammar": answer_grammar(WRITING)}
    body = _sent(f"openai:m@{recorder}", TASK)
    assert body["response_format"] == {"type": "json_schema", "json_schema": json_schema(TASK)}
    assert "task" not in body and "structured_outputs" not in body and "grammar" not in body
    assert body["temperature"] == 0 and body["top_p"] == 1.0
    plain = build_remote_chat_model(parse_backend_spec(f"vllm:a@{recorder}"))
    plain.invoke([HumanMessage("hello")])  # no task: greedy settings only
    assert "structured_outputs" not in _Recorder.bodies[-1] and _Recorder.bodies[-1]["repetition_penalty"] == 1.0


def test_server_kind_from_spec() -> None:
    assert server_kind(parse_backend_spec("vllm:a@http://h:8000/v1")) == "vllm"
    assert server_kind(parse_backend_spec("ollama:llama3")) == "ollama"
    assert server_kind(parse_backend_spec("openai:gpt-4o-mini")) == "openai"
    assert server_kind(parse_backend_spec("openai:m@http://h:8080/v1#LLAMA.CPP")) == "llama.cpp"
    with pytest.raises(BackendSpecError, match="names no server kind"):
        build_remote_chat_model(parse_backend_spec("openai:m@http://h:8080/v1#tgi"))
