"""Local stand-ins of real base-model families, for tests and benchmarks without downloads.

A stand-in has the family's real ``transformers`` config and model class with random weights, a byte-level BPE
tokenizer trained here (with the Llama 3 / Qwen2 split pattern) that carries the family's special tokens as
added tokens, and the family's chat template. Templates are read at run time from TRL's installed package
(``trl/chat_templates/*.jinja``: copies of the Qwen2.5, Qwen3, Llama 3.1, Llama 3.2, Gemma 3 and Phi-3 templates
as the model repositories ship them); no installed package ships SmolLM2's or Mistral's, so those two are written
here in the family's style (``SMOLLM2_TEMPLATE``, ``MISTRAL_TEMPLATE``). Speed and memory depend on the shapes,
not on the weights, so ``shape="qwen2-0.5b"`` gives a model of Qwen2-0.5B's dimensions for benchmarks.

What differs from the real bases: the tokenizer's merges and vocabulary (a few hundred tokens learnt from a
short text, SentencePiece families included), and the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "MISTRAL_TEMPLATE", "SHAPES", "SMOLLM2_TEMPLATE", "Family", "build_standin",
           "build_standin_tokenizer", "family_template"]

logger = logging.getLogger(__name__)

#: SmolLM2-Instruct's style: ChatML with a default system prompt when the conversation has none (written here).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Mistral-Instruct v0.3's style: ``[INST] ... [/INST]`` turns, answers closed by ``</s>``, and the system message
#: put in front of the *last* user message only (written here).
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}"
    "{%- endfor %}"
)

#: The pre-tokenizer split pattern of Llama 3 and Qwen2 (their tokenizer.json), used by every stand-in.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>")
_CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>")


@dataclass(frozen=True)
class Family:
    """One model family's stand-in recipe.

    Attributes:
        name: the key in ``FAMILIES`` (e.g. ``"llama3.1"``).
        config: the ``transformers`` config class name (e.g. ``"LlamaConfig"``).
        template: ``"trl:<file stem>"`` for a template read from TRL's installed copies, or the template text.
        specials: the family's special tokens (added to the tokenizer as special).
        bos, eos, pad, unk: the tokenizer's special token roles (None: the family has none).
        extra: added tokens that are not special (Qwen3's ``<think>``, ``</think>``).
        multimodal: a vision-language model (``Gemma3Config``: vision tower + language model).
    """

    name: str
    config: str
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None = None
    extra: tuple[str, ...] = ()
    multimodal: bool = False
    config_kwargs: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2.5", "Qwen2Config", "trl:qwen2_5", _CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>"),
    Family("qwen3", "Qwen3Config", "trl:qwen3", _CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>",
           extra=("<think>", "</think>"), config_kwargs={"head_dim": 16}),
    Family("llama3", "LlamaConfig", "trl:llama3", _LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>",
           "<|finetune_right_pad_id|>"),
    Family("llama3.1", "LlamaConfig", "trl:llama3_1", _LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>",
           "<|finetune_right_pad_id|>"),
    Family("llama3.2", "LlamaConfig", "trl:llama3_2", _LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>",
           "<|finetune_right_pad_id|>"),
    Family("gemma3", "Gemma3TextConfig", "trl:gemma3", _GEMMA_SPECIALS, "<bos>", "<eos>", "<pad>", "<unk>",
           config_kwargs={"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16}),
    Family("gemma3-vision", "Gemma3Config", "trl:gemma3", _GEMMA_SPECIALS, "<bos>", "<eos>", "<pad>", "<unk>",
           multimodal=True, config_kwargs={"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16}),
    Family("phi3", "Phi3Config", "trl:phi3", ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                            "<|end|>"), "<s>", "<|endoftext|>", "<|endoftext|>"),
    Family("smollm2", "LlamaConfig", SMOLLM2_TEMPLATE, _CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", "<|im_end|>"),
    Family("mistral", "MistralConfig", MISTRAL_TEMPLATE, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>",
           None, "<unk>"),
)}

#: Model shapes: ``tiny`` (tests: a few hundred thousand parameters) and ``qwen2-0.5b`` (Qwen2-0.5B's dimensions
#: and vocabulary, 494M parameters with tied embeddings; config.json of Qwen/Qwen2-0.5B).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "qwen2-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1_000_000.0,
                   "tie_word_embeddings": True},
}

_CORPUS = (
    "Acme Freight builds logistics software for carriers in Austin, Texas. It was founded in 2012 and employs 85 "
    "people. Hi {{first_name}}, I saw that {{company}} opened an office in Denver. You answer briefly. Ping? "
    'Pong: the first answer. {"facts": [{"field": "founded_year", "value": "2012", "evidence": "S1"}]} '
    "Write a short email to the buyer. Extract the city. city: Boston, Seattle, Portland, Chicago."
)


def family_template(family: str | Family) -> str:
    """The chat template of a family: TRL's installed copy (``trl/chat_templates/<stem>.jinja``) or the text here.

    Raises:
        KeyError: an unknown family name.
        FileNotFoundError: the installed TRL does not ship the template file.
    """
    fam = FAMILIES[family] if isinstance(family, str) else family
    if not fam.template.startswith("trl:"):
        return fam.template
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / f"{fam.template.removeprefix('trl:')}.jinja"
    if not path.is_file():
        raise FileNotFoundError(f"the installed TRL ({trl.__version__}) has no {path.name}; install trl>=1.16")
    return path.read_text(encoding="utf-8")


def build_standin_tokenizer(family: str, vocab_size: int = 512) -> Any:
    """The stand-in tokenizer of ``family`` alone (a ``PreTrainedTokenizerFast`` with the family's special tokens
    and chat template), e.g. for template checks that need no model. Raises ``KeyError`` for an unknown family."""
    return _tokenizer(FAMILIES[family], vocab_size)


def _tokenizer(fam: Family, vocab_size: int) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fam.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_CORPUS] * 8, trainer=trainer)
    roles = {k: v for k, v in {"bos_token": fam.bos, "eos_token": fam.eos, "pad_token": fam.pad,
                                "unk_token": fam.unk}.items() if v}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=131072, **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in fam.specials if t not in roles.values()]})
    if fam.extra:
        tokenizer.add_tokens(list(fam.extra))
    tokenizer.chat_template = family_template(fam)
    return tokenizer


def build_standin(family: str, folder: str | Path, *, shape: str = "tiny", vocab_size: int = 512, seed: int = 0,
                  max_position_embeddings: int = 4096) -> Path:
    """Save a stand-in of ``family`` (random weights, the family's config class, tokenizer and template).

    Args:
        family: a key of ``FAMILIES`` (``qwen2.5``, ``qwen3``, ``llama3``, ``llama3.1``, ``llama3.2``, ``gemma3``,
            ``gemma3-vision``, ``phi3``, ``smollm2``, ``mistral``).
        folder: where ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer go.
        shape: a key of ``SHAPES``; a shape's ``vocab_size`` (the real one) may exceed the tokenizer's.
        vocab_size: tokens the BPE learns (the family's special tokens included).
        seed: seeds the random weights.
        max_position_embeddings: positions of the model.

    Returns:
        ``folder``, loadable with ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        KeyError: an unknown family or shape.
    """
    import torch
    import transformers

    fam, dims = FAMILIES[family], dict(SHAPES[shape])
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(fam, vocab_size)
    tokenizer.save_pretrained(folder)
    ids = {role: tokenizer.convert_tokens_to_ids(tok) if tok else None
           for role, tok in (("bos_token_id", fam.bos), ("eos_token_id", fam.eos), ("pad_token_id", fam.pad))}
    text: dict[str, Any] = {"vocab_size": max(len(tokenizer), dims.pop("vocab_size", 0)),
                            "max_position_embeddings": max_position_embeddings, **ids, **dims}
    if shape == "tiny":
        text.update(fam.config_kwargs)
    config_class = getattr(transformers, fam.config)
    if fam.multimodal:
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 28, "patch_size": 14}
        config = config_class(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                              image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
                              boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
                              eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"), **ids)
    else:
        config = config_class(**text)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in dict.fromkeys((fam.eos, *_stop_tokens(fam)))]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(folder)
    logger.info("stand-in %s (%s, %s) with %d parameters saved to %s", family, type(model).__name__, shape,
                model.num_parameters(), folder)
    return folder


def _stop_tokens(fam: Family) -> tuple[str, ...]:
    """The end-of-turn tokens the family's generation_config stops on besides its eos."""
    return {"gemma3": ("<end_of_turn>",), "gemma3-vision": ("<end_of_turn>",), "phi3": ("<|end|>",),
            "llama3": ("<|eot_id|>", "<|end_of_text|>"), "llama3.1": ("<|end_of_text|>", "<|eom_id|>"),
            "llama3.2": ("<|end_of_text|>", "<|eom_id|>"), "qwen2.5": ("<|endoftext|>",),
            "qwen3": ("<|endoftext|>",)}.get(fam.name, ())
