"""Tiny miniatures for tests: a random Llama with a ChatML tokenizer trained here, and LoRA adapters on it.

The same construction as ``tests/test_miniatures_local.py`` (no downloads), with the context length and the
LoRA rank as parameters, shared by the server tests and the serving benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    'You extract facts about one company. {"facts": [{"field": "industry", "value": "fintech", "evidence": "S3"}]}',
    "Hi {{first_name}}, I saw that {{company}} is based in {{fact.location}} and wanted to share an idea.",
    "The company builds logistics software for mid-sized freight carriers in Austin, Texas since 2012.",
    '{"subject": "{{company}} and invoices", "body": "Best, {{sender_name}}"} research writer email',
]
PROMPTS = [
    [{"role": "system", "content": "You write emails."}, {"role": "user", "content": "Write to the company."}],
    [{"role": "user", "content": "extract facts about the freight company"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You extract facts."}, {"role": "user", "content": "logistics software in Austin"}],
]


def build_tiny_base(folder: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 400,
                    context: int = 512) -> Path:
    """Save a tiny random Llama (``context`` positions) and a locally trained ChatML tokenizer to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        initializer_range=0.1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build_adapter(base: Path, folder: Path, seed: int, *, rank: int = 4) -> Path:
    """Save a LoRA adapter of rank ``rank`` with random, non-zero A and B (so adapters differ) to ``folder``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(folder))
    return folder


def grammar_tokenizer(folder: Path) -> tuple[Any, Any]:
    """A tiny base's tokenizer built in ``folder`` and its llguidance tokenizer (``<|im_end|>`` the stop token):
    ``(transformers tokenizer, llguidance.LLTokenizer)``, for feeding answers to a grammar."""
    from transformers import AutoTokenizer

    from miniatures.grammar import llg_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base(folder))
    end: Any = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer, llg_tokenizer(tokenizer, [int(end)])


def grammar_accepts(tok: tuple[Any, Any], grammar: str, answer: dict[str, str] | str) -> bool:
    """The whole answer (JSON as the agents write it, or text) is consumed token by token with a mask computed
    at each step, and complete; a lexer that gives up ("too many expressions") is a refusal too, so it cannot
    pass unseen. ``tok`` is ``grammar_tokenizer``'s pair."""
    import json

    from miniatures.grammar import matcher

    tokenizer, llt = tok
    found = matcher(llt, grammar)
    text = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        found.compute_bitmask()
        if not found.consume_token(token):
            return False
    return bool(found.is_accepting())
