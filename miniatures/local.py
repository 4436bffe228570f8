"""The ``miniature:<name>[@<version>]`` backend: registered miniatures run in-process (transformers + peft).

One ``LocalEngine`` holds one base model and several LoRA adapters on it, switched by name the way
vLLM serves ``--lora-modules name=path`` (a fully fine-tuned miniature is loaded as its own base).
Concurrent ``generate`` calls are queued and served in batches: a background task collects the
requests that arrive within ``batch_window_ms`` (at most ``max_batch_size``), takes those of the shortest
length class (their ``max_new_tokens`` caps within a factor of two, so a sentence tag never rides with or
waits behind an email) and runs them as one left-padded, greedy ``model.generate`` call, with a KV cache
that writes each token in place (``reserved_cache``), in the engine's own model thread (``run_in_executor``
on a one-thread pool, like ``asyncio.to_thread`` but never queued behind other work), so the event
loop stays free. ``generate_sync`` runs in that same thread, so both paths see the same torch
threading (measured here: on a loaded 2-core machine, generation in the main thread was up to 10x
slower than in a worker thread).
Requests for different adapters share a batch through peft's mixed-adapter batches
(``generate(..., adapter_names=[...])``, peft >= 0.10); when the installed peft refuses that, the
batch is split per adapter. Prompts are rendered with the tokenizer's own chat template
(``apply_chat_template(messages, add_generation_prompt=True)``), the same template the miniature
was trained with (DESIGN.md). Decoding is greedy with every setting spelled out
(``LocalEngine.generation_config``), and an answer is held to the Lark grammar of its task
(``miniatures.grammar``, llguidance token masks) when the caller passes one.

Heavy imports (torch, transformers, peft) happen inside functions: importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
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
from miniatures.formats import (
    WRITER_BRIEF,
    assemble_extraction,
    brief_messages,
    expand_offer_tags,
    offer_tag_values,
    sentence_messages,
)
from miniatures.grammar import GrammarLogitsProcessor, answer_grammar, email_grammar, llg_tokenizer, tag_grammar
from miniatures.grammar import matcher as grammar_matcher
from miniatures.registry import check_miniature_paths, get_miniature
from miniatures.sampling import RowSampling, SeededSampler, prompt_seed
from miniatures.specs import BackendSpec, BackendSpecError

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "BASE_ADAPTER",
    "AdapterPathError",
    "Generation",
    "LocalEngine",
    "LocalMiniatureChatModel",
    "build_miniature_chat_model",
    "repair_json",
    "reserved_cache",
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
#: the distribution it learned from the teacher's varied emails keeps the variety (measured with the rubric's
#: campaign checks, ``evals.rubric``); the grammar still holds every token to valid JSON and listed merge tags.
WRITER_TEMPERATURE = 0.7
WRITER_TOP_P = 0.9


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
    future: asyncio.Future[Generation] | None = None
    passed_over: int = 0  # batches that went before it although it was waiting (see LocalEngine._take_batch)


@dataclass
class _LoopState:
    queue: collections.deque[_Request] = field(default_factory=collections.deque)  # arrival order
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None


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
    """A base model with several LoRA adapters, serving batched greedy generation in-process.

    Args:
        base_model: Hugging Face model id or local folder of the base model and its tokenizer (which
            must carry a chat template). For a fully fine-tuned miniature, its own folder.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``...; ``None`` picks CUDA when available.
        dtype: a ``torch.dtype`` or its name; ``None`` gives bfloat16 on CUDA and float32 on CPU.
        max_batch_size: most requests run in one ``generate`` call.
        batch_window_ms: how long the batcher waits after a request for others to join it, ms.
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

    Attributes:
        tokenizer: the base model's tokenizer (left padding).
        generate_calls: how many ``model.generate`` calls have run (for batching statistics).
        requests_served: how many requests have been answered.

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
    ) -> None:
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
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self.generate_calls = 0
        self.requests_served = 0
        self.stop_token_ids = self._stop_ids()
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

    def _generate_ids(self, batch: Sequence[_Request], adapter_names: list[str] | None) -> list[list[int]]:
        """One ``model.generate`` call over ``batch``; returns each row's new tokens (padding stripped)."""
        import torch

        pad = int(self.tokenizer.pad_token_id)
        width = max(len(r.input_ids) for r in batch)
        input_ids = torch.tensor([[pad] * (width - len(r.input_ids)) + r.input_ids for r in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in batch],
                            device=self.device)
        config = self.generation_config(max(r.max_new_tokens for r in batch))
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "generation_config": config}
        kwargs[_cache_keyword(type(self._base))] = reserved_cache(self._base.config, reserve=config.max_new_tokens)
        matchers = [r.matcher for r in batch]
        processors: list[Any] = []
        if any(m is not None for m in matchers):
            processors.append(self.grammar_processor(matchers, width))
        if any(r.sampling is not None for r in batch):  # after the grammar: refused tokens have probability 0
            processors.append(SeededSampler([r.sampling for r in batch]))
        if processors:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names
        started = time.perf_counter()
        with torch.inference_mode():
            out = self._model.generate(**kwargs)
        self.generate_calls += 1
        logger.debug("generate: %d rows, prompt width %d, %d steps (cap %d), grammar rows %d, sampled rows %d, %.0f ms",
                     len(batch), width, out.shape[1] - width, config.max_new_tokens,
                     sum(m is not None for m in matchers), sum(r.sampling is not None for r in batch),
                     (time.perf_counter() - started) * 1000)
        return [row[width:].tolist() for row in out]

    def generation_config(self, max_new_tokens: int) -> Any:
        """The decoding settings of every ``generate`` call: greedy, spelled out.

        transformers fills each setting left unset from the base's own ``generation_config`` (Qwen2.5
        Instruct ships ``repetition_penalty`` 1.1 and ``do_sample`` with top-k/top-p), so every setting that
        could change a greedy answer is given: no sampling (transformers then applies no temperature, top-k or
        top-p warper), one beam, no repetition penalty, no n-gram ban, no minimum length (``min_new_tokens=0``, which
        takes precedence over any ``min_length``; giving both makes transformers warn on every call).
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
        are free.

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

    def _run_group(self, batch: Sequence[_Request], adapter: str) -> list[list[int]]:
        from peft import PeftModel

        if not isinstance(self._model, PeftModel):
            return self._generate_ids(batch, None)
        if adapter == BASE_ADAPTER:
            with self._model.disable_adapter():
                return self._generate_ids(batch, None)
        self._model.set_adapter(adapter)
        return self._generate_ids(batch, None)

    def _run_batch(self, batch: Sequence[_Request]) -> list[Generation]:
        """Run ``batch`` (blocking): one ``generate`` call, or one per adapter when mixing is unsupported."""
        with self._lock:
            names = [r.adapter for r in batch]
            rows: list[list[int]] | None = None
            if len(set(names)) == 1:
                rows = self._run_group(batch, names[0])
            elif self._mixed_batches is not False:
                try:
                    rows = self._generate_ids(batch, names)
                    self._mixed_batches = True
                except (TypeError, ValueError) as exc:
                    logger.warning("mixed-adapter batches are not supported here (%s); batching per adapter", exc)
                    self._mixed_batches = False
            if rows is None:
                by_adapter: dict[str, list[int]] = {}
                for i, name in enumerate(names):
                    by_adapter.setdefault(name, []).append(i)
                rows = [[] for _ in batch]
                for name, idx in by_adapter.items():
                    for i, row in zip(idx, self._run_group([batch[i] for i in idx], name), strict=True):
                        rows[i] = row
            self.requests_served += len(batch)
        now = time.perf_counter()
        return [self._finish(r, row, now) for r, row in zip(batch, rows, strict=True)]

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

    def generate_sync(
        self, adapter: str, messages: Sequence[Mapping[str, Any]], *, max_new_tokens: int | None = None,
        grammar: str | None = None, sampling: RowSampling | None = None,
    ) -> Generation:
        """Answer one request now, blocking (no batching with other requests).

        Args:
            adapter: a loaded adapter's name, or ``BASE_ADAPTER`` for the bare base model.
            messages: the chat in OpenAI format, ``[{"role": ..., "content": ...}, ...]``.
            max_new_tokens: cap on generated tokens (default: the engine's).
            grammar: the Lark grammar the answer must follow (``miniatures.grammar``); None: free.
            sampling: draw tokens with this temperature, top-p and seed (``miniatures.sampling``); None: greedy.

        Raises:
            ValueError: unknown adapter, empty messages, or a prompt longer than the model's context.
        """
        request = self._prepare(adapter, messages, max_new_tokens, grammar, sampling)
        if threading.current_thread().name.startswith("miniature-engine"):
            return self._run_batch([request])[0]
        return self._executor.submit(self._run_batch, [request]).result()[0]

    async def generate(
        self, adapter: str, messages: Sequence[Mapping[str, Any]], *, max_new_tokens: int | None = None,
        grammar: str | None = None, sampling: RowSampling | None = None,
    ) -> Generation:
        """Queue one request and await its answer; concurrent requests are batched.

        Same arguments and errors as ``generate_sync``. Greedy decoding, and sampling with a row's own seeded
        generator, make the answer the same as ``generate_sync`` would give (up to floating-point ties),
        whatever it was batched with.
        """
        request = self._prepare(adapter, messages, max_new_tokens, grammar, sampling)
        loop = asyncio.get_running_loop()
        request.future = loop.create_future()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopState()
        state.queue.append(request)
        state.arrived.set()
        if state.worker is None or state.worker.done():
            state.worker = loop.create_task(self._batcher(state), name="miniature-batcher")
        return await request.future

    #: Most batches that may go before a waiting request because their answers are shorter (no request starves).
    MAX_PASSED_OVER = 2

    def _take_batch(self, pending: collections.deque[_Request]) -> list[_Request]:
        """Take the next batch off ``pending`` (arrival order): the requests of the shortest length class.

        A batch runs until its longest row ends, so a request that caps its answer at a few tokens (a sentence tag,
        ``max_new_tokens`` 64) must not ride with, or wait behind, one capped at hundreds (an email). The class of a
        request is its ``max_new_tokens`` cap: the batch is the waiting requests capped at most twice the smallest cap
        waiting (up to ``max_batch_size``, oldest first). A request passed over ``MAX_PASSED_OVER`` times goes next
        with its own class, so long answers are delayed by short ones at most that many batches.
        """
        oldest = pending[0]
        if oldest.passed_over >= self.MAX_PASSED_OVER:
            limit = 2 * oldest.max_new_tokens
            floor = oldest.max_new_tokens // 2
        else:
            limit = 2 * min(r.max_new_tokens for r in pending)
            floor = 0
        batch: list[_Request] = []
        kept: list[_Request] = []
        for request in pending:
            if len(batch) < self.max_batch_size and floor <= request.max_new_tokens <= limit:
                batch.append(request)
            else:
                kept.append(request)
        passed = batch[-1].started
        for request in kept:
            if request.started < passed:
                request.passed_over += 1
        pending.clear()
        pending.extend(kept)
        return batch

    async def _batcher(self, state: _LoopState) -> None:
        """Collect requests into batches and run them until none is waiting, then exit.

        After the first request of a batch arrives the batcher waits up to ``batch_window_ms`` for others (or until
        ``max_batch_size`` are waiting), then runs the shortest length class first (``_take_batch``).
        """
        queue = state.queue
        loop = asyncio.get_running_loop()
        window_s = self.batch_window_ms / 1000.0
        batch: list[_Request] = []
        try:
            while queue:
                deadline = queue[0].started + window_s
                while len(queue) < self.max_batch_size:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    state.arrived.clear()
                    try:
                        await asyncio.wait_for(state.arrived.wait(), remaining)
                    except TimeoutError:
                        break
                batch = self._take_batch(queue)
                live = [r for r in batch if r.future is not None and not r.future.done()]
                if not live:
                    continue
                try:
                    results = await loop.run_in_executor(self._executor, self._run_batch, live)
                except Exception as exc:  # noqa: BLE001 - handed to each waiting caller
                    for r in live:
                        if r.future is not None and not r.future.done():
                            r.future.set_exception(exc)
                    continue
                for r, result in zip(live, results, strict=True):
                    if r.future is not None and not r.future.done():
                        r.future.set_result(result)
                batch = []
        finally:
            # Cancelled (loop shutting down) or crashed: nobody may wait forever.
            pending = batch + list(queue)
            queue.clear()
            for r in pending:
                if r.future is not None and not r.future.done():
                    r.future.set_exception(RuntimeError("the miniature batcher stopped before answering"))


# ---------------------------------------------------------------------- KV cache


_CACHE_KEYWORDS: dict[Any, str] = {}


def _cache_keyword(model_class: Any) -> str:
    """The keyword ``generate`` takes a cache under: ``cache`` (newer transformers 5) or ``past_key_values``.

    Read from the model class's own ``forward`` signature (``generate`` takes either under ``**kwargs``), once.
    """
    import inspect

    if model_class not in _CACHE_KEYWORDS:
        names = inspect.signature(model_class.forward).parameters
        _CACHE_KEYWORDS[model_class] = "cache" if "cache" in names else "past_key_values"
    return _CACHE_KEYWORDS[model_class]


@functools.cache
def _reserved_layer_class() -> type:
    """``ReservedLayer``: transformers' ``DynamicLayer`` writing new keys and values in place (made on first use)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):  # type: ignore[misc]
        """A full-attention cache layer with room reserved for the tokens still to come.

        ``DynamicLayer`` concatenates every step's key and value onto the whole cache, a copy of the cache per token
        and layer (measured here: half of a decoding step of the 1.7M-parameter demo miniature at 8 rows and 600 prompt
        tokens). This layer allocates its buffers ``(batch, kv heads, prompt + reserve, head dim)`` at the first update,
        writes each new token in place and hands attention a view of the filled part, so a step costs what attention
        itself reads; past the reserve the buffers double. Values are bit-for-bit those of ``DynamicLayer``.
        """

        def __init__(self, reserve: int) -> None:
            super().__init__()
            self.reserve = reserve
            self._length = 0
            self._key_buffer: Any = None
            self._value_buffer: Any = None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            n = key_states.shape[-2]
            if self._key_buffer is None:
                self.is_initialized = True
                self.device = key_states.device
                self._key_buffer = self._allocate(key_states, n + self.reserve)
                self._value_buffer = self._allocate(value_states, n + self.reserve)
            elif self._length + n > self._key_buffer.shape[-2]:
                room = max(self._length + n, 2 * self._key_buffer.shape[-2])
                self._key_buffer = self._grown(self._key_buffer, room)
                self._value_buffer = self._grown(self._value_buffer, room)
            end = self._length + n
            self._key_buffer[:, :, self._length:end] = key_states
            self._value_buffer[:, :, self._length:end] = value_states
            self._length = end
            self.keys = self._key_buffer[:, :, :end]
            self.values = self._value_buffer[:, :, :end]
            return self.keys, self.values

        @staticmethod
        def _allocate(like: Any, length: int) -> Any:
            return like.new_empty((like.shape[0], like.shape[1], length, like.shape[3]))

        def _grown(self, buffer: Any, length: int) -> Any:
            grown = self._allocate(buffer, length)
            grown[:, :, : self._length] = buffer[:, :, : self._length]
            return grown

        def _reindex(self, select: Any) -> None:
            if self._key_buffer is not None:
                self._key_buffer = select(self._key_buffer)
                self._value_buffer = select(self._value_buffer)
                self.keys = self._key_buffer[:, :, : self._length]
                self.values = self._value_buffer[:, :, : self._length]

        def reset(self) -> None:
            super().reset()
            self._length = 0
            self._key_buffer = self._value_buffer = None

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            if self.is_initialized and self._key_buffer is not None and self.keys is not None:
                self._length = int(self.keys.shape[-2])

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._reindex(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: Any) -> None:
            self._reindex(lambda t: t[indices, ...])

        def reorder_cache(self, beam_idx: Any) -> None:
            self._reindex(lambda t: t.index_select(0, beam_idx.to(t.device)))

    return ReservedLayer


def reserved_cache(config: Any, reserve: int) -> Any:
    """A transformers ``DynamicCache`` for ``config`` whose full-attention layers reserve room for ``reserve`` tokens.

    Sliding-window and other special layers keep transformers' own classes. See ``_reserved_layer_class``.

    Args:
        config: the model's config (its text config is used).
        reserve: tokens to reserve past the prompt (the call's ``max_new_tokens``).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layer_class = _reserved_layer_class()
    cache: Any = DynamicCache(config=config.get_text_config(decoder=True))
    if cache.layers:
        cache.layers = [layer_class(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:  # layers made lazily, one per model layer
        cache.layer_class_to_replicate = functools.partial(layer_class, reserve)
    return cache


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
                    seed: int | None = None) -> Generation:
        """The miniature's answer to ``chat`` (OpenAI-format messages) in its answer format, blocking.

        Args:
            chat: the messages.
            max_new_tokens: cap on generated tokens (default: the model's, else the engine's).
            task: the typed task the chat asks for; its answer grammar constrains the answer (when the engine
                is ``constrained``) and, with ``answer_format="sentence-tags"``, an extraction task is split
                into its sentences.
            grammar: a Lark grammar to hold the answer to instead of the task's (a server request's own).
            temperature, top_p: sampling of a whole answer (default: the model's ``temperature``/``top_p``;
                temperature 0 is greedy). Sentence-tag prompts are always greedy.
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
                                                            sampling=self._sampling(asked, temperature, top_p, seed)),
                                  task)
        return _assembled(split, [
            self.engine.generate_sync(self.adapter, sentence_messages(split.company, s.source_url, s.text),
                                      max_new_tokens=_TAG_TOKENS, grammar=self._tag_grammar(s.text, split))
            for s in split.sentences])

    async def answer(self, chat: Sequence[Mapping[str, Any]], *, max_new_tokens: int | None = None,
                     task: ExtractionTask | WritingTask | None = None, grammar: str | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     seed: int | None = None) -> Generation:
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
                                                             sampling=self._sampling(asked, temperature, top_p, seed)),
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
                  seed: int | None) -> RowSampling | None:
        """The request's sampling (None: greedy): the call's settings, else the model's; seeded by the chat."""
        temp = self.temperature if temperature is None else temperature
        if temp <= 0:
            return None
        if seed is None:
            seed = prompt_seed(json.dumps([[m.get("role"), m.get("content")] for m in chat], ensure_ascii=False))
        return RowSampling(temperature=temp, top_p=self.top_p if top_p is None else top_p, seed=seed)

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
    """The sampling keywords of a chat-model call (``temperature``, ``top_p``, ``seed``) that were given."""
    return {k: kwargs[k] for k in ("temperature", "top_p", "seed") if kwargs.get(k) is not None}


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
        writer_temperature, writer_top_p: sampling of a writer miniature's emails, seeded by each prompt so a
            run is reproducible (0: greedy). A researcher miniature is always greedy: its answers copy spans.

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
                                   top_p=writer_top_p if writer else 1.0)
