"""Span-copy decoding: a cited fact's value is held to a verbatim span of the sentence it cites.

A random tiny Llama with a byte-level BPE tokenizer trained here (no downloads) generates the value; without
the processor it writes tokens that are not in the sentence, with it every value is a substring.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from miniatures.span_copy import SpanCopyProcessor, cited_sentences, decode_vocabulary

torch = pytest.importorskip("torch")

from tests.miniature_fixtures import build_tiny_base  # noqa: E402

SENTENCE = "Our flagship product, Sarnora Sync, brings the whole workflow into one place."
PROMPT = f"Sentences:\nSource 1: https://a.example/\nS1: Founded in 2014 in Cork.\nS2: {SENTENCE}\n"
OPEN = '{"facts": [{"field": "product", "evidence": "S2", "value": "'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_base(tmp_path_factory.mktemp("span") / "base")
    return AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()


def test_cited_sentences_reads_the_numbered_lines() -> None:
    assert cited_sentences(PROMPT) == {"S1": "Founded in 2014 in Cork.", "S2": SENTENCE}
    assert cited_sentences("Merge tags you may use:\n{{first_name}}: the prospect's first name") == {}


def test_allowed_tokens_extend_a_span_and_close_only_a_non_empty_value(tiny: tuple[object, object]) -> None:
    tokenizer, _model = tiny
    vocab = decode_vocabulary(tokenizer)
    proc = SpanCopyProcessor(tokenizer, [PROMPT], 0, vocab)
    first = proc.allowed(SENTENCE, "")
    assert first and all(vocab[i] in SENTENCE for i in first)  # no quote: a blank value cannot close
    grown = proc.allowed(SENTENCE, "Sarnora")
    heads = {vocab[i].partition('"')[0] for i in grown}
    assert all(("Sarnora" + h) in SENTENCE for h in heads)
    assert any(vocab[i].startswith('"') for i in grown)  # a non-empty value may close
    assert " " in heads or " Sync" in heads or " S" in heads


def _generate(tiny: tuple[object, object], span_copy: bool, seed: int) -> str:
    from transformers import LogitsProcessorList

    tokenizer, model = tiny
    prompt_ids = tokenizer(PROMPT + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    opened = tokenizer(OPEN, add_special_tokens=False)["input_ids"]
    kwargs = {}
    if span_copy:  # the opening of the answer counts as generated text: the processor sees the cited id
        proc = SpanCopyProcessor(tokenizer, [PROMPT], len(prompt_ids), decode_vocabulary(tokenizer))
        kwargs["logits_processor"] = LogitsProcessorList([proc])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a different random model per seed
            p.add_(torch.randn_like(p) * 0.05)
        out = model.generate(torch.tensor([prompt_ids + opened]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0, len(prompt_ids) + len(opened):].tolist(), skip_special_tokens=True)


def test_generated_values_are_spans_of_the_cited_sentence(tiny: tuple[object, object]) -> None:
    free = [_generate(tiny, False, seed).partition('"')[0] for seed in range(4)]
    held = [_generate(tiny, True, seed) for seed in range(4)]
    assert any(v and v not in SENTENCE for v in free), free  # the random model does not copy by itself
    for text in held:
        value, closed, _rest = text.partition('"')
        assert value and value in SENTENCE, text
        assert closed or len(text) >= 1


def test_the_engine_uses_span_copy_only_for_prompts_with_numbered_sentences(tmp_path: Path) -> None:
    from miniatures.local import LocalEngine

    engine = LocalEngine(str(build_tiny_base(tmp_path / "base")), device="cpu", max_new_tokens=4)
    try:
        seen: list[object] = []
        original = engine._model.generate

        def spy(**kwargs: object) -> object:
            seen.append(kwargs.get("logits_processor"))
            return original(**kwargs)

        engine._model.generate = spy
        engine.generate_sync("__base__", [{"role": "user", "content": PROMPT}])
        engine.generate_sync("__base__", [{"role": "user", "content": "Write to the company."}])
        assert seen[0] is not None and seen[1] is None
    finally:
        engine.close()
