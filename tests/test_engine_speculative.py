"""Speculative decoding in the local engine: n-gram drafts verified in one forward pass (``miniatures.local``).

Greedy answers with drafts must be transformers' ``generate`` answers; sampled answers must follow the same
distribution as without drafts (here: the same answer by seed, and a chi-square fit of the first tokens to the
model's own probabilities); drafts a grammar refuses never reach an answer; rows join and leave with drafts, holes
and compaction in the cache.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llguidance")

from miniatures import BASE_ADAPTER, LocalEngine  # noqa: E402
from miniatures.drafts import CompletionStore, DraftSource, NgramIndex  # noqa: E402
from miniatures.grammar import answer_grammar, tag_grammar  # noqa: E402
from miniatures.local import _Batch  # noqa: E402
from miniatures.sampling import RowSampling, SeededSampler, draw  # noqa: E402
from tests.miniature_fixtures import build_adapter, build_tiny_base  # noqa: E402
from tests.test_engine_continuous import NEVER, WRITING, _chat, _reference, _schedule  # noqa: E402

REPEATING = [{"role": "user", "content": "the freight carrier ships the freight carrier ships " * 6}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speculative")
    base = build_tiny_base(root / "base")
    return {"base": base, "a1": build_adapter(base, root / "a1", seed=11)}


def _engine(tiny: dict[str, Path], k: int, **kwargs: Any) -> LocalEngine:
    made = LocalEngine(str(tiny["base"]), device="cpu", max_new_tokens=24, num_threads=1, prefix_cache_tokens=0,
                       speculative_tokens=k, **kwargs)
    made.add_adapter("a1", tiny["a1"])
    return made


@pytest.fixture()
def engine(tiny: dict[str, Path]) -> Iterator[LocalEngine]:
    threads = torch.get_num_threads()
    made = _engine(tiny, 4)
    yield made
    made.close()
    torch.set_num_threads(threads)


def test_ngram_index_and_store_propose_what_followed() -> None:
    index = NgramIndex(3, 1, [5, 6, 7, 8, 5, 6])
    assert index.continuation([5, 6], 2) == [7, 8]  # the earlier occurrence, not the suffix itself
    assert index.continuation([9], 2) == []
    store = CompletionStore(2, 1, max_tokens=40)
    store.add("a", [1, 2, 3], [10, 11, 12, 0])
    assert store.continuation("a", [2, 3], 3) == [10, 11, 12]  # from the prompt's tail
    assert store.continuation("a", [12], 5) == [0]  # cut at the completion's end
    assert store.continuation("b", [2, 3], 3) == []
    for i in range(20):  # past max_tokens the older completions go
        store.add("a", [1, 2, 3], [20 + i, 0])
    assert store.tokens("a") <= 40 and store.continuation("a", [2, 3], 1) == [39]
    source = DraftSource([4, 5, 6, 4], store, "a", 3, 1)
    assert source.propose([5], 3, stops=frozenset({0})) == [6, 4, 5]
    assert source.propose([5, 6, 4, 5], 3) == [6, 4, 5]
    with pytest.raises(ValueError, match="n_min"):
        NgramIndex(1, 2)


def test_greedy_answers_with_drafts_are_generates(engine: LocalEngine) -> None:
    """A prompt that repeats gets drafts from itself; answers equal ``generate``'s, drafts were accepted, and a
    second identical request is drafted from the adapter's completion store almost whole."""
    engine.stop_token_ids = [NEVER]
    chats = [REPEATING, _chat(20), _chat(7, "carrier")]
    for adapter in ("a1", BASE_ADAPTER):
        for chat in chats:
            assert engine.generate_sync(adapter, chat, max_new_tokens=24).text == _reference(
                engine, engine._model, chat, 24, adapter=adapter)
    assert engine.accepted_tokens > 0 and engine.drafted_tokens > engine.accepted_tokens
    steps, accepted = engine.decode_steps, engine.accepted_tokens
    again = engine.generate_sync("a1", REPEATING, max_new_tokens=24).text
    assert again == _reference(engine, engine._model, REPEATING, 24, adapter="a1")
    # 23 tokens after the prefill's, at most 5 a step (4 drafts): the store's copy of the first answer drafts most
    assert engine.decode_steps - steps <= 9 and engine.accepted_tokens - accepted >= 14
    drafted, kept, row_steps = engine.draft_stats["a1"]
    assert drafted >= kept > 0 and row_steps > 0


def test_rows_that_join_and_leave_with_drafts_get_generates_answers(engine: LocalEngine) -> None:
    """Rows join at several steps (one longer prompt shifts the batch right), accept different numbers of drafts
    (holes in the cache, compaction) and leave; every answer is ``generate``'s alone."""
    engine.stop_token_ids = [NEVER]
    compactions = []
    compact = _Batch._compact

    def counted(batch: _Batch) -> None:
        before = batch.cache.layers[0].length
        compact(batch)
        compactions.append(before - batch.cache.layers[0].length)

    plan = {0: [("a1", REPEATING, 24)], 1: [(BASE_ADAPTER, _chat(12, "carrier"), 20), ("a1", _chat(3), 9)],
            3: [("a1", [{"role": "user", "content": "rail freight and ports " * 12}], 16)],
            4: [(BASE_ADAPTER, REPEATING, 12), ("a1", _chat(5, "truck"), 4)]}
    _Batch._compact = counted  # type: ignore[method-assign,assignment]
    try:
        got = _schedule(engine, plan)
    finally:
        _Batch._compact = compact  # type: ignore[method-assign]
    expected = [_reference(engine, engine._model, chat, n, adapter=adapter)
                for step in sorted(plan) for adapter, chat, n in plan[step]]
    assert got == expected
    assert engine.accepted_tokens > 0 and engine.drafted_tokens > engine.accepted_tokens  # some drafts rejected
    assert compactions  # holes were packed at least once (with rows of 24 tokens and up to 4 drafts a step)


def test_sampled_answers_are_the_same_with_and_without_drafts(tiny: dict[str, Path]) -> None:
    """Each kept token is the row's own seeded draw, so a seed gives the same answer whatever the drafts."""
    plain, fast = _engine(tiny, 0), _engine(tiny, 4)
    try:
        for e in (plain, fast):
            e.stop_token_ids = [NEVER]
        for seed in range(30):
            sampling = RowSampling(temperature=0.4, top_p=0.95, seed=seed, min_p=0.05)
            chat = REPEATING if seed % 2 else _chat(9)
            assert (fast.generate_sync("a1", chat, max_new_tokens=16, sampling=sampling).text
                    == plain.generate_sync("a1", chat, max_new_tokens=16, sampling=sampling).text)
        assert fast.accepted_tokens > 0 and fast.drafted_tokens > fast.accepted_tokens
    finally:
        plain.close()
        fast.close()


def test_the_first_tokens_follow_the_models_distribution_with_drafts(engine: LocalEngine) -> None:
    """Chi-square: the first two tokens over 300 seeds against the model's own probabilities (temperature 0.5,
    min-p 0.1), drafted from the adapter's earlier answers, both accepted and rejected."""
    from scipy.stats import chisquare

    engine.stop_token_ids = [NEVER]
    chat = _chat(6)
    ids = engine.prompt_ids(chat)
    rows = [RowSampling(temperature=0.5, top_p=1.0, seed=seed, min_p=0.1) for seed in range(300)]
    seen: collections.Counter[tuple[int, int]] = collections.Counter()
    for sampling in rows:  # the step after the first token settles the second, from a draft or not
        request = engine._prepare("a1", chat, 3, None, sampling)
        batch = _Batch(engine)
        engine._stops = frozenset(engine.stop_token_ids)
        with torch.inference_mode():
            assert engine._start(batch, request) is None
            row = batch.rows[0]
            batch.step()
        seen[(row.tokens[0], row.tokens[1])] += 1
        assert engine.draft_store is not None  # (the answer is not finished: kept by hand, for the next drafts)
        engine.draft_store.add("a1", ids, row.tokens)
    assert engine.drafted_tokens > engine.accepted_tokens > 0

    def probs(prefix: list[int]) -> Any:
        with torch.inference_mode():
            logits = engine._model(input_ids=torch.tensor([prefix])).logits[:, -1, :].float()
        p, _ = SeededSampler([rows[0]]).probabilities(logits)
        return p[0] / p[0].sum()

    first = probs(ids)
    expected: dict[tuple[int, int], float] = {}
    for a in torch.nonzero(first).flatten().tolist():
        second = probs([*ids, a])
        for b in torch.nonzero(second).flatten().tolist():
            expected[(a, b)] = float(first[a] * second[b]) * len(rows)
    big = [pair for pair, e in expected.items() if e >= 5]
    observed = [seen[p] for p in big] + [len(rows) - sum(seen[p] for p in big)]
    wanted = [expected[p] for p in big] + [len(rows) - sum(expected[p] for p in big)]
    assert len(big) >= 3
    assert chisquare(observed, wanted).pvalue > 0.001
    assert set(seen) <= set(expected)  # never a pair the model cannot draw


def test_draws_are_torchs_multinomial() -> None:
    probs = torch.softmax(torch.randn(300, generator=torch.Generator().manual_seed(3)), dim=-1)
    for seed in range(20):
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert [draw(probs, a) for _ in range(3)] == [int(torch.multinomial(probs, 1, generator=b)) for _ in range(3)]


def test_drafts_the_grammar_refuses_are_cut_and_the_masks_are_llguidances(engine: LocalEngine) -> None:
    """``fill_drafts`` cuts each row's drafts at the first refused token, leaves the matcher where it was, and fills
    at each position the mask llguidance gives after the drafts before it; in the engine, a grammar row drafted from
    a store of answers its grammar refuses gives ``generate``'s grammar answer."""
    import llguidance.numpy as llg_numpy

    sentence = "Founded in 2014 in Cork by two engineers."
    grammar = tag_grammar(sentence, ("founded_year", "location"))
    good = engine.tokenizer.encode("founded_year | 2014", add_special_tokens=False)
    bad = engine.tokenizer.encode("location | Paris", add_special_tokens=False)
    processor = engine.grammar_processor([], 0)
    m = engine.matcher(grammar)
    kept, constrained = processor.fill_drafts([m, None], [good + bad, [1, 2]])
    assert kept[1] == [1, 2] and good[:2] == kept[0][:2] and len(kept[0]) < len(good) + len(bad)
    assert constrained == list(range(len(kept[0]) + 1))
    fresh = engine.matcher(grammar)
    bits = llg_numpy.allocate_token_bitmask(1, processor.vocab_size)
    for j in range(len(kept[0]) + 1):
        llg_numpy.fill_next_token_bitmask(fresh, bits, 0)
        assert (processor._bits[j] == bits[0]).all()
        if j < len(kept[0]):
            assert fresh.consume_token(kept[0][j])
    assert m.validate_tokens(good) == len(good)  # rolled back: still at the start
    email = answer_grammar(WRITING)  # a long answer (a tag answer of this tiny model is "-")
    chat = _chat(6)
    expected = _reference(engine, engine._model, chat, 30, email, BASE_ADAPTER)
    first = engine.tokenizer.encode(expected, add_special_tokens=False)[0]
    refused = engine.tokenizer.encode(" Paris and more text", add_special_tokens=False)
    assert engine.draft_store is not None
    engine.draft_store.add(BASE_ADAPTER, engine.prompt_ids(chat), [first, *refused, NEVER])
    cuts: list[tuple[int, int]] = []
    fill = type(processor).fill_drafts

    def spied(self: Any, matchers: Any, drafts: Any) -> Any:
        out = fill(self, matchers, drafts)
        cuts.extend((len(d), len(k)) for d, k in zip(drafts, out[0], strict=True))
        return out

    type(processor).fill_drafts = spied  # type: ignore[method-assign]
    try:
        got = engine.generate_sync(BASE_ADAPTER, chat, max_new_tokens=30, grammar=email).text
    finally:
        type(processor).fill_drafts = fill  # type: ignore[method-assign]
    assert got == expected and "Paris" not in got
    assert any(kept < proposed for proposed, kept in cuts)  # the store's refused drafts were cut


def test_grouped_query_attention_with_drafts_gets_generates_answers(tmp_path: Path) -> None:
    """A stand-in with grouped-query attention (query heads packed per key/value head in speculative steps,
    ``miniatures.kv_cache.use_packed_attention``): rows with drafts give ``generate``'s answers."""
    pytest.importorskip("trl")
    from finetune.standins import build_standin

    engine = LocalEngine(str(build_standin("llama3.2", tmp_path / "llama")), device="cpu", max_new_tokens=12,
                         num_threads=1, prefix_cache_tokens=0, speculative_tokens=4)
    try:
        assert engine._base.config._attn_implementation == "miniature_packed_sdpa"
        engine.stop_token_ids = [NEVER]
        chats = [REPEATING, [{"role": "user", "content": "carrier invoices " * 20}], _chat(4)]
        plan = {0: [(BASE_ADAPTER, chats[0], 12)], 1: [(BASE_ADAPTER, chats[1], 10), (BASE_ADAPTER, chats[2], 6)]}
        expected = [_reference(engine, engine._base, c, n) for c, n in ((chats[0], 12), (chats[1], 10),
                                                                        (chats[2], 6))]
        assert _schedule(engine, plan) == expected
        assert _schedule(engine, plan) == expected  # drafted from the first answers (the completion store)
        assert engine.accepted_tokens > 0
    finally:
        engine.close()


def test_bad_speculative_settings_are_refused(tiny: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="speculative_tokens"):
        LocalEngine(str(tiny["base"]), device="cpu", speculative_tokens=-1)
    with pytest.raises(ValueError, match="draft_ngram"):
        LocalEngine(str(tiny["base"]), device="cpu", draft_ngram=(1, 2))
