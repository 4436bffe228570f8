"""The OpenAI-compatible miniature server, started with uvicorn on 127.0.0.1 in a thread.

Two tiny LoRA miniatures (random Llama + ChatML tokenizer trained here, no downloads) are registered in a
store and served; the tests check the API's shapes and errors, that the ``openai:<name>@<server>`` backend
gives the same text as the in-process ``miniature:<name>`` backend (greedy), that a campaign gives the same
trace outputs through both, batching, API keys and bind checks, disconnects, a 1,000-request load and the
``outreach serve`` command.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Iterator
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
        running.app = app
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
        here, there = local.invoke(messages), remote.invoke(messages)
        assert there.content == here.content and here.content
        assert there.usage_metadata is not None and here.usage_metadata is not None
        assert there.usage_metadata["input_tokens"] == here.usage_metadata["input_tokens"]
        assert there.usage_metadata["output_tokens"] == here.usage_metadata["output_tokens"]
        assert there.response_metadata["model_name"] == f"{name}@{2 if name == 'writer-x' else 1}"
    pinned = build_chat_model(f"openai:writer-x:1@{server.base_url}").invoke(messages)  # the spec-safe pin
    assert pinned.content == build_chat_model("miniature:writer-x@1", store=store, engines=engines).invoke(
        messages).content
    assert pinned.content != build_chat_model("miniature:writer-x", store=store, engines=engines).invoke(
        messages).content
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


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "nobody", "messages": PROMPTS[0]}, 404, "model_not_found", "model"),
        ({"model": "writer-x@7", "messages": PROMPTS[0]}, 404, "model_not_found", "model"),
        ({"model": "writer-x"}, 400, "invalid_value", "messages"),
        ({"model": "writer-x", "messages": []}, 400, "invalid_value", "messages"),
        ({"model": "writer-x", "messages": PROMPTS[0], "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ({"model": "writer-x", "messages": [{"role": "tool", "content": "x"}]}, 400, None, "messages.0.role"),
        ({"model": "writer-x", "messages": PROMPTS[0], "temperature": 0.7}, 400, None, "temperature"),
        ({"model": "writer-x", "messages": PROMPTS[0], "n": 2}, 400, None, "n"),
        ({"model": "writer-x", "messages": [{"role": "user", "content": "freight " * 4000}]}, 400,
         "context_length_exceeded", "messages"),
        ({"model": "writer-x", "messages": [{"role": "user", "content": "x" * 300_000}]}, 413, "request_too_large",
         None),
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
    bodies = [{"model": ["writer-x", "writer-x@1", "researcher-x"][i % 3], "messages": PROMPTS[i % 4],
               "max_tokens": 6} for i in range(12)]
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


def test_campaign_through_the_server_matches_in_process(server: Any, served: list[ServedModel], tmp_path: Path,
                                                        sqlite_engine: Engine) -> None:
    """run_campaign with writer=miniature:writer-x vs writer=openai:writer-x@server: same trace outputs."""
    from langchain_openai import ChatOpenAI
    from sqlmodel import Session, select

    from graphs.models import ModelPool
    from graphs.runner import add_prospects, run_campaign
    from miniatures.local import LocalMiniatureChatModel
    from store.models import Trace
    from tests.helpers import small_world
    from tools import CorpusWeb

    _, corpus, offer, prospects = small_world(tmp_path, n=2)
    writer = server.app.state.models["writer-x@2"]
    in_process = "miniature:writer-x"
    as_served = f"openai:writer-x@{server.base_url}"
    pool = ModelPool(preloaded={
        in_process: LocalMiniatureChatModel(engine=writer.engine, adapter=writer.adapter, max_new_tokens=24,
                                            model_name="miniature:writer-x@2"),
        as_served: ChatOpenAI(model="writer-x", base_url=server.base_url, api_key="x", temperature=0,  # type: ignore[arg-type]
                              max_tokens=24),
    }, store=sqlite_engine)
    outputs = {}
    for campaign, spec in (("local", in_process), ("served", as_served)):
        add_prospects(sqlite_engine, campaign, offer, prospects)
        asyncio.run(run_campaign(sqlite_engine, campaign, web=CorpusWeb(corpus), writer=spec, models=pool))
        with Session(sqlite_engine) as session:
            traces = session.exec(select(Trace).where(Trace.backend == spec).order_by(Trace.id)).all()
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
                                      "--batch-window-ms", "3", "--device", "cpu", "--threads", "1"])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    assert set(started["app"].state.models) == {"writer-x@2"}
    engine = started["app"].state.models["writer-x@2"].engine
    assert (engine.max_batch_size, engine.batch_window_ms) == (4, 3.0)
    engine.close()


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
    assert f"researcher-x@1={tiny['a2']}" in line and f"writer-x@2={tiny['a1']}" in line
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
