"""Benchmark: answer-grammar mask cost per token and row, this tree's grammars and tokenizer vs the previous ones.

Measures, side by side in one run, for each grammar kind (extraction answer, email answer, email with the rules of
craft, one sentence's sentence-tags answer) and two vocabularies (the bootstrapped bases' 4096 tokens,
``finetune.base.build_tokenizer``, and a 150k-token byte-level BPE trained here with ``tokenizers`` as a stand-in for
Qwen/Llama-3 sized vocabularies):

* ``new``: ``miniatures.grammar`` as it is in this tree: its grammars (``answer_grammar``, ``tag_grammar``) over
  ``llg_tokenizer`` (llguidance's slicer set to ``TEXT_SLICES``), each row's matcher filling its bit mask and
  consuming its token on the calling thread, and ``GrammarLogitsProcessor`` called as transformers calls it, once
  per generated token, on a batch of rows that each replay a valid answer token by token;
* ``previous``: the same module before the slices and span terminals (the last commit whose ``llg_tokenizer``
  kept llguidance's default slices), loaded from git history: its own grammars over its own tokenizer view, fed
  the same answers, timed the same way, interleaved with ``new`` (``--repeats`` times each; the lower mean is
  kept: a burst of load on a shared machine only ever adds time);
* ``old``: the hand-written state machine this project used before llguidance (``miniatures/constrained.py`` and
  the ``TagGrammar`` of ``miniatures/formats.py``), loaded from git history into temporary modules (the repository
  keeps no dead copy), fed the same answers through its own ``GrammarProcessor``, one row (its cost is per row;
  its per-state mask cache is kept, as in generation). It had no craft grammar.

``mask ms/token`` is wall time divided by tokens x rows (target: at most 0.1 ms per token and row); ``CPU`` is the
calling thread's CPU time for the same loop (``time.thread_time``: time the scheduler gives other processes is not
in it, so it is the figure to compare on a busy machine). A few steps cost milliseconds (those that enter a new
lexer state whose mask llguidance has not computed yet and cannot take from a slice: it walks the whole token
trie), the rest microseconds: the table gives the median step and the count of steps over 0.5 ms of CPU, and the
script prints the slowest steps of each new grammar with the text they end. The processor figures add the refused
tokens set to ``-inf`` in place on float32 scores, with the processor's defaults and with each step's masks filled
by one call on llguidance's executor. The old processor scans the vocabulary in Python for each new state, so at
150k tokens it is timed on the first ``--old-tokens`` tokens of each answer only (the table says so; early tokens
are mostly fixed JSON text, its cheapest states, so that figure flatters it). Compile ms is llguidance's compile
time per row. ``check-first greedy step`` is ``mask_rows_greedy`` (each row's top token validated, only the rows
that refuse it masked) with each row's consume, on scores whose top token is the answer's (a model that follows its
grammar; each step a real model's top token is refused adds a mask). ``--kernels`` adds a table of the mask
application alone: the processor's against ``llguidance.torch.apply_token_bitmask_inplace`` and xgrammar's CPU
kernel when xgrammar is importable (it is no project dependency). The load average is printed before and after.

Usage: python benchmarks/grammar_speed.py [--smoke] [--rows 8] [--large-vocab 150000] [--repeats 2] [--kernels]
[--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from core.tasks import ExtractionTask, FieldSpec, Sentence, WritingTask  # noqa: E402

OLD_FILES = ("miniatures/constrained.py", "miniatures/formats.py")
#: A line of the previous ``llg_tokenizer`` (llguidance's default slices) that this tree's no longer has.
PREVIOUS_NEEDLE = "return llguidance.hf.from_tokenizer(tokenizer, n_vocab=size, eos_token=eos)\n"
FIELDS = ("location", "founded_year", "employee_count", "product", "industry", "customers", "funding", "news")
SYLLABLES = ("ka", "ri", "to", "mel", "an", "vor", "su", "ne", "lo", "bra", "di", "quen", "sa", "or", "fi", "zu",
             "pe", "lan", "tor", "mi", "ga", "res", "ul", "che", "no", "ba", "ver", "is", "do", "ha")
#: Slowest steps printed per new grammar.
SHOW_SLOW = 6
#: A step over this many ms of CPU is counted as slow (a trie walk or lexer construction, not a cached mask).
SLOW_MS = 0.5


@dataclass
class Case:
    """One grammar kind: the grammar built by a grammar module (this tree's or the previous one), the answer
    replayed, and the old state machine's inputs (None: it had no such grammar)."""

    kind: str
    grammar: Callable[[Any], str]
    answer: str
    old: Any  # (prompt text) for old extraction/email, (sentence, fields) for old tags, None for none


def _word(rnd: random.Random) -> str:
    return "".join(rnd.choice(SYLLABLES) for _ in range(rnd.randint(1, 4)))


def _sentence(rnd: random.Random, words: int) -> str:
    body = " ".join(_word(rnd) for _ in range(words))
    return body[0].upper() + body[1:] + f" in {rnd.randint(1990, 2024)}."


def training_texts(n_docs: int, seed: int = 3) -> list[str]:
    """Synthetic documents of made-up words: enough distinct words for a large BPE vocabulary."""
    rnd = random.Random(seed)
    return [" ".join(_sentence(rnd, 12) for _ in range(8)) for _ in range(n_docs)]


def large_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens (ChatML specials) trained here: a Qwen/Llama-3 sized stand-in."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                                  min_frequency=1)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def writing_case_task() -> tuple[WritingTask, dict[str, str]]:
    """A writing task as the writer agent builds it (an offer with its call to action, proof point and opt-out
    line; a prospect; five facts) and the heuristic teacher's email for it."""
    from agents.heuristic import write_email
    from agents.schemas import Fact, Offer, Profile, ProspectInfo
    from agents.writer import writing_task

    offer = Offer(
        sender_name="Ilse Varnum", sender_title="Account Executive", sender_company="Tallyfold",
        product="Tallyfold Signals",
        value_proposition="Tallyfold Signals spots the accounts that are ready to buy, so your team spends its week "
                          "on conversations instead of spreadsheets.",
        call_to_action="Would a 15-minute call next week be worth it?",
        problems_solved=["finding the accounts that are ready to buy", "filling the pipeline for a newly opened office"],
        proof_point="Brightline's sales team booked 30% more meetings in its first quarter with it.",
        cta_style="meeting",
    )
    prospect = ProspectInfo(first_name="Ada", last_name="Lovel", title="Head of Growth", email="ada@acme.example",
                            company="Acme Freight", website="https://acme.example")
    facts = [("industry", "logistics software"), ("location", "Omaha, Nebraska"), ("employee_count", "120"),
             ("recent_event", "opened an office in Lisbon"), ("customer_segment", "third-party logistics providers")]
    profile = Profile(company=prospect.company, website=prospect.website, facts=[
        Fact(field=f, value=v, evidence=f"S{j}", source_url=prospect.website) for j, (f, v) in enumerate(facts)])
    task = writing_task(offer, prospect, profile)
    return task, write_email(task)


def cases(seed: int = 11, n_sentences: int = 40) -> list[Case]:
    """The grammar kinds with realistic sizes: 8 fields and 40 sentences; the writer's task with 10 merge tags
    (format, and craft); one sentence."""
    rnd = random.Random(seed)
    sentences = tuple(Sentence(id=f"S{i + 1}", text=_sentence(rnd, rnd.randint(10, 24)), source_url="https://a.example/")
                      for i in range(n_sentences))
    task = ExtractionTask(company="Acme", website="https://a.example/",
                          fields=tuple(FieldSpec(name=f, description=f"the {f}") for f in FIELDS), sentences=sentences)
    facts = []
    for i, name in enumerate(FIELDS[::2]):
        words = sentences[5 * i + 1].text.split()
        facts.append({"field": name, "evidence": sentences[5 * i + 1].id, "value": " ".join(words[2:5])})
    extraction = json.dumps({"facts": facts})
    old_extraction = ("Fields:\n" + "".join(f"- {f}: the {f}\n" for f in FIELDS) + "\nSource 1: https://a.example/\n"
                      + "".join(f"{s.id}: {s.text}\n" for s in sentences))
    writing, email = writing_case_task()
    old_email = "Merge tags you may use:\n" + "".join(f"{{{{{t}}}}}: {t}\n" for t in writing.tag_names)
    sentence = sentences[3].text
    tag_answer = f"product | {' '.join(sentence.split()[1:4])}"
    return [
        Case("extraction", lambda g: g.answer_grammar(task), extraction, old_extraction),
        Case("writing", lambda g: g.answer_grammar(writing), json.dumps(email), old_email),
        Case("writing, craft", lambda g: g.answer_grammar(writing, craft=True), json.dumps(email), None),
        Case("sentence tags", lambda g: g.tag_grammar(sentence, FIELDS), tag_answer, (sentence, FIELDS)),
    ]


def _from_history(path: str, needle: str) -> str | None:
    """The text of ``path`` at the newest commit where it still held ``needle``, or None.

    Tried in order: the last commit that touched ``path`` and its parent (the file's last version, or the one
    before its removal), then the commits that added or removed ``needle`` (``git log -S``) and their parents.
    """
    candidates: list[str] = []
    for command in (["git", "rev-list", "-n", "1", "HEAD", "--", path],
                    ["git", "log", "--format=%H", "-S", needle, "--", path]):
        try:
            found = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        except (OSError, subprocess.CalledProcessError):
            return None
        candidates += [c for rev in found for c in (rev, f"{rev}^")]
    for candidate in candidates:
        shown = subprocess.run(["git", "show", f"{candidate}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0 and needle in shown.stdout:
            return shown.stdout
    return None


def load_previous() -> Any | None:
    """``miniatures/grammar.py`` before the slices and span terminals (``PREVIOUS_NEEDLE``) from git history, as a
    temporary module, or None."""
    text = _from_history("miniatures/grammar.py", PREVIOUS_NEEDLE)
    if text is None:
        return None
    module = types.ModuleType("previous_grammar")
    sys.modules["previous_grammar"] = module
    exec(compile(text, "previous_grammar", "exec"), module.__dict__)  # noqa: S102 - our own history
    return module


def load_old() -> tuple[Any, Any] | None:
    """The removed state machine (``constrained``, ``formats``) from git history, as temporary modules."""
    sources: dict[str, str] = {}
    for path, needle in zip(OLD_FILES, ("class GrammarProcessor", "class TagGrammar"), strict=True):
        text = _from_history(path, needle)
        if text is None:
            return None
        sources[path] = text
    old = types.ModuleType("old_constrained")
    exec(compile(sources[OLD_FILES[0]], "old_constrained", "exec"), old.__dict__)  # noqa: S102 - our own history
    sys.modules["old_constrained"] = old
    formats_text = sources[OLD_FILES[1]].replace("from miniatures.constrained import", "from old_constrained import")
    formats = types.ModuleType("old_formats")
    sys.modules["old_formats"] = formats  # dataclasses look their module up
    exec(compile(formats_text, "old_formats", "exec"), formats.__dict__)  # noqa: S102 - our own history
    return old, formats


@dataclass
class MaskTimes:
    """One grammar module's mask figures for one case (ms per token and row unless said)."""

    wall: float  # mean wall time per step and row: fill the row's bit mask, consume its token (calling thread)
    cpu: float  # the same loop's CPU time (time.thread_time)
    median: float  # the median step's CPU time per row
    slow: int  # steps over SLOW_MS of CPU per row
    compile_ms: float  # compile ms of CPU per row
    steps: list[float]  # each step's CPU ms per row


def time_masks(module: Any, llt: Any, grammar: str, ids: list[int], rows: int) -> MaskTimes:
    """Mask figures of ``module``'s matchers (``module.matcher``) over ``rows`` rows replaying ``ids``.

    Raises:
        AssertionError: the grammar refuses a token of the answer.
    """
    import llguidance.numpy as llg_numpy

    started = time.thread_time()  # llguidance compiles on the calling thread (without the GIL)
    matchers = [module.matcher(llt, grammar) for _ in range(rows)]
    compile_ms = (time.thread_time() - started) * 1000 / rows
    bits = llg_numpy.allocate_token_bitmask(rows, llt.vocab_size)
    walls, cpus = [], []
    for k, token in enumerate(ids):
        wall, cpu = time.perf_counter(), time.thread_time()
        for row, m in enumerate(matchers):
            llg_numpy.fill_next_token_bitmask(m, bits, row)
            assert m.consume_token(token), f"the grammar refused token {k} of a valid answer: {m.get_error()[:300]}"
        cpus.append((time.thread_time() - cpu) * 1000 / rows)
        walls.append((time.perf_counter() - wall) * 1000 / rows)
    return MaskTimes(wall=statistics.mean(walls), cpu=statistics.mean(cpus), median=statistics.median(cpus),
                     slow=sum(c > SLOW_MS for c in cpus), compile_ms=compile_ms, steps=cpus)


def time_processor(llt: Any, grammar: str, ids: list[int], rows: int, vocab: int, stop: int,
                   parallel_rows: int | None) -> tuple[float, float]:
    """(wall, CPU of the calling thread) ms per token and row of this tree's ``GrammarLogitsProcessor.__call__``
    (float32 scores of ``vocab`` tokens)."""
    import torch

    from miniatures.grammar import GrammarLogitsProcessor

    processor = GrammarLogitsProcessor(llt, [grammar] * rows, 1, [stop], parallel_rows=parallel_rows)
    scores = torch.zeros((rows, vocab))
    prefix = torch.zeros((rows, 1), dtype=torch.long)
    spent = cpu = 0.0
    for k, token in enumerate(ids):
        run_scores = scores.clone()
        started, cpu_started = time.perf_counter(), time.thread_time()
        out = processor(prefix, run_scores)
        spent += time.perf_counter() - started
        cpu += time.thread_time() - cpu_started
        assert bool(torch.isfinite(out[0, token])), f"the processor refused token {k} of a valid answer"
        prefix = torch.cat([prefix, torch.full((rows, 1), token)], dim=1)
    return spent * 1000 / (len(ids) * rows), cpu * 1000 / (len(ids) * rows)


def time_greedy(llt: Any, grammar: str, ids: list[int], rows: int, vocab: int, stop: int) -> tuple[float, float]:
    """(wall, CPU of the calling thread) ms per token and row of this tree's check-first greedy step
    (``mask_rows_greedy``: validate each row's top token, mask only the rows that refuse it) plus each row's
    ``consume_token``, on float32 scores of ``vocab`` tokens whose top token is the answer's: the replay is the
    case of a model that follows its grammar (only the final stop token is masked); every step whose top token a
    real model has refused adds a mask."""
    import torch

    from miniatures.grammar import GrammarLogitsProcessor, mask_rows_greedy, matcher

    processor = GrammarLogitsProcessor(llt, [None] * rows, 1, [stop])
    matchers = [matcher(llt, grammar) for _ in range(rows)]
    scores = torch.zeros((rows, vocab))
    spent = cpu = 0.0
    for k, token in enumerate(ids):
        run_scores = scores.clone()
        run_scores[:, token] = 1.0
        started, cpu_started = time.perf_counter(), time.thread_time()
        out = mask_rows_greedy(processor, run_scores, matchers, [token] * rows)
        for m in matchers:  # the engine's own argmax is left out (given as ``top``): the replay's token
            if token != stop:
                m.consume_token(token)
        spent += time.perf_counter() - started
        cpu += time.thread_time() - cpu_started
        chosen = out.argmax(dim=-1).tolist()
        assert chosen == [token] * rows, f"the check-first step changed token {k} of a valid answer"
    return spent * 1000 / (len(ids) * rows), cpu * 1000 / (len(ids) * rows)


def time_kernels(llt: Any, grammar: str, ids: list[int], rows: int, vocab: int) -> dict[str, tuple[float, float]]:
    """(wall, CPU of the calling thread) ms per token and row of applying the replay's bit masks to float32 scores
    of ``vocab`` tokens in place, by ``GrammarLogitsProcessor``'s application and by the library kernels that are
    installed: ``llguidance.torch.apply_token_bitmask_inplace`` (a ``torch.compile`` kernel; its compile is left
    out) and xgrammar's CPU kernel (``xgrammar.apply_token_bitmask_inplace``, when xgrammar imports). Each result
    is checked against the processor's."""
    import llguidance.numpy as llg_numpy
    import torch

    from miniatures.grammar import GrammarLogitsProcessor, matcher

    m = matcher(llt, grammar)
    masks = []
    for token in ids:
        bits = llg_numpy.allocate_token_bitmask(1, llt.vocab_size)
        llg_numpy.fill_next_token_bitmask(m, bits, 0)
        masks.append(bits.repeat(rows, axis=0))
        m.consume_token(token)
    processor = GrammarLogitsProcessor(llt, [None] * rows, 1, [])
    every = list(range(rows))

    def ours(scores: Any, bits: Any) -> None:
        processor._bits = bits  # the processor's own application step (``_apply``), masks already filled
        processor._apply(every, scores)

    kernels: dict[str, Callable[[Any, Any], None]] = {"processor": ours}
    try:
        import llguidance.torch as llg_torch

        kernels["llguidance.torch"] = lambda s, b: llg_torch.apply_token_bitmask_inplace(s, torch.from_numpy(b))
    except ImportError:
        pass
    try:
        import xgrammar

        kernels["xgrammar cpu"] = lambda s, b: xgrammar.apply_token_bitmask_inplace(s, torch.from_numpy(b),
                                                                                   vocab_size=vocab)
    except ImportError:
        pass
    base = torch.randn((rows, vocab), generator=torch.Generator().manual_seed(0))
    expected = []
    for bits in masks:
        s = base.clone()
        ours(s, bits)
        expected.append(torch.isfinite(s))
    out: dict[str, tuple[float, float]] = {}
    for name, kernel in kernels.items():
        kernel(base.clone(), masks[0])  # warm-up (a compile)
        spent = cpu = 0.0
        for bits, finite in zip(masks, expected, strict=True):
            s = base.clone()
            started, cpu_started = time.perf_counter(), time.thread_time()
            kernel(s, bits)
            spent += time.perf_counter() - started
            cpu += time.thread_time() - cpu_started
            assert torch.equal(torch.isfinite(s), finite), f"{name} applied another mask"
        out[name] = (spent * 1000 / (len(masks) * rows), cpu * 1000 / (len(masks) * rows))
    return out


def time_old(old: tuple[Any, Any], tokenizer: Any, case: Case, rows: int, max_tokens: int) -> tuple[float, int]:
    """(mask ms per token and row, tokens timed) of the old ``GrammarProcessor`` on the same answer."""
    import torch

    constrained, formats = old
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if case.kind == "sentence tags":
        sentence, fields = case.old
        grammars = [formats.TagGrammar(sentence, fields) for _ in range(rows)]
    else:
        grammars = [constrained.grammar_for(case.old) for _ in range(rows)]
    vocabulary = constrained.decode_vocabulary(tokenizer)
    processor = constrained.GrammarProcessor(tokenizer, grammars, 1, vocabulary, [stop])
    ids = (tokenizer(case.answer, add_special_tokens=False)["input_ids"] + [stop])[:max_tokens]
    scores = torch.zeros((rows, len(tokenizer)))
    prefix = torch.zeros((rows, 1), dtype=torch.long)
    spent = 0.0
    for token in ids:
        started = time.perf_counter()
        processor(prefix, scores.clone())
        spent += time.perf_counter() - started
        prefix = torch.cat([prefix, torch.full((rows, 1), token)], dim=1)
    return spent * 1000 / (len(ids) * rows), len(ids)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="smallest settings (a 6k large vocabulary, 2 rows, "
                                                             "one repeat, old processor on 4 tokens)")
    parser.add_argument("--rows", type=int, default=8, help="batch rows, each replaying the answer")
    parser.add_argument("--large-vocab", type=int, default=150_000, help="the large stand-in vocabulary")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of previous and new per case "
                                                               "(the lower mean of each is kept)")
    parser.add_argument("--old-tokens", type=int, default=None, help="tokens the old processor is timed on "
                                                                     "(default: all at 4096, 40 at the large one)")
    parser.add_argument("--kernels", action="store_true", help="also time library kernels applying the masks "
                                                                "(llguidance.torch, xgrammar if installed)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.large_vocab, args.repeats = 2, 6000, 1
        args.old_tokens = args.old_tokens or 4
    return args


def _best(runs: list[MaskTimes]) -> MaskTimes:
    return min(runs, key=lambda t: t.cpu)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    import miniatures.grammar as new_module
    from finetune.base import build_tokenizer

    hf_logging.set_verbosity_error()
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"({os.cpu_count()} CPUs)")
    texts = training_texts(400 if args.smoke else 12_000)
    started = time.perf_counter()
    tokenizers = {"4096 (bootstrapped)": build_tokenizer(texts[:400], vocab_size=4096)}
    tokenizers[f"{args.large_vocab // 1000}k (stand-in)"] = large_tokenizer(texts, args.large_vocab)
    print(f"tokenizers trained in {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{name}: {len(t)} tokens" for name, t in tokenizers.items()))
    old = load_old()
    if old is None:
        print("the old state machine is not in this checkout's git history: old columns left empty")
    previous = load_previous()
    if previous is None:
        print("the previous grammar module is not in this checkout's git history: its columns left empty")
    lines = ["| grammar | vocabulary | rows | previous: mask ms/token/row | new: mask ms/token/row | previous/new "
             "| new: mask CPU ms/token/row | new: median step CPU | steps over 0.5 ms CPU, previous -> new "
             "| new: processor ms/token/row | processor CPU | processor, masks on the executor "
             "| new: check-first greedy step ms/token/row | check-first CPU "
             "| compile CPU ms/row, previous -> new | old state machine ms/token (1 row) | old/new |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    kernel_lines = ["| grammar | vocabulary | rows | kernel | apply ms/token/row | apply CPU |", "|---|---|---:|---|---:|---:|"]
    worst = worst_cpu = worst_call = worst_call_cpu = worst_greedy = worst_greedy_cpu = 0.0
    for vocab_name, tokenizer in tokenizers.items():
        large = not vocab_name.startswith("4096")
        end: Any = tokenizer.convert_tokens_to_ids("<|im_end|>")
        stop = int(end)
        llt = new_module.llg_tokenizer(tokenizer, [stop])
        previous_llt = previous.llg_tokenizer(tokenizer, [stop]) if previous is not None else None
        for case in cases():
            grammar = case.grammar(new_module)
            ids = tokenizer(case.answer, add_special_tokens=False)["input_ids"] + [stop]
            new_runs: list[MaskTimes] = []
            previous_runs: list[MaskTimes] = []
            for _ in range(args.repeats):
                if previous is not None:
                    previous_runs.append(time_masks(previous, previous_llt, case.grammar(previous), ids, args.rows))
                new_runs.append(time_masks(new_module, llt, grammar, ids, args.rows))
            new = _best(new_runs)
            call, call_cpu = time_processor(llt, grammar, ids, args.rows, len(tokenizer), stop, None)
            pool = time_processor(llt, grammar, ids, args.rows, len(tokenizer), stop, 2)[0]
            greedy, greedy_cpu = time_greedy(llt, grammar, ids, args.rows, len(tokenizer), stop)
            worst_greedy, worst_greedy_cpu = max(worst_greedy, greedy), max(worst_greedy_cpu, greedy_cpu)
            if args.kernels:
                for name, (k_wall, k_cpu) in time_kernels(llt, grammar, ids, args.rows, len(tokenizer)).items():
                    kernel_lines.append(f"| {case.kind} | {vocab_name} | {args.rows} | {name} | {k_wall:.4f} "
                                        f"| {k_cpu:.4f} |")
                    print(kernel_lines[-1], flush=True)
            worst, worst_cpu, worst_call = max(worst, new.wall), max(worst_cpu, new.cpu), max(worst_call, call)
            worst_call_cpu = max(worst_call_cpu, call_cpu)
            previous_text, ratio, slow_text, compile_text = "-", "-", f"- -> {new.slow}", f"- -> {new.compile_ms:.1f}"
            if previous_runs:
                before = _best(previous_runs)
                previous_text, ratio = f"{before.wall:.4f}", f"{before.cpu / new.cpu:.1f}x"
                slow_text, compile_text = f"{before.slow} -> {new.slow}", f"{before.compile_ms:.1f} -> {new.compile_ms:.1f}"
            old_text, old_ratio = "-", "-"
            if old is not None and case.old is not None:
                limit = args.old_tokens or (40 if large else 10_000)
                old_ms, timed = time_old(old, tokenizer, case, 1, limit)
                old_text = f"{old_ms:.3f}" + (f" (first {timed})" if timed < len(ids) else "")
                old_ratio = f"{old_ms / call:.1f}x"
            lines.append(f"| {case.kind} ({len(ids)} tokens) | {vocab_name} | {args.rows} | {previous_text} "
                         f"| {new.wall:.4f} | {ratio} | {new.cpu:.4f} | {new.median:.4f} | {slow_text} | {call:.4f} "
                         f"| {call_cpu:.4f} | {pool:.4f} | {greedy:.4f} | {greedy_cpu:.4f} | {compile_text} "
                         f"| {old_text} | {old_ratio} |")
            print(lines[-1], flush=True)
            slowest = sorted(range(len(ids)), key=lambda k: -new.steps[k])[:SHOW_SLOW]
            print("    slowest new steps (CPU ms per row, the text the step's token ends): " + "; ".join(
                f"{new.steps[k]:.2f} {tokenizer.decode(ids[max(0, k - 2):k + 1])!r}" for k in sorted(slowest)),
                flush=True)
    load_end = os.getloadavg()
    lines.append("")
    lines.append(f"Load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at the end ({os.cpu_count()} CPUs). "
                 f"previous/new is the ratio of CPU times. Worst new mask cost {worst:.4f} ms per token and row of "
                 f"wall time, {worst_cpu:.4f} of CPU time (target <= 0.1: {'met' if worst_cpu <= 0.1 else 'NOT met'} "
                 f"in CPU time, {'met' if worst <= 0.1 else 'NOT met'} in wall time); worst whole processor call "
                 f"{worst_call:.4f} ms per token and row of wall time, {worst_call_cpu:.4f} of CPU time; worst "
                 f"check-first greedy step {worst_greedy:.4f} of wall time, {worst_greedy_cpu:.4f} of CPU time "
                 f"(target <= 0.1: {'met' if worst_greedy <= 0.1 else 'NOT met'} in wall time, on a replay whose "
                 f"every top token is allowed). Processor defaults here: masks "
                 f"{'on the shared executor' if (os.cpu_count() or 1) >= 4 else 'on the calling thread'}.")
    if args.kernels:
        lines += ["", "Mask application alone (the replay's masks, filled beforehand, applied to float32 scores in "
                      "place):", "", *kernel_lines]
    print("\n".join(lines))
    if args.out is not None and not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Grammar mask speed\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
