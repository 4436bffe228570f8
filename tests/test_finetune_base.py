"""Tests of finetune.base: tokenizer + chat template, bootstrap of a tiny base, loading, corpus texts.

Everything is built locally (a tokenizer trained here, a model from a config); nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from finetune.base import (  # noqa: E402
    CHATML_TEMPLATE,
    IM_END_TOKEN,
    BaseModelInfo,
    bootstrap_base,
    build_tokenizer,
    corpus_texts,
    load_base,
)
from miniatures.device import pick_dtype

WORDS = (
    "acme analytics austin founded employees logistics platform software revenue customers growth hiring "
    "series funding warehouse retail fintech denver seattle boston team product launch partners market"
).split()


def synthetic_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Short pseudo-sentences from a small vocabulary (a few hundred, like a tiny web corpus)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        sentences = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 12))) for _ in range(3)]
        out.append(" ".join(s.capitalize() + "." for s in sentences))
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> BaseModelInfo:
    out = tmp_path_factory.mktemp("base")
    return bootstrap_base(
        out, synthetic_texts(), preset="2m", vocab_size=512, pretrain_steps=30, seq_len=32, batch_size=4, lr=3e-3
    )


def test_bootstrap_writes_a_loadable_model_that_generates(tiny_base: BaseModelInfo) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding

    path = tiny_base.path
    for name in ("config.json", "model.safetensors", "tokenizer.json", "bootstrap.json"):
        assert (path / name).is_file(), name
    meta = json.loads((path / "bootstrap.json").read_text())
    assert meta["arch"] == "llama" and meta["preset"] == "2m" and meta["steps"] == 30
    assert meta["n_params"] == tiny_base.n_params
    assert 500_000 < tiny_base.n_params < 2_500_000
    assert meta["vocab_size"] <= 512
    # pretraining lowered the loss from about ln(vocab)
    history = meta["loss_history"]
    assert len(history) == 30 and tiny_base.final_loss < history[0] - 1.0

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.tie_word_embeddings
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, torch.nn.Embedding) and isinstance(lm_head, torch.nn.Linear)
    assert embed.weight.data_ptr() == lm_head.weight.data_ptr()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Acme analytics"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    assert isinstance(enc, BatchEncoding)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert IM_END_TOKEN in tok.convert_ids_to_tokens(model.generation_config.eos_token_id)


def test_chat_template_masks_assistant_answers_with_end_of_turn(tiny_base: BaseModelInfo) -> None:
    from transformers import AutoTokenizer, BatchEncoding

    tok = AutoTokenizer.from_pretrained(tiny_base.path)
    assert tok.chat_template == CHATML_TEMPLATE
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name the city."},
        {"role": "assistant", "content": "Austin."},
        {"role": "user", "content": "And the product?"},
        {"role": "assistant", "content": "Logistics platform."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert isinstance(text, str) and text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName the city.<|im_end|>\n"
        "<|im_start|>assistant\nAustin.<|im_end|>\n<|im_start|>user\nAnd the product?<|im_end|>\n"
        "<|im_start|>assistant\nLogistics platform.<|im_end|>\n"
    )
    out = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    assert isinstance(out, BatchEncoding)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # contiguous masked spans, decoded: exactly the two answers, each with its end-of-turn token
    spans: list[list[int]] = []
    for i, (tid, m) in enumerate(zip(ids, mask, strict=True)):
        if m:
            if i == 0 or not mask[i - 1]:
                spans.append([])
            spans[-1].append(tid)
    assert [tok.decode(s) for s in spans] == ["Austin.<|im_end|>", "Logistics platform.<|im_end|>"]
    unmasked = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "You are terse." in unmasked and "Name the city." in unmasked and "And the product?" in unmasked
    assert "Austin" not in unmasked and "Logistics platform" not in unmasked
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt.endswith("<|im_start|>user\nName the city.<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_round_trips_and_keeps_special_tokens_whole() -> None:
    tok = build_tokenizer(synthetic_texts(50), vocab_size=400)
    text = "Ünïcode café — 42 €, <|im_start|>user\nhi<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert {"<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"} <= set(tok.get_vocab())
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["x"], vocab_size=10)
    with pytest.raises(ValueError, match="no text"):
        build_tokenizer(["", "  "], vocab_size=400)


def test_load_base_picks_cpu_float32_and_rejects_missing_or_templateless(
    tiny_base: BaseModelInfo, tmp_path: Path
) -> None:
    import torch

    model, tok = load_base(str(tiny_base.path), device="cpu")
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tok.pad_token == "<|pad|>"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_base(tmp_path / "nope")
    plain = tmp_path / "plain"
    shutil.copytree(tiny_base.path, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        load_base(str(plain), device="cpu")


def test_pick_dtype() -> None:
    assert pick_dtype(None, "cpu") == "float32"
    assert pick_dtype("bf16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("int3", "cpu")


def test_bootstrap_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        bootstrap_base(tmp_path, ["a b c"], arch="gpt9")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown preset"):
        bootstrap_base(tmp_path, ["a b c"], preset="7b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        bootstrap_base(tmp_path, [], preset="2m")
    with pytest.raises(ValueError, match="fewer than one block"):
        bootstrap_base(tmp_path, ["one short text"], preset="2m", vocab_size=300, seq_len=512)


def test_bootstrap_qwen2_arch(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    info = bootstrap_base(tmp_path, synthetic_texts(60), arch="qwen2", preset="2m", vocab_size=400, pretrain_steps=2,
                          seq_len=32, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(info.path)
    assert model.config.model_type == "qwen2" and info.n_params == model.num_parameters()


def test_corpus_texts_reads_documents(tmp_path: Path) -> None:
    from tools.corpus import Corpus
    from tools.types import Document

    path = tmp_path / "corpus.sqlite"
    with Corpus(path) as corpus:
        corpus.add(Document(url="https://www.a.example/", title="A Co", text="A Co makes widgets."))
        corpus.add(Document(url="https://www.b.example/", title="", text="B Co sells gears."))
        corpus.add(Document(url="https://www.c.example/", title="Empty", text="  "))
    assert list(corpus_texts(path)) == ["A Co\n\nA Co makes widgets.", "B Co sells gears."]
    with pytest.raises(FileNotFoundError, match="outreach world generate"):
        list(corpus_texts(tmp_path / "missing.sqlite"))
