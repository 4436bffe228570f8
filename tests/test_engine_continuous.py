"""Continuous batching and prefix caching in the local engine (``miniatures.local``).

Rows join a running batch after their own prefill and leave the step they end; the answers must be those of
transformers' own ``generate`` for each request alone (greedy, the engine's ``generation_config``), on a tiny Llama
and on stand-ins of real families (sliding-window layers, other attention layouts), with the grammar's masks and
with seeded sampling. The prefix cache must save prompt tokens without changing an answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llguidance")

from core.tasks import MergeTag, OfferBrief, WritingTask  # noqa: E402
from miniatures import BASE_ADAPTER, LocalEngine  # noqa: E402
from miniatures.grammar import answer_grammar, tag_grammar  # noqa: E402
from miniatures.kv_cache import PrefixCache  # noqa: E402
from miniatures.local import _Batch  # noqa: E402
from miniatures.sampling import RowSampling  # noqa: E402
from tests.miniature_fixtures import PROMPTS, build_adapter, build_tiny_base  # noqa: E402

NEVER = 10**9  # a stop id no model emits: every answer runs to its max_new_tokens

WRITING = WritingTask(
    offer=OfferBrief(sender_title="AE", product="Widget", value_proposition="saves time",
                     call_to_action="Worth a call?", opt_out_line="Reply stop."),
    merge_tags=(MergeTag(name="first_name", description="the first name"),))


def _chat(words: int, topic: str = "freight") -> list[dict[str, str]]:
    return [{"role": "system", "content": "You write emails about logistics software."},
            {"role": "user", "content": " ".join(f"{topic} {i}" for i in range(words))}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("continuous")
    base = build_tiny_base(root / "base")
    return {"base": base, "a1": build_adapter(base, root / "a1", seed=11), "a2": build_adapter(base, root / "a2",
                                                                                                seed=22)}


@pytest.fixture()
def engine(tiny: dict[str, Path]) -> Iterator[LocalEngine]:
    threads = torch.get_num_threads()
    made = LocalEngine(str(tiny["base"]), device="cpu", max_new_tokens=16, num_threads=1, batch_window_ms=20.0,
                       prefix_cache_tokens=0)
    made.add_adapter("a1", tiny["a1"])
    made.add_adapter("a2", tiny["a2"])
    yield made
    made.close()
    torch.set_num_threads(threads)


def _reference(engine: LocalEngine, model: Any, chat: list[dict[str, str]], n: int, grammar: str | None = None,
               adapter: str | None = None) -> str:
    """transformers' ``generate`` of ``chat`` alone, greedy with the engine's settings (and grammar)."""
    from transformers import LogitsProcessorList

    ids = engine.prompt_ids(chat)
    kwargs: dict[str, Any] = {"generation_config": engine.generation_config(n)}
    if grammar is not None:
        kwargs["logits_processor"] = LogitsProcessorList([engine.grammar_processor([grammar], len(ids))])
    if adapter is not None:
        kwargs["adapter_names"] = [adapter]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs)
    row = out[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(row) if t in engine.stop_token_ids), len(row))
    return str(engine.tokenizer.decode(row[:stop], skip_special_tokens=True))


def _schedule(engine: LocalEngine, plan: dict[int, list[tuple[str, list[dict[str, str]], int]]]) -> list[str]:
    """Decode requests that join one batch at chosen steps: ``plan[step]`` are (adapter, chat, max_new_tokens)
    started before that step (prefilled together, as the engine does at a step boundary). Returns the answers in
    plan order, and checks the batch really mixed them."""
    requests = []
    order = []
    for step in sorted(plan):
        for adapter, chat, n in plan[step]:
            requests.append((step, engine._prepare(adapter, chat, n, None)))
            order.append(id(requests[-1][1]))
    answers: dict[int, str] = {}
    batch = _Batch(engine)
    engine._stops = frozenset(engine.stop_token_ids)
    widest = 0
    step = 0
    with torch.inference_mode():
        while len(answers) < len(requests):
            joining = [request for at, request in requests if at == step]
            if joining:  # together: the prefix cache's leader alone, then groups in one forward pass each
                for request, done in engine._start_all(batch, joining):
                    answers[id(request)] = done.text
            widest = max(widest, len(batch.rows))
            if batch.rows:
                for request, done in batch.step():
                    answers[id(request)] = done.text
            step += 1
    assert widest >= min(3, len(requests))
    return [answers[key] for key in order]


@pytest.mark.parametrize("prefix_cache", [0, 4096])
def test_rows_that_join_and_leave_get_generates_answers(engine: LocalEngine, prefix_cache: int) -> None:
    """Rows join at steps 0, 2, 3 and 5 (those of one step prefilled together), one with a prompt longer than the
    batch (the others shift right), with three adapters mixed; rows of 4 to 16 tokens leave as they end and the
    batch shrinks. With the prefix cache, later prompts reuse the system prompt and more of earlier ones."""
    engine.stop_token_ids = [NEVER]
    engine.prefix_cache = PrefixCache(prefix_cache) if prefix_cache else None
    short, mid, long = _chat(3), _chat(12, "carrier"), _chat(60, "invoice")
    plan = {0: [("a1", mid, 16)], 2: [("a2", short, 6), (BASE_ADAPTER, mid, 10), ("a1", _chat(14, "carrier"), 9)],
            3: [("a1", long, 12)], 5: [("a2", _chat(5, "truck"), 4), ("a1", short, 16), ("a1", short, 3)]}
    got = _schedule(engine, plan)
    expected = [_reference(engine, engine._model, chat, n, adapter=adapter)
                for step in sorted(plan) for adapter, chat, n in plan[step]]
    assert got == expected
    assert engine.decode_rows > engine.decode_steps  # steps ran several rows
    if prefix_cache:
        assert engine.prefix_tokens_reused > 0


async def test_concurrent_requests_share_steps_and_match_alone(engine: LocalEngine) -> None:
    engine.speculative_tokens = 0  # rows per step counts one token per row and step (the answers' drafts would
    # come from the adapter's completion store, all accepted: tests/test_engine_speculative.py)
    asked = [("a1" if i % 2 else "a2", _chat(4 + 7 * i), 6 + 2 * i) for i in range(6)]
    alone = [engine.generate_sync(a, c, max_new_tokens=n).text for a, c, n in asked]
    steps, rows, calls = engine.decode_steps, engine.decode_rows, engine.generate_calls

    async def ask(i: int) -> str:
        await asyncio.sleep(0.004 * i)  # arrivals spread over the first steps
        adapter, chat, n = asked[i]
        return (await engine.generate(adapter, chat, max_new_tokens=n)).text

    together = await asyncio.gather(*(ask(i) for i in range(len(asked))))
    assert together == alone
    assert engine.generate_calls - calls == 1
    assert (engine.decode_rows - rows) / (engine.decode_steps - steps) > 2  # mean rows per step


async def test_a_cancelled_request_leaves_and_the_others_are_answered(engine: LocalEngine) -> None:
    engine.stop_token_ids = [NEVER]
    expected = engine.generate_sync("a1", PROMPTS[1], max_new_tokens=16).text
    doomed = asyncio.ensure_future(engine.generate("a2", PROMPTS[0], max_new_tokens=16))
    kept = asyncio.ensure_future(engine.generate("a1", PROMPTS[1], max_new_tokens=16))
    await asyncio.sleep(0.03)
    doomed.cancel()
    assert (await kept).text == expected
    with pytest.raises(asyncio.CancelledError):
        await doomed


def test_grammar_rows_get_the_processors_answers(engine: LocalEngine) -> None:
    """Each row held to its own grammar (an email, a sentence tag, none) in one batch gives what ``generate`` with
    ``GrammarLogitsProcessor`` gives alone, including where the grammar ends the answer."""
    sentence = "Founded in 2014 in Cork by two engineers."
    grammars = [answer_grammar(WRITING), tag_grammar(sentence, ("founded_year", "location")), None]
    chats = [_chat(6), [{"role": "user", "content": sentence}], _chat(9)]
    expected = [_reference(engine, engine._model, c, 40, g, BASE_ADAPTER) for c, g in zip(chats, grammars, strict=True)]
    requests = [engine._prepare(BASE_ADAPTER, c, 40, g) for c, g in zip(chats, grammars, strict=True)]
    batch = _Batch(engine)
    engine._stops = frozenset(engine.stop_token_ids)
    answers: dict[int, Any] = {}
    with torch.inference_mode():
        for request, done in engine._start_all(batch, requests):
            answers[id(request)] = done
        while batch.rows:
            for request, done in batch.step():
                answers[id(request)] = done
    got = [answers[id(r)].text for r in requests]
    assert got == expected
    assert got[0].startswith('{"subject": "') and (got[1] == "-" or " | " in got[1])


async def test_sampled_rows_are_the_same_whatever_joins_them(engine: LocalEngine) -> None:
    rows = [RowSampling(temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    chats = [_chat(5), _chat(20), _chat(11)]
    alone = [engine.generate_sync("a1", c, max_new_tokens=16, sampling=r).text for c, r in zip(chats, rows,
                                                                                                 strict=True)]

    async def ask(i: int) -> str:
        await asyncio.sleep(0.005 * i)
        return (await engine.generate("a1", chats[i], max_new_tokens=16, sampling=rows[i])).text

    assert list(await asyncio.gather(*(ask(i) for i in range(3)))) == alone
    assert len(set(alone)) == 3


def test_the_prefix_cache_saves_prompt_tokens_and_changes_no_answer(tiny: dict[str, Path]) -> None:
    cached = LocalEngine(str(tiny["base"]), device="cpu", max_new_tokens=12, num_threads=1, prefix_cache_tokens=4096)
    plain = LocalEngine(str(tiny["base"]), device="cpu", max_new_tokens=12, num_threads=1, prefix_cache_tokens=0)
    try:
        for e in (cached, plain):
            e.add_adapter("a1", tiny["a1"])
            e.stop_token_ids = [NEVER]
        shared = _chat(40)
        chats = [shared, [*shared[:1], {"role": "user", "content": shared[1]["content"] + " and ports"}],
                 shared, _chat(40, "carrier")]
        for adapter in ("a1", BASE_ADAPTER):
            for chat in chats:
                assert cached.generate_sync(adapter, chat).text == plain.generate_sync(adapter, chat).text
        assert plain.prefix_tokens_reused == 0 and plain.prefix_cache is None
        assert cached.prefix_cache is not None
        length = len(cached.prompt_ids(shared))
        # per adapter: the second prompt reuses all of the first but its end, the repeat all but its last token,
        # the last one the system prompt; the other adapter's entries are never used
        assert cached.prefix_tokens_reused >= 2 * (2 * (length - 8))
        assert cached.prefill_tokens + cached.prefix_tokens_reused == plain.prefill_tokens
    finally:
        cached.close()
        plain.close()


def test_prefix_cache_entries_are_bounded_and_matched_by_longest_prefix(tiny: dict[str, Path]) -> None:
    engine = LocalEngine(str(tiny["base"]), device="cpu", max_new_tokens=4, num_threads=1, prefix_cache_tokens=0)
    try:
        def prefilled(ids: list[int]) -> Any:
            cache = engine._new_cache(4)
            with torch.inference_mode():
                engine._forward(torch.tensor([ids]), None, None, cache, [BASE_ADAPTER])
            return cache

        cache = PrefixCache(max_tokens=100, min_tokens=4)
        first = list(range(3, 43))  # 40 tokens
        cache.store("x", first, prefilled(first).layers)
        assert cache.longest("x", first + [7])[1] == 40
        assert cache.longest("x", first)[1] == 39  # never the whole prompt: its last token gives the logits
        assert cache.longest("y", first + [7]) == (None, 0)  # another adapter's keys and values differ
        assert cache.longest("x", [3, 4, 5, 99])[1] == 0  # below min_tokens
        longer = first + list(range(50, 60))
        cache.store("x", longer, prefilled(longer).layers)
        assert len(cache) == 2 and cache.tokens == 90
        assert cache.longest("x", longer + [1])[1] == 50  # the deepest entry
        other = list(range(100, 160))
        cache.store("x", other, prefilled(other).layers)
        assert len(cache) == 1 and cache.tokens == 60  # 150 > 100 tokens: the least recently used went
        assert cache.longest("x", first + [7]) == (None, 0)  # and no hash of theirs is left behind
        empty = engine._new_cache(4)
        assert cache.fill("x", other[:30] + [1, 2], empty) == 30
        assert empty.layers[0].length == 30 and empty.layers[0].keys.shape[2] == 30
        with pytest.raises(ValueError, match="max_tokens"):
            PrefixCache(0)
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["gemma3", "llama3.2", "mistral", "phi3", "qwen2.5", "qwen3"])
def test_families_rows_that_join_and_leave_get_generates_answers(family: str, tmp_path: Path) -> None:
    """On stand-ins of real families (Gemma 3's sliding-window layers of 64 tokens included: the long prompt
    passes them), rows that join and leave give ``generate``'s answers for each alone."""
    pytest.importorskip("trl")
    from finetune.standins import build_standin

    engine = LocalEngine(str(build_standin(family, tmp_path / family)), device="cpu", max_new_tokens=10,
                         num_threads=1, prefix_cache_tokens=0)
    try:
        engine.stop_token_ids = [NEVER]
        chats = [[{"role": "user", "content": "Write one line."}],
                 [{"role": "user", "content": "carrier invoices " * 40}],
                 [{"role": "user", "content": "rail freight and ports " * 30}],
                 [{"role": "user", "content": "freight ports and rail"}]]
        plan = {0: [(BASE_ADAPTER, chats[0], 10)], 2: [(BASE_ADAPTER, chats[1], 8), (BASE_ADAPTER, chats[2], 6)],
                3: [(BASE_ADAPTER, chats[3], 4)]}  # chats 1 and 2: one padded group prefill
        got = _schedule(engine, plan)
        assert got == [_reference(engine, engine._base, c, n) for c, n in ((chats[0], 10), (chats[1], 8),
                                                                           (chats[2], 6), (chats[3], 4))]
    finally:
        engine.close()
