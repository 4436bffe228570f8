"""The local miniature backend: several LoRA adapters on one tiny base, batching, usage, template, JSON repair.

Everything runs on a tiny Llama built from a config and a byte-level BPE tokenizer trained here (no downloads).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from sqlalchemy import Engine

from miniatures import (
    BASE_ADAPTER,
    AdapterPathError,
    LocalEngine,
    LocalMiniatureChatModel,
    MiniatureNotFoundError,
    build_miniature_chat_model,
    parse_backend_spec,
    register_miniature,
    repair_json,
)
from miniatures.registry import MiniaturePathError

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.miniature_fixtures import PROMPTS, build_adapter, build_tiny_base  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_base(root / "base")
    return {
        "base": base,
        "a1": build_adapter(base, root / "a1", seed=11),
        "a2": build_adapter(base, root / "a2", seed=22),
    }


@pytest.fixture(scope="module")
def local(tiny: dict[str, Path]) -> Iterator[LocalEngine]:
    threads = torch.get_num_threads()
    # one torch thread: steady timings on a shared CPU (num_threads is process-wide, so restored after)
    engine = LocalEngine(str(tiny["base"]), device="cpu", batch_window_ms=50.0, max_new_tokens=12, num_threads=1)
    assert torch.get_num_threads() == 1
    engine.add_adapter("a1", tiny["a1"])
    engine.add_adapter("a2", tiny["a2"])
    yield engine
    engine.close()
    torch.set_num_threads(threads)


def test_prompt_is_the_tokenizers_own_chat_template(local: LocalEngine) -> None:
    messages = PROMPTS[0]
    expected_text = local.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert local.render_prompt(messages) == expected_text
    assert expected_text.endswith("<|im_start|>assistant\n")
    expected_ids = local.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert local.prompt_ids(messages) == list(expected_ids)
    assert local.tokenizer.convert_tokens_to_ids("<|im_end|>") in local.stop_token_ids


def test_usage_counts_are_the_tokenizers(local: LocalEngine) -> None:
    result = local.generate_sync("a1", PROMPTS[1], max_new_tokens=5)
    assert result.input_tokens == len(local.prompt_ids(PROMPTS[1]))
    assert 1 <= result.output_tokens <= 5
    if result.finish_reason == "length":
        assert result.output_tokens == 5
    assert result.latency_ms > 0


def test_stop_token_ends_the_text_and_counts_as_output(local: LocalEngine) -> None:
    from miniatures.local import _Request

    im_end = local.tokenizer.convert_tokens_to_ids("<|im_end|>")
    hello = local.tokenizer("Hi there", add_special_tokens=False)["input_ids"]
    request = _Request(adapter="a1", grammar=None, input_ids=[1, 2, 3], max_new_tokens=50, started=0.0)
    done = local._finish(request, [*hello, im_end, 0, 0], now=0.001)
    assert (done.text, done.output_tokens, done.finish_reason, done.input_tokens) == (
        "Hi there", len(hello) + 1, "stop", 3)
    capped = local._finish(_Request("a1", None, [1], 2, 0.0), [*hello, im_end], now=0.0)
    assert capped.output_tokens == 2 and capped.finish_reason == "length"


async def test_two_adapters_on_one_base_differ_and_batching_changes_nothing(local: LocalEngine) -> None:
    adapters = ["a1", "a2", BASE_ADAPTER]
    alone = {(a, i): local.generate_sync(a, p) for a in adapters for i, p in enumerate(PROMPTS[:2])}
    assert alone[("a1", 0)].text != alone[("a2", 0)].text
    assert alone[("a1", 0)].text != alone[(BASE_ADAPTER, 0)].text

    calls = local.generate_calls
    keys = list(alone)
    together = await asyncio.gather(*(local.generate(a, PROMPTS[i]) for a, i in keys))
    assert local.generate_calls - calls == 1  # one mixed-adapter batch (peft adapter_names=)
    for key, result in zip(keys, together, strict=True):
        assert (result.text, result.output_tokens) == (alone[key].text, alone[key].output_tokens), key
        assert result.input_tokens == alone[key].input_tokens


async def test_grouped_fallback_gives_the_same_answers(tiny: dict[str, Path]) -> None:
    engine = LocalEngine(str(tiny["base"]), device="cpu", batch_window_ms=50.0, max_new_tokens=8)
    engine.add_adapter("a1", tiny["a1"])
    engine.add_adapter("a2", tiny["a2"])
    engine._mixed_batches = False  # as when the installed peft refuses adapter_names=
    alone = [engine.generate_sync(a, PROMPTS[0]) for a in ("a1", "a2", "a1")]
    calls = engine.generate_calls
    together = await asyncio.gather(*(engine.generate(a, PROMPTS[0]) for a in ("a1", "a2", "a1")))
    assert engine.generate_calls - calls == 2  # one generate per adapter
    assert [g.text for g in together] == [g.text for g in alone]


async def test_eight_concurrent_requests_take_fewer_generate_calls(local: LocalEngine) -> None:
    requests = [("a1" if i % 2 else "a2", PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    expected = [local.generate_sync(a, p).text for a, p in requests]
    calls, served = local.generate_calls, local.requests_served
    results = await asyncio.gather(*(local.generate(a, p) for a, p in requests))
    used = local.generate_calls - calls
    assert local.requests_served - served == 8
    assert 1 <= used < 8
    assert [r.text for r in results] == expected


async def test_bad_requests_fail_alone(local: LocalEngine) -> None:
    with pytest.raises(ValueError, match="adapter 'nope' is not loaded"):
        await local.generate("nope", PROMPTS[0])
    with pytest.raises(ValueError, match="messages is empty"):
        local.generate_sync("a1", [])
    long = [{"role": "user", "content": "logistics software " * 400}]
    with pytest.raises(ValueError, match="does not fit the context"):
        await local.generate("a1", long)
    assert (await local.generate("a1", PROMPTS[2])).input_tokens > 0  # the batcher still serves


def test_add_adapter_checks_the_folder(local: LocalEngine, tmp_path: Path, tiny: dict[str, Path]) -> None:
    with pytest.raises(AdapterPathError, match="adapter_config.json"):
        local.add_adapter("ghost", tmp_path / "missing")
    with pytest.raises(ValueError, match="reserved"):
        local.add_adapter(BASE_ADAPTER, tiny["a1"])
    with pytest.raises(ValueError, match="already loaded"):
        local.add_adapter("a1", tiny["a2"])
    local.add_adapter("a1", tiny["a1"])  # same folder again: no-op
    assert local.adapters["a1"] == str(tiny["a1"])


async def test_chat_model_reports_usage_and_name(local: LocalEngine) -> None:
    model = LocalMiniatureChatModel(engine=local, adapter="a2", model_name="miniature:writer-small@3")
    assert model._llm_type == "miniature"
    messages = [SystemMessage("You write emails."), HumanMessage("Write to the company.")]
    sync = model.invoke(messages)
    result = await model.ainvoke(messages)
    assert result.content == sync.content == local.generate_sync("a2", PROMPTS[0]).text
    usage = result.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] == len(local.prompt_ids(PROMPTS[0]))
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert result.response_metadata["model_name"] == "miniature:writer-small@3"


def test_chat_model_repairs_truncated_json(local: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    from miniatures.local import Generation

    truncated = '{"facts": [{"field": "industry", "value": "fintech", "evidence": "S3"}, {"field": "loc'
    monkeypatch.setattr(local, "generate_sync", lambda *a, **k: Generation(truncated, 10, 12, 1.0, "length"))
    message = LocalMiniatureChatModel(engine=local, adapter="a1").invoke([HumanMessage("x")])
    assert json.loads(str(message.content)) == {"facts": [{"field": "industry", "value": "fintech", "evidence": "S3"}]}
    assert message.response_metadata["json_repaired"] is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', '{"a": 1}'),  # valid: unchanged
        ("no json here", "no json here"),
        ('Sure! ```json\n{"subject": "Hi", "body": "x"}\n``` hope it helps', '{"subject": "Hi", "body": "x"}'),
        ('{"a": [1, 2,], "b": {"c": 3,},}', '{"a": [1, 2], "b": {"c": 3}}'),  # trailing commas
        ('use {braces} like {"a": "}"}', '{"a": "}"}'),  # a brace inside a string does not close
        ('{"facts": [{"field": "a", "value": "x"}, {"field": "b", "val', '{"facts": [{"field": "a", "value": "x"}]}'),
        ('{"subject": "Hi", "body": "Dear {{first_name}}, we', '{"subject": "Hi"}'),  # half a string is dropped
        ('{"subject": "Hi", "count": 20', '{"subject": "Hi"}'),  # a number cut short is dropped, not kept as 20
        ('{"facts": [', '{"facts": ['),  # nothing complete: left alone, so the agent retries
        ('x}} {} y {"a": {', 'x}} {} y {"a": {'),  # never turned into an empty but valid answer
        ('Here: {"facts": []} ok', 'Here: {"facts": []} ok'),
        ('{"a": "x\\"y", "b": "unfinished \\', '{"a": "x\\"y"}'),  # escaped quotes are not string ends
        ('{"a": 1]', '{"a": 1]'),  # mismatched brackets: left alone
        ('{"facts": [{"field": "location", "value": "San Fran', '{"facts": [{"field": "location", "value": "San Fran'),
    ],
)
def test_repair_json(text: str, expected: str) -> None:
    assert repair_json(text) == expected
    if expected != text:
        json.loads(expected)


def test_build_from_registry_shares_engines_and_checks_paths(
    sqlite_engine: Engine, tiny: dict[str, Path], tmp_path: Path
) -> None:
    common: dict[str, Any] = {
        "base_model": str(tiny["base"]), "training_config": {}, "dataset_hash": "h", "metrics": {}}
    register_miniature(sqlite_engine, name="writer-small", agent="writer", adapter_path=str(tiny["a1"]), **common)
    register_miniature(sqlite_engine, name="writer-small", agent="writer", adapter_path=str(tiny["a2"]), **common)
    register_miniature(sqlite_engine, name="researcher-small", agent="researcher", adapter_path=str(tiny["a1"]),
                       **common)
    register_miniature(sqlite_engine, name="gone", agent="writer", adapter_path=str(tmp_path / "deleted"), **common)
    full_folder = shutil.copytree(tiny["base"], tmp_path / "full")  # a fully fine-tuned model: its own folder
    register_miniature(sqlite_engine, name="full-one", agent="writer", method="full", adapter_path=str(full_folder),
                       **{**common, "base_model": "unused"})

    engines: dict[str, LocalEngine] = {}
    latest = build_miniature_chat_model(parse_backend_spec("miniature:writer-small"), sqlite_engine, engines=engines,
                                        max_new_tokens=8)
    pinned = build_miniature_chat_model(parse_backend_spec("miniature:writer-small@1"), sqlite_engine, engines=engines)
    other = build_miniature_chat_model(parse_backend_spec("miniature:researcher-small"), sqlite_engine,
                                       engines=engines)
    assert latest.engine is pinned.engine is other.engine and list(engines) == [str(tiny["base"])]
    assert (latest.adapter, pinned.adapter, other.adapter) == ("writer-small@2", "writer-small@1", "researcher-small@1")
    assert set(latest.engine.adapters) == {"writer-small@1", "writer-small@2", "researcher-small@1"}
    assert latest.invoke([HumanMessage("Hi")]).response_metadata["model_name"] == "miniature:writer-small@2"

    full = build_miniature_chat_model(parse_backend_spec("miniature:full-one"), sqlite_engine, engines=engines,
                                      max_new_tokens=8)
    assert full.adapter == BASE_ADAPTER and full.engine is not latest.engine
    assert full.engine.base_model == str(full_folder) and full.engine.adapters == {}
    assert full.engine.generate_sync(BASE_ADAPTER, PROMPTS[2]).text == latest.engine.generate_sync(
        BASE_ADAPTER, PROMPTS[2]).text

    with pytest.raises(MiniaturePathError) as gone:
        build_miniature_chat_model(parse_backend_spec("miniature:gone"), sqlite_engine, engines=engines)
    assert str(tmp_path / "deleted") in str(gone.value)
    assert "outreach miniatures relocate" in str(gone.value) and "outreach miniatures rm gone@1" in str(gone.value)
    with pytest.raises(MiniatureNotFoundError, match="writer-small@1"):
        build_miniature_chat_model(parse_backend_spec("miniature:nobody"), sqlite_engine, engines=engines)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_gpu_batches_match_single_requests(tiny: dict[str, Path]) -> None:
    engine = LocalEngine(str(tiny["base"]), device="cuda", dtype="float32", max_new_tokens=12)
    engine.add_adapter("a1", tiny["a1"])
    engine.add_adapter("a2", tiny["a2"])
    requests = [("a1" if i % 2 else "a2", PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    alone = [engine.generate_sync(a, p).text for a, p in requests]
    together = await asyncio.gather(*(engine.generate(a, p) for a, p in requests))
    assert [g.text for g in together] == alone
    assert LocalEngine(str(tiny["base"]), device="cuda").dtype == torch.bfloat16


async def test_a_short_answer_joins_a_running_long_one_and_leaves_first(local: LocalEngine) -> None:
    long_chat, short_chat = PROMPTS[0], PROMPTS[3]
    alone = [local.generate_sync("a1", long_chat, max_new_tokens=12), local.generate_sync("a1", short_chat,
                                                                                         max_new_tokens=2)]
    calls, steps = local.generate_calls, local.decode_steps
    ended: list[str] = []

    async def ask(chat: list[dict[str, str]], n: int, name: str, delay: float) -> Any:
        await asyncio.sleep(delay)
        answer = await local.generate("a1", chat, max_new_tokens=n)
        ended.append(name)
        return answer

    speculative, local.speculative_tokens = local.speculative_tokens, 0  # one token per step: the long answer,
    try:  # drafted from the adapter's completion store (it was just answered alone), would end in two steps
        got = await asyncio.gather(ask(long_chat, 12, "long", 0.0), ask(short_chat, 2, "short", 0.06))
    finally:
        local.speculative_tokens = speculative
    assert [g.text for g in got] == [a.text for a in alone]
    assert ended == ["short", "long"]  # the short one did not wait for the long one to end
    assert local.generate_calls - calls == 1  # it joined the running batch: one run
    assert local.decode_steps - steps < 12 + 2  # and shared its steps

