"""``outreach serve`` carries the typed task: ``openai:<name>@<url>#outreach`` sends it as ``outreach_task``.

Three tiny LoRA miniatures on one random base (no downloads) are registered with the answer formats
``sentence-tags`` (researcher), ``writer-brief`` (writer) and ``json`` (researcher) and served on loopback. The
tests check that a served answer with the task equals the in-process ``miniature:<name>`` answer with the same
task (greedy; the split sentence prompts and the brief are what the server feeds the model), that a campaign
through the server gives the in-process traces, that a task-format miniature asked without a task (a ``#vllm``
or plain client) or with a malformed task or another constraint gets an OpenAI-style 400 naming the field and
the fix, and that ``json`` miniatures still serve ``vllm:``-style requests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from langchain_core.messages import BaseMessage
from sqlalchemy import Engine
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from agents.researcher import build_extraction_messages  # noqa: E402
from agents.schemas import Fact, Offer, Profile, ProspectInfo  # noqa: E402
from agents.writer import writer_messages, writing_task  # noqa: E402
from core.tasks import ExtractionTask, FieldSpec, Sentence, WritingTask, dump_task  # noqa: E402
from graphs.models import build_chat_model  # noqa: E402
from miniatures import register_miniature  # noqa: E402
from miniatures.formats import brief_messages, sentence_messages  # noqa: E402
from miniatures.grammar import answer_grammar  # noqa: E402
from miniatures.local import LocalEngine  # noqa: E402
from miniatures.remote import TASK_FIELD  # noqa: E402
from miniatures.server import ChatCompletionRequest, ServedModel, create_app, load_served_models, serve_in_thread  # noqa: E402
from store import open_store  # noqa: E402
from tests.miniature_fixtures import build_adapter, build_tiny_base  # noqa: E402

MAX_NEW = 24
EXTRACTION = ExtractionTask(
    company="Acme Freight", website="https://acme.example/",
    fields=(FieldSpec(name="location", description="where the company is based"),
            FieldSpec(name="founded_year", description="the year it was founded")),
    sentences=(Sentence(id="S1", text="Acme Freight is based in Austin, Texas.", source_url="https://acme.example/"),
               Sentence(id="S2", text="The company was founded in 2012.", source_url="https://acme.example/about"),
               Sentence(id="S3", text="It builds logistics software.", source_url="https://news.example/acme")),
)
OFFER = Offer(sender_name="Ilse Varnum", sender_title="Account Executive", sender_company="Tallyfold",
              product="Tallyfold Signals", value_proposition="Tallyfold Signals spots the accounts ready to buy.",
              call_to_action="Would a 15-minute call next week be worth it?",
              problems_solved=["finding the accounts that are ready to buy"],
              proof_point="Brightline's team booked 30% more meetings.", cta_style="meeting")
PROSPECT = ProspectInfo(first_name="Ada", last_name="Lovel", title="Head of Growth", email="ada@acme.example",
                        company="Acme Freight", website="https://acme.example")
WRITING = writing_task(OFFER, PROSPECT, Profile(company="Acme Freight", website="https://acme.example", facts=[
    Fact(field="location", value="Austin, Texas", evidence="S1", source_url="https://acme.example/")]))
#: name -> (training config, its task, the agent's messages for it)
MINIATURES: dict[str, tuple[dict[str, Any], ExtractionTask | WritingTask]] = {
    "researcher-tags": ({"answer_format": "sentence-tags"}, EXTRACTION),
    "writer-brief": ({"answer_format": "writer-brief"}, WRITING),
    "researcher-json": ({}, EXTRACTION),
}


def _messages(task: ExtractionTask | WritingTask) -> list[BaseMessage]:
    return build_extraction_messages(task) if isinstance(task, ExtractionTask) else writer_messages(task)


def _openai(messages: list[BaseMessage]) -> list[dict[str, str]]:
    roles = {"system": "system", "human": "user", "ai": "assistant"}
    return [{"role": roles[m.type], "content": str(m.content)} for m in messages]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root = tmp_path_factory.mktemp("served-task")
    base = build_tiny_base(root / "base", context=4096)
    adapter = build_adapter(base, root / "a1", seed=11)
    engine = open_store(f"sqlite:///{root / 'registry.sqlite'}")
    for name, (config, task) in MINIATURES.items():
        register_miniature(engine, name=name, agent="writer" if isinstance(task, WritingTask) else "researcher",
                           adapter_path=str(adapter), base_model=str(base), training_config=config,
                           dataset_hash="h", metrics={})
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def served(store: Engine) -> Iterator[list[ServedModel]]:
    threads = torch.get_num_threads()
    engines: dict[str, LocalEngine] = {}
    models = load_served_models(store, list(MINIATURES), engines=engines, device="cpu", max_new_tokens=MAX_NEW,
                                num_threads=1)
    yield models
    for engine in engines.values():
        engine.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(served: list[ServedModel]) -> Iterator[Any]:
    with serve_in_thread(create_app(served, max_batch_size=16, batch_window_ms=10.0)) as running:
        yield running


def _post(server: Any, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=60.0) as client:
        return client.post("/chat/completions", json=body)


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def test_the_request_field_is_the_one_clients_send() -> None:
    assert TASK_FIELD == "outreach_task" and TASK_FIELD in ChatCompletionRequest.model_fields


def test_models_say_which_task_each_miniature_needs(server: Any) -> None:
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=60.0) as client:
        cards = {card["id"]: card["metadata"] for card in client.get("/models").json()["data"]}
    assert {name: (cards[name]["answer_format"], cards[name]["task"]) for name in MINIATURES} == {
        "researcher-tags": ("sentence-tags", "extraction"), "writer-brief": ("writer-brief", "writing"),
        "researcher-json": ("json", None)}


def test_served_answers_with_the_task_equal_the_in_process_backend(server: Any, served: list[ServedModel],
                                                                   store: Engine) -> None:
    """openai:<name>@server#outreach and miniature:<name> with the same task give the same text and usage (greedy),
    and the server fed the model the format's prompts: one per sentence, the brief, or the agent's messages."""
    base = served[0].parent
    engines: dict[str, Any] = {base: LocalEngine(base, device="cpu", max_new_tokens=MAX_NEW)}
    try:
        for name, (_config, task) in MINIATURES.items():
            messages = _messages(task)
            here = build_chat_model(f"miniature:{name}", store=store, engines=engines).invoke(
                messages, task=task, temperature=0)  # a writer samples in-process by default
            there = build_chat_model(f"openai:{name}@{server.base_url}#outreach").invoke(messages, task=task)
            assert there.content == here.content and here.content, name
            assert there.usage_metadata is not None and here.usage_metadata is not None
            assert there.usage_metadata["input_tokens"] == here.usage_metadata["input_tokens"], name
            assert there.usage_metadata["output_tokens"] == here.usage_metadata["output_tokens"], name
            engine = engines[base]
            prompts = {"researcher-tags": [sentence_messages(EXTRACTION.company, s.source_url, s.text)
                                           for s in EXTRACTION.sentences],
                       "writer-brief": [brief_messages(WRITING)],
                       "researcher-json": [_openai(messages)]}[name]
            assert there.usage_metadata["input_tokens"] == sum(len(engine.prompt_ids(p)) for p in prompts), name
            text = str(there.content)
            if name == "researcher-tags":  # the extraction JSON assembled from the sentence tags, always whole
                facts = json.loads(text)["facts"]
                assert all(f["evidence"] in {s.id for s in EXTRACTION.sentences} for f in facts)
            else:  # held to the task's grammar (cut at MAX_NEW tokens); a brief's offer tags are written out
                assert text.startswith('{"subject": "' if name == "writer-brief" else '{"facts": ['), text
                assert "{{cta}}" not in text and "{{proof}}" not in text
    finally:
        for engine in engines.values():
            engine.close()


def test_a_task_format_asked_without_its_task_gets_400_naming_the_fix(server: Any) -> None:
    """What a #vllm client sends (the grammar, no task) and a plain request: refused, never answered wrongly."""
    for name, format_name in (("researcher-tags", "sentence-tags"), ("writer-brief", "writer-brief")):
        task = MINIATURES[name][1]
        for extra in ({"structured_outputs": {"grammar": answer_grammar(task)}}, {}):
            body = {"model": name, "messages": _openai(_messages(task)), "max_tokens": 8, **extra}
            error = _error(_post(server, body))
            assert (error["param"], error["code"]) == (TASK_FIELD, "task_required")
            assert f"'{format_name}' format" in error["message"]
            assert f"openai:{name}@{server.base_url}#outreach" in error["message"]
    import openai

    with pytest.raises(openai.BadRequestError, match="#outreach"):
        build_chat_model(f"openai:researcher-tags@{server.base_url}#vllm").invoke(_messages(EXTRACTION),
                                                                                 task=EXTRACTION)
    # A json-format miniature serves vllm:-style requests (the grammar, no task) as before: the same answer as
    # with the task, whose grammar is the one a vllm: client sends.
    vllm_style = build_chat_model(f"vllm:researcher-json@{server.base_url}").invoke(_messages(EXTRACTION),
                                                                                   task=EXTRACTION)
    with_task = build_chat_model(f"openai:researcher-json@{server.base_url}#outreach").invoke(_messages(EXTRACTION),
                                                                                             task=EXTRACTION)
    assert vllm_style.content == with_task.content and str(vllm_style.content).startswith('{"facts": [')


@pytest.mark.parametrize(
    ("model", "task", "expected"),
    [
        ("researcher-tags", "S1 is in Austin", "not a string"),
        ("researcher-tags", [dump_task(EXTRACTION)], "not an array"),
        ("researcher-tags", {"kind": "summary"}, "outreach_task: "),
        ("researcher-tags", {"kind": "extraction", "company": "Acme"}, "outreach_task.extraction.website"),
        ("researcher-tags", {**dump_task(EXTRACTION), "prompt": "x"}, "outreach_task.extraction.prompt"),
        ("researcher-tags", dump_task(WRITING), "needs an extraction task"),
        ("writer-brief", dump_task(EXTRACTION), "needs a writing task"),
    ],
)
def test_a_malformed_or_mismatched_task_gets_400_naming_the_field(server: Any, model: str, task: Any,
                                                                  expected: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, TASK_FIELD: task}
    error = _error(_post(server, body))
    assert (error["param"], error["code"]) == (TASK_FIELD, "invalid_task")
    assert expected in error["message"] and TASK_FIELD in error["message"]


def test_a_task_with_another_constraint_is_refused(server: Any) -> None:
    base = {"model": "researcher-json", "messages": _openai(_messages(EXTRACTION)), "max_tokens": 8,
            TASK_FIELD: dump_task(EXTRACTION)}
    other = EXTRACTION.model_copy(update={"sentences": EXTRACTION.sentences[:1]})
    error = _error(_post(server, {**base, "structured_outputs": {"grammar": answer_grammar(other)}}))
    assert (error["param"], error["code"]) == ("structured_outputs.grammar", "invalid_grammar")
    error = _error(_post(server, {**base, "response_format": {"type": "json_object"}}))
    assert error["param"] == "response_format" and TASK_FIELD in error["message"]
    own = _post(server, {**base, "structured_outputs": {"grammar": answer_grammar(EXTRACTION)}})
    assert own.status_code == 200, own.text
    alone = _post(server, base)  # the task's own grammar is redundant
    assert own.json()["choices"][0]["message"]["content"] == alone.json()["choices"][0]["message"]["content"]


def test_the_prompt_limit_counts_the_prompts_built_from_the_task(served: list[ServedModel]) -> None:
    """A sentence-tags request whose agent prompt is over the limit but whose sentence prompts fit is served; one
    sentence over it is refused naming outreach_task (the messages are not what the model reads)."""
    engine = served[0].engine
    longest = max(len(engine.prompt_ids(sentence_messages(EXTRACTION.company, s.source_url, s.text)))
                  for s in EXTRACTION.sentences)
    messages = _openai(_messages(EXTRACTION))
    assert len(engine.prompt_ids(messages)) > longest + 10
    long_text = " ".join(["The company builds logistics software."] * 20)
    too_long = EXTRACTION.model_copy(update={"sentences": (
        *EXTRACTION.sentences, Sentence(id="S4", text=long_text, source_url="https://acme.example/"))})
    with serve_in_thread(create_app(served, max_prompt_tokens=longest + 10)) as running:
        body = {"model": "researcher-tags", "messages": messages, "max_tokens": 8}
        fits = _post(running, {**body, TASK_FIELD: dump_task(EXTRACTION)})
        over = _post(running, {**body, TASK_FIELD: dump_task(too_long)})
        plain = _post(running, {**body, "model": "researcher-json", TASK_FIELD: dump_task(EXTRACTION)})
    assert fits.status_code == 200, fits.text
    error = _error(over)
    assert (error["param"], error["code"]) == (TASK_FIELD, "context_length_exceeded")
    assert _error(plain)["param"] == "messages"  # a json miniature reads the messages


def test_a_stream_with_a_task_adds_up_to_the_answer(server: Any) -> None:
    body = {"model": "writer-brief", "messages": _openai(_messages(WRITING)), "max_tokens": 16,
            TASK_FIELD: dump_task(WRITING)}
    whole = _post(server, body).json()["choices"][0]["message"]["content"]
    pieces = []
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=60.0) as client, client.stream(
            "POST", "/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                pieces.append(chunk["choices"][0]["delta"].get("content") or "")
    assert "".join(pieces) == whole and whole


@pytest.mark.slow  # about 20 s on the shared CPU: two campaigns of two prospects
def test_a_campaign_through_the_server_with_tasks_matches_in_process(server: Any, tmp_path: Path,
                                                                     sqlite_engine: Engine) -> None:
    """A sentence-tags researcher and a writer-brief writer, served over #outreach, write the in-process traces."""
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
    served = server.app.state.models
    specs: dict[str, dict[str, str]] = {"local": {}, "served": {}}
    preloaded: dict[str, Any] = {}
    for agent, name in (("researcher", "researcher-tags"), ("writer", "writer-brief")):
        model = served[f"{name}@1"]
        assert model.chat is not None
        local, remote = f"miniature:{name}", f"openai:{name}@{server.base_url}#outreach"
        preloaded[local] = LocalMiniatureChatModel(engine=model.engine, adapter=model.adapter,
                                                   max_new_tokens=MAX_NEW, model_name=f"miniature:{name}@1",
                                                   answer_format=model.chat.answer_format)
        preloaded[remote] = build_remote_chat_model(parse_backend_spec(remote), max_tokens=MAX_NEW)
        specs["local"][agent], specs["served"][agent] = local, remote
    pool = ModelPool(preloaded=preloaded, store=sqlite_engine)
    outputs = {}
    for campaign, chosen in specs.items():
        add_prospects(sqlite_engine, campaign, offer, prospects)
        asyncio.run(run_campaign(sqlite_engine, campaign, web=CorpusWeb(corpus), researcher=chosen["researcher"],
                                 writer=chosen["writer"], models=pool))
        with Session(sqlite_engine) as session:
            traces = session.exec(select(Trace).where(col(Trace.backend).in_(list(chosen.values())))
                                  .order_by(col(Trace.id))).all()
        outputs[campaign] = sorted((t.agent, t.messages[-1]["content"], t.output, t.input_tokens, t.output_tokens)
                                   for t in traces)
    assert {row[0] for row in outputs["local"]} == {"researcher", "writer"}
    assert outputs["local"] == outputs["served"]


def test_serve_help_and_start_line_name_the_outreach_fragment(store: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import miniatures.server as server_module
    from outreach.cli_serve import serve_command

    cli = typer.Typer()
    cli.command()(serve_command)
    assert "#outreach" in CliRunner().invoke(cli, ["--help"]).output
    started: list[Any] = []
    monkeypatch.setattr(server_module, "run_server", lambda app, *, host, port: started.append(app))
    threads = torch.get_num_threads()
    result = CliRunner().invoke(cli, ["researcher-tags", "--store", str(store.url), "--device", "cpu",
                                      "--threads", "1", "--max-new-tokens", "16"])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "openai:researcher-tags@http://127.0.0.1:8000/v1#outreach" in result.output.replace("\n", "")
    for model in started[0].state.models.values():
        model.engine.close()
