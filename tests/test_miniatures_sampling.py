"""Seeded per-row sampling: reproducible by seed whatever shares the batch, within the grammar's mask."""

from __future__ import annotations

import pytest
import torch

from miniatures.sampling import RowSampling, SeededSampler, prompt_seed


def _draw(rows, scores, steps=20):  # type: ignore[no-untyped-def]
    sampler = SeededSampler(rows)
    picks = []
    for _ in range(steps):
        out = sampler(None, scores.clone())
        picks.append(out.argmax(dim=-1).tolist())
    return picks


def test_a_row_draws_the_same_tokens_alone_or_in_a_batch():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    row = RowSampling(temperature=1.0, top_p=1.0, seed=42)
    alone = [p[0] for p in _draw([row], scores[1:2])]
    batched = [p[1] for p in _draw([RowSampling(1.0, 1.0, 7), row, None], scores)]
    assert alone == batched
    assert len(set(alone)) > 1  # it samples: not always the argmax


def test_greedy_rows_are_left_alone_and_masked_tokens_are_never_drawn():  # type: ignore[no-untyped-def]
    scores = torch.zeros(2, 10)
    scores[:, 5:] = float("-inf")  # a grammar mask
    out = SeededSampler([None, RowSampling(2.0, 1.0, 1)])(None, scores.clone())
    assert torch.equal(out[0], scores[0])
    drawn = int(out[1].argmax())
    assert drawn < 5 and torch.isinf(out[1]).sum() == 9


def test_a_small_top_p_keeps_only_the_most_likely_token():  # type: ignore[no-untyped-def]
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    picks = {p[0] for p in _draw([RowSampling(1.0, 0.01, s) for s in range(1)], scores, steps=30)}
    assert picks == {1}


def test_min_p_drops_tokens_below_its_share_of_the_most_likely_one():  # type: ignore[no-untyped-def]
    """Min-p (Nguyen et al. 2024): with probabilities 0.5 / 0.3 / 0.15 / 0.05 and min_p 0.2 (threshold 0.1), the
    last token is never drawn, the other three are; a row with min_p 0 beside it still draws all four."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    scores = probs.log().repeat(2, 1)
    picks = _draw([RowSampling(1.0, 1.0, 3, min_p=0.2), RowSampling(1.0, 1.0, 3)], scores, steps=400)
    assert {p[0] for p in picks} == {0, 1, 2}
    assert {p[1] for p in picks} == {0, 1, 2, 3}
    sure = torch.tensor([[0.0, 8.0, 0.0, 0.0]])  # where the model is sure, min-p leaves one choice
    assert {p[0] for p in _draw([RowSampling(1.0, 1.0, 5, min_p=0.01)], sure, steps=50)} == {1}


def test_seeds_differ_and_prompt_seeds_are_stable():  # type: ignore[no-untyped-def]
    scores = torch.zeros(1, 1000)
    a = [p[0] for p in _draw([RowSampling(1.0, 1.0, prompt_seed("one prompt"))], scores)]
    b = [p[0] for p in _draw([RowSampling(1.0, 1.0, prompt_seed("another prompt"))], scores)]
    assert a != b and prompt_seed("one prompt") == prompt_seed("one prompt") >= 0


@pytest.mark.parametrize(("temperature", "top_p", "min_p"),
                         [(0.0, 1.0, 0.0), (-1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.5, 0.0), (1.0, 1.0, -0.1),
                          (1.0, 1.0, 1.0)])
def test_bad_settings_are_refused(temperature, top_p, min_p):  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        RowSampling(temperature, top_p, 0, min_p=min_p)


def test_row_count_must_match_the_batch():  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="rows"):
        SeededSampler([None])(None, torch.zeros(2, 4))


def test_a_sampling_miniature_is_reproducible_varied_and_inside_the_grammar(tmp_path):  # type: ignore[no-untyped-def]
    import asyncio

    pytest.importorskip("peft")
    pytest.importorskip("llguidance")
    from core.tasks import MergeTag, OfferBrief, WritingTask
    from miniatures import BASE_ADAPTER, LocalEngine, LocalMiniatureChatModel
    from tests.miniature_fixtures import build_tiny_base

    engine = LocalEngine(str(build_tiny_base(tmp_path / "base")), device="cpu", max_new_tokens=40, num_threads=1)
    task = WritingTask(offer=OfferBrief(sender_title="AE", product="Widget", value_proposition="saves time",
                                        call_to_action="Worth a call?", opt_out_line="Reply stop."),
                       merge_tags=(MergeTag(name="first_name", description="the first name"),))
    sampler = LocalMiniatureChatModel(engine=engine, adapter=BASE_ADAPTER, temperature=1.0, top_p=0.95)
    greedy = LocalMiniatureChatModel(engine=engine, adapter=BASE_ADAPTER)
    chats = [[{"role": "user", "content": f"Write to prospect {i}."}] for i in range(4)]
    try:
        alone = [sampler.answer_sync(c, task=task).text for c in chats]
        again = [sampler.answer_sync(c, task=task).text for c in chats]

        async def together():  # type: ignore[no-untyped-def]
            return await asyncio.gather(*(sampler.answer(c, task=task) for c in chats),
                                        greedy.answer(chats[0], task=task))

        batched = asyncio.run(together())
        plain = [greedy.answer_sync(c, task=task).text for c in chats]
    finally:
        engine.close()
    assert alone == again == [g.text for g in batched[:4]]  # seeded by the prompt, whatever shares the batch
    assert batched[4].text == plain[0]  # a greedy row in the same batch is unchanged
    assert alone != plain and len(set(alone)) > 1
    for text in alone:
        assert text.startswith('{"subject": "'), text  # the grammar holds while sampling
