"""The ``miniature:<name>[@<version>]`` backend: registered miniatures run in-process (transformers + peft).

One ``LocalEngine`` holds one base model and several LoRA adapters on it, switched by name the way
vLLM serves ``--lora-modules name=path`` (a fully fine-tuned miniature is loaded as its own base).
Requests are served with continuous batching, in the engine's own model thread (a one-thread pool, so the
event loop stays free and every request sees the same torch threading: measured here, on a loaded 2-core
machine, generation in the main thread was up to 10x slower than in a worker thread). The engine decodes in its
own loop, not ``model.generate``: a request is prefilled alone (no padding, so the fused attention kernel) and
joins the running batch at the next step boundary; every step decodes one token of every row; a row leaves at
the step it ends (a stop token, its grammar complete, or its ``max_new_tokens``), so a sentence tag never waits
for an email. With speculative decoding (``speculative_tokens``, on by default) a step also verifies each row's
n-gram drafts (``miniatures.drafts``: its own prompt and output, its adapter's recent completions) in the same
forward pass and keeps those the model agrees with, several tokens per step at no draft-model cost (``_Batch``).
The batch's KV cache is left-aligned with per-row padding masks and position ids, as transformers does for a
left-padded batch, and grows or shrinks by rows (``_Batch``, ``_slot_layer_class``). A prompt that
starts like one prefilled before (the same system prompt, instructions and offer) is prefilled only past that
prefix (``PrefixCache``). Requests for different adapters share a batch through peft's mixed-adapter batches
(``adapter_names=[...]``, peft >= 0.10); when the installed peft refuses that, a request joins only rows of its
own adapter. Prompts are rendered with the tokenizer's own chat template
(``apply_chat_template(messages, add_generation_prompt=True)``), the same template the miniature was trained
with (DESIGN.md). Decoding is greedy, or a row's own seeded draw (``miniatures.sampling``), with nothing inherited
from the base's ``generation_config`` (``LocalEngine.generation_config`` is the ``generate`` equivalent the tests
compare with), and an answer is held to the Lark grammar of its task (``miniatures.grammar``, llguidance token
masks) when the caller passes one.

Heavy imports (torch, transformers, peft) happen inside functions: importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, convert_to_openai_messages
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field

from core.errors import UserError
from core.tasks import ExtractionTask, WritingTask
from miniatures.device import pick_device, torch_dtype
from miniatures.drafts import CompletionStore, DraftSource
from miniatures.formats import (
    WRITER_BRIEF,
    assemble_extraction,
    brief_messages,
    expand_offer_tags,
    offer_tag_values,
    sentence_messages,
)
from miniatures.grammar import (
    GrammarLogitsProcessor,
    answer_grammar,
    email_grammar,
    llg_tokenizer,
    mask_rows_greedy,
    tag_grammar,
)
from miniatures.grammar import matcher as grammar_matcher
from miniatures.kv_cache import (
    PrefixCache,
    _cache_keyword,
    _has_sliding_layers,
    _slot_cache,
    _slot_layers_fit,
    use_packed_attention,
)
from miniatures.registry import check_miniature_paths, get_miniature
from miniatures.sampling import RowSampling, SeededSampler, draw, prompt_seed
from miniatures.specs import BackendSpec, BackendSpecError

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "BASE_ADAPTER",
    "AdapterPathError",
    "Generation",
    "LocalEngine",
    "LocalMiniatureChatModel",
    "PrefixCache",
    "build_miniature_chat_model",
    "repair_json",
    "share_cpus",
    "usable_cpus",
]

logger = logging.getLogger(__name__)

#: Adapter name that runs the bare base model (peft's name for "no adapter" in mixed batches).
BASE_ADAPTER = "__base__"

#: End-of-turn token of the ChatML template the miniatures are trained with.
IM_END = "<|im_end|>"
#: End-of-turn tokens of the chat templates of common families (ChatML/Qwen/SmolLM2, Llama 3.x, Gemma 3,
#: Phi-3): each one the base's vocabulary has also stops generation, since not every base lists its
#: end-of-turn token as ``eos`` in its config (a Llama 3 base tokenizer ends turns with ``<|eot_id|>``).
END_OF_TURN_TOKENS = (IM_END, "<|eot_id|>", "<end_of_turn>", "<|end|>")

#: Most new tokens of one sentence's answer in the ``sentence-tags`` format (a field name and a span).
_TAG_TOKENS = 64


#: Sampling of a writer miniature's emails (``build_miniature_chat_model``). Greedy decoding of a small writer
#: gives its single most likely wording to every prospect, so a campaign reads as one template; sampling from
#: the distribution it learned from the teacher's varied emails (temperature 1) keeps the variety (measured with
#: the rubric's campaign checks, ``evals.rubric``), and min-p (``miniatures.sampling.RowSampling.min_p``) cuts the
#: tail of broken words where the model is sure while keeping the choice where it is not (a sentence's opening);
#: the grammar still holds every token to valid JSON and listed merge tags. Figures: README, "Distil".
WRITER_TEMPERATURE = 1.0
WRITER_TOP_P = 1.0
WRITER_MIN_P = 0.1


class AdapterPathError(UserError, FileNotFoundError):
    """A miniature's adapter (or fully fine-tuned model) folder is missing or holds no weights config."""


@dataclass(frozen=True)
class Generation:
    """One answer of a local miniature.

    Attributes:
        text: the generated text, up to (not including) the stop token.
        input_tokens: prompt length in tokens (the chat-templated prompt, as the tokenizer counts it).
        output_tokens: generated tokens, including the stop token when the model emitted one.
        latency_ms: wall time from the request to its answer, milliseconds (queueing included).
        finish_reason: ``"stop"`` (a stop token ended it) or ``"length"`` (``max_new_tokens`` reached).
    """

    text: str
    input_tokens: int
    output_tokens: int
    latency_ms: float
    finish_reason: str = "stop"


@dataclass
class _Request:
    adapter: str
    grammar: str | None
    input_ids: list[int]
    max_new_tokens: int
    started: float
    matcher: Any = None  # the grammar's llguidance matcher, compiled when the request is made
    sampling: RowSampling | None = None  # None: greedy
    future: Any = None  # asyncio.Future (awaited in ``loop``) or concurrent.futures.Future (generate_sync)
    loop: asyncio.AbstractEventLoop | None = None
    passed_over: int = 0  # requests admitted past it while its adapter could not join (no mixed batches)


@dataclass
class _Row:
    """A request in the running batch: its tokens so far and where it sits in the batch's KV cache."""

    request: _Request
    pad: int  # leading slots of the batch cache that are not this row's (masked)
    position: int  # position id of the row's next input token: prompt + generated tokens fed so far
    matcher: Any = None  # the grammar's matcher while it constrains the row (None: free, or left its grammar)
    generator: Any = None  # the row's torch.Generator when it samples
    tokens: list[int] = field(default_factory=list)  # generated tokens (the last one is the next input)
    drafts: DraftSource | None = None  # its n-gram draft index, made at its first speculative step
    draft_limit: int = -1  # most drafts of its next step (-1: the engine's speculative_tokens); see _Batch._drafts


#: The process's live CPU engines (``LocalEngine`` on a CPU device), which share its CPUs (``share_cpus``).
_CPU_ENGINES: weakref.WeakSet[LocalEngine] = weakref.WeakSet()
_CPU_ENGINES_LOCK = threading.RLock()


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``os.sched_getaffinity``), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _set_torch_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` for the calling thread, kept past torch's lazy per-thread start.

    torch sets a thread's OpenMP thread count at its first parallel call to the last count set by any thread, so a
    count set before that call would be lost; ``get_num_threads`` makes that call first.
    """
    import torch

    torch.get_num_threads()
    torch.set_num_threads(threads)


def share_cpus() -> int:
    """Give each live CPU engine made with ``num_threads=None`` its share of the CPUs; returns the share.

    The share is ``usable_cpus() // live CPU engines`` (engines with an explicit ``num_threads`` count too), at least
    1. Set in each engine's model thread before its next batch (torch's thread count is per thread).
    """
    with _CPU_ENGINES_LOCK:
        engines = [e for e in _CPU_ENGINES if not e._closed]
        share = max(1, usable_cpus() // max(1, len(engines)))
        for engine in engines:
            if engine._shared_threads:
                engine._use_threads(share)
    return share


class LocalEngine:
    """A base model with several LoRA adapters, serving continuously batched generation in-process.

    Args:
        base_model: Hugging Face model id or local folder of the base model and its tokenizer (which
            must carry a chat template). For a fully fine-tuned miniature, its own folder.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``...; ``None`` picks CUDA when available.
        dtype: a ``torch.dtype`` or its name; ``None`` gives bfloat16 on CUDA and float32 on CPU.
        max_batch_size: most rows decoded together; more requests wait for a row to end.
        batch_window_ms: how long an idle engine waits after a request for others to start with it, ms.
        max_new_tokens: default cap on generated tokens per request.
        num_threads: torch CPU threads of the engine's model thread (``torch.set_num_threads``, set there and in
            the calling thread). ``None`` on a CPU device: the process's CPU engines share its usable CPUs
            (``usable_cpus() // live CPU engines``, at least 1, rebalanced when an engine is made or closed; see
            ``share_cpus``), so a researcher and a writer engine on 2 cores get 1 thread each instead of torch's
            default of one per core each. ``None`` on a GPU keeps torch's default. Oversubscribed OpenMP threads wait
            on each other: measured here (2 cores, load 5), the demo's writer miniature made 8.8 tokens/s at batch 1
            with torch's default threads and 68 tokens/s with 1 (``benchmarks/results/miniature_speed.md``); on a
            CPU shared with other busy processes, pass 1.
        constrained: hold answers to the grammar of their task (``miniatures.grammar``) when the caller
            gives one (``task=`` of the chat model): extraction answers cite existing sentence ids and copy
            each value from the cited sentence, emails are JSON with only listed merge tags. Requests
            without a task or grammar are not constrained; the prompt text is never read for one.
        prefix_cache_tokens: prompt tokens whose keys and values are kept for reuse by later prompts that start
            the same way (``PrefixCache``; 0: none). Measured on the demo's prompts in
            ``benchmarks/results/miniature_speed.md``.
        speculative_tokens: most draft tokens verified per row and step (0: none, one token per step). Drafts
            are n-gram lookups (``miniatures.drafts``) in the row's own prompt and output and in the adapter's
            recent completions, so they cost no model; a step runs each row's last token and its drafts in one
            forward pass and keeps the drafts the model agrees with (``_Batch.step``). Greedy answers are the
            same as without drafts, and so are sampled ones (each kept token is the row's own seeded draw from its
            processed distribution), up to floating-point ties between the one-token and the multi-token
            forward pass. Off for models with sliding-window layers. Measured in
            ``benchmarks/results/miniature_speed.md``.
        draft_ngram: ``(n_max, n_min)``: longest and shortest n-gram looked up for drafts, longest first.
        draft_store_tokens: tokens of recent completions kept per adapter for retrieval drafts (0: prompt lookup
            only).

    Attributes:
        tokenizer: the base model's tokenizer (left padding).
        prefix_cache: the ``PrefixCache``, or None.
        generate_calls: decoding runs: how many times a request started an idle batch (each ``generate_sync`` alone
            is one; requests that join a running batch add none). For batching statistics.
        requests_served: how many requests have been answered.
        decode_steps, decode_rows: batch decoding steps run, and rows decoded over them (mean batch = rows / steps).
        prefill_tokens, prefix_tokens_reused: prompt tokens run through the model, and taken from the prefix cache.
        prefill_s, decode_s: seconds spent prefilling (with each request's first token) and in decoding steps.
        drafted_tokens, accepted_tokens: draft tokens verified, and those the model agreed with (each saves a step).
        draft_stats: per adapter, ``[drafted, accepted, row steps that verified drafts]``.

    Raises:
        ValueError: a bad size, device or dtype; or a tokenizer without chat template.
        FileNotFoundError: ``base_model`` is neither a folder nor a loadable model id.
    """

    def __init__(
        self,
        base_model: str,
        *,
        device: str | None = None,
        dtype: Any = None,
        max_batch_size: int = 8,
        batch_window_ms: float = 5.0,
        max_new_tokens: int = 512,
        num_threads: int | None = None,
        constrained: bool = True,
        prefix_cache_tokens: int = 16384,
        speculative_tokens: int = 8,
        draft_ngram: tuple[int, int] = (5, 1),
        draft_store_tokens: int = 65536,
    ) -> None:
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0 (0: no speculative decoding), got {speculative_tokens}")
        if not 1 <= draft_ngram[1] <= draft_ngram[0]:
            raise ValueError(f"draft_ngram must be (n_max, n_min) with 1 <= n_min <= n_max, got {draft_ngram}")
        if draft_store_tokens < 0:
            raise ValueError(f"draft_store_tokens must be >= 0 (0: no retrieval drafts), got {draft_store_tokens}")
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0 (0: no prefix cache), got {prefix_cache_tokens}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {batch_window_ms}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_model = str(base_model)
        self.device = pick_device(device)
        self.dtype = torch_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.batch_window_ms = batch_window_ms
        self.max_new_tokens = max_new_tokens
        self.constrained = constrained
        self._llg: Any = None  # llguidance's view of the tokenizer, built on first constrained request
        self._llg_lock = threading.Lock()
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(self.base_model)
            model: Any = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=self.dtype)
        except OSError as exc:
            raise FileNotFoundError(
                f"cannot load base model {self.base_model!r} ({exc}); give a local folder saved with "
                "save_pretrained (model + tokenizer) or a Hugging Face model id available offline"
            ) from exc
        if not tokenizer.chat_template:
            raise ValueError(
                f"the tokenizer of {self.base_model!r} has no chat template; miniatures are prompted with the "
                "same chat template they were trained with, so save the base model's tokenizer with one"
            )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self._base: Any = model.to(self.device).eval()
        self._model: Any = self._base
        self._adapters: dict[str, str] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="miniature-engine")
        if num_threads is not None:
            import torch

            torch.set_num_threads(num_threads)
            self._executor.submit(_set_torch_threads, num_threads).result()
        self._closed = False
        self.threads: int | None = num_threads  # torch threads of the model thread (None: torch's default)
        on_cpu = str(self.device).split(":")[0] == "cpu"
        self._shared_threads = num_threads is None and on_cpu
        if on_cpu:  # every CPU engine counts, so the shared ones are rebalanced whichever kind this one is
            with _CPU_ENGINES_LOCK:
                _CPU_ENGINES.add(self)
            share_cpus()
        self._mixed_batches: bool | None = None  # None: not tried yet
        self._active_adapter: str | None = None  # peft's active adapter as the engine last set it
        self._cache_kw = _cache_keyword(type(model))
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        self._slots = _slot_layers_fit(model.config)  # False: rows decode one at a time (see _new_cache)
        if not self._slots:
            logger.warning("the KV cache of %s has layers other than attention ones; decoding one request at a time",
                           self.base_model)
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens and self._slots else None
        # Speculative steps leave rejected drafts' slots in the slot cache, masked: a sliding window counts slots,
        # so a model with sliding-window layers (and one without the slot cache) decodes a token per step.
        self.speculative_tokens = speculative_tokens if self._slots and not _has_sliding_layers(model.config) else 0
        if speculative_tokens and not self.speculative_tokens:
            logger.info("speculative decoding is off for %s (sliding-window or non-attention cache layers)",
                        self.base_model)
        if self.speculative_tokens:  # several query tokens per row: no copies of a grouped-query cache
            use_packed_attention(self._base)
        self.draft_ngram = (int(draft_ngram[0]), int(draft_ngram[1]))
        self.draft_store = (CompletionStore(*self.draft_ngram, max_tokens=draft_store_tokens)
                            if draft_store_tokens and self.speculative_tokens else None)
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.draft_stats: dict[str, list[int]] = {}  # adapter -> [drafted, accepted, speculative row steps]
        self._inbox: collections.deque[_Request] = collections.deque()
        self._inbox_ready = threading.Condition()
        self._serving = False  # a serving task is running (or submitted) in the model thread
        self.stop_token_ids = self._stop_ids()
        self._stops: frozenset[int] = frozenset(self.stop_token_ids)
        self.generate_calls = 0
        self.requests_served = 0
        self.decode_steps = 0
        self.decode_rows = 0
        self.prefill_tokens = 0
        self.prefix_tokens_reused = 0
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        logger.info("loaded base %s on %s (%s)", self.base_model, self.device, self.dtype)

    def _stop_ids(self) -> list[int]:
        ids: list[int] = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        vocab = self.tokenizer.get_vocab()
        ids.extend(int(vocab[token]) for token in END_OF_TURN_TOKENS if token in vocab)
        config_eos = getattr(self._base.generation_config, "eos_token_id", None)
        for value in config_eos if isinstance(config_eos, list) else [config_eos]:
            if value is not None:
                ids.append(int(value))
        if not ids:
            raise ValueError(f"the tokenizer of {self.base_model!r} has no eos token and no {IM_END}; set one")
        return sorted(set(ids))

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> folder."""
        return dict(self._adapters)

    def close(self) -> None:
        """Stop the engine's model thread (after the work it has); later calls raise ``RuntimeError``.

        The other CPU engines that share the CPUs (``num_threads=None``) then get its share (``share_cpus``).
        """
        with _CPU_ENGINES_LOCK:
            self._closed = True
            _CPU_ENGINES.discard(self)
        self._executor.shutdown(wait=True)
        share_cpus()

    def _use_threads(self, threads: int) -> None:
        """Run the model thread with ``threads`` torch threads from its next task on (no-op when unchanged)."""
        if threads == self.threads or self._closed:
            return
        self.threads = threads
        self._executor.submit(_set_torch_threads, threads)
        logger.debug("engine %s: %d torch thread(s)", self.base_model, threads)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load the LoRA adapter in ``path`` under ``name`` (a no-op when it is already loaded from there).

        The first adapter wraps the base in ``peft.PeftModel.from_pretrained``; later ones are added
        with ``PeftModel.load_adapter(path, adapter_name=name)``; all share the base weights.

        Raises:
            ValueError: ``name`` is empty or reserved, or already names an adapter from another folder.
            AdapterPathError: ``path`` is not a folder with ``adapter_config.json``.
        """
        if not name or name == BASE_ADAPTER:
            raise ValueError(f"adapter name {name!r} is empty or reserved ({BASE_ADAPTER!r} is the bare base)")
        folder = Path(path).expanduser()
        if name in self._adapters:
            if self._adapters[name] == str(folder):
                return
            raise ValueError(
                f"adapter {name!r} is already loaded from {self._adapters[name]!r}; "
                f"pick another name for {str(folder)!r}"
            )
        if not (folder / "adapter_config.json").is_file():
            raise AdapterPathError(
                f"adapter folder {str(folder)!r} does not exist or holds no adapter_config.json; "
                "point at the folder peft's save_pretrained wrote (e.g. <train out>/final)"
            )
        from peft import PeftModel

        with self._lock:
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(folder), adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self._base, str(folder), adapter_name=name)
            self._model.eval()
            self._adapters[name] = str(folder)
            self._active_adapter = None  # set again before the next forward pass that needs it
        logger.info("loaded adapter %s from %s on base %s", name, folder, self.base_model)

    # ------------------------------------------------------------------ prompts

    def render_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text for ``messages`` (OpenAI chat format) under the tokenizer's chat template."""
        return str(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False))

    def prompt_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of ``render_prompt(messages)``; equal to ``apply_chat_template(..., tokenize=True)``."""
        return self._encode(self.render_prompt(messages))

    def _encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def _prepare(self, adapter: str, messages: Sequence[Mapping[str, Any]], max_new_tokens: int | None,
                 grammar: str | None, sampling: RowSampling | None = None) -> _Request:
        if adapter != BASE_ADAPTER and adapter not in self._adapters:
            loaded = ", ".join(self._adapters) or "none"
            raise ValueError(f"adapter {adapter!r} is not loaded on {self.base_model!r} (loaded: {loaded}); "
                             "call add_adapter(name, path) first")
        if not messages:
            raise ValueError("messages is empty; give at least one {'role': ..., 'content': ...} message")
        prompt = self.render_prompt(messages)
        ids = self._encode(prompt)
        limit = max_new_tokens or self.max_new_tokens
        if self.context_length:
            room = self.context_length - len(ids)
            if room < 1:
                raise ValueError(
                    f"prompt of {len(ids)} tokens does not fit the context of {self.base_model!r} "
                    f"({self.context_length} tokens); shorten the prompt (fewer or shorter pages)"
                )
            limit = min(limit, room)
        return _Request(adapter=adapter, grammar=grammar, input_ids=ids, max_new_tokens=limit,
                        started=time.perf_counter(), matcher=self.matcher(grammar) if grammar is not None else None,
                        sampling=sampling)

    # ------------------------------------------------------------------ generation

    def generation_config(self, max_new_tokens: int) -> Any:
        """The decoding settings of a transformers ``generate`` call that gives the engine's own answers.

        The engine decodes in its own loop (``_Batch``): argmax of the logits after the grammar mask and the row's
        seeded draw, nothing else. This is the same decoding as transformers' ``generate`` with these settings, which
        spell out every setting a base's own ``generation_config`` could change (Qwen2.5 Instruct ships
        ``repetition_penalty`` 1.1 and ``do_sample`` with top-k/top-p): no sampling (transformers then applies no
        temperature, top-k or top-p warper), one beam, no repetition penalty, no n-gram ban, no minimum length
        (``min_new_tokens=0``, which takes precedence over any ``min_length``; giving both makes transformers warn
        on every call). The tests compare the loop's answers with ``generate`` under this config.
        """
        from transformers import GenerationConfig

        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
            no_repeat_ngram_size=0, min_new_tokens=0, temperature=1.0, top_p=1.0,
            eos_token_id=self.stop_token_ids, pad_token_id=int(self.tokenizer.pad_token_id),
        )

    def _grammar_tokenizer(self) -> Any:
        with self._llg_lock:
            if self._llg is None:
                self._llg = llg_tokenizer(self.tokenizer, self.stop_token_ids)
        return self._llg

    def grammar_processor(self, grammars: Sequence[Any], prompt_width: int) -> GrammarLogitsProcessor:
        """A logits processor holding each row to its Lark grammar or matcher (``miniatures.grammar``); None rows
        are free. The engine's loop uses one with no grammars (``GrammarLogitsProcessor.mask_rows``).

        Raises:
            GrammarError: a grammar does not compile.
        """
        tokenizer = self._grammar_tokenizer()
        return GrammarLogitsProcessor(tokenizer, grammars, prompt_width, self.stop_token_ids)

    def matcher(self, grammar: str) -> Any:
        """An llguidance matcher of ``grammar`` (Lark text) over this engine's tokenizer (about 1 ms to compile).

        Raises:
            GrammarError: the grammar does not compile.
        """
        return grammar_matcher(self._grammar_tokenizer(), grammar)

    def _forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any,
                 adapters: Sequence[str], keep: int = 0) -> Any:
        """One forward pass of ``input_ids`` (rows, tokens) through the adapters of its rows; returns the last
        position's logits (rows, model vocabulary), float32; with ``keep`` > 0, the last ``keep`` positions' logits
        (rows, keep, model vocabulary).

        One adapter for every row: peft's active adapter (``set_adapter``, or ``disable_adapter`` for the bare
        base); several: peft's mixed-adapter batch (``adapter_names=``, peft >= 0.10).
        """
        import torch
        from peft import PeftModel

        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "position_ids": position_ids, self._cache_kw: cache, "use_cache": True}
        if self._keeps_logits:
            kwargs["logits_to_keep"] = max(1, keep)
        with self._lock:
            model = self._model
            if not isinstance(model, PeftModel):
                out = model(**kwargs)
            elif len(set(adapters)) > 1:
                out = model(**kwargs, adapter_names=list(adapters))
            elif adapters[0] == BASE_ADAPTER:
                with model.disable_adapter():
                    out = model(**kwargs)
            else:
                if self._active_adapter != adapters[0]:
                    model.set_adapter(adapters[0])
                    self._active_adapter = adapters[0]
                out = model(**kwargs)
        logits = out.logits[:, -keep:, :] if keep else out.logits[:, -1, :]
        return logits if logits.dtype == torch.float32 else logits.float()

    def _can_mix(self, names: set[str]) -> bool:
        """Whether rows of the adapters ``names`` may share a batch (peft's mixed batches; tried once)."""
        if len(names) <= 1:
            return True
        if self._mixed_batches is None:
            import torch

            pad = int(self.tokenizer.pad_token_id)
            probe = sorted(names)[:2]
            try:
                with torch.inference_mode(), self._lock:
                    self._model(input_ids=torch.tensor([[pad], [pad]], device=self.device), adapter_names=probe)
                self._mixed_batches = True
            except (TypeError, ValueError) as exc:
                logger.warning("mixed-adapter batches are not supported here (%s); batching per adapter", exc)
                self._mixed_batches = False
        return bool(self._mixed_batches)

    def _new_cache(self, reserve: int) -> Any:
        """An empty KV cache for one row: ``_slot_cache`` (rows can join and leave), or transformers' own
        ``DynamicCache`` for a model with layers the slot cache does not hold (such a model decodes one row at a
        time)."""
        from transformers import DynamicCache

        if self._slots:
            return _slot_cache(self._base.config, reserve)
        return DynamicCache(config=self._base.config.get_text_config(decoder=True))

    def _start(self, batch: _Batch, request: _Request) -> Generation | None:
        """Prefill ``request`` alone (no padding; only the part past a cached prefix), pick its first token and
        add it to ``batch``; returns its answer instead when that token already ends it."""
        import torch

        started = time.perf_counter()
        if not batch.rows:
            self.generate_calls += 1
        ids = request.input_ids
        cache = self._new_cache(request.max_new_tokens)
        reused = self.prefix_cache.fill(request.adapter, ids, cache) if self.prefix_cache is not None else 0
        scores = self._forward(torch.tensor([ids[reused:]], device=self.device), None,
                               torch.arange(reused, len(ids), device=self.device).unsqueeze(0), cache,
                               [request.adapter])
        if self.prefix_cache is not None:
            self.prefix_cache.store(request.adapter, ids, cache.layers)
        self.prefill_tokens += len(ids) - reused
        self.prefix_tokens_reused += reused
        row = _Row(request=request, pad=0, position=len(ids), matcher=request.matcher,
                   generator=request.sampling.generator() if request.sampling is not None else None)
        token = batch.choose([row], scores, first=True)[0]
        self.prefill_s += time.perf_counter() - started
        if self._advance(row, token):
            return self._answer(row)
        batch.join([row], cache, [0])
        return None

    #: Requests prefilled together pad their prompt parts to the longest: at most this factor of the shortest
    #: (plus ``GROUP_SLACK`` tokens), so little of a group's prefill is spent on padding.
    GROUP_RATIO = 2
    GROUP_SLACK = 16

    def _start_all(self, batch: _Batch, requests: Sequence[_Request]) -> list[tuple[_Request, Generation]]:
        """Prefill the requests that join ``batch`` at this step boundary and add them to it; returns the answers
        that their first token already ended.

        A request that shares a prefix with others of the same adapter and has none of it cached yet is prefilled
        alone first, so the others reuse it (``PrefixCache``). The rest are prefilled in groups of similar uncached
        lengths (``GROUP_RATIO``), one forward pass per group (``_start_group``): with short prompts (a researcher's
        sentence prompts, about 40 tokens) the fixed cost of a forward pass dominates, and one pass per request
        (measured here: 977 sentence prompts of the demo's eval, 33 ms each on a loaded 2-core machine) costs more
        than all their decoding. A group of one is prefilled alone, without padding (``_start``).
        """
        done: list[tuple[_Request, Generation]] = []
        pending = list(requests)
        cache = self.prefix_cache
        while pending:
            hits = [cache.longest(r.adapter, r.input_ids)[1] if cache is not None else 0 for r in pending]
            leader = self._leader(pending, hits) if cache is not None else None
            if leader is None:
                break
            request = pending.pop(leader)
            done.extend(self._guarded(batch, [request]))
        if pending:
            order = sorted(range(len(pending)), key=lambda i: len(pending[i].input_ids) - hits[i])
            group: list[_Request] = []
            shortest = 0
            for i in order:
                uncached = len(pending[i].input_ids) - hits[i]
                if group and (uncached > self.GROUP_RATIO * shortest + self.GROUP_SLACK
                              or len(group) >= self.max_batch_size):
                    done.extend(self._guarded(batch, group))
                    group = []
                if not group:
                    shortest = uncached
                group.append(pending[i])
            if group:
                done.extend(self._guarded(batch, group))
        return done

    def _leader(self, pending: Sequence[_Request], hits: Sequence[int]) -> int | None:
        """The index of a request to prefill alone first: the one with the most uncached tokens among those that
        share at least ``PrefixCache.min_tokens`` more leading tokens (whole blocks, by ``PrefixCache.block_hashes``)
        with another waiting request of their adapter than the cache holds for them; None when none gains."""
        cache = self.prefix_cache
        assert cache is not None
        hashes = [cache.block_hashes(r.input_ids) for r in pending]
        counts: collections.Counter[tuple[str, int]] = collections.Counter()
        for request, blocks in zip(pending, hashes, strict=True):
            counts.update((request.adapter, h) for h in blocks)
        best: int | None = None
        best_uncached = 0
        for i, (request, blocks) in enumerate(zip(pending, hashes, strict=True)):
            uncached = len(request.input_ids) - hits[i]
            if uncached <= best_uncached:
                continue
            shared = 0
            for h in blocks:
                if counts[(request.adapter, h)] < 2:
                    break
                shared += 1
            if shared * cache.BLOCK - hits[i] >= cache.min_tokens:
                best, best_uncached = i, uncached
        return best

    def _guarded(self, batch: _Batch, group: list[_Request]) -> list[tuple[_Request, Generation]]:
        """``_start``/``_start_group`` of ``group``; an error goes to its requests alone."""
        try:
            if len(group) == 1:
                answer = self._start(batch, group[0])
                return [] if answer is None else [(group[0], answer)]
            return self._start_group(batch, group)
        except Exception as exc:  # noqa: BLE001 - handed to the group's callers alone
            for request in group:
                _settle(request, error=exc)
            return []

    def _start_group(self, batch: _Batch, group: Sequence[_Request]) -> list[tuple[_Request, Generation]]:
        """Prefill ``group`` in one forward pass and add its rows to ``batch``; returns the answers their first
        token ended.

        Every row runs the same number of prompt tokens, ``width``: the longest uncached part in the group. A row
        reuses its cached prefix up to ``len(prompt) - width`` tokens (recomputing a little of it when its own
        uncached part is shorter), and a prompt shorter than ``width`` is padded on the left, so each row's
        tokens stay contiguous and end at the group's last slot, as in the batch (``_Batch``).
        """
        import torch

        started = time.perf_counter()
        if not batch.rows:
            self.generate_calls += 1
        cache_of = self.prefix_cache
        found = [cache_of.longest(r.adapter, r.input_ids) if cache_of is not None else (None, 0) for r in group]
        lengths = [len(r.input_ids) for r in group]
        width = max(n - hit for n, (_entry, hit) in zip(lengths, found, strict=True))
        reuse = [max(0, n - width) for n in lengths]
        held = max(reuse)
        device = self.device
        cache = self._new_cache(max(r.max_new_tokens for r in group))
        if held:
            assert cache_of is not None
            for layer_index, layer in enumerate(cache.layers):
                keys: Any = None
                values: Any = None
                for at, ((entry, _hit), n) in enumerate(zip(found, reuse, strict=True)):
                    if not n or entry is None:
                        continue
                    k, v = entry.kv[layer_index]
                    if keys is None:
                        keys = k.new_zeros((len(group), k.shape[1], held, k.shape[3]))
                        values = v.new_zeros((len(group), v.shape[1], held, v.shape[3]))
                    keys[at, :, held - n:] = k[0, :, :n]
                    values[at, :, held - n:] = v[0, :, :n]
                layer.preload(keys, values, held + width + layer.reserve)
            for (entry, _hit), n in zip(found, reuse, strict=True):
                if n and entry is not None:
                    cache_of.touch(entry)
        pad = self.tokenizer.pad_token_id
        tokens = torch.tensor([[pad] * (width - (n - r)) + req.input_ids[r:]
                               for req, n, r in zip(group, lengths, reuse, strict=True)], device=device)
        pads = [held + width - n for n in lengths]
        slots = torch.arange(held + width, device=device)
        mask = slots.unsqueeze(0) >= torch.tensor(pads, device=device).unsqueeze(1)
        positions = (slots[held:].unsqueeze(0) - torch.tensor(pads, device=device).unsqueeze(1)).clamp(min=0)
        scores = self._forward(tokens, mask, positions, cache, [r.adapter for r in group])
        self.prefill_tokens += sum(n - r for n, r in zip(lengths, reuse, strict=True))
        self.prefix_tokens_reused += sum(reuse)
        rows = [_Row(request=r, pad=p, position=n, matcher=r.matcher,
                     generator=r.sampling.generator() if r.sampling is not None else None)
                for r, p, n in zip(group, pads, lengths, strict=True)]
        if cache_of is not None:
            for i, (request, p) in enumerate(zip(group, pads, strict=True)):
                cache_of.store(request.adapter, request.input_ids, cache.layers, row=i, start=p)
        chosen = batch.choose(rows, scores, first=True)
        done: list[tuple[_Request, Generation]] = []
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            if self._advance(row, token):
                done.append((row.request, self._answer(row)))
            else:
                keep.append(i)
        self.prefill_s += time.perf_counter() - started
        if keep:
            batch.join([rows[i] for i in keep], cache, keep)
        return done

    def _advance(self, row: _Row, token: int) -> bool:
        """Append ``token`` to ``row``; True when it ends the answer.

        An answer ends at a stop token, at its ``max_new_tokens``, or when its grammar is complete and allows no
        further token (``LLMatcher.is_stopped``): the mask would then allow only the stop tokens, so the stop token
        is counted without running the step that picks it.
        """
        row.tokens.append(token)
        if token in self._stops:
            return True
        if len(row.tokens) >= row.request.max_new_tokens:
            return True
        m = row.matcher
        if m is not None:
            if not m.consume_token(token):
                logger.warning("a row left its answer grammar (%s); leaving it unconstrained", m.get_error()[:200])
                row.matcher = None
            elif m.is_stopped():
                row.tokens.append(self.stop_token_ids[0])
                return True
        return False

    def _answer(self, row: _Row) -> Generation:
        self.requests_served += 1
        if self.draft_store is not None:
            self.draft_store.add(row.request.adapter, row.request.input_ids, row.tokens)
        return self._finish(row.request, row.tokens, time.perf_counter())

    def _finish(self, request: _Request, row: list[int], now: float) -> Generation:
        row = row[: request.max_new_tokens]
        stop = next((i for i, tok in enumerate(row) if tok in self.stop_token_ids), None)
        kept = row if stop is None else row[:stop]
        return Generation(
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            input_tokens=len(request.input_ids),
            output_tokens=len(row) if stop is None else stop + 1,
            latency_ms=(now - request.started) * 1000.0,
            finish_reason="length" if stop is None else "stop",
        )

    def _run_alone(self, request: _Request) -> Generation:
        """Decode ``request`` by itself, in the calling thread (a ``generate_sync`` made in the model thread)."""
        import torch

        self._stops = frozenset(self.stop_token_ids)
        batch = _Batch(self)
        with torch.inference_mode():
            answer = self._start(batch, request)
            while answer is None:
                done = batch.step()
                if done:
                    answer = done[0][1]
        return answer

    def generate_sync(
        self, adapter: str, messages: Sequence[Mapping[str, Any]], *, max_new_tokens: int | None = None,
        grammar: str | None = None, sampling: RowSampling | None = None,
    ) -> Generation:
        """Answer one request, blocking; it joins the running batch like any other (see ``generate``).

        Args:
            adapter: a loaded adapter's name, or ``BASE_ADAPTER`` for the bare base model.
            messages: the chat in OpenAI format, ``[{"role": ..., "content": ...}, ...]``.
            max_new_tokens: cap on generated tokens (default: the engine's).
            grammar: the Lark grammar the answer must follow (``miniatures.grammar``); None: free.
            sampling: draw tokens with this temperature, top-p and seed (``miniatures.sampling``); None: greedy.

        Raises:
            ValueError: unknown adapter, empty messages, or a prompt longer than the model's context.
            RuntimeError: the engine is closed.
        """
        request = self._prepare(adapter, messages, max_new_tokens, grammar, sampling)
        if threading.current_thread().name.startswith("miniature-engine"):
            return self._run_alone(request)
        request.future = concurrent.futures.Future()
        self._enqueue(request)
        answer: Generation = request.future.result()
        return answer

    async def generate(
        self, adapter: str, messages: Sequence[Mapping[str, Any]], *, max_new_tokens: int | None = None,
        grammar: str | None = None, sampling: RowSampling | None = None,
    ) -> Generation:
        """Queue one request and await its answer; it joins the running batch at the next step.

        Same arguments and errors as ``generate_sync``. Greedy decoding, and sampling with a row's own seeded
        generator, make the answer the same as it would be alone (up to floating-point ties), whatever it was
        batched with.
        """
        request = self._prepare(adapter, messages, max_new_tokens, grammar, sampling)
        loop = asyncio.get_running_loop()
        request.future = loop.create_future()
        request.loop = loop
        self._enqueue(request)
        answer: Generation = await request.future
        return answer

    def _enqueue(self, request: _Request) -> None:
        """Put ``request`` in the inbox and make sure the model thread is serving it."""
        with self._inbox_ready:
            if self._closed:
                raise RuntimeError(f"the engine of {self.base_model!r} is closed")
            self._inbox.append(request)
            self._inbox_ready.notify()
            if not self._serving:
                self._serving = True
                self._executor.submit(self._serve)

    def _take(self, batch: _Batch) -> list[_Request] | None:
        """The waiting requests that join ``batch`` now (oldest first, up to ``max_batch_size`` rows); None when
        there is nothing left to do (the serving task then ends).

        When the batch is empty, it first waits up to ``batch_window_ms`` after the oldest request for others (or
        until ``max_batch_size`` are waiting), so requests sent together start together. Without mixed-adapter
        batches a request joins only rows of its own adapter; one passed over ``max_batch_size`` times stops the
        others from joining, so it goes next once the batch has drained.
        """
        with self._inbox_ready:
            inbox = self._inbox
            if not batch.rows:
                if not inbox:
                    self._serving = False
                    return None
                deadline = inbox[0].started + self.batch_window_ms / 1000.0
                while len(inbox) < self.max_batch_size:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._inbox_ready.wait(remaining)
            taken: list[_Request] = []
            kept: collections.deque[_Request] = collections.deque()
            room = self.max_batch_size - len(batch.rows) if self._slots else (0 if batch.rows else 1)
            names = {r.request.adapter for r in batch.rows}
            blocked: list[_Request] = []
            for request in inbox:
                if request.future is not None and request.future.done():  # cancelled while it waited
                    continue
                if (len(taken) < room and not any(b.passed_over >= self.max_batch_size for b in blocked)
                        and self._can_mix(names | {request.adapter})):
                    taken.append(request)
                    names.add(request.adapter)
                    for b in blocked:
                        b.passed_over += 1
                else:
                    if len(taken) < room:
                        blocked.append(request)
                    kept.append(request)
            self._inbox = kept
        return taken

    def _serve(self) -> None:
        """The model thread's serving task: admit waiting requests at each step boundary, decode one step of every
        row, hand out the answers of the rows that ended; returns when no request is left."""
        import torch

        batch = _Batch(self)
        try:
            with torch.inference_mode():
                while True:
                    taken = self._take(batch)
                    if taken is None:
                        return
                    self._stops = frozenset(self.stop_token_ids)
                    for request, answer in self._start_all(batch, taken):
                        _settle(request, answer)
                    if not batch.rows:
                        continue
                    try:
                        done = batch.step()
                    except Exception as exc:  # noqa: BLE001 - handed to each caller in the batch
                        for row in batch.rows:
                            _settle(row.request, error=exc)
                        batch = _Batch(self)
                        continue
                    for request, answer in done:
                        _settle(request, answer)
        except BaseException as exc:
            # Crashed (or the interpreter is going down): nobody may wait forever.
            error = RuntimeError(f"the miniature engine stopped before answering ({exc!r})")
            with self._inbox_ready:
                self._serving = False
                waiting = list(self._inbox)
                self._inbox.clear()
            for request in [row.request for row in batch.rows] + waiting:
                _settle(request, error=error)
            raise


def _torch_index(indices: Sequence[int], device: Any) -> Any:
    """``indices`` as an int64 tensor on ``device`` (for ``index_select``)."""
    import torch

    return torch.tensor(list(indices), dtype=torch.long, device=device)


def _settle(request: _Request, answer: Generation | None = None, error: BaseException | None = None) -> None:
    """Hand ``answer`` (or ``error``) to the caller waiting for ``request``, from the model thread."""
    future = request.future
    if future is None:
        return
    if request.loop is None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(answer)
        return
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
        request.loop.call_soon_threadsafe(_set_future, future, answer, error)


def _set_future(future: asyncio.Future[Generation], answer: Generation | None, error: BaseException | None) -> None:
    if future.done():  # cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert answer is not None
        future.set_result(answer)


class _Batch:
    """The running batch of an engine: its rows and their KV cache, one decoding step at a time.

    The cache is left-aligned: every row's last token sits in the same slot, a row that joins with a shorter
    prompt is padded on the left, and a longer one shifts the others right (``_slot_cache``). Padding slots are
    masked (``attention_mask``, rows by slots) and each row has its own position ids, as transformers' ``generate``
    does for a left-padded batch, so a row's tokens are those it gets alone (up to floating-point ties).

    Speculative steps (``LocalEngine.speculative_tokens``): every row writes the same number of slots per step (its
    last token, its drafts, padding up to the longest row's drafts), and keeps those of the drafts the model agreed
    with; the rest are holes, masked like padding (``holes``, rows by slots) in every later step, while each row's
    position ids count only its kept tokens, so attention sees what a one-token-per-step decode would. When the
    slots no row uses (padding and holes of the fullest row) reach a quarter of the cache, ``_compact`` packs each
    row's kept slots to the right (a gather per layer), as ``_trim`` cuts common padding.
    """

    #: Leading padding slots shared by every row that are cut out of the cache, when at least a quarter of it.
    TRIM_FROM = 32

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.rows: list[_Row] = []
        self.cache: Any = None
        self._grammar: GrammarLogitsProcessor | None = None  # for the batch's steps
        self._first: GrammarLogitsProcessor | None = None  # for one row's first token
        self.holes: Any = None  # torch bool (row room, slot room): rejected draft slots (None: none yet)

    def choose(self, rows: Sequence[_Row], scores: Any, first: bool = False) -> list[int]:
        """The next token of each row: argmax after its grammar's mask and its seeded draw (``SeededSampler``).

        A greedy row is checked first (``miniatures.grammar.mask_rows_greedy``): its mask is filled only when its
        grammar refuses its top token, which gives the same argmax. A sampled row always gets its whole mask.
        """
        matchers = [r.matcher for r in rows]
        if any(m is not None for m in matchers):
            if first:
                self._first = processor = self._first or self.engine.grammar_processor([], 0)
            else:
                self._grammar = processor = self._grammar or self.engine.grammar_processor([], 0)
            sampled = [m if r.generator is not None else None for r, m in zip(rows, matchers, strict=True)]
            greedy = [m if r.generator is None else None for r, m in zip(rows, matchers, strict=True)]
            if any(m is not None for m in sampled):
                processor.mask_rows(scores, sampled)
            if any(m is not None for m in greedy):
                mask_rows_greedy(processor, scores, greedy)
        if any(r.generator is not None for r in rows):  # after the grammar: refused tokens have probability 0
            SeededSampler([r.request.sampling for r in rows], [r.generator for r in rows])(None, scores)
        tokens: list[int] = scores.argmax(dim=-1).tolist()
        return tokens

    def join(self, rows: Sequence[_Row], cache: Any, which: Sequence[int]) -> None:
        """Add ``rows``, rows ``which`` of a prefilled ``cache`` (their ``pad`` counted in it), to the batch."""
        if not self.rows and list(which) == list(range(cache.layers[0].rows if self.engine._slots else 1)):
            self.cache = cache
            self.holes = None
            self.rows.extend(rows)
            return
        if not self.rows:  # some rows of the cache ended at their first token: the others, compacted
            self.cache = cache
            self.holes = None
            self.rows.extend(rows)
            for layer in cache.layers:
                index = _torch_index(which, layer.key_buffer.device)
                layer.key_buffer = layer.key_buffer.index_select(0, index)
                layer.value_buffer = layer.value_buffer.index_select(0, index)
                layer.rows = len(which)
                layer.refresh()
            return
        new = cache.layers[0].length
        length = self.cache.layers[0].length
        shift = max(0, new - length)  # the batch's rows move right: the new ones are longer
        offset = max(0, length - new)  # the new rows move right: the batch is longer
        remaining = max(r.request.max_new_tokens - len(r.tokens) for r in [*self.rows, *rows])
        count = len(self.rows)
        total = count + len(rows)
        index = _torch_index(which, cache.layers[0].key_buffer.device)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            rows_room, slots_room = mine.key_buffer.shape[0], mine.key_buffer.shape[2]
            slots = max(length, new) + remaining
            if shift or total > rows_room or slots > slots_room:
                mine.resize(max(rows_room, min(2 * rows_room, self.engine.max_batch_size), total),
                            max(slots_room, slots), shift)
            end = mine.length
            mine.key_buffer[count:total, :, end - new:end] = theirs.key_buffer.index_select(0, index)[:, :, :new]
            mine.value_buffer[count:total, :, end - new:end] = theirs.value_buffer.index_select(0, index)[:, :, :new]
            mine.rows = total
            mine.refresh()
        if self.holes is not None:  # follow the rows' shift; the new rows have none
            buffer = self.cache.layers[0].key_buffer
            holes = self.holes.new_zeros((buffer.shape[0], buffer.shape[2]))
            holes[:count, shift:shift + length] = self.holes[:count, :length]
            self.holes = holes
        if shift:
            for r in self.rows:
                r.pad += shift
        for r in rows:
            r.pad += offset
        self.rows.extend(rows)

    def leave(self, indices: Sequence[int]) -> None:
        """Take the rows at ``indices`` out (the last row moves into each freed slot)."""
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if self.engine._slots:
                for layer in self.cache.layers:
                    if i != last:
                        layer.key_buffer[i, :, :layer.length] = layer.key_buffer[last, :, :layer.length]
                        layer.value_buffer[i, :, :layer.length] = layer.value_buffer[last, :, :layer.length]
                    layer.rows = last
                    layer.refresh()
                if self.holes is not None:
                    if i != last:
                        self.holes[i] = self.holes[last]
                    self.holes[last] = False
            self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.cache = None
            self.holes = None
        elif self.engine._slots:
            self._trim()

    def _trim(self) -> None:
        """Cut the leading slots that are padding in every row, when they are a quarter of the cache or more (with
        holes: ``_compact``, when the slots the fullest row does not use are)."""
        if self.holes is not None:
            self._compact()
            return
        lead = min(r.pad for r in self.rows)
        length = self.cache.layers[0].length
        if lead < self.TRIM_FROM or 4 * lead < length:
            return
        for layer in self.cache.layers:
            rows = layer.rows
            layer.key_buffer[:rows, :, : length - lead] = layer.key_buffer[:rows, :, lead:length].clone()
            layer.value_buffer[:rows, :, : length - lead] = layer.value_buffer[:rows, :, lead:length].clone()
            layer.length = length - lead
            layer.refresh()
        for r in self.rows:
            r.pad -= lead

    def _compact(self) -> None:
        """Pack each row's kept slots (not padding, not holes) to the right end of the cache, when the slots the
        fullest row does not use are at least ``TRIM_FROM`` and a quarter of the cache; the holes are then gone.

        A row's kept slots number its ``position`` (prompt and tokens fed). After packing, row ``i`` holds them in
        the last ``position_i`` slots of ``max(position)``, in order, and its padding is the rest.
        """
        import torch

        length = self.cache.layers[0].length
        longest = max(r.position for r in self.rows)
        waste = length - longest
        if waste < self.TRIM_FROM or 4 * waste < length:
            return
        rows = len(self.rows)
        device = self.holes.device
        slots = torch.arange(length, device=device)
        pads = torch.tensor([r.pad for r in self.rows], device=device)
        used = (slots.unsqueeze(0) >= pads.unsqueeze(1)) & ~self.holes[:rows, :length]
        # a stable sort puts each row's unused slots first and its used ones after them, in order
        order = torch.sort(used.to(torch.int8), dim=1, stable=True).indices[:, length - longest:]
        for layer in self.cache.layers:
            layer.compact(order, longest)
        self.holes.zero_()
        for r in self.rows:
            r.pad = longest - r.position

    def _holes(self, slots: int) -> Any:
        """The hole mask with room for the batch's rows and ``slots`` slots (made, or grown, with no holes)."""
        import torch

        buffer = self.cache.layers[0].key_buffer
        rows = buffer.shape[0]
        holes = self.holes
        if holes is None or holes.shape[0] < rows or holes.shape[1] < slots:
            width = max(slots, buffer.shape[2], 0 if holes is None else holes.shape[1])
            grown = torch.zeros((max(rows, 0 if holes is None else holes.shape[0]), width), dtype=torch.bool,
                                device=buffer.device)
            if holes is not None:
                grown[: holes.shape[0], : holes.shape[1]] = holes
            self.holes = holes = grown
        return holes

    def _drafts(self) -> list[list[int]]:
        """Each row's draft tokens for this step (``miniatures.drafts``), at most its ``draft_limit`` and what its
        ``max_new_tokens`` leaves room for.

        A row's limit follows transformers' "heuristic" schedule of assisted generation
        (``num_assistant_tokens_schedule``): 2 more after a step that kept all its drafts, 1 fewer (at least 1)
        after one that did not, between 1 and ``speculative_tokens``. Every verified token costs compute in the
        forward pass (at 8 rows and 9 tokens a row the matrix products dominate a step), so a row whose drafts
        keep failing asks for fewer.
        """
        engine = self.engine
        k = engine.speculative_tokens
        n_max, n_min = engine.draft_ngram
        out: list[list[int]] = []
        for r in self.rows:
            source = r.drafts
            if source is None:
                source = r.drafts = DraftSource(r.request.input_ids, engine.draft_store, r.request.adapter, n_max,
                                                n_min)
            limit = k if r.draft_limit < 0 else r.draft_limit
            out.append(source.propose(r.tokens, min(limit, r.request.max_new_tokens - len(r.tokens) - 1),
                                      engine._stops))
        return out

    def step(self) -> list[tuple[_Request, Generation]]:
        """One decoding step of every row; returns the answers of the rows it ended (they leave the batch).

        With ``speculative_tokens`` and a draft for some row, the step verifies drafts (``_speculate``).
        """
        import torch

        engine = self.engine
        gone = [i for i, r in enumerate(self.rows) if r.request.future is not None and r.request.future.done()]
        if gone:  # cancelled callers
            self.leave(gone)
            if not self.rows:
                return []
        started = time.perf_counter()
        if engine.speculative_tokens:
            drafts = self._drafts()
            if any(drafts):
                return self._speculate(drafts, started)
        rows = self.rows
        device = engine.device
        tokens_in = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
        positions = torch.tensor([[r.position] for r in rows], device=device)
        mask = self._mask(1)
        scores = engine._forward(tokens_in, mask, positions, self.cache, [r.request.adapter for r in rows])
        for r in rows:
            r.position += 1
        chosen = self.choose(rows, scores)
        ended = [i for i, (r, token) in enumerate(zip(rows, chosen, strict=True)) if engine._advance(r, token)]
        done = [(rows[i].request, engine._answer(rows[i])) for i in ended]
        if ended:
            self.leave(ended)
        engine.decode_steps += 1
        engine.decode_rows += len(rows)
        engine.decode_s += time.perf_counter() - started
        return done

    def _mask(self, new: int) -> Any:
        """The attention mask (rows, slots + ``new``) of a step writing ``new`` slots per row: padding and holes
        masked; None when nothing is."""
        import torch

        rows = self.rows
        pads = [r.pad for r in rows]
        if not any(pads) and self.holes is None:
            return None
        length = self.cache.layers[0].length
        device = self.engine.device
        slots = torch.arange(length + new, device=device)
        mask = slots.unsqueeze(0) >= torch.tensor(pads, device=device).unsqueeze(1)
        if self.holes is not None:
            mask &= ~self._holes(length + new)[: len(rows), : length + new]
        return mask

    def _speculate(self, drafts: list[list[int]], started: float) -> list[tuple[_Request, Generation]]:
        """A speculative step: each row's last token and its drafts in one forward pass; each row keeps its drafts
        while they are the tokens it picks, then the token it picks where they differ (or after the last).

        A row picks position ``j``'s token as a one-token step would: argmax of the logits after its grammar's mask
        at that position (``GrammarLogitsProcessor.fill_drafts``: the mask after its drafts before ``j``), or, when it
        samples, its own seeded draw from its processed distribution (``SeededSampler.probabilities``,
        ``miniatures.sampling.draw``), one draw per token it keeps. A draft is kept when the token picked equals
        it, so with a sampling row a draft ``x`` is kept with probability ``p(x)`` and otherwise the token comes
        from ``p`` without ``x``, renormalised: the speculative-sampling rule for a draft that is a point mass
        (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", arXiv 2211.17192;
        Chen et al. 2023, arXiv 2302.01318), which leaves the answer's distribution exactly the non-speculative
        one. Because the draw at each token does not depend on the drafts, the answer is the one the row gets
        without speculation from the same seed, whatever its drafts or batch, up to floating-point ties between
        the logits of a one-token and a multi-token forward pass (different matrix shapes round differently).
        """
        import torch

        engine = self.engine
        rows = self.rows
        device = engine.device
        matchers = [r.matcher for r in rows]
        constrained: list[int] = []
        if any(m is not None for m in matchers):
            self._grammar = self._grammar or engine.grammar_processor([], 0)
            drafts, constrained = self._grammar.fill_drafts(matchers, drafts)
        width = 1 + max(len(d) for d in drafts)
        tokens_in = torch.tensor([[r.tokens[-1], *d, *[r.tokens[-1]] * (width - 1 - len(d))]
                                  for r, d in zip(rows, drafts, strict=True)], device=device)
        positions = (torch.tensor([r.position for r in rows], device=device).unsqueeze(1)
                     + torch.arange(width, device=device).unsqueeze(0))
        length = self.cache.layers[0].length
        mask = self._mask(width)  # None: nothing masked (transformers' causal mask over the new slots alone)
        logits = engine._forward(tokens_in, mask, positions, self.cache, [r.request.adapter for r in rows],
                                 keep=width)
        starts: list[int] = []
        flat_rows: list[int] = []
        for i, d in enumerate(drafts):
            starts.append(len(flat_rows))
            flat_rows.extend(i * width + j for j in range(len(d) + 1))
        vocab = logits.shape[-1]
        scores = logits.reshape(-1, vocab)
        if len(flat_rows) != scores.shape[0]:
            scores = scores[torch.tensor(flat_rows, device=device)]
        if constrained:
            assert self._grammar is not None
            self._grammar.apply_drafts(scores, constrained)
        greedy: list[int] = scores.argmax(dim=-1).tolist()
        sampled = [r.request.sampling if r.generator is not None else None
                   for r, d in zip(rows, drafts, strict=True) for _ in range(len(d) + 1)]
        probs: Any = None
        usable: list[bool] = []
        where: list[int] = []  # flat position -> its row in probs
        if any(s is not None for s in sampled):
            probs, usable = SeededSampler(sampled, [None] * len(sampled)).probabilities(scores)
            count = 0
            for s in sampled:
                where.append(count)
                count += s is not None
        kept: list[int] = []
        ended: list[int] = []
        for i, (r, d) in enumerate(zip(rows, drafts, strict=True)):
            accepted = 0
            finished = False
            for j in range(len(d) + 1):
                f = starts[i] + j
                if r.generator is not None and usable[where[f]]:
                    token = draw(probs[where[f]], r.generator)
                else:
                    token = greedy[f]
                finished = engine._advance(r, token)
                if finished or j == len(d) or token != d[j]:
                    break
                accepted += 1
            kept.append(accepted)
            if d:
                limit = engine.speculative_tokens if r.draft_limit < 0 else r.draft_limit
                r.draft_limit = (min(engine.speculative_tokens, limit + 2) if accepted == len(d)
                                 else max(1, limit - 1))
            if finished:
                ended.append(i)
            else:
                r.position += 1 + accepted
            stats = engine.draft_stats.setdefault(r.request.adapter, [0, 0, 0])
            stats[0] += len(d)
            stats[1] += accepted
            stats[2] += 1 if d else 0
            engine.drafted_tokens += len(d)
            engine.accepted_tokens += accepted
        if width > 1:  # the slots past each row's kept tokens are holes from now on
            holes = self._holes(length + width)
            offsets = torch.arange(width, device=device).unsqueeze(0)
            rejected = offsets > torch.tensor(kept, device=device).unsqueeze(1)
            holes[: len(rows), length:length + width] = rejected
        done = [(rows[i].request, engine._answer(rows[i])) for i in ended]
        if ended:
            self.leave(ended)
        elif self.holes is not None:
            self._compact()
        engine.decode_steps += 1
        engine.decode_rows += len(rows)
        engine.decode_s += time.perf_counter() - started
        return done


# ---------------------------------------------------------------------- JSON repair


def _closers(stack: Sequence[str]) -> str:
    return "".join(reversed(stack))


def _repair_from(text: str, start: int) -> tuple[str | None, int]:
    """Repair the JSON object that starts at ``text[start] == "{"``.

    Returns:
        ``(repaired text or None, where to look for the next start)``; the next start is ``len(text)``
        when the object runs to the end (an object nested in it is no answer of its own).
    """
    out: list[str] = []
    stack: list[str] = []
    cuts: list[tuple[int, tuple[str, ...]]] = []  # (length of out, open containers) where a cut is safe
    in_string = escaped = False

    def safe_cut() -> None:
        # Only where nothing half-written would survive: inside an array, or at the top level.
        if stack and (stack[-1] == "]" or len(stack) == 1):
            cuts.append((len(out), tuple(stack)))

    for pos in range(start, len(text)):
        ch = text[pos]
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                safe_cut()
            continue
        if ch == '"':
            in_string = True
            out.append(ch)
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
            out.append(ch)
            safe_cut()
        elif ch in "}]":
            if not stack or stack[-1] != ch:
                return None, pos + 1
            j = len(out) - 1
            while j >= 0 and out[j] in " \t\r\n":
                j -= 1
            if j >= 0 and out[j] == ",":  # a trailing comma: drop it
                del out[j]
            stack.pop()
            out.append(ch)
            if not stack:
                candidate = "".join(out)
                return (candidate if _is_object(candidate) else None), pos + 1
            safe_cut()
        elif ch == ",":
            safe_cut()
            out.append(ch)
        else:
            out.append(ch)
    body = "".join(out)
    for length, open_stack in reversed(cuts):
        candidate = body[:length].rstrip().rstrip(",") + _closers(open_stack)
        if _is_object(candidate):
            return candidate, len(text)
    return None, len(text)


def _has_value(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_value(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_value(v) for v in value)
    return True


def _is_object(text: str) -> bool:
    """``text`` parses as a JSON object holding at least one scalar (an empty shell is no answer)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and _has_value(value)


def repair_json(text: str, *, max_starts: int = 16) -> str:
    """Cheap, safe repair of a model's JSON object answer; never invents content.

    Steps: a text that already parses as JSON is returned unchanged. Otherwise each ``{`` (the first
    ``max_starts``) is tried in turn as the start of the object:

    - a balanced object is cut out of the surrounding prose or code fence (trailing commas before
      ``}``/``]`` are dropped) and returned if it parses;
    - an object cut short (``max_new_tokens`` reached) is cut back to its last complete array element
      or top-level field and its open brackets are closed. A string, number or object left half-written
      is dropped rather than closed, so a truncated value (``"San Fran``) never passes as a fact.

    A result without any scalar value (``{}``, ``{"facts": []}``) is not returned: the text is left as
    it was, so that a broken answer still fails parsing and the agent retries, instead of passing as an
    empty but valid answer.

    Written for this project (no dependency); the policy is stricter than ``json-repair`` on PyPI, which
    also closes open strings and fills missing values.

    Args:
        text: the model's answer.
        max_starts: how many ``{`` positions to try (bounds the work at O(max_starts * len(text))).

    Returns:
        The repaired JSON object text, or ``text`` unchanged when it parses already or cannot be repaired.
    """
    try:
        json.loads(text)
        return text
    except ValueError:
        pass
    start = text.find("{")
    tries = 0
    while start != -1 and tries < max_starts:
        repaired, after = _repair_from(text, start)
        if repaired is not None:
            return repaired
        tries += 1
        start = text.find("{", after)
    return text


# ---------------------------------------------------------------------- chat model


def _to_chat(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    chat: list[dict[str, Any]] = []
    for message in convert_to_openai_messages(list(messages)):
        content = message.get("content", "")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        chat.append({"role": message["role"], "content": content or ""})
    return chat


def _cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class LocalMiniatureChatModel(BaseChatModel):
    """A registered miniature (one adapter on a shared ``LocalEngine``) behind the chat-model interface.

    ``invoke``/``ainvoke`` render the messages with the base tokenizer's chat template and decode
    greedily; ``ainvoke`` calls from concurrent runs are batched by the engine. The ``AIMessage``
    carries ``usage_metadata`` with exact tokenizer counts (``input_tokens`` = prompt tokens) and
    ``response_metadata`` ``{"model_name": "miniature:<name>@<version>", "finish_reason": ...,
    "json_repaired": bool}``. With ``repair_json`` on, an answer that is not valid JSON goes through
    ``repair_json`` (cut to the object, close what truncation left open) before it is returned.
    The agents pass their typed task (``ainvoke(messages, task=task)``): its answer grammar
    (``miniatures.grammar``) constrains the answer, and with ``answer_format="sentence-tags"``
    (``miniatures.formats``) an extraction task is split into one prompt per numbered sentence, the sentences
    are tagged in one batch and the answer is the assembled extraction JSON (usage summed over the sentence
    prompts). With ``answer_format="writer-brief"`` a writing task is asked as its brief
    (``miniatures.formats.brief_messages``), held to the email grammar with the offer tags, and the offer tags of
    the answer are written out (``expand_offer_tags``), so the agent gets its own JSON. Without a task the chat is
    answered as it is, unconstrained. A miniature trained with ``system_prompt=False`` is asked without the
    system messages. A writer trained with ``email_grammar="craft"``
    (``craft_grammar``) is held to ``miniatures.grammar.craft_email_grammar`` instead of the email format alone.

    Raises (from ``invoke``/``ainvoke``):
        ValueError: the adapter is not loaded, or the prompt does not fit the model's context.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: LocalEngine = Field(exclude=True)
    adapter: str
    model_name: str = ""
    max_new_tokens: int | None = None
    repair_json: bool = True
    answer_format: str = "json"
    craft_grammar: bool = False
    system_prompt: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "miniature"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._name(), "adapter": self.adapter, "base_model": self.engine.base_model}

    def _name(self) -> str:
        return self.model_name or f"miniature:{self.adapter}"

    def _result(self, generation: Generation, stop: list[str] | None) -> ChatResult:
        text = _cut_at_stop(generation.text, stop)
        repaired = repair_json(text) if self.repair_json and "{" in text else text
        usage = {
            "input_tokens": generation.input_tokens,
            "output_tokens": generation.output_tokens,
            "total_tokens": generation.input_tokens + generation.output_tokens,
        }
        message = AIMessage(
            content=repaired,
            usage_metadata=usage,  # type: ignore[arg-type]
            response_metadata={
                "model_name": self._name(),
                "finish_reason": generation.finish_reason,
                "json_repaired": repaired != text,
                "latency_ms": generation.latency_ms,
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        max_new = kwargs.get("max_new_tokens", self.max_new_tokens)
        answer = self.answer_sync(_to_chat(messages), max_new_tokens=max_new, task=_task(kwargs),
                                  grammar=kwargs.get("grammar"), **_decoding(kwargs))
        return self._result(answer, stop)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        max_new = kwargs.get("max_new_tokens", self.max_new_tokens)
        answer = await self.answer(_to_chat(messages), max_new_tokens=max_new, task=_task(kwargs),
                                   grammar=kwargs.get("grammar"), **_decoding(kwargs))
        return self._result(answer, stop)

    def answer_sync(self, chat: Sequence[Mapping[str, Any]], *, max_new_tokens: int | None = None,
                    task: ExtractionTask | WritingTask | None = None, grammar: str | None = None,
                    temperature: float | None = None, top_p: float | None = None,
                    seed: int | None = None, min_p: float | None = None) -> Generation:
        """The miniature's answer to ``chat`` (OpenAI-format messages) in its answer format, blocking.

        Args:
            chat: the messages.
            max_new_tokens: cap on generated tokens (default: the model's, else the engine's).
            task: the typed task the chat asks for; its answer grammar constrains the answer (when the engine
                is ``constrained``) and, with ``answer_format="sentence-tags"``, an extraction task is split
                into its sentences.
            grammar: a Lark grammar to hold the answer to instead of the task's (a server request's own).
            temperature, top_p, min_p: sampling of a whole answer (default: the model's ``temperature``, ``top_p``,
                ``min_p``; temperature 0 is greedy). Sentence-tag prompts are always greedy.
            seed: the sampling seed (default: ``miniatures.sampling.prompt_seed`` of the chat, so the same
                request gets the same answer).

        Raises:
            ValueError: see ``LocalEngine.generate_sync``; ``GrammarError`` for a grammar that does not compile.
        """
        split = self._split(task)
        if split is None:
            asked = self._asked(chat, task)
            return self._expanded(self.engine.generate_sync(self.adapter, asked, max_new_tokens=max_new_tokens,
                                                            grammar=self._grammar(task, grammar),
                                                            sampling=self._sampling(asked, temperature, top_p, seed,
                                                                                    min_p)),
                                  task)
        return _assembled(split, [
            self.engine.generate_sync(self.adapter, sentence_messages(split.company, s.source_url, s.text),
                                      max_new_tokens=_TAG_TOKENS, grammar=self._tag_grammar(s.text, split))
            for s in split.sentences])

    async def answer(self, chat: Sequence[Mapping[str, Any]], *, max_new_tokens: int | None = None,
                     task: ExtractionTask | WritingTask | None = None, grammar: str | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     seed: int | None = None, min_p: float | None = None) -> Generation:
        """The miniature's answer to ``chat`` in its answer format; the requests are batched by the engine.

        Same arguments as ``answer_sync``.

        Raises:
            ValueError: see ``LocalEngine.generate``; ``GrammarError`` for a grammar that does not compile.
        """
        split = self._split(task)
        if split is None:
            asked = self._asked(chat, task)
            return self._expanded(await self.engine.generate(self.adapter, asked, max_new_tokens=max_new_tokens,
                                                             grammar=self._grammar(task, grammar),
                                                             sampling=self._sampling(asked, temperature, top_p, seed,
                                                                                     min_p)),
                                  task)
        return _assembled(split, await asyncio.gather(*(
            self.engine.generate(self.adapter, sentence_messages(split.company, s.source_url, s.text),
                                 max_new_tokens=_TAG_TOKENS, grammar=self._tag_grammar(s.text, split))
            for s in split.sentences)))

    def _asked(self, chat: Sequence[Mapping[str, Any]],
               task: ExtractionTask | WritingTask | None = None) -> Sequence[Mapping[str, Any]]:
        """``chat`` as the miniature was trained to see it: a ``writer-brief`` writer gets the brief of its writing
        task (``miniatures.formats.brief_messages``) instead; otherwise without system messages when trained so."""
        if self.answer_format == WRITER_BRIEF and isinstance(task, WritingTask):
            return brief_messages(task)
        return chat if self.system_prompt else [m for m in chat if m.get("role") != "system"]

    def _expanded(self, generation: Generation, task: ExtractionTask | WritingTask | None) -> Generation:
        """A ``writer-brief`` answer with its offer tags written out (``miniatures.formats.expand_offer_tags``):
        the agent's JSON; any other answer as it is."""
        if self.answer_format != WRITER_BRIEF or not isinstance(task, WritingTask):
            return generation
        return dataclasses.replace(generation, text=expand_offer_tags(generation.text, task))

    def _sampling(self, chat: Sequence[Mapping[str, Any]], temperature: float | None, top_p: float | None,
                  seed: int | None, min_p: float | None = None) -> RowSampling | None:
        """The request's sampling (None: greedy): the call's settings, else the model's; seeded by the chat."""
        temp = self.temperature if temperature is None else temperature
        if temp <= 0:
            return None
        if seed is None:
            seed = prompt_seed(json.dumps([[m.get("role"), m.get("content")] for m in chat], ensure_ascii=False))
        return RowSampling(temperature=temp, top_p=self.top_p if top_p is None else top_p, seed=seed,
                           min_p=self.min_p if min_p is None else min_p)

    def _grammar(self, task: ExtractionTask | WritingTask | None, grammar: str | None) -> str | None:
        """The grammar of one whole answer: the one given, else the task's when the engine is constrained (with
        ``craft_grammar``, an email's with the rules of craft, ``miniatures.grammar.craft_email_grammar``)."""
        if grammar is not None:
            return grammar
        if task is None or not self.engine.constrained:
            return None
        if self.answer_format == WRITER_BRIEF and isinstance(task, WritingTask) and not self.craft_grammar:
            return email_grammar(task, tuple(offer_tag_values(task)))
        return answer_grammar(task, craft=self.craft_grammar)

    def prompts(self, chat: Sequence[Mapping[str, Any]],
                task: ExtractionTask | WritingTask | None = None) -> list[Sequence[Mapping[str, Any]]]:
        """The prompts this miniature reads to answer ``chat`` with ``task``, as ``answer`` feeds them: one per
        sentence of an extraction task in the ``sentence-tags`` format, else the one chat as trained (``_asked``:
        a ``writer-brief`` writer's brief, or the chat without system messages when trained so). For counting a
        request's prompt tokens (``miniatures.server``)."""
        split = self._split(task)
        if split is None:
            return [self._asked(chat, task)]
        return [sentence_messages(split.company, s.source_url, s.text) for s in split.sentences]

    def _split(self, task: ExtractionTask | WritingTask | None) -> ExtractionTask | None:
        """The extraction task to split into sentence prompts, or None to answer the chat as it is."""
        if self.answer_format != "sentence-tags" or not isinstance(task, ExtractionTask) or not task.sentences:
            return None
        return task

    def _tag_grammar(self, sentence: str, task: ExtractionTask) -> str | None:
        return tag_grammar(sentence, task.field_names) if self.engine.constrained else None


def _task(kwargs: Mapping[str, Any]) -> ExtractionTask | WritingTask | None:
    """The ``task`` keyword of a chat-model call (``model.ainvoke(messages, task=task)``), checked.

    Raises:
        TypeError: ``task`` is given but is not a typed task.
    """
    task = kwargs.get("task")
    if task is None or isinstance(task, ExtractionTask | WritingTask):
        return task
    raise TypeError(f"task must be a core.tasks.ExtractionTask or WritingTask, got {type(task).__name__}")


def _decoding(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling keywords of a chat-model call (``temperature``, ``top_p``, ``min_p``, ``seed``) that were given."""
    return {k: kwargs[k] for k in ("temperature", "top_p", "min_p", "seed") if kwargs.get(k) is not None}


def _assembled(task: ExtractionTask, tagged: Sequence[Generation]) -> Generation:
    """One ``Generation`` for a split extraction: the assembled JSON, tokens summed, the slowest latency."""
    return Generation(
        text=assemble_extraction([s.id for s in task.sentences], [g.text for g in tagged], task.field_names),
        input_tokens=sum(g.input_tokens for g in tagged),
        output_tokens=sum(g.output_tokens for g in tagged),
        latency_ms=max(g.latency_ms for g in tagged),
        finish_reason="length" if any(g.finish_reason == "length" for g in tagged) else "stop",
    )


def build_miniature_chat_model(
    spec: BackendSpec,
    engine_store: Engine,
    *,
    engines: dict[str, LocalEngine] | None = None,
    device: str | None = None,
    dtype: Any = None,
    max_new_tokens: int = 512,
    num_threads: int | None = None,
    max_batch_size: int = 32,
    writer_temperature: float = WRITER_TEMPERATURE,
    writer_top_p: float = WRITER_TOP_P,
    writer_min_p: float = WRITER_MIN_P,
) -> LocalMiniatureChatModel:
    """Build the chat model of a ``miniature:<name>[@<version>]`` spec from the registry.

    LoRA miniatures on the same base share one ``LocalEngine`` (kept in ``engines`` by base model),
    each adapter loaded under the name ``"<name>@<version>"``; a fully fine-tuned miniature gets an
    engine of its own (kept by its folder) and runs as that engine's base.

    Args:
        spec: a parsed spec of kind ``miniature`` (no version: the latest).
        engine_store: the store holding the registry.
        engines: engines already loaded, by base model (LoRA) or model folder (full); new ones are
            added to it, so pass the same dict to share engines between miniatures.
        device: device of new engines (``None``: CUDA when available).
        dtype: dtype of new engines (``None``: bfloat16 on CUDA, float32 on CPU).
        max_new_tokens: default cap on generated tokens of new engines.
        num_threads: torch CPU threads of new engines (see ``LocalEngine``).
        max_batch_size: most requests per ``generate`` call of new engines (a ``sentence-tags``
            researcher sends one short request per sentence, dozens per prospect).
        writer_temperature, writer_top_p, writer_min_p: sampling of a writer miniature's emails, seeded by each
            prompt so a run is reproducible (temperature 0: greedy). A researcher miniature is always greedy: its
            answers copy spans.

    Raises:
        BackendSpecError: the spec is not of kind ``miniature``.
        MiniatureNotFoundError: no such miniature is registered.
        MiniaturePathError: the registered base, adapter or model folder is gone, moved or stored relative
            (``miniatures.registry.check_miniature_paths``).
    """
    if spec.kind != "miniature":
        raise BackendSpecError(f"{spec.raw or spec.kind!r} is not a miniature spec (miniature:<name>[@<version>])")
    record = get_miniature(engine_store, spec.model, spec.version)
    check_miniature_paths(record)
    label = f"{record.name}@{record.version}"
    folder = Path(record.adapter_path)
    pool = engines if engines is not None else {}
    key = record.base_model if record.method == "lora" else str(folder)
    engine = pool.get(key)
    if engine is None:
        engine = LocalEngine(key, device=device, dtype=dtype, max_new_tokens=max_new_tokens, num_threads=num_threads,
                             max_batch_size=max_batch_size)
        pool[key] = engine
    if record.method == "lora":
        engine.add_adapter(label, folder)
        adapter = label
    else:
        adapter = BASE_ADAPTER
    trained = record.training_config or {}
    writer = record.agent == "writer"
    return LocalMiniatureChatModel(engine=engine, adapter=adapter, model_name=f"miniature:{label}",
                                   answer_format=str(trained.get("answer_format", "json")),
                                   craft_grammar=trained.get("email_grammar") == "craft",
                                   system_prompt=bool(trained.get("system_prompt", True)),
                                   temperature=writer_temperature if writer else 0.0,
                                   top_p=writer_top_p if writer else 1.0,
                                   min_p=writer_min_p if writer else 0.0)
