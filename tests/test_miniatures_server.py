"""The OpenAI-compatible miniature server, started with uvicorn on 127.0.0.1 in a thread.

Two tiny LoRA miniatures (random Llama + ChatML tokenizer trained here, no downloads) are registered in a
store and served; the tests check the API's shapes and errors, that the ``openai:<name>@<server>`` backend
gives the same text as the in-process ``miniature:<name>`` backend (greedy), that a campaign gives the same
trace outputs through both, batching, API keys and bind checks, disconnects, a 1,000-request load and the
``outreach serve`` command; and the guards, each fed its bad input over loopback: the ``max_tokens`` cap, a
3.9 MB prompt tokenised off the event loop, deeply nested JSON, Host headers (DNS rebinding), non-JSON bodies
(cross-site simple POSTs), no OpenAPI schema, and clients that hang up without a traceback in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from langchain_core.messages import HumanMessage, SystemMessage
from sqlalchemy import Engine
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from graphs.models import build_chat_model  # noqa: E402
from miniatures import register_miniature  # noqa: E402
from miniatures.local import LocalEngine  # noqa: E402
from miniatures.server import (  # noqa: E402
    InsecureBindError,
    ServedModel,
    check_bind,
    create_app,
    is_loopback,
    load_served_models,
    parse_host,
    serve_in_thread,
)
from store import open_store  # noqa: E402
from tests.miniature_fixtures import PROMPTS, build_adapter, build_tiny_base  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    base = build_tiny_base(root / "base", context=4096)
    return {"root": root, "base": base, "a1": build_adapter(base, root / "a1", seed=11),
            "a2": build_adapter(base, root / "a2", seed=22, rank=12)}


@pytest.fixture(scope="module")
def store(tiny: dict[str, Path]) -> Iterator[Engine]:
    engine = open_store(f"sqlite:///{tiny['root'] / 'registry.sqlite'}")
    common: dict[str, Any] = {"base_model": str(tiny["base"]), "training_config": {}, "dataset_hash": "h",
                              "metrics": {}}
    register_miniature(engine, name="writer-x", agent="writer", adapter_path=str(tiny["a2"]), **common)  # v1
    register_miniature(engine, name="writer-x", agent="writer", adapter_path=str(tiny["a1"]), **common)  # v2
    register_miniature(engine, name="researcher-x", agent="researcher", adapter_path=str(tiny["a2"]), **common)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def served(store: Engine) -> Iterator[list[ServedModel]]:
    threads = torch.get_num_threads()
    engines: dict[str, LocalEngine] = {}
    models = load_served_models(store, ["writer-x@1", "writer-x", "researcher-x"], engines=engines, device="cpu",
                                max_new_tokens=24, num_threads=1)
    yield models
    for engine in engines.values():
        engine.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(served: list[ServedModel]) -> Iterator[Any]:
    app = create_app(served, max_prompt_tokens=3000, max_body_bytes=200_000, max_batch_size=16,
                     batch_window_ms=10.0)
    with serve_in_thread(app) as running:
        yield running


def _client(server: Any, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, trust_env=False, timeout=60.0, **kwargs)


def test_models_lists_each_version_and_the_alias_with_its_base_as_parent(server: Any, tiny: dict[str, Path]) -> None:
    with _client(server) as client:
        listing = client.get("/models").json()
    cards = {card["id"]: card for card in listing["data"]}
    assert listing["object"] == "list"
    assert set(cards) == {"writer-x@1", "writer-x@2", "writer-x", "researcher-x@1", "researcher-x"}
    assert all(card["parent"] == str(tiny["base"]) and card["object"] == "model" for card in cards.values())
    assert cards["writer-x"]["root"] == cards["writer-x@2"]["root"] == str(tiny["a1"])  # alias: latest version
    assert cards["writer-x@1"]["root"] == str(tiny["a2"])
    assert {m.engine for m in server.app.state.models.values()} and len(
        {id(m.engine) for m in server.app.state.models.values()}) == 1  # one base in memory for all adapters


def test_served_answers_equal_the_in_process_backend(server: Any, served: list[ServedModel], store: Engine) -> None:
    """Evaluate as served: openai:<name>@server and miniature:<name> give the same text and usage (greedy)."""
    messages = [SystemMessage("You write emails."), HumanMessage("Write to the company.")]
    base = served[0].parent  # a second, separately loaded engine with the server's default max_new_tokens
    engines: dict[str, Any] = {base: LocalEngine(base, device="cpu", max_new_tokens=24)}
    for name in ("writer-x", "researcher-x"):
        local = build_chat_model(f"miniature:{name}", store=store, engines=engines)
        remote = build_chat_model(f"openai:{name}@{server.base_url}")
        here, there = local.invoke(messages, temperature=0), remote.invoke(messages)  # a writer samples by default
        assert there.content == here.content and here.content
        assert there.usage_metadata is not None and here.usage_metadata is not None
        assert there.usage_metadata["input_tokens"] == here.usage_metadata["input_tokens"]
        assert there.usage_metadata["output_tokens"] == here.usage_metadata["output_tokens"]
        assert there.response_metadata["model_name"] == f"{name}@{2 if name == 'writer-x' else 1}"
    pinned = build_chat_model(f"openai:writer-x:1@{server.base_url}").invoke(messages)  # the spec-safe pin
    assert pinned.content == build_chat_model("miniature:writer-x@1", store=store, engines=engines).invoke(
        messages, temperature=0).content
    assert pinned.content != build_chat_model("miniature:writer-x", store=store, engines=engines).invoke(
        messages, temperature=0).content
    for engine in engines.values():
        engine.close()


def test_stream_sends_openai_chunks_that_add_up_to_the_answer(server: Any) -> None:
    body = {"model": "writer-x", "messages": PROMPTS[1], "max_tokens": 12}
    with _client(server) as client:
        whole = client.post("/chat/completions", json=body).json()
        with client.stream("POST", "/chat/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + whole["usage"]["completion_tokens"]


def test_stop_and_max_tokens(server: Any) -> None:
    with _client(server) as client:
        full = client.post("/chat/completions", json={"model": "writer-x", "messages": PROMPTS[0], "max_tokens": 3})
        answer = full.json()
        assert answer["usage"]["completion_tokens"] <= 3
        text = answer["choices"][0]["message"]["content"]
        if len(text) > 1:
            stop = text[1:3]
            cut = client.post("/chat/completions", json={"model": "writer-x", "messages": PROMPTS[0],
                                                         "max_tokens": 3, "stop": [stop]}).json()
            assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
            assert cut["choices"][0]["finish_reason"] == "stop"


def test_sampling_requests_are_repeatable_by_seed(server: Any) -> None:
    body = {"model": "writer-x", "messages": PROMPTS[0], "max_tokens": 12}
    with _client(server) as client:
        greedy = client.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        sampled = [client.post("/chat/completions", json={**body, "temperature": 1.5, "seed": seed}).json()
                   ["choices"][0]["message"]["content"] for seed in (1, 1, 2, 3, 4)]
    assert sampled[0] == sampled[1]  # same seed, same answer
    assert len(set(sampled)) > 1 and any(text != greedy for text in sampled)
    with _client(server) as client:  # min-p (vLLM's extra parameter): repeatable by seed as well
        min_p = [client.post("/chat/completions", json={**body, "temperature": 1.5, "min_p": 0.1, "seed": 1}).json()
                 ["choices"][0]["message"]["content"] for _ in range(2)]
    assert min_p[0] == min_p[1]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "nobody", "messages": PROMPTS[0]}, 404, "model_not_found", "model"),
        ({"model": "writer-x@7", "messages": PROMPTS[0]}, 404, "model_not_found", "model"),
        ({"model": "writer-x"}, 400, "invalid_value", "messages"),
        ({"model": "writer-x", "messages": []}, 400, "invalid_value", "messages"),
        ({"model": "writer-x", "messages": PROMPTS[0], "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ({"model": "writer-x", "messages": [{"role": "tool", "content": "x"}]}, 400, None, "messages.0.role"),
        ({"model": "writer-x", "messages": PROMPTS[0], "temperature": 3.0}, 400, "invalid_value", "temperature"),
        ({"model": "writer-x", "messages": PROMPTS[0], "min_p": 1.0}, 400, "invalid_value", "min_p"),
        ({"model": "writer-x", "messages": PROMPTS[0], "n": 2}, 400, None, "n"),
        ({"model": "writer-x", "messages": PROMPTS[0], "max_tokens": 10**9}, 400, "invalid_value", "max_tokens"),
        ({"model": "writer-x", "messages": PROMPTS[0], "max_completion_tokens": 513}, 400, "invalid_value",
         "max_completion_tokens"),
        ({"model": "writer-x", "messages": [{"role": "user", "content": "freight " * 4000}]}, 400,
         "context_length_exceeded", "messages"),
        ({"model": "writer-x", "messages": [{"role": "user", "content": "x" * 300_000}]}, 413, "request_too_large",
         None),
        ({"model": "writer-x", "messages": PROMPTS[0], "repetition_penalty": 1.1}, 400, None, "repetition_penalty"),
        ({"model": "writer-x", "messages": PROMPTS[0], "structured_outputs": {"grammar": "start: nowhere"}}, 400,
         "invalid_grammar", "structured_outputs.grammar"),
        ({"model": "writer-x", "messages": PROMPTS[0], "structured_outputs": {"regex": "a+"}}, 400, "invalid_value",
         "structured_outputs.regex"),
        ({"model": "writer-x", "messages": PROMPTS[0], "structured_outputs": {"choice": ["a"]},
          "response_format": {"type": "json_object"}}, 400, None, "response_format"),
    ],
)
def test_bad_requests_get_openai_error_json(server: Any, body: dict[str, Any], status: int, code: str | None,
                                            param: str | None) -> None:
    with _client(server) as client:
        response = client.post("/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"]) == (code, param)


def test_structured_outputs_hold_the_answer_to_the_grammar(server: Any) -> None:
    """vLLM's request field, enforced: a choice, a JSON schema and a task's Lark grammar (greedy, random model)."""
    from core.tasks import ExtractionTask, FieldSpec, Sentence
    from miniatures.grammar import answer_grammar

    task = ExtractionTask(company="Acme", website="https://acme.example/",
                          fields=(FieldSpec(name="location", description="where"),),
                          sentences=(Sentence(id="S1", text="Acme is based in Cork.", source_url="https://acme.example/"),))
    with _client(server) as client:
        def ask(**extra: Any) -> str:
            body = {"model": "writer-x", "messages": PROMPTS[1], "max_tokens": 60, **extra}
            response = client.post("/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return str(response.json()["choices"][0]["message"]["content"])

        free = ask()
        assert ask(structured_outputs={"choice": ["yes", "no"]}) in ("yes", "no")
        facts = json.loads(ask(structured_outputs={"grammar": answer_grammar(task)}))["facts"]
        assert all(f["evidence"] == "S1" and f["value"] in task.sentences[0].text for f in facts)
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        shaped = ask(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        assert isinstance(json.loads(shaped)["ok"], bool)
        assert free != shaped


def test_malformed_json_and_unknown_routes(server: Any) -> None:
    with _client(server) as client:
        bad = client.post("/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
        missing = client.get("/nothing-here")
        ok = client.post("/chat/completions", json={"model": "writer-x", "messages": PROMPTS[2], "max_tokens": 2,
                                                    "temperature": 0, "seed": 1, "user": "x"})  # extras ignored
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert ok.status_code == 200


async def test_concurrent_requests_are_batched(server: Any, served: list[ServedModel]) -> None:
    engine = served[0].engine
    calls = engine.generate_calls
    bodies: list[dict[str, Any]] = [{"model": ["writer-x", "writer-x@1", "researcher-x"][i % 3],
                                     "messages": PROMPTS[i % 4], "max_tokens": 6} for i in range(12)]
    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False, timeout=60) as client:
        answers = await asyncio.gather(*(client.post("/chat/completions", json=b) for b in bodies))
    assert all(a.status_code == 200 for a in answers)
    assert engine.generate_calls - calls < len(bodies)  # several requests per generate call
    alone = [engine.generate_sync(served_model.adapter, b["messages"], max_new_tokens=6).text
             for b in bodies for served_model in [server.app.state.models[
                 {"writer-x": "writer-x@2", "writer-x@1": "writer-x@1", "researcher-x": "researcher-x@1"}[b["model"]]]]]
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == alone


def test_api_key_is_required_when_set(served: list[ServedModel]) -> None:
    app = create_app(served, api_key="s3cret")
    body = {"model": "writer-x", "messages": PROMPTS[2], "max_tokens": 2}
    with serve_in_thread(app) as running, _client(running) as client:
        missing = client.post("/chat/completions", json=body)
        wrong = client.get("/models", headers={"Authorization": "Bearer nope"})
        right = client.post("/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        health = client.get(f"http://127.0.0.1:{running.port}/health")
        remote = build_chat_model(f"openai:writer-x@{running.base_url}")
        with pytest.raises(Exception, match="401|API key"):
            remote.invoke([HumanMessage("Hi")])
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key" and "Authorization: Bearer" in missing.json()[
        "error"]["message"]
    assert right.status_code == 200 and health.status_code == 200


def test_binding_beyond_loopback_needs_a_key(served: list[ServedModel]) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    with pytest.raises(InsecureBindError, match="--api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "key")
    check_bind("127.0.0.1", None)
    with pytest.raises(InsecureBindError), serve_in_thread(create_app(served), host="0.0.0.0"):
        pass


async def test_a_client_that_goes_away_does_not_stall_others(server: Any) -> None:
    state = server.app.state.stats
    before = state["disconnects"]
    long = {"model": "writer-x", "messages": PROMPTS[0], "max_tokens": 400}
    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False, timeout=60) as client:
        async with client.stream("POST", "/chat/completions", json={**long, "stream": True}) as response:
            async for line in response.aiter_lines():  # the role chunk comes at once; then hang up
                assert line.startswith("data: ")
                break
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up waiting
            await client.post("/chat/completions", json={**long, "max_tokens": 401}, timeout=0.05)
        started = time.perf_counter()
        short = [{"model": "researcher-x", "messages": PROMPTS[i % 4], "max_tokens": 4} for i in range(6)]
        answers = await asyncio.gather(*(client.post("/chat/completions", json=b) for b in short))
        took = time.perf_counter() - started
    assert all(a.status_code == 200 for a in answers)
    assert took < 20.0
    deadline = time.monotonic() + 10
    while state["disconnects"] < before + 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert state["disconnects"] >= before + 2


# ---------------------------------------------------------------------- guards, fed their bad input on loopback


def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` byte for byte to 127.0.0.1:``port`` (it should ask ``Connection: close``); (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _get_health(port: int, host: str) -> tuple[int, bytes]:
    return _raw(port, f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1"))


def test_max_tokens_over_the_cap_is_refused_before_anything_runs(served: list[ServedModel]) -> None:
    with pytest.raises(ValueError, match="--max-tokens-cap"):
        create_app(served, max_tokens_cap=23)  # the engines make 24 tokens when a request sets no max_tokens
    body = {"model": "writer-x", "messages": PROMPTS[0]}
    engine = served[0].engine
    with serve_in_thread(create_app(served, max_tokens_cap=24)) as running, _client(running) as client:
        at_cap = client.post("/chat/completions", json={**body, "max_tokens": 24})
        served_before = engine.requests_served
        over = [client.post("/chat/completions", json={**body, **extra}) for extra in (
            {"max_tokens": 10**9}, {"max_completion_tokens": 25}, {"max_tokens": 25, "stream": True})]
    assert at_cap.status_code == 200 and at_cap.json()["usage"]["completion_tokens"] <= 24
    assert [r.status_code for r in over] == [400, 400, 400]  # the stream is refused before it starts, as JSON
    errors = [r.json()["error"] for r in over]
    assert [e["param"] for e in errors] == ["max_tokens", "max_completion_tokens", "max_tokens"]
    assert all(e["code"] == "invalid_value" and "at most 24" in e["message"] for e in errors)
    assert engine.requests_served == served_before  # nothing reached the model


def test_a_huge_prompt_is_tokenised_off_the_event_loop(served: list[ServedModel],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3.9 MB prompt (under the default 4 MB body limit) is counted in a worker thread: /health answers while it
    is being tokenised, then the request gets its 400. The tokenizer is replaced by one that waits for /health to
    have answered (so the test shows where it runs without paying the real ~4 s, which
    ``benchmarks/serve_speed.py`` measures); on the event loop it would wait in vain."""
    engine = served[0].engine
    prompt = "freight " * 490_000
    seen: dict[str, Any] = {}
    entered, health_answered = threading.Event(), threading.Event()

    def waiting_prompt_ids(messages: list[dict[str, str]]) -> list[int]:
        seen.update(thread=threading.current_thread().name, chars=sum(len(m["content"]) for m in messages))
        entered.set()
        seen["health_first"] = health_answered.wait(10)
        return [0] * 3001

    monkeypatch.setattr(engine, "prompt_ids", waiting_prompt_ids)
    body = json.dumps({"model": "writer-x", "messages": [{"role": "user", "content": prompt}]}).encode()
    assert 3_900_000 < len(body) < 4_000_000
    with serve_in_thread(create_app(served, max_prompt_tokens=3000)) as running, _client(running) as client, \
            ThreadPoolExecutor(1) as pool:
        huge = pool.submit(client.post, "/chat/completions", content=body,
                           headers={"content-type": "application/json"})
        assert entered.wait(30)
        health = _get_health(running.port, f"127.0.0.1:{running.port}")
        health_answered.set()
        answer = huge.result(60)
        too_big = client.post("/chat/completions", content=body + b" " * 100_001,
                              headers={"content-type": "application/json"})
    assert health[0] == 200 and seen["health_first"]
    assert seen["thread"] != running.thread.name and seen["chars"] == len(prompt)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"


def test_a_chunked_body_over_the_limit_gets_413(server: Any) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "writer-x", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 10_000  # 300 KB, no Content-Length: counted as it streams in
        yield b'"}]}'

    with _client(server) as client:
        response = client.post("/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("body", [
    b'{"model": "writer-x", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"model": "writer-x", "messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}]}",
    b'{"model": "writer-x", "messages": [{"role": "user", "content": "x"}], "user": ' + b'{"a": ' * 5000
    + b"1" + b"}" * 5000 + b"}",
    b'{"model": "writer-x", "messages": [{"role": "user", "content": ' + b"[" * 900 + b"]" * 900 + b"}]}",
], ids=["messages-50k-deep", "content-5k-deep", "extra-5k-deep", "content-900-deep"])
def test_deeply_nested_json_gets_an_openai_400(server: Any, body: bytes) -> None:
    with _client(server) as client:
        response = client.post("/chat/completions", content=body, headers={"content-type": "application/json"})
        after = client.post("/chat/completions", json={"model": "writer-x", "messages": PROMPTS[2], "max_tokens": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert after.status_code == 200  # the same connection goes on serving


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonp"])
def test_only_json_bodies_are_accepted(server: Any, served: list[ServedModel], content_type: str | None) -> None:
    """A cross-site page can POST text/plain, a form or a typeless blob without a CORS preflight: all refused."""
    engine = served[0].engine
    before = engine.requests_served
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"model": "writer-x", "messages": PROMPTS[2], "max_tokens": 2}).encode()
    with _client(server) as client:
        refused = client.post("/chat/completions", content=body, headers=headers)
        served_before = engine.requests_served
        accepted = client.post("/chat/completions", content=body,
                               headers={"content-type": "application/json; charset=utf-8"})
    assert served_before == before  # the refused body never reached the model
    assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_media_type"
    assert accepted.status_code == 200


@pytest.mark.parametrize(("value", "parsed"), [
    ("127.0.0.1:8000", ("127.0.0.1", 8000)), ("LocalHost", ("localhost", None)), ("[::1]:80", ("::1", 80)),
    ("[0:0:0:0:0:0:0:1]", ("::1", None)), ("models.lan:", ("models.lan", None)),
    ("evil.example@127.0.0.1:8000", None), ("user:pw@localhost", None), ("127.0.0.1:8000@evil.example", None),
    ("", None), (" localhost", None), ("local host", None), ("::1", None), ("[::1", None), ("[v1.x]", None),
    ("[fe80::1%eth0]:80", None), ("localhost:99999", None), ("localhost:8a", None), ("localhost/x", None),
    ("localhost?x", None), ("a,b", ("a,b", None)),  # a sub-delim is allowed in a reg-name; it names no one we serve
])
def test_parse_host_follows_the_host_port_grammar(value: str, parsed: tuple[str, int | None] | None) -> None:
    if parsed is None:
        with pytest.raises(ValueError, match="Host header"):
            parse_host(value)
    else:
        assert parse_host(value) == parsed


def test_host_headers_the_server_does_not_answer_for_are_refused(server: Any, served: list[ServedModel]) -> None:
    """DNS rebinding: a page at evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", f"evil.example@127.0.0.1:{port}",
                 f"127.0.0.1:{port}@evil.example", f"localhost:{port}/x", "127.0.0.1:99999", "", f"[::1:{port}",
                 "127.1", "localhost."):
        status, body = _get_health(port, host)
        assert status == 400, host
        assert json.loads(body)["error"]["code"] == "host_not_allowed"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "127.0.0.1"):
        assert _get_health(port, host)[0] == 200, host
    engine = served[0].engine
    before = engine.requests_served
    payload = json.dumps({"model": "writer-x", "messages": PROMPTS[2], "max_tokens": 2})
    status, answer = _raw(port, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: evil.example:{port}\r\nContent-Type: "
                                 f"application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                                 f"{payload}").encode())
    assert status == 400 and b"--allowed-host evil.example" in answer
    assert engine.requests_served == before
    two = _raw(port, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n"
                     "Connection: close\r\n\r\n".encode())
    assert two[0] == 400


def test_allowed_hosts_add_names(served: list[ServedModel]) -> None:
    with serve_in_thread(create_app(served, allowed_hosts=["models.lan", "[::2]:8000"])) as running:
        assert _get_health(running.port, f"models.lan:{running.port}")[0] == 200
        assert _get_health(running.port, "[::2]")[0] == 200
        assert _get_health(running.port, "other.lan")[0] == 400
    with serve_in_thread(create_app(served, allowed_hosts=["*"])) as running:
        assert _get_health(running.port, "other.lan")[0] == 200
        assert _get_health(running.port, "other.lan@127.0.0.1")[0] == 400  # still host[:port]
    with pytest.raises(ValueError, match="allowed host"):
        create_app(served, allowed_hosts=["evil.example@127.0.0.1"])


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_no_openapi_schema_or_docs_are_served(served: list[ServedModel], api_key: str | None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with serve_in_thread(create_app(served, api_key=api_key)) as running, \
            httpx.Client(base_url=f"http://127.0.0.1:{running.port}", trust_env=False, headers=headers) as client:
        for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect", "/v1/openapi.json"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"


def test_clients_that_hang_up_leave_no_traceback_in_the_log(served: list[ServedModel],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Hanging up while the body uploads, while waiting for the answer, and during a stream: one info line each."""
    app = create_app(served)
    stats = app.state.stats
    long = {"model": "writer-x", "messages": PROMPTS[0], "max_tokens": 400}
    uvicorn_log = logging.getLogger("uvicorn")  # uvicorn's loggers do not propagate to the root logger
    caplog.set_level(logging.INFO)
    with serve_in_thread(app) as running:
        uvicorn_log.addHandler(caplog.handler)
        try:
            with socket.create_connection(("127.0.0.1", running.port)) as sock:
                sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\nContent-Type: "
                             'application/json\r\nContent-Length: 1000\r\n\r\n{"model": '.encode())
            with _client(running) as client:
                with pytest.raises(httpx.ReadTimeout):
                    client.post("/chat/completions", json=long, timeout=0.05)
                with client.stream("POST", "/chat/completions", json={**long, "stream": True}) as response:
                    assert next(response.iter_lines()).startswith("data: ")
            deadline = time.monotonic() + 30
            while stats["disconnects"] < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            uvicorn_log.removeHandler(caplog.handler)
    assert stats["disconnects"] == 3
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []
    gone = [r.getMessage() for r in caplog.records if r.name == "miniatures.server" and "went away" in r.getMessage()]
    assert len(gone) == 3 and any("while sending" in m for m in gone) and any("stream" in m for m in gone)


def test_campaign_through_the_server_matches_in_process(server: Any, served: list[ServedModel], tmp_path: Path,
                                                        sqlite_engine: Engine) -> None:
    """run_campaign with writer=miniature:writer-x vs writer=openai:writer-x@server#vllm: same trace outputs
    (the served model gets the writer's grammar as structured_outputs.grammar, the in-process one as its task)."""
    from sqlmodel import Session, col, select

    from graphs.models import ModelPool
    from graphs.runner import add_prospects, run_campaign
    from miniatures.local import LocalMiniatureChatModel
    from miniatures.remote import build_remote_chat_model
    from miniatures.specs import parse_backend_spec
    from store.models import Trace
    from tests.helpers import small_world
    from tools import CorpusWeb

    _, corpus, offer, prospects = small_world(tmp_path, n=2)
    writer = server.app.state.models["writer-x@2"]
    in_process = "miniature:writer-x"
    as_served = f"openai:writer-x@{server.base_url}#vllm"
    pool = ModelPool(preloaded={
        in_process: LocalMiniatureChatModel(engine=writer.engine, adapter=writer.adapter, max_new_tokens=24,
                                            model_name="miniature:writer-x@2"),
        as_served: build_remote_chat_model(parse_backend_spec(as_served), max_tokens=24),
    }, store=sqlite_engine)
    outputs = {}
    for campaign, spec in (("local", in_process), ("served", as_served)):
        add_prospects(sqlite_engine, campaign, offer, prospects)
        asyncio.run(run_campaign(sqlite_engine, campaign, web=CorpusWeb(corpus), writer=spec, models=pool))
        with Session(sqlite_engine) as session:
            traces = session.exec(select(Trace).where(Trace.backend == spec).order_by(col(Trace.id))).all()
        outputs[campaign] = sorted((t.messages[-1]["content"], t.output, t.input_tokens, t.output_tokens)
                                   for t in traces)
    assert outputs["local"] and len(outputs["local"]) >= len(prospects)
    assert outputs["local"] == outputs["served"]


@pytest.mark.slow
def test_load_of_1000_requests_without_errors_or_memory_growth(server: Any) -> None:
    """1,000 short requests, 16 at a time, on loopback: no errors, RSS growth under 64 MiB, within 300 s."""
    psutil = pytest.importorskip("psutil")
    process = psutil.Process(os.getpid())
    body = {"model": "researcher-x", "max_tokens": 4}

    async def load(n: int) -> list[int]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server.base_url, trust_env=False, timeout=60, limits=limits) as client:
            gate = asyncio.Semaphore(16)

            async def one(i: int) -> int:
                async with gate:
                    r = await client.post("/chat/completions", json={**body, "messages": PROMPTS[i % 4]})
                    return r.status_code

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout=300)

    asyncio.run(load(100))  # warm-up: allocator pools, caches
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    statuses = asyncio.run(load(1000))
    took = time.perf_counter() - started
    growth_mib = (process.memory_info().rss - rss_before) / 2**20
    print(f"1000 requests in {took:.1f} s ({1000 / took:.0f} req/s), RSS growth {growth_mib:.1f} MiB")
    assert statuses.count(200) == 1000
    assert growth_mib < 64


# ---------------------------------------------------------------------- outreach serve


@pytest.fixture
def cli() -> typer.Typer:
    from outreach.cli_serve import serve_command

    app = typer.Typer()
    app.command()(serve_command)
    return app


def _store_url(store: Engine) -> str:
    return str(store.url)


def test_serve_command_local_builds_the_app_and_runs_it(cli: typer.Typer, store: Engine,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import miniatures.server as server_module

    started: dict[str, Any] = {}

    def fake_run(app: Any, *, host: str, port: int) -> None:
        started.update(app=app, host=host, port=port)

    monkeypatch.setattr(server_module, "run_server", fake_run)
    threads = torch.get_num_threads()
    result = CliRunner().invoke(cli, ["writer-x", "--store", _store_url(store), "--port", "8123", "--batch-size", "4",
                                      "--batch-window-ms", "3", "--device", "cpu", "--threads", "1",
                                      "--max-new-tokens", "16", "--max-tokens-cap", "64", "--allowed-host",
                                      "models.lan", "--allowed-host", "[::2]"])
    too_low = CliRunner().invoke(cli, ["writer-x", "--store", _store_url(store), "--device", "cpu", "--threads", "1",
                                       "--max-tokens-cap", "8"])  # under the default --max-new-tokens 512
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    app = started["app"]
    assert set(app.state.models) == {"writer-x@2"}
    engine = app.state.models["writer-x@2"].engine
    assert (engine.max_batch_size, engine.batch_window_ms, engine.max_new_tokens) == (4, 3.0, 16)
    assert [m.kwargs["allowed_hosts"] for m in app.user_middleware] == [frozenset({"models.lan", "::2"})]
    with serve_in_thread(app) as running, _client(running) as client:
        over = client.post("/chat/completions", json={"model": "writer-x", "messages": PROMPTS[2], "max_tokens": 65})
    assert over.status_code == 400 and "at most 64" in over.json()["error"]["message"]
    engine.close()
    assert too_low.exit_code == 2 and "--max-tokens-cap" in too_low.output and "512" in too_low.output


def test_serve_command_refuses_public_bind_and_unknown_miniatures(cli: typer.Typer, store: Engine) -> None:
    public = CliRunner().invoke(cli, ["--host", "0.0.0.0", "--store", _store_url(store)])
    assert public.exit_code == 2 and "without an API key" in public.output
    unknown = CliRunner().invoke(cli, ["ghost", "--store", _store_url(store), "--engine", "vllm", "--print"])
    assert unknown.exit_code == 2 and "no miniature 'ghost'" in unknown.output


def test_serve_command_vllm_prints_or_explains_how_to_install(cli: typer.Typer, store: Engine, tiny: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    printed = CliRunner().invoke(cli, ["--engine", "vllm", "--print", "--store", _store_url(store)])
    assert printed.exit_code == 0, printed.output
    line = printed.output.strip()
    assert line.startswith(f"vllm serve {tiny['base']} --enable-lora --lora-modules ")
    assert f"researcher-x={tiny['a2']}" in line and f"writer-x={tiny['a1']}" in line
    assert "--max-lora-rank 16 --max-loras 2" in line  # ranks 4 and 12 -> 16; latest of each name
    monkeypatch.setattr(shutil, "which", lambda name: None)
    missing = CliRunner().invoke(cli, ["--engine", "vllm", "--store", _store_url(store)])
    assert missing.exit_code == 2 and "pip install '.[vllm]'" in missing.output.replace("\n", "")
    execs: list[Any] = []
    monkeypatch.setattr(shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append((path, argv)))
    ran = CliRunner().invoke(cli, ["--engine", "vllm", "--store", _store_url(store), "--api-key", "k",
                                   "--host", "0.0.0.0"])
    assert ran.exit_code == 0, ran.output
    assert execs[0][0] == "/opt/bin/vllm" and execs[0][1][:3] == ["vllm", "serve", str(tiny["base"])]
    assert execs[0][1][-6:] == ["--host", "0.0.0.0", "--port", "8000", "--api-key", "k"]
