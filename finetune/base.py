"""Base models for miniatures: bootstrap a tiny one offline, or load any Hugging Face causal LM.

The embedded default base (DESIGN.md, "Offline defaults") is a tiny Llama- or Qwen2-shaped model built
from a config, with a byte-level BPE tokenizer trained locally with the ``tokenizers`` library and a
ChatML chat template, briefly pretrained as a causal LM on local text so that LoRA adapters have
something to adapt (LoRA on random weights learns little). It is saved with ``save_pretrained`` and
loads like any Hugging Face model, so the rest of the pipeline cannot tell it from ``Qwen/Qwen2.5-0.5B``.

Heavy imports (torch, transformers, tokenizers) happen inside the functions (DESIGN.md, "Known traps").
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from miniatures.device import pick_device, pick_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BOS_TOKEN",
    "CHATML_TEMPLATE",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "PRESETS",
    "BaseModelInfo",
    "base_name",
    "bootstrap_base",
    "build_tokenizer",
    "corpus_texts",
    "load_base",
    "load_tokenizer",
]

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

#: ChatML (``<|im_start|>role\n...<|im_end|>\n``). Assistant turns are wrapped in
#: ``{% generation %}...{% endgeneration %}`` with the end-of-turn token inside the block, so TRL's
#: ``assistant_only_loss`` trains the answer *and* the stop token (DESIGN.md, "Known traps").
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is not none else '' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- generation -%}"
    "{{- content + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- endif -%}"
)

#: Model shapes per preset: hidden size, layers, attention heads, key/value heads, MLP size.
#: Parameter counts with the default 4096-token vocabulary and tied embeddings (measured with
#: ``model.num_parameters()``): 2m -> 1.7M, 10m -> 9.9M, 30m -> 28.8M for ``llama``; ``qwen2`` adds
#: the q/k/v biases (a few thousand parameters).
PRESETS: dict[str, dict[str, int]] = {
    "2m": {"hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 384},
    "10m": {"hidden_size": 256, "num_hidden_layers": 9, "num_attention_heads": 8, "num_key_value_heads": 4,
            "intermediate_size": 1024},
    "30m": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
            "intermediate_size": 1664},
}

_ARCHES = ("llama", "qwen2")


@dataclass(frozen=True)
class BaseModelInfo:
    """What ``bootstrap_base`` built.

    Attributes:
        path: folder with the model (``config.json``, ``model.safetensors``), tokenizer files and
            ``bootstrap.json``; pass it to ``load_base`` or ``AutoModelForCausalLM.from_pretrained``.
        arch: ``"llama"`` or ``"qwen2"``.
        preset: ``"2m"``, ``"10m"`` or ``"30m"``.
        n_params: parameter count (tied embeddings counted once).
        vocab_size: tokenizer vocabulary size, special tokens included.
        steps: pretraining optimizer steps taken.
        seq_len: pretraining block length in tokens.
        n_tokens: tokens in the packed pretraining corpus (one epoch).
        final_loss: mean causal-LM cross-entropy (nats/token) over the last 10% of steps (at least one).
        seconds: wall time of the whole bootstrap (tokenizer, pretraining, saving).
        device: where it was pretrained (``"cpu"`` or ``"cuda"``).
    """

    path: Path
    arch: str
    preset: str
    n_params: int
    vocab_size: int
    steps: int
    seq_len: int
    n_tokens: int
    final_loss: float
    seconds: float
    device: str

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``path`` as a string)."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def corpus_texts(corpus_path: str | Path) -> Iterator[str]:
    """Yield the text of every document of a local corpus (``tools.corpus`` SQLite file), in insertion order.

    Each text is the document's title (when it has one) and its extracted main text, separated by a
    blank line; documents with no text are skipped.

    Args:
        corpus_path: a corpus file made by ``outreach corpus import`` or ``outreach world generate``.

    Yields:
        Document texts (str).

    Raises:
        FileNotFoundError: ``corpus_path`` does not exist (a missing file would otherwise be created empty).
    """
    from tools.corpus import Corpus

    path = Path(corpus_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus file {path} not found; make one with `outreach world generate` or `outreach corpus import`"
        )
    with Corpus(path) as corpus:
        for url in corpus.urls():
            doc = corpus.get(url)
            if doc is None or not doc.text.strip():
                continue
            yield f"{doc.title}\n\n{doc.text}" if doc.title else doc.text


def build_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ChatML chat tokenizer.

    The byte-level BPE is the GPT-2 / Llama-3 / Qwen2 scheme (``tokenizers.models.BPE`` with a
    ``ByteLevel`` pre-tokenizer and decoder), so any input string round-trips. Special tokens:
    ``<|bos|>``, ``<|eos|>`` (end of document, the tokenizer's ``eos_token``), ``<|pad|>``,
    ``<|im_start|>``, ``<|im_end|>`` (end of turn). The chat template is ``CHATML_TEMPLATE``.

    Args:
        texts: training text; iterated once.
        vocab_size: target vocabulary size, special tokens and the 256 byte tokens included (>= 300).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``chat_template`` set.

    Raises:
        ValueError: ``vocab_size`` < 300, or ``texts`` yields no non-empty text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 byte tokens + specials + merges), got {vocab_size}")
    seen = 0

    def _iter() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            if text and text.strip():
                seen += 1
                yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter(), trainer=trainer)
    if seen == 0:
        raise ValueError("no text to train the tokenizer on: `texts` was empty or held only blank strings")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        model_max_length=1_000_000,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _chat_wrap(text: str) -> list[dict[str, str]]:
    """Split a text at a sentence boundary near its middle into a user turn and an assistant turn."""
    mid = len(text) // 2
    cut = text.find(". ", mid)
    cut = mid if cut < 0 else cut + 2
    return [{"role": "user", "content": text[:cut].strip()}, {"role": "assistant", "content": text[cut:].strip()}]


def bootstrap_base(
    out_dir: Path,
    texts: Iterable[str],
    *,
    arch: Literal["llama", "qwen2"] = "llama",
    preset: Literal["2m", "10m", "30m"] = "10m",
    vocab_size: int = 4096,
    pretrain_steps: int = 300,
    seq_len: int = 256,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | None = None,
    chat_fraction: float = 0.25,
    num_threads: Callable[[], int] | None = None,
) -> BaseModelInfo:
    """Build, briefly pretrain and save a tiny causal LM with a locally trained tokenizer.

    Steps: train the tokenizer (``build_tokenizer``); build a ``LlamaConfig`` or ``Qwen2Config`` of the
    preset's shape (``PRESETS``) with tied input/output embeddings; pretrain as a causal LM on
    ``texts`` packed into ``seq_len``-token blocks (documents joined by ``<|eos|>``; every
    ``1/chat_fraction``-th text is rendered through the chat template as a user/assistant pair, so the
    ChatML tokens have trained embeddings); AdamW (betas 0.9/0.95, weight decay 0.1), linear warmup over
    the first 5% of steps then cosine decay to 10% of ``lr`` (the GPT-3 / Chinchilla recipe), gradient
    clipping at 1.0, fixed seed. Blocks are sampled in a shuffled order, cycling when steps exceed one epoch.

    Args:
        out_dir: folder to write (created; existing model files in it are overwritten).
        texts: pretraining text, e.g. ``corpus_texts("corpus.sqlite")``; iterated once (materialised).
        arch: ``"llama"`` (LlamaForCausalLM) or ``"qwen2"`` (Qwen2ForCausalLM, q/k/v biases).
        preset: model size, see ``PRESETS`` (about 1.7M, 9.9M, 28.8M parameters with a 4096 vocabulary).
        vocab_size: tokenizer vocabulary size (>= 300).
        pretrain_steps: optimizer steps (0 saves the randomly initialised model).
        seq_len: tokens per block (>= 16).
        batch_size: blocks per step (>= 1).
        lr: peak learning rate.
        seed: seeds Python and torch (initialisation and block order).
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available. Pretraining on CUDA uses bf16 autocast.
        chat_fraction: share of texts rendered as a chat exchange, in [0, 1].
        num_threads: called before each step; torch's intra-op threads are set to what it returns (so a caller
            can move cores between this and other work, ``finetune.background``). On the demo's CPU the losses
            and weights are bitwise the same at any count. None leaves the threads as they are.

    Returns:
        ``BaseModelInfo``; the same fields are written to ``out_dir/bootstrap.json``.

    Raises:
        ValueError: unknown ``arch``/``preset``, a bad size argument, or text too short for one block.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from finetune.background import set_threads

    if arch not in _ARCHES:
        raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(_ARCHES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if seq_len < 16 or batch_size < 1 or pretrain_steps < 0:
        raise ValueError(
            f"need seq_len >= 16, batch_size >= 1, pretrain_steps >= 0; got {seq_len}, {batch_size}, {pretrain_steps}"
        )
    if not 0.0 <= chat_fraction <= 1.0:
        raise ValueError(f"chat_fraction must be in [0, 1], got {chat_fraction}")
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = [t for t in texts if t and t.strip()]
    if not docs:
        raise ValueError("no text to pretrain on: `texts` was empty; pass e.g. corpus_texts('corpus.sqlite')")
    random.seed(seed)
    torch.manual_seed(seed)

    tokenizer = build_tokenizer(docs, vocab_size=vocab_size)
    every = round(1 / chat_fraction) if chat_fraction > 0 else 0
    ids: list[int] = []
    eos_id = int(tokenizer.convert_tokens_to_ids(EOS_TOKEN))  # type: ignore[arg-type]
    for i, text in enumerate(docs):
        if every and i % every == every - 1 and len(text) > 40:
            rendered = tokenizer.apply_chat_template(_chat_wrap(text), tokenize=False)
            ids.extend(tokenizer(str(rendered), add_special_tokens=False)["input_ids"])
        else:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos_id)
    n_blocks = len(ids) // seq_len
    if n_blocks < 1:
        raise ValueError(
            f"the text gives {len(ids)} tokens, fewer than one block of seq_len={seq_len}; pass more text or a "
            "smaller seq_len"
        )
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)

    shape = PRESETS[preset]
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max(4096, seq_len),
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **shape,
    }
    model: PreTrainedModel
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    n_params = int(model.num_parameters())
    dev = pick_device(device)
    model.to(dev)  # type: ignore[arg-type]  # transformers types .to() loosely
    logger.info(
        "bootstrap %s/%s: %d params, vocab %d, %d tokens in %d blocks of %d, %d steps on %s",
        arch, preset, n_params, len(tokenizer), len(ids), n_blocks, seq_len, pretrain_steps, dev,
    )

    losses: list[float] = []
    if pretrain_steps:
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        optim = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.95),
        )
        warmup = max(1, pretrain_steps // 20)

        def _lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, pretrain_steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_factor)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n_blocks, generator=gen)
        cursor = 0
        use_bf16 = dev.startswith("cuda") and torch.cuda.is_bf16_supported()
        for step in range(pretrain_steps):
            if num_threads is not None:
                set_threads(num_threads())
            if cursor + batch_size > n_blocks:
                order = torch.cat([order[cursor:], torch.randperm(n_blocks, generator=gen)])
                cursor = 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            batch = blocks[idx].to(dev)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
            if step % max(1, pretrain_steps // 10) == 0 or step == pretrain_steps - 1:
                logger.info("bootstrap step %d/%d loss %.4f", step + 1, pretrain_steps, losses[-1])
    tail = losses[-max(1, len(losses) // 10) :] if losses else []
    final_loss = float(sum(tail) / len(tail)) if tail else float("nan")

    model.eval()
    model.to("cpu")  # type: ignore[arg-type]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END_TOKEN)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = BaseModelInfo(
        path=out_dir, arch=arch, preset=preset, n_params=n_params, vocab_size=len(tokenizer), steps=pretrain_steps,
        seq_len=seq_len, n_tokens=len(ids), final_loss=final_loss, seconds=time.perf_counter() - started,
        device=dev,
    )
    (out_dir / "bootstrap.json").write_text(json.dumps({**info.to_json(), "lr": lr, "batch_size": batch_size,
                                                        "seed": seed, "loss_history": losses}, indent=2))
    logger.info("bootstrap done: %s, final loss %.4f, %.1f s", out_dir, final_loss, info.seconds)
    return info


def base_name(model_id_or_path: str | Path) -> str:
    """The name to load a base by: an existing local folder as its absolute path (so an adapter's
    ``base_model_name_or_path`` works from any folder), else the Hugging Face model id as given.

    Raises:
        FileNotFoundError: a path-like argument (``./x``, ``/x``, ``~/x``, a ``Path``) that does not exist.
    """
    name = str(model_id_or_path)
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or isinstance(model_id_or_path, Path):
        raise FileNotFoundError(
            f"base model folder {path} not found; pass a Hugging Face model id or a folder made by bootstrap_base"
        )
    return name


def load_tokenizer(model_id_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load a base's tokenizer only (no weights), with a pad token (its EOS when it had none).

    Raises:
        FileNotFoundError: a path-like argument that does not exist (``base_name``).
        ValueError: the tokenizer has no chat template.
        OSError: transformers cannot find or download the tokenizer.
    """
    from transformers import AutoTokenizer

    name = base_name(model_id_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {name!r} has no chat template; miniatures are trained and served on chat messages, "
            "so pass a model that has one (an instruct/chat model, or a folder made by bootstrap_base)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    model_id_or_path: str | Path, *, device: str | None = None, dtype: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, from a Hugging Face model id or a local folder.

    Vision-language bases whose checkpoints ``AutoModelForCausalLM`` maps to a conditional-generation class
    (Gemma 3 4B and up: ``Gemma3ForConditionalGeneration``) load as that class; train them on text with LoRA on
    the language model only (``finetune.train``).

    Args:
        model_id_or_path: e.g. ``"Qwen/Qwen2.5-0.5B-Instruct"`` (downloaded through the Hugging Face cache)
            or a folder written by ``bootstrap_base`` / ``save_pretrained``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:0"``...; default CUDA when available, else CPU.
        dtype: see ``pick_dtype``; default bf16 on CUDA (fp16 where bf16 is unsupported, float32 for Gemma),
            float32 on CPU.
        tokenizer: the base's tokenizer when already loaded (``load_tokenizer``), else it is loaded here.

    Returns:
        ``(model, tokenizer)``: the model on ``device`` in eval mode, the tokenizer with a pad token
        (its EOS when it had none).

    Raises:
        FileNotFoundError: a path-like argument (``./x``, ``/x``, ``~/x``) that does not exist.
        ValueError: the tokenizer has no chat template, or an unknown dtype.
        OSError: transformers cannot find or download the model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = base_name(model_id_or_path)
    if tokenizer is None:
        tokenizer = load_tokenizer(name)
    dev = pick_device(device)
    model_type = getattr(AutoConfig.from_pretrained(name), "model_type", None)
    torch_dtype = getattr(torch, pick_dtype(dtype, dev, model_type=model_type))
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    model.to(dev)  # type: ignore[arg-type]  # transformers types .to() loosely
    model.eval()
    logger.info("loaded %s (%d params) on %s as %s", name, model.num_parameters(), dev, torch_dtype)
    return model, tokenizer
