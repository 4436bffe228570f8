"""Benchmark: answer-grammar mask cost per token and row, llguidance grammars vs the removed state machine.

Measures, side by side in one run, for each grammar kind (extraction answer, email answer, one sentence's
sentence-tags answer) and two vocabularies (the bootstrapped bases' 4096 tokens, ``finetune.base.build_tokenizer``,
and a 150k-token byte-level BPE trained here with ``tokenizers`` as a stand-in for Qwen/Llama-3 sized
vocabularies):

* ``new``: ``miniatures.grammar.GrammarLogitsProcessor`` (llguidance token masks) called as transformers calls
  it, once per generated token, on a batch of rows that each replay a valid answer token by token;
* ``previous``: the llguidance processor before its masks were applied in place (a float bias row per row
  and step through a 256-entry table), loaded from git history like ``old``, fed the same rows;
* ``old``: the hand-written state machine this project used before (``miniatures/constrained.py`` and the
  ``TagGrammar`` of ``miniatures/formats.py``), loaded from git history into temporary modules (the repository
  keeps no dead copy), fed the same answers through its own ``GrammarProcessor``, one row (its cost is per row;
  its per-state mask cache is kept, as in generation).

``mask ms/token`` is wall time divided by tokens x rows (target: at most 0.1 ms per token and row), given for
the new grammar as llguidance's mask alone (each row's bit mask filled and its token consumed on the calling
thread; also its median step: a few steps that enter a new lexer state cost milliseconds, the rest
microseconds) and as the whole processor call (plus the refused tokens set to ``-inf`` in place on float32
scores), with its defaults and with each step's masks filled by one call on llguidance's executor. The old processor scans the
vocabulary in Python for each new state, so at 150k tokens it is timed on the first ``--old-tokens`` tokens of
each answer only (the table says so; early tokens are mostly fixed JSON
text, its cheapest states, so that figure flatters it). Compile ms is the new grammar's llguidance compile
time per row (the old one has none). The load average is printed before and after; figures from a shared
machine are upper bounds.

Usage: python benchmarks/grammar_speed.py [--smoke] [--rows 8] [--large-vocab 150000] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from core.tasks import ExtractionTask, FieldSpec, MergeTag, OfferBrief, Sentence, WritingTask  # noqa: E402

OLD_FILES = ("miniatures/constrained.py", "miniatures/formats.py")
FIELDS = ("location", "founded_year", "employee_count", "product", "industry", "customers", "funding", "news")
SYLLABLES = ("ka", "ri", "to", "mel", "an", "vor", "su", "ne", "lo", "bra", "di", "quen", "sa", "or", "fi", "zu",
             "pe", "lan", "tor", "mi", "ga", "res", "ul", "che", "no", "ba", "ver", "is", "do", "ha")


@dataclass
class Case:
    """One grammar kind: its task (or sentence), the answer replayed, and the old grammar's inputs."""

    kind: str
    new_grammar: str
    answer: str
    old: Any  # (prompt text) for old extraction/email, (sentence, fields) for old tags


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


def cases(seed: int = 11, n_sentences: int = 40) -> list[Case]:
    """The three grammar kinds with realistic sizes: 8 fields and 40 sentences; 8 merge tags; one sentence."""
    from miniatures.grammar import answer_grammar, tag_grammar

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
    tags = ("first_name", "company", "sender_name", *(f"fact.{f}" for f in FIELDS[:5]))
    writing = WritingTask(offer=OfferBrief(sender_title="AE", product="Ledgerline", value_proposition="v",
                                           call_to_action="c", opt_out_line="o"),
                          merge_tags=tuple(MergeTag(name=t, description=t) for t in tags))
    body = (" ".join(_word(rnd) for _ in range(30)) + " {{fact.location}} " + " ".join(_word(rnd) for _ in range(30))
            + "\\n\\nBest, {{sender_name}}")
    email = '{"subject": "{{company}} and ' + _word(rnd) + '", "body": "Hi {{first_name}}, ' + body + '"}'
    old_email = "Merge tags you may use:\n" + "".join(f"{{{{{t}}}}}: {t}\n" for t in tags)
    sentence = sentences[3].text
    tag_answer = f"product | {' '.join(sentence.split()[1:4])}"
    return [
        Case("extraction", answer_grammar(task), extraction, old_extraction),
        Case("writing", answer_grammar(writing), email, old_email),
        Case("sentence tags", tag_grammar(sentence, FIELDS), tag_answer, (sentence, FIELDS)),
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
    """The previous llguidance processor (bits turned into a float bias row through a 256-entry table, one
    Python call per row) from git history, as a temporary module, or None."""
    text = _from_history("miniatures/grammar.py", "def _bias_table")
    if text is None:
        return None
    module = types.ModuleType("previous_grammar")
    sys.modules["previous_grammar"] = module
    exec(compile(text, "previous_grammar", "exec"), module.__dict__)  # noqa: S102 - our own history
    return module


def time_previous(previous: Any, tokenizer: Any, case: Case, rows: int) -> float:
    """ms per token and row of the previous ``GrammarLogitsProcessor`` on the same answer and rows."""
    import torch

    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    llt = previous.llg_tokenizer(tokenizer, [stop])
    processor = previous.GrammarLogitsProcessor(llt, [case.new_grammar] * rows, 1, [stop])
    ids = tokenizer(case.answer, add_special_tokens=False)["input_ids"] + [stop]
    scores = torch.zeros((rows, len(tokenizer)))
    prefix = torch.zeros((rows, 1), dtype=torch.long)
    spent = 0.0
    for token in ids:
        run_scores = scores.clone()
        started = time.perf_counter()
        processor(prefix, run_scores)
        spent += time.perf_counter() - started
        prefix = torch.cat([prefix, torch.full((rows, 1), token)], dim=1)
    return spent * 1000 / (len(ids) * rows)


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
class NewTimes:
    """The new grammar's figures for one case (ms per token and row unless said)."""

    mask: float  # llguidance alone, row by row on the calling thread: fill the row's mask, consume its token
    mask_median: float  # the median step of ``mask``
    processor: float  # GrammarLogitsProcessor.__call__ with its defaults
    processor_median: float  # the median step of ``processor``
    processor_pool: float  # the same with every step's masks filled by one call on the shared executor
    compile_ms: float  # compile ms per row
    tokens: int


def time_new(tokenizer: Any, case: Case, rows: int) -> NewTimes:
    """The new grammar's figures over ``rows`` rows replaying ``case.answer``, each on fresh matchers.

    The llguidance figure is the matchers alone, row by row on the calling thread (``fill_next_token_bitmask``
    into one int32 bit mask, ``consume_token``); the processor figures are ``GrammarLogitsProcessor.__call__``
    as generate calls it (the same, plus the refused tokens set to ``-inf`` in place on float32 scores of the
    vocabulary's width), with its defaults (on fewer than 4 CPUs: the calling thread) and with every step's
    masks filled by one ``fill_next_token_bitmask_par`` call on the shared executor.
    """
    import statistics

    import llguidance.numpy as llg_numpy
    import torch

    from miniatures.grammar import GrammarLogitsProcessor, llg_tokenizer, matcher

    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    llt = llg_tokenizer(tokenizer, [stop])
    ids = tokenizer(case.answer, add_special_tokens=False)["input_ids"] + [stop]
    started = time.perf_counter()
    matchers = [matcher(llt, case.new_grammar) for _ in range(rows)]
    compile_ms = (time.perf_counter() - started) * 1000 / rows
    bits = llg_numpy.allocate_token_bitmask(rows, len(tokenizer))
    steps = []
    for token in ids:
        started = time.perf_counter()
        for row, m in enumerate(matchers):
            llg_numpy.fill_next_token_bitmask(m, bits, row)
            m.consume_token(token)
        steps.append((time.perf_counter() - started) * 1000 / rows)

    def processor_ms(parallel_rows: int | None) -> tuple[float, float]:
        processor = GrammarLogitsProcessor(llt, [case.new_grammar] * rows, 1, [stop], parallel_rows=parallel_rows)
        scores = torch.zeros((rows, len(tokenizer)))
        prefix = torch.zeros((rows, 1), dtype=torch.long)
        spent = []
        for k, token in enumerate(ids):
            run_scores = scores.clone()
            started = time.perf_counter()
            out = processor(prefix, run_scores)
            spent.append((time.perf_counter() - started) * 1000 / rows)
            assert bool(torch.isfinite(out[0, token])), f"{case.kind}: the new grammar refused token {k} of a valid answer"
            prefix = torch.cat([prefix, torch.full((rows, 1), token)], dim=1)
        return sum(spent) / len(spent), statistics.median(spent)

    processor, processor_median = processor_ms(None)
    return NewTimes(mask=sum(steps) / len(steps), mask_median=statistics.median(steps), processor=processor,
                    processor_median=processor_median, processor_pool=processor_ms(2)[0], compile_ms=compile_ms,
                    tokens=len(ids))


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
                                                             "old processor on 4 tokens)")
    parser.add_argument("--rows", type=int, default=8, help="batch rows, each replaying the answer")
    parser.add_argument("--large-vocab", type=int, default=150_000, help="the large stand-in vocabulary")
    parser.add_argument("--old-tokens", type=int, default=None, help="tokens the old processor is timed on "
                                                                     "(default: all at 4096, 40 at the large one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.large_vocab = 2, 6000
        args.old_tokens = args.old_tokens or 4
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

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
        print("the previous llguidance processor is not in this checkout's git history: its columns left empty")
    lines = ["| grammar | vocabulary | rows | new: llguidance mask ms/token/row | mask, median step | new: processor "
             "ms/token/row | processor, median step | processor, masks on the executor | previous processor "
             "(bias table) | previous/new | new compile ms/row | old processor ms/token (1 row) | old/new processor |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst = worst_call = worst_median = 0.0
    for vocab_name, tokenizer in tokenizers.items():
        large = not vocab_name.startswith("4096")
        for case in cases():
            new = time_new(tokenizer, case, args.rows)
            n_tokens, new_ms = new.tokens, new.processor
            worst = max(worst, new.mask)
            worst_call = max(worst_call, new_ms)
            worst_median = max(worst_median, new.processor_median)
            old_text, ratio, previous_text, previous_ratio = "-", "-", "-", "-"
            if previous is not None:
                previous_ms = time_previous(previous, tokenizer, case, args.rows)
                previous_text, previous_ratio = f"{previous_ms:.4f}", f"{previous_ms / new_ms:.1f}x"
            if old is not None:
                limit = args.old_tokens or (40 if large else 10_000)
                old_ms, timed = time_old(old, tokenizer, case, 1, limit)
                old_text = f"{old_ms:.3f}" + (f" (first {timed})" if timed < n_tokens else "")
                ratio = f"{old_ms / new_ms:.1f}x"
            lines.append(f"| {case.kind} ({n_tokens} tokens) | {vocab_name} | {args.rows} | {new.mask:.4f} "
                         f"| {new.mask_median:.4f} | {new_ms:.4f} | {new.processor_median:.4f} | {new.processor_pool:.4f} "
                         f"| {previous_text} | {previous_ratio} | {new.compile_ms:.2f} "
                         f"| {old_text} | {ratio} |")
            print(lines[-1], flush=True)
    load_end = os.getloadavg()
    lines.append("")
    lines.append(f"Load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at the end ({os.cpu_count()} CPUs). "
                 f"Worst new llguidance mask cost {worst:.4f} ms per token and row (target <= 0.1: "
                 f"{'met' if worst <= 0.1 else 'NOT met'}); worst whole processor call {worst_call:.4f} ms per token "
                 f"and row ({'met' if worst_call <= 0.1 else 'NOT met'}); worst median processor step {worst_median:.4f} ms "
                 f"per row. Processor defaults here: masks "
                 f"{'on the shared executor' if (os.cpu_count() or 1) >= 4 else 'on the calling thread'}.")
    print("\n".join(lines))
    if args.out is not None and not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Grammar mask speed\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
