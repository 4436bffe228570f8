"""Benchmark: local miniature inference, LoRA and full fine-tuning, and decoding against the memory bound.

Measures side by side in one run, on tiny Llama bases built from a config (``finetune.base.bootstrap_base``
on the text of a small demo world, ChatML tokenizer trained on that text; presets ``2m`` and ``10m``):

1. ``miniatures.local.LocalEngine`` generation: tokens/s and requests/min at batch 1 (requests one after
   the other, each ``await engine.generate(...)``) and batched (8 requests gathered with asyncio, which the
   engine decodes together, continuous batching), on the bare base, on one LoRA adapter and with two
   LoRA adapters mixed in one batch. Prompts are writer chats (``agents.writer.build_writer_messages`` over
   demo-world prospects, topped up with a validation-feedback retry turn to about ``--prompt-tokens``);
   greedy decoding with the stop tokens disabled, so every request makes exactly ``--new-tokens`` tokens.
2. Training tokens/s of ``finetune.train.main`` (TRL ``SFTTrainer``), LoRA and full fine-tuning, on a
   synthetic writer chat dataset (``train.jsonl`` of ``{"messages": [...]}`` rows) in a temporary folder.
3. Batch-1 decoding tokens/s against the memory-bandwidth bound: every generated token reads all the
   weights once, so the bound is ``bandwidth / (n_params * bytes per param)`` tokens/s, with the bandwidth
   measured here by a numpy copy of a large array.

Usage: python benchmarks/miniature_speed.py [--smoke] [--quick] [--threads N] [--presets 2m,10m]
       [--baseline-engine OLD_LOCAL_PY] [--prefix-cache-tokens N] [--speculative K]
       [--out benchmarks/results/miniature_speed.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from agents.prompts import FEEDBACK_TEMPLATE  # noqa: E402
from agents.schemas import Fact, Offer, Profile, ProspectInfo  # noqa: E402
from agents.writer import build_writer_messages  # noqa: E402

console = Console()
if not console.is_terminal:  # piped or captured: wide enough for the tables
    console = Console(width=160)

#: Validation errors used to make the retry turn of a writer chat (as ``agents.validation`` words them).
FEEDBACK_ITEMS = (
    "the body has 48 words; write 60 to 160 words",
    "the tag {{fact.revenue}} is not in the list of merge tags; use only the tags given",
    "the call to action is not copied word for word from the offer",
    "the body does not end with the offer's opt-out line",
    "the subject has 71 characters; use at most 60",
    "the email mentions no company fact; use at least one {{fact.<field>}} tag",
)

SUBJECTS = (
    "{{company}} and {{fact.pain_point}}",
    "A thought on {{fact.recent_event}}",
    "Question for {{first_name}} about {{fact.product}}",
    "{{fact.customer_segment}} and your week",
)

OPENERS = (
    "Hi {{first_name}},\n\nI saw that {{company}} {{fact.recent_event}}, congratulations.",
    "Hi {{first_name}},\n\nTeams that sell {{fact.product}} to {{fact.customer_segment}} often tell us about "
    "{{fact.pain_point}}.",
    "Hello {{first_name}},\n\nWith {{fact.employee_count}} people in {{fact.location}}, {{company}} must be "
    "juggling a lot of accounts at once.",
)

MIDDLES = (
    "Most {{title}}s I talk to spend hours every week deciding which accounts deserve attention, and the "
    "answer is usually buried in spreadsheets that nobody has time to update.",
    "When a team grows the way yours has, the accounts that are ready to buy get lost among the ones that "
    "are only browsing, and the people who should close them end up chasing the wrong conversations.",
    "Since {{fact.founded_year}}, {{company}} has built a strong name in {{fact.industry}}, and keeping that "
    "pace usually means cutting the manual work that slows the sales team down.",
)


# ----------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine(threads: int) -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory = f"{mem_gib:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = "unknown"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "cores": f"{os.cpu_count()} (os.cpu_count), {affinity} usable by this process",
        "CPU": _cpu_model(),
        "memory": memory,
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": f"{threads} (torch.set_num_threads; the engine's model thread too)",
        "transformers / peft / trl / numpy": f"{transformers.__version__} / {peft.__version__} / "
                                             f"{trl.__version__} / {np.__version__}",
    }


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (1e9 bytes): best of ``repeats`` ``np.copyto`` of a ``megabytes`` MiB array.

    Counted the STREAM way, read + write (2 x the array size per copy); one thread (numpy copies in one).
    """
    n = megabytes * 2**20 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best / 1e9


# ----------------------------------------------------------------------------------------------- data


@dataclass
class World:
    texts: list[str]
    offer: Offer
    cases: list[tuple[ProspectInfo, Profile]]
    pages: int


def build_world(folder: Path, n_companies: int) -> World:
    """A small demo world: its page texts (tokenizer and base), offer and (prospect, gold profile) pairs."""
    from evals.world import generate_world, load_gold, load_world_prospects
    from finetune.base import corpus_texts
    from graphs.inputs import load_offer
    from tools import Corpus, import_html

    world = folder / "world"
    generate_world(world, n_companies=n_companies, seed=7, heldout_fraction=0.0)
    corpus = Corpus(folder / "corpus.sqlite")
    pages = import_html(world / "sites", corpus, root=world / "sites")
    if hasattr(corpus, "close"):
        corpus.close()
    texts = list(corpus_texts(folder / "corpus.sqlite"))
    gold = load_gold(world)
    cases = []
    for row in load_world_prospects(world):
        company = gold[row["company"]]
        profile = Profile(company=company.company, website=company.website, facts=[
            Fact(field=k, value=v, evidence=v, source_url=company.website) for k, v in company.facts.items()])
        cases.append((ProspectInfo(**row), profile))
    return World(texts=texts, offer=load_offer(world / "offer.toml"), cases=cases, pages=pages)


def tokenizer_texts(world: World, n_chats: int = 100) -> list[str]:
    """Pretraining/tokenizer text: the world's pages plus writer prompts and answers.

    A miniature's base has seen text like its prompts (a real base's tokenizer compresses English
    instructions to about 4 characters per token); without the prompts the tokenizer, trained on the
    pages alone, splits the writer's instructions into almost twice as many tokens.
    """
    from langchain_core.messages import convert_to_openai_messages

    extra: list[str] = []
    for i in range(n_chats):
        prospect, profile = world.cases[i % len(world.cases)]
        extra += [str(m["content"]) for m in
                  convert_to_openai_messages(build_writer_messages(world.offer, prospect, profile))]
        extra.append(_email(random.Random(i), world.offer))
    return world.texts + extra


def _email(rnd: random.Random, offer: Offer, *, short: bool = False) -> str:
    """A merge-tag email as the writer answers (JSON); ``short`` leaves out the middle (a too-short draft)."""
    parts = [rnd.choice(OPENERS)] if short else [rnd.choice(OPENERS), rnd.choice(MIDDLES),
                                                 f"{{{{product}}}} from {{{{sender_company}}}}: {offer.value_proposition}"]
    body = "\n\n".join([*parts, offer.call_to_action, offer.opt_out_line, "Best,\n{{sender_name}}"])
    return json.dumps({"subject": rnd.choice(SUBJECTS), "body": body})


def writer_chat(world: World, i: int, tokenizer: Any, target_tokens: int) -> list[dict[str, str]]:
    """Writer chat ``i`` (OpenAI format), with a retry turn when short of ``target_tokens``.

    The retry turn is what the writer graph sends after a failed validation: the earlier (too short) draft
    as an assistant message and a ``FEEDBACK_TEMPLATE`` user message listing its errors, one more error
    at a time until the prompt reaches the target.
    """
    from langchain_core.messages import convert_to_openai_messages

    prospect, profile = world.cases[i % len(world.cases)]
    messages = [{"role": m["role"], "content": m["content"]}
                for m in convert_to_openai_messages(build_writer_messages(world.offer, prospect, profile))]

    def count(msgs: list[dict[str, str]]) -> int:
        return len(tokenizer(str(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)),
                             add_special_tokens=False)["input_ids"])

    if count(messages) < target_tokens:
        rnd = random.Random(i)
        messages.append({"role": "assistant", "content": _email(rnd, world.offer, short=True)})
        errors: list[str] = []
        for item in [FEEDBACK_ITEMS[0], *rnd.sample(FEEDBACK_ITEMS[1:], len(FEEDBACK_ITEMS) - 1)]:
            errors.append(item)
            retry = messages + [{"role": "user", "content": FEEDBACK_TEMPLATE.format(
                errors="\n".join(f"- {e}" for e in errors))}]
            if count(retry) >= target_tokens:
                break
        messages = retry
    return messages


def write_dataset(folder: Path, world: World, n_rows: int, tokenizer: Any, prompt_tokens: int) -> Path:
    """``train.jsonl`` (+ ``manifest.json``) of writer chats, each answered with a merge-tag email."""
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    with (folder / "train.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(n_rows):
            messages = writer_chat(world, i, tokenizer, prompt_tokens)
            messages.append({"role": "assistant", "content": _email(rnd, world.offer)})
            fh.write(json.dumps({"messages": messages}) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"agent": "writer", "n_train": n_rows, "n_eval": 0,
                                                      "source": "benchmarks/miniature_speed.py (synthetic)"}))
    return folder


def make_lora_adapter(base_path: Path, out: Path, seed: int, r: int = 16) -> Path:
    """A LoRA adapter on every projection with random ``lora_B`` (so it changes the output), saved with peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.config import DEFAULT_TARGET_MODULES

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_path))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r,
                                                  target_modules=list(DEFAULT_TARGET_MODULES)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------------------------- inference


@dataclass
class InferenceRow:
    preset: str
    mode: str
    requests: int
    prompt_tokens: float
    new_tokens: int
    seconds: float
    generate_calls: int
    note: str = ""
    cpu_seconds: float = 0.0  # CPU time of the whole process (all its threads) over the same span
    prefilled: int = 0  # prompt tokens run through the model (engines with a prefix cache count them)
    reused: int = 0  # prompt tokens taken from the prefix cache instead

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.new_tokens / self.cpu_seconds if self.cpu_seconds > 0 else float("nan")

    @property
    def requests_per_min(self) -> float:
        return self.requests * 60.0 / self.seconds


@dataclass
class PresetResult:
    preset: str
    n_params: int
    n_layers: int
    kv_dim: int
    vocab: int
    rows: list[InferenceRow] = field(default_factory=list)
    prefill_s: float = 0.0
    b1_request_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    mean_prompt_tokens: float = 0.0
    train: list[dict[str, Any]] = field(default_factory=list)


#: CPU seconds of the last ``_sequential``/``_gathered`` call (process time, every thread).
_LAST_CPU_S = [0.0]
#: Prompt tokens (prefilled, reused from the prefix cache) of the last ``_sequential``/``_gathered`` call.
_LAST_PREFILL = [0, 0]


def _fresh(engine: Any) -> tuple[int, int]:
    """Empty the engine's prefix cache (so a run reuses only what its own prompts share, never a repeat of an
    earlier run's prompts) and return its prompt-token counters (0, 0 for an engine without them)."""
    cache = getattr(engine, "prefix_cache", None)
    if cache is not None:
        cache.clear()
    return getattr(engine, "prefill_tokens", 0), getattr(engine, "prefix_tokens_reused", 0)


def _count(engine: Any, before: tuple[int, int]) -> None:
    _LAST_PREFILL[:] = [getattr(engine, "prefill_tokens", 0) - before[0],
                        getattr(engine, "prefix_tokens_reused", 0) - before[1]]


async def _sequential(engine: Any, chats: list[tuple[str, list[dict[str, str]]]], new_tokens: int,
                      grammar: str | None = None) -> tuple[list[Any], float, int]:
    calls = engine.generate_calls
    before = _fresh(engine)
    cpu = time.process_time()
    started = time.perf_counter()
    out = [await engine.generate(adapter, chat, max_new_tokens=new_tokens, grammar=grammar) for adapter, chat in chats]
    _LAST_CPU_S[0] = time.process_time() - cpu
    _count(engine, before)
    return out, time.perf_counter() - started, engine.generate_calls - calls


async def _gathered(engine: Any, chats: list[tuple[str, list[dict[str, str]]]], new_tokens: int,
                    grammar: str | None = None) -> tuple[list[Any], float, int]:
    calls = engine.generate_calls
    before = _fresh(engine)
    cpu = time.process_time()
    started = time.perf_counter()
    out = await asyncio.gather(*[engine.generate(adapter, chat, max_new_tokens=new_tokens, grammar=grammar)
                                 for adapter, chat in chats])
    _LAST_CPU_S[0] = time.process_time() - cpu
    _count(engine, before)
    return list(out), time.perf_counter() - started, engine.generate_calls - calls


async def _best_of(repeats: int, run: Any, *args: Any) -> tuple[list[Any], float, int, float]:
    """``run(*args)`` ``repeats`` times: the outputs and calls of the fastest, the least wall and CPU seconds.

    On a shared CPU the least time of a few repeats is the one least disturbed by other processes.
    """
    best: tuple[list[Any], float, int, float] | None = None
    least_cpu = float("inf")
    for _ in range(max(1, repeats)):
        out, seconds, calls = await run(*args)
        least_cpu = min(least_cpu, _LAST_CPU_S[0])
        if best is None or seconds < best[1]:
            best = (out, seconds, calls, 0.0)
    assert best is not None
    return best[0], best[1], best[2], least_cpu


def _writer_grammar() -> str:
    """The email answer grammar of a writing task with the demo's merge tags (``miniatures.grammar``), as a run of
    at least 8 emails one after another (its ``start`` rule renamed ``email``; ``start: email ("\\n" email){7,}``).

    A random-weight model closes its first email after a few dozen tokens, and an engine ends an answer as soon as
    its grammar is complete (or the model picks the stop token it then allows); emails one after another keep
    every row under the grammar's masks for all ``--new-tokens`` tokens, as the rows without grammar are, so the
    two compare token for token.
    """
    from core.tasks import MergeTag, OfferBrief, WritingTask
    from miniatures.grammar import answer_grammar

    offer = OfferBrief(sender_title="AE", product="Ledgerline", value_proposition="v", call_to_action="c",
                       opt_out_line="o")
    tags = ("first_name", "company", "sender_name", "fact.location", "fact.industry")
    one = answer_grammar(WritingTask(offer=offer, merge_tags=tuple(MergeTag(name=t, description=t) for t in tags)))
    if "\nstart:" not in one:
        raise SystemExit("the writer grammar has no 'start:' rule at the start of a line; update _writer_grammar")
    return one.replace("\nstart:", "\nemail:", 1) + '\nstart: email ("\\n" email){7,}\n'


def _engine_class(path: Path | None) -> Any:
    """``LocalEngine`` of ``miniatures.local``, or of the module file ``path`` (an earlier version of it, e.g.
    ``git show HEAD~1:miniatures/local.py > /tmp/old_local.py``), loaded under a name of its own."""
    if path is None:
        from miniatures.local import LocalEngine

        return LocalEngine
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_local_engine", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline-engine {path}: not a Python module file; give the path of a miniatures/local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.LocalEngine


async def run_inference(result: PresetResult, base_path: Path, adapters: dict[str, Path],
                        chats: list[list[dict[str, str]]], args: argparse.Namespace,
                        engine_class: Any = None) -> None:
    """Batch 1 and batched generation on the base, on one adapter and on two adapters mixed."""
    from miniatures.local import BASE_ADAPTER

    make = engine_class or _engine_class(None)
    options: dict[str, Any] = {}
    if args.prefix_cache_tokens is not None and engine_class is None:
        options["prefix_cache_tokens"] = args.prefix_cache_tokens
    if engine_class is None:  # the rows below decode a token per step; --speculative K adds rows with drafts
        options["speculative_tokens"] = 0
    engine = make(str(base_path), device="cpu", dtype="float32", max_batch_size=args.batch,
                  num_threads=args.threads, max_new_tokens=args.new_tokens, **options)
    # Stop tokens off (an id no model can emit), so every request makes exactly --new-tokens tokens.
    engine.stop_token_ids = [len(engine.tokenizer) + 1_000_000]
    new = args.new_tokens
    seq = chats[: args.sequential]
    batch = chats[: args.batch]

    def row(mode: str, gens: list[Any], seconds: float, calls: int, cpu: float, note: str = "") -> InferenceRow:
        r = InferenceRow(result.preset, mode, len(gens), statistics.mean(g.input_tokens for g in gens),
                         sum(g.output_tokens for g in gens), seconds, calls, note, cpu, *_LAST_PREFILL)
        result.rows.append(r)
        console.print(f"  {result.preset} {mode}: {r.tokens_per_s:.1f} tokens/s, {r.requests_per_min:.1f} req/min "
                      f"({r.new_tokens} tokens in {seconds:.1f} s, {cpu:.1f} CPU s, {calls} run(s))")
        return r

    reps = args.repeats

    # Warm-up: one short request and one short batch (allocator, kernels, first-call costs).
    await _sequential(engine, [(BASE_ADAPTER, chats[0])], 4)
    await _gathered(engine, [(BASE_ADAPTER, c) for c in batch], 4)

    # Prefill alone (max_new_tokens=1) on the batch-1 prompts, for the decode-only rate.
    _, prefill, _ = await _sequential(engine, [(BASE_ADAPTER, c) for c in seq], 1)
    gens, seconds, calls, cpu = await _best_of(reps, _sequential, engine, [(BASE_ADAPTER, c) for c in seq], new)
    row("base, batch 1", gens, seconds, calls, cpu)
    result.prefill_s = prefill / len(seq)
    result.b1_request_s = seconds / len(seq)
    result.decode_tokens_per_s = (new - 1) / max(1e-9, result.b1_request_s - result.prefill_s)
    result.mean_prompt_tokens = statistics.mean(g.input_tokens for g in gens)
    gens, seconds, calls, cpu = await _best_of(reps, _gathered, engine, [(BASE_ADAPTER, c) for c in batch], new)
    row(f"base, {len(batch)} gathered", gens, seconds, calls, cpu)

    # The same with the writer's answer grammar (llguidance masks, ``miniatures.grammar``) on every request.
    grammar = _writer_grammar()
    gens, seconds, calls, cpu = await _best_of(reps, _sequential, engine, [(BASE_ADAPTER, c) for c in seq], new,
                                               grammar)
    row("base + grammar, batch 1", gens, seconds, calls, cpu, "email grammar")
    gens, seconds, calls, cpu = await _best_of(reps, _gathered, engine, [(BASE_ADAPTER, c) for c in batch], new,
                                               grammar)
    row(f"base + grammar, {len(batch)} gathered", gens, seconds, calls, cpu, "email grammar")

    names = list(adapters)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    await _gathered(engine, [(names[i % 2], c) for i, c in enumerate(batch)], 4)  # warm-up of the LoRA path
    gens, seconds, calls, cpu = await _best_of(reps, _sequential, engine, [(names[0], c) for c in seq], new)
    row("LoRA, batch 1", gens, seconds, calls, cpu, "one adapter")
    if args.single_adapter_batch:
        gens, seconds, calls, cpu = await _best_of(reps, _gathered, engine, [(names[0], c) for c in batch], new)
        row(f"LoRA, {len(batch)} gathered", gens, seconds, calls, cpu, "one adapter")
    gens, seconds, calls, cpu = await _best_of(reps, _gathered, engine,
                                               [(names[i % 2], c) for i, c in enumerate(batch)], new)
    row(f"2 LoRAs mixed, {len(batch)} gathered", gens, seconds, calls, cpu,
        "one mixed-adapter batch" if calls == 1 else f"split into {calls} per-adapter batches")
    engine.close()
    if args.speculative and engine_class is None:
        await run_speculative(result, base_path, chats, args, make, row)


async def run_speculative(result: PresetResult, base_path: Path, chats: list[list[dict[str, str]]],
                          args: argparse.Namespace, make: Any, row: Any) -> None:
    """The base's batch-1 and gathered rows again with ``--speculative K`` draft tokens per step (prompt lookup
    only: the completion store is off, since the repeats ask the same prompts and would draft their own earlier
    answers whole). The note gives the drafts accepted and the tokens per row and step."""
    from miniatures.local import BASE_ADAPTER

    options: dict[str, Any] = {"speculative_tokens": args.speculative, "draft_store_tokens": 0}
    if args.prefix_cache_tokens is not None:
        options["prefix_cache_tokens"] = args.prefix_cache_tokens
    engine = make(str(base_path), device="cpu", dtype="float32", max_batch_size=args.batch,
                  num_threads=args.threads, max_new_tokens=args.new_tokens, **options)
    engine.stop_token_ids = [len(engine.tokenizer) + 1_000_000]
    new, reps = args.new_tokens, args.repeats
    seq, batch = chats[: args.sequential], chats[: args.batch]
    await _sequential(engine, [(BASE_ADAPTER, chats[0])], 4)
    await _gathered(engine, [(BASE_ADAPTER, c) for c in batch], 4)
    grammar = _writer_grammar()
    for mode, run, asked, constrained in (
            ("batch 1", _sequential, seq, None), (f"{len(batch)} gathered", _gathered, batch, None),
            (f"{len(batch)} gathered", _gathered, batch, grammar)):
        drafted, accepted = engine.drafted_tokens, engine.accepted_tokens
        rows = engine.decode_rows
        gens, seconds, calls, cpu = await _best_of(reps, run, engine, [(BASE_ADAPTER, c) for c in asked], new,
                                                   constrained)
        d, a = engine.drafted_tokens - drafted, engine.accepted_tokens - accepted
        per_step = (a + (engine.decode_rows - rows)) / max(1, engine.decode_rows - rows)
        name = f"base{' + grammar' if constrained else ''}, {mode}, drafts {args.speculative}"
        row(name, gens, seconds, calls, cpu, f"{a}/{d} drafts kept, {per_step:.2f} tokens/row-step")
    engine.close()


# ----------------------------------------------------------------------------------------------- training


def run_training(result: PresetResult, base_path: Path, dataset: Path, out: Path, args: argparse.Namespace) -> None:
    import torch

    from finetune.config import TrainConfig
    from finetune.train import main as train_main

    for method in ("lora", "full"):
        torch.set_num_threads(args.threads)
        config = TrainConfig(base_model=str(base_path), dataset_dir=str(dataset), output_dir=str(out / method),
                             method=method, max_steps=args.train_steps, per_device_train_batch_size=args.train_batch,
                             max_length=1024, logging_steps=1, save_steps=10_000, save_total_limit=1)
        trained = train_main(config)
        m = trained.metrics
        result.train.append({"method": method, "trainable": trained.trainable_params, "steps": m["global_step"],
                             "tokens": m["train_tokens"], "seconds": m["train_seconds"],
                             "tokens_per_s": trained.train_tokens_per_s, "loss": m["final_train_loss"]})
        console.print(f"  {result.preset} train {method}: {trained.train_tokens_per_s:.0f} tokens/s "
                      f"({m['train_tokens']} tokens, {m['global_step']} steps, {m['train_seconds']:.1f} s)")


# ----------------------------------------------------------------------------------------------- report


def _bound(r: PresetResult, bandwidth_gbs: float, new_tokens: int) -> dict[str, float]:
    weight_bytes = r.n_params * 4  # float32 on CPU
    context = r.mean_prompt_tokens + new_tokens / 2  # mean positions attended to while decoding
    kv_bytes = 2 * r.n_layers * r.kv_dim * 4 * context
    bound = bandwidth_gbs * 1e9 / weight_bytes
    bound_kv = bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes)
    return {"weight_mb": weight_bytes / 1e6, "kv_mb": kv_bytes / 1e6, "bound": bound, "bound_kv": bound_kv,
            "pct": 100 * r.decode_tokens_per_s / bound, "pct_kv": 100 * r.decode_tokens_per_s / bound_kv}


def _ratios(r: PresetResult) -> list[tuple[str, float, float]]:
    """``(name, batched / batch-1 tokens per wall second, the same per CPU second)`` for each pair measured."""
    by = {row.mode.split(",")[0] + ("/b1" if "batch 1" in row.mode else "/bN"): row for row in r.rows}
    pairs = [("base", "base/bN", "base/b1"), ("base + grammar", "base + grammar/bN", "base + grammar/b1"),
             ("LoRA", "LoRA/bN", "LoRA/b1"), ("2 LoRAs mixed (vs LoRA batch 1)", "2 LoRAs mixed/bN", "LoRA/b1")]
    out = [(name, by[n].tokens_per_s / by[b].tokens_per_s, by[n].tokens_per_cpu_s / by[b].tokens_per_cpu_s)
           for name, n, b in pairs if n in by and b in by]
    plain = {row.mode: row for row in r.rows if "drafts" not in row.mode}
    for row in r.rows:  # drafts against the same mode without them (--speculative)
        if ", drafts " in row.mode:
            other = plain.get(row.mode.rsplit(", drafts ", 1)[0])
            if other is not None:
                out.append((f"{row.mode} / without drafts", row.tokens_per_s / other.tokens_per_s,
                            row.tokens_per_cpu_s / other.tokens_per_cpu_s))
    return out


def report(results: list[PresetResult], machine: dict[str, str], bandwidth: float, loads: tuple[Any, Any],
           args: argparse.Namespace, world_pages: int, total_s: float) -> None:
    inf = Table(title=f"LocalEngine generation: writer chats, {args.new_tokens} new tokens each (greedy, stop "
                      f"tokens off), {args.threads} torch threads")
    for col in ("preset", "mode", "requests", "prompt tok", "new tok", "wall s", "gen tok/s", "req/min",
                "CPU s", "tok/CPU s", "runs", "prefilled / reused"):
        inf.add_column(col, justify="right" if col not in ("preset", "mode") else "left")
    for r in results:
        for row in r.rows:
            inf.add_row(r.preset, row.mode, str(row.requests), f"{row.prompt_tokens:.0f}", str(row.new_tokens),
                        f"{row.seconds:.1f}", f"{row.tokens_per_s:.1f}", f"{row.requests_per_min:.1f}",
                        f"{row.cpu_seconds:.1f}", f"{row.tokens_per_cpu_s:.1f}", str(row.generate_calls),
                        f"{row.prefilled} / {row.reused}")
    console.print(inf)
    for r in results:
        for name, ratio, cpu_ratio in _ratios(r):
            if "drafts" in name:
                console.print(f"{r.preset}: tokens/s, {name}: [bold]{ratio:.2f}x[/bold] wall, {cpu_ratio:.2f}x CPU")
                continue
            console.print(f"{r.preset}: batched / batch-1 tokens/s, {name}: [bold]{ratio:.2f}x[/bold] wall, "
                          f"{cpu_ratio:.2f}x CPU (target >= 4x)")

    tr = Table(title=f"finetune.train.main: {args.train_rows} writer chats, {args.train_steps} steps of "
                     f"{args.train_batch}")
    for col in ("preset", "method", "trainable params", "steps", "train tokens", "seconds", "train tok/s",
                "last loss"):
        tr.add_column(col, justify="right" if col not in ("preset", "method") else "left")
    for r in results:
        for t in r.train:
            tr.add_row(r.preset, t["method"], f"{t['trainable']:,}", str(t["steps"]), str(t["tokens"]),
                       f"{t['seconds']:.1f}", f"{t['tokens_per_s']:.0f}", f"{t['loss']:.3f}" if t["loss"] else "-")
    console.print(tr)

    bt = Table(title=f"batch-1 decoding vs the memory-bandwidth bound ({bandwidth:.1f} GB/s numpy copy)")
    for col in ("preset", "params", "weights MB", "prefill s", "decode tok/s", "bound tok/s", "% of bound",
                "KV MB/token", "bound incl. KV", "% incl. KV"):
        bt.add_column(col, justify="right" if col != "preset" else "left")
    for r in results:
        b = _bound(r, bandwidth, args.new_tokens)
        bt.add_row(r.preset, f"{r.n_params / 1e6:.2f}M", f"{b['weight_mb']:.1f}", f"{r.prefill_s:.2f}",
                   f"{r.decode_tokens_per_s:.1f}", f"{b['bound']:.0f}", f"{b['pct']:.1f}%", f"{b['kv_mb']:.1f}",
                   f"{b['bound_kv']:.0f}", f"{b['pct_kv']:.1f}%")
    console.print(bt)
    console.print(f"load average (1/5/15 min) at start {_load(loads[0])}, at end {_load(loads[1])}; "
                  f"total {total_s:.0f} s")

    cmd = "python benchmarks/miniature_speed.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [
        "# Miniature speed: local inference, fine-tuning, decoding vs the memory bound", "",
        f"Command: `{cmd}` (total {total_s:.0f} s, {time.strftime('%Y-%m-%d %H:%M %Z')}).", "",
        "Machine:", "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        f"- load average (1/5/15 min): {_load(loads[0])} at start, {_load(loads[1])} at end. **Other processes "
        "may be using the CPU** during the run (a load near or above the core count means the benchmark shared "
        "the cores), so treat the figures as a floor for an idle machine of this type.",
        "",
        f"Bases: `finetune.base.bootstrap_base` (Llama, tied embeddings, float32, {args.pretrain_steps} pretraining "
        f"steps; speed does not depend on the weights) with a byte-level BPE ChatML tokenizer trained on the "
        f"{world_pages} pages of a {args.companies}-company demo world plus 100 writer prompts and answers (so the "
        "instructions tokenize about as compactly as with a real base's tokenizer). Prompts: writer chats "
        f"(`agents.writer.build_writer_messages` over demo-world prospects and their gold profiles, topped up "
        f"with an earlier draft and a validation-feedback turn to about {args.prompt_tokens} tokens).",
        "",
        f"## 1. `miniatures.local.LocalEngine` generation ({args.new_tokens} new tokens per request)", "",
        "Greedy; the engine's stop tokens are replaced by an id no model can emit, so every request makes "
        f"exactly {args.new_tokens} tokens unless its grammar ends it ('new tok' is what the engine reported). "
        f"Batch 1: requests awaited one after the other; gathered: {args.batch} `await engine.generate(...)` calls "
        "under `asyncio.gather`, which the engine decodes together ('runs': how often a request started an idle "
        "engine; the baseline engine, when measured, counts its `model.generate` calls there). The prefix cache "
        "is emptied before each run, so a run reuses only what its own prompts share (the writer's system prompt "
        "and instructions), never an earlier run's repeat ('prompt tok prefilled / reused'; 0 / 0 for an engine "
        "without the counters). LoRA: r=16 "
        "on all seven projections, random `lora_B`; '2 LoRAs mixed' alternates two adapters in one batch "
        "(peft `adapter_names`). Wall time includes tokenizing, queueing and padding. Each mode ran "
        f"{args.repeats} time(s) in a row; the table keeps the least wall time and, apart, the least CPU time "
        "(`time.process_time`, every thread of the process), which other processes on the machine disturb far "
        "less than wall time.",
        "",
        "| preset | mode | requests | prompt tok (mean) | new tok | wall s | gen tok/s | req/min | CPU s | tok/CPU s "
        "| runs | prompt tok prefilled / reused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {r.preset} | {row.mode} | {row.requests} | {row.prompt_tokens:.0f} | {row.new_tokens} | "
          f"{row.seconds:.1f} | {row.tokens_per_s:.1f} | {row.requests_per_min:.1f} | {row.cpu_seconds:.1f} | "
          f"{row.tokens_per_cpu_s:.1f} | {row.generate_calls} | {row.prefilled} / {row.reused} |"
          for r in results for row in r.rows],
        "",
        "Batched / batch-1 throughput (issue target: >= 4x), per wall second and per CPU second:", "",
        *[f"- {r.preset}, {name}: **{ratio:.2f}x** wall, **{cpu_ratio:.2f}x** CPU"
          for r in results for name, ratio, cpu_ratio in _ratios(r)],
        "",
        f"## 2. Fine-tuning (`finetune.train.main`, TRL `SFTTrainer`, CPU float32, {args.threads} threads)", "",
        f"{args.train_rows} synthetic writer chats (prompt as above plus a merge-tag email as the answer), "
        f"{args.train_steps} optimizer steps of {args.train_batch} conversations, max_length 1024, assistant-only "
        "loss. 'train tokens' are the non-padding input tokens the Trainer saw (prompt and answer, forward and "
        "backward); tokens/s is `TrainResult.train_tokens_per_s` (over the Trainer's `train_runtime`, which "
        "includes the final checkpoint save).",
        "",
        "| preset | method | trainable params | steps | train tokens | seconds | train tok/s | last loss |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r.preset} | {t['method']} | {t['trainable']:,} | {t['steps']} | {t['tokens']} | {t['seconds']:.1f} | "
          f"{t['tokens_per_s']:.0f} | {t['loss']:.3f} |" if t["loss"] is not None else
          f"| {r.preset} | {t['method']} | {t['trainable']:,} | {t['steps']} | {t['tokens']} | {t['seconds']:.1f} | "
          f"{t['tokens_per_s']:.0f} | - |" for r in results for t in r.train],
        "",
        "## 3. Batch-1 decoding against the memory-bandwidth bound", "",
        f"Memory bandwidth: **{bandwidth:.1f} GB/s**, best of 5 `np.copyto` of a {args.bandwidth_mb} MiB float64 "
        "array, counted as read + write (STREAM 'copy'; one thread). Each decoded token reads every weight once "
        "(float32, 4 bytes per parameter, tied embeddings counted once), so the bound is bandwidth / weight bytes "
        "tokens/s. 'KV MB/token' is the key/value cache read per token at the mean decoding context (prompt + "
        "half the new tokens); 'incl. KV' adds it to the bytes. Decode tok/s is the batch-1 rate without the "
        "prompt: (new tokens - 1) / (time of a request - time of the same request with max_new_tokens=1).",
        "",
        "| preset | params | weights MB | prefill s | decode tok/s | bound tok/s | % of bound | KV MB/token | "
        "bound incl. KV | % incl. KV |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[_bound_row(r, bandwidth, args.new_tokens) for r in results],
        "",
        "Models this small are far from the bound: a decoding step costs a fixed overhead (the Python of the "
        "model's forward pass, the dispatch of a few hundred small ops, the grammar masks and sampling) that "
        "does not shrink with the model, and the weights (a few MB to a few tens of MB) may sit partly in the CPU "
        "caches, above DRAM bandwidth. The percentage says how much of a step reading the weights from memory "
        "would take, not how close a bigger model would get.",
        "",
        f"Threads: every figure uses {args.threads} torch threads. When other processes keep the cores busy "
        "(see the load averages above), OpenMP threads wait on each other and fewer threads can be much faster "
        "(the demo's writer miniature at batch 1, load 5 on 2 cores: 8.8 tokens/s with torch's default of 2 threads, "
        "68 with 1); compare with `--threads 1`. Without `num_threads`, the CPU engines of one process share its "
        "CPUs (`miniatures.local.share_cpus`).",
    ]
    if args.smoke:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out}")


def _bound_row(r: PresetResult, bandwidth: float, new_tokens: int) -> str:
    b = _bound(r, bandwidth, new_tokens)
    return (f"| {r.preset} | {r.n_params / 1e6:.2f}M | {b['weight_mb']:.1f} | {r.prefill_s:.2f} | "
            f"{r.decode_tokens_per_s:.1f} | {b['bound']:.0f} | {b['pct']:.1f}% | {b['kv_mb']:.1f} | "
            f"{b['bound_kv']:.0f} | {b['pct_kv']:.1f}% |")


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="smallest run that checks the script works (2m, 8 new tokens, batch 2, no training, "
                             "nothing written)")
    parser.add_argument("--skip-training", action="store_true", help="generation and bandwidth only")
    parser.add_argument("--quick", action="store_true",
                        help="smaller run: preset 2m only, 48 new tokens, 1 batch-1 request, 24 rows and 3 training steps")
    parser.add_argument("--presets", default=None, help="comma-separated bootstrap presets (default 2m,10m)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default os.cpu_count())")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per request (default 150)")
    parser.add_argument("--prompt-tokens", type=int, default=600, help="target prompt length in tokens")
    parser.add_argument("--sequential", type=int, default=None, help="batch-1 requests, one after the other "
                                                                     "(default 2)")
    parser.add_argument("--batch", type=int, default=8, help="requests gathered into one batch")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each generation mode, the least time "
                        "kept (default 3; 1 with --quick)")
    parser.add_argument("--single-adapter-batch", action="store_true",
                        help="also time a gathered batch on one LoRA adapter (besides the two mixed)")
    parser.add_argument("--train-rows", type=int, default=None, help="training conversations (default 64)")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default 8)")
    parser.add_argument("--train-batch", type=int, default=2, help="conversations per training step")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="bootstrap pretraining steps (speed does "
                                                                       "not depend on the weights)")
    parser.add_argument("--companies", type=int, default=60, help="demo-world companies (tokenizer text, prompts)")
    parser.add_argument("--bandwidth-mb", type=int, default=512, help="array size of the bandwidth copy, MiB")
    parser.add_argument("--baseline-engine", type=Path, default=None,
                        help="also measure the LocalEngine of this module file (an earlier miniatures/local.py), "
                             "side by side in the same run")
    parser.add_argument("--prefix-cache-tokens", type=int, default=None,
                        help="prefix cache size of the engine (default the engine's; 0: off)")
    parser.add_argument("--speculative", type=int, default=0, metavar="K",
                        help="also run the base's rows with K draft tokens per step (speculative decoding, "
                             "LocalEngine speculative_tokens), side by side with K=0 (default 0: not run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "miniature_speed.md")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick = args.skip_training = True
        args.new_tokens, args.batch, args.companies, args.prompt_tokens = 8, 2, 6, 120
        args.bandwidth_mb = 16
        args.speculative = args.speculative or 2  # the speculative rows run too, so they cannot break silently
    if args.speculative < 0:
        parser.error("--speculative must be >= 0")
    quick = args.quick
    args.presets = [p.strip() for p in (args.presets or ("2m" if quick else "2m,10m")).split(",") if p.strip()]
    args.threads = args.threads or os.cpu_count() or 1
    args.new_tokens = args.new_tokens or (48 if quick else 150)
    args.sequential = args.sequential or (1 if quick else 2)
    args.repeats = args.repeats or (1 if quick else 3)
    args.train_rows = args.train_rows or (24 if quick else 64)
    args.train_steps = args.train_steps or (3 if quick else 8)
    if args.batch < 2:
        parser.error("--batch must be at least 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of transformers/peft
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from finetune.base import bootstrap_base

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()
    machine = _machine(args.threads)
    console.print(f"torch threads: {torch.get_num_threads()}; load average at start {_load(load_start)}")
    bandwidth = memory_bandwidth_gbs(args.bandwidth_mb)
    console.print(f"memory bandwidth (numpy copy, read + write): {bandwidth:.1f} GB/s")
    results: list[PresetResult] = []
    with tempfile.TemporaryDirectory(prefix="miniature-speed-") as tmp:
        root = Path(tmp)
        world = build_world(root, args.companies)
        console.print(f"demo world: {world.pages} pages, {len(world.cases)} prospects")
        texts = tokenizer_texts(world)
        for preset in args.presets:
            base_dir = root / f"base-{preset}"
            info = bootstrap_base(base_dir, texts, preset=preset, pretrain_steps=args.pretrain_steps,  # type: ignore[arg-type]
                                  seq_len=128, batch_size=4)
            config = json.loads((base_dir / "config.json").read_text())
            head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            result = PresetResult(preset=preset, n_params=info.n_params, n_layers=config["num_hidden_layers"],
                                  kv_dim=config["num_key_value_heads"] * head_dim, vocab=info.vocab_size)
            console.print(f"[bold]{preset}[/bold]: {info.n_params:,} parameters, vocabulary {info.vocab_size}")
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
            chats = [writer_chat(world, i, tokenizer, args.prompt_tokens) for i in range(max(args.batch,
                                                                                             args.sequential))]
            adapters = {name: make_lora_adapter(base_dir, root / f"lora-{preset}-{name}", seed)
                        for seed, name in enumerate(("writer-a", "writer-b"))}
            if args.baseline_engine is not None:
                baseline = PresetResult(preset=f"{preset} baseline", n_params=result.n_params,
                                        n_layers=result.n_layers, kv_dim=result.kv_dim, vocab=result.vocab)
                asyncio.run(run_inference(baseline, base_dir, adapters, chats, args,
                                          _engine_class(args.baseline_engine)))
                results.append(baseline)
            asyncio.run(run_inference(result, base_dir, adapters, chats, args))
            if not (args.smoke or args.skip_training):
                dataset = write_dataset(root / f"dataset-{preset}", world, args.train_rows, tokenizer,
                                        args.prompt_tokens)
                run_training(result, base_dir, dataset, root / f"train-{preset}", args)
            results.append(result)
    load_end = os.getloadavg()
    report(results, machine, bandwidth, (load_start, load_end), args, world.pages, time.perf_counter() - started)


if __name__ == "__main__":
    main()
