"""Benchmark: training speed. Two tables, each measured side by side in one run.

1. LoRA training tokens/s and peak memory on the Qwen2-0.5B shape, with and without checkpointing. The base is a
   stand-in (``finetune.standins.build_standin("qwen2.5", shape="qwen2-0.5b")``: ``Qwen2Config`` with Qwen2-0.5B's
   dimensions and 151,936-token vocabulary, random weights, 494M parameters; speed and memory depend on the shapes,
   not on the weights). Each configuration runs ``finetune.train.main`` (TRL ``SFTTrainer``, LoRA r=16 on every
   projection, assistant-only loss) in its own process, so each peak is its own (``miniatures.device.PeakMemory``:
   the process's RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), at batch 1 on chat rows of about
   ``--tokens`` tokens. Tokens/s is the Trainer's non-padding input tokens over its train runtime.
2. ``outreach demo --distill``'s full fine-tuning of the 1.7M-parameter bootstrapped shape (``finetune.base``
   preset ``2m``, random weights, 4,096-token vocabulary) on rows shaped like the demo's: researcher sentence-tags
   rows (about 50 tokens, a short answer; the demo's: 48, 13% answer) and writer rows (about 860 tokens, a third of
   them answer; the demo's: 878, 32%). Milliseconds per row of one training step (forward, backward, AdamW) for
   TRL's default (its LM head scores every position on CPU), the compact LM head
   (``finetune.train.labelled_positions_only``: labelled positions only), a researcher batch of 16, and the
   demo's writer step (4 rows as 4 unpadded micro-batches of 1). The configurations take turns, ``--rounds``
   rounds of ``--rows`` rows each; each round's figure is its fastest step (the least disturbed by other
   processes) and the table gives the median over rounds.

The load average is printed: on a shared machine the figures move with it, so compare the ratios of one run.

Usage: python benchmarks/train_speed.py [--smoke] [--only checkpointing|demo] [--tokens 1200] [--steps 3]
       [--rows 64] [--rounds 4] [--threads N] [--out benchmarks/results/train_speed.md]
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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

WORDS = ("Acme Freight builds logistics software for regional carriers and their dispatch teams in Austin Texas "
         "since 2012 with eighty people the company serves mid sized fleets across the south").split()


def _rows(tokenizer: Any, n: int, tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` chat rows of about ``tokens`` tokens each (system, a long user text, a short JSON answer)."""
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = json.dumps({"facts": [{"field": "location", "value": "Austin", "evidence": f"S{rnd.randint(1, 40)}"}]})
        words: list[str] = []
        messages: list[dict[str, str]] = []
        while True:
            words.extend(rnd.choice(WORDS) for _ in range(40))
            messages = [{"role": "system", "content": "Extract the facts."},
                        {"role": "user", "content": " ".join(words)},
                        {"role": "assistant", "content": answer}]
            if len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) >= tokens:
                break
        rows.append({"messages": messages})
    return rows


def _child(spec: dict[str, Any]) -> None:
    """Run one configuration and print its metrics as JSON on the last line."""
    import logging

    from finetune.config import TrainConfig
    from finetune.train import main

    logging.basicConfig(level=logging.WARNING)
    result = main(TrainConfig(**spec))
    m = result.metrics
    print(json.dumps({k: m[k] for k in ("train_tokens_per_s", "peak_memory_gib", "peak_memory_kind", "train_tokens",
                                        "train_seconds", "gradient_checkpointing", "device", "total_params",
                                        "trainable_params", "max_length")}))


def _run(spec: dict[str, Any], *, in_process: bool) -> dict[str, Any]:
    if in_process:  # --smoke: no second torch import, the peak is then the process's so far
        from finetune.config import TrainConfig
        from finetune.train import main as train

        m = train(TrainConfig(**spec)).metrics
        return {k: m[k] for k in ("train_tokens_per_s", "peak_memory_gib", "peak_memory_kind", "gradient_checkpointing",
                                  "device", "total_params", "trainable_params", "max_length")}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"configuration failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


DEMO_WORDS = ("Amberbrook Analytics builds route planning software for third-party logistics providers from its "
              "offices in Denver Colorado and serves regional carriers mid sized fleets dispatch teams").split()


def _demo_rows(kind: str, n: int, rnd: random.Random, *, smoke: bool) -> list[dict[str, Any]]:
    """``n`` chat rows shaped like the demo's ``kind`` rows (``researcher`` or ``writer``), in words."""
    prompt_words, answer_words = {"researcher": (6, 1), "writer": (520, 240)}[kind]
    if smoke:
        prompt_words, answer_words = max(4, prompt_words // 10), max(2, answer_words // 10)
    rows = []
    for _ in range(n):
        jitter = rnd.randint(-prompt_words // 4, prompt_words // 4)
        prompt = " ".join(rnd.choice(DEMO_WORDS) for _ in range(prompt_words + jitter))
        answer = " ".join(rnd.choice(DEMO_WORDS) for _ in range(answer_words))
        if kind == "researcher":
            user, answer = f"Company: Amberbrook Analytics\nSource: amberbrook.example\nSentence: {prompt}.", \
                f"customer_segment | {answer}"
        else:
            user, answer = f"Write to Dana at Amberbrook. Facts: {prompt}.", json.dumps({"subject": "Routes",
                                                                                          "body": answer})
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return rows


#: (name, rows, per-device batch, micro-batches per optimizer step, compact LM head)
DEMO_CONFIGS: tuple[tuple[str, str, int, int, bool], ...] = (
    ("researcher: TRL default, batch 4", "researcher", 4, 1, False),
    ("researcher: compact head, batch 4", "researcher", 4, 1, True),
    ("researcher: compact head, batch 16", "researcher", 16, 1, True),
    ("writer: TRL default, batch 4", "writer", 4, 1, False),
    ("writer: compact head, batch 4", "writer", 4, 1, True),
    ("writer: compact head, 4 x batch 1", "writer", 1, 4, True),
)


def _demo_table(args: argparse.Namespace, tmp: Path) -> tuple[list[tuple[str, float, float, str]], str]:
    """Per-row step times of ``DEMO_CONFIGS``, in turns; returns (name, ms/row, ratio to the row kind's TRL default,
    rounds) rows and a line on the setup."""
    import statistics

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from finetune.base import bootstrap_base, load_base
    from finetune.train import labelled_positions_only

    rnd = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "an", "er", "is")]
    # the demo's words, and made-up words enough for the BPE to fill the demo's 4,096-token vocabulary
    texts = [" ".join(rnd.choice(DEMO_WORDS) if rnd.random() < 0.5 else
                      "".join(rnd.choice(syllables) for _ in range(rnd.randint(2, 4))) for _ in range(200))
             for _ in range(40 if args.smoke else 400)]
    info = bootstrap_base(tmp / "demo-base", texts, preset="2m", pretrain_steps=0, vocab_size=1024 if args.smoke
                          else 4096)
    model, tokenizer = load_base(str(info.path), device="cpu", dtype="float32")
    n_rows = 16 if args.smoke else max(16, args.rows)
    rounds = 1 if args.smoke else args.rounds
    setups = []
    for name, kind, batch, accumulate, compact in DEMO_CONFIGS:
        data = Dataset.from_list(_demo_rows(kind, n_rows, random.Random(1), smoke=args.smoke))
        config = SFTConfig(output_dir=str(tmp / "demo-run"), per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulate, assistant_only_loss=True, use_cpu=True,
                           report_to="none", disable_tqdm=True, learning_rate=1e-4, dataloader_drop_last=True,
                           max_length=4096)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        trainer.current_gradient_accumulation_steps = accumulate
        batches = list(trainer.get_train_dataloader())
        setups.append((name, kind, batch, accumulate, compact, trainer, batches))
    if args.threads:
        torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {name: [] for name, *_ in setups}
    for _ in range(rounds):
        for name, _kind, batch, accumulate, compact, trainer, batches in setups:
            optimizer = trainer.optimizer
            assert optimizer is not None  # made by create_optimizer_and_scheduler above
            steps = []
            for first in range(0, len(batches) - accumulate + 1, accumulate):
                started = time.perf_counter()
                with labelled_positions_only() if compact else nullcontext():
                    for micro in batches[first:first + accumulate]:
                        trainer.training_step(trainer.model, dict(micro), None)
                optimizer.step()
                optimizer.zero_grad()
                steps.append((time.perf_counter() - started) / (batch * accumulate))
            times[name].append(min(steps))
    table = []
    default: dict[str, float] = {}
    for name, kind, *_ in setups:
        ms = 1000 * statistics.median(times[name])
        default.setdefault(kind, ms)
        table.append((name, ms, default[kind] / ms, " / ".join(f"{1000 * t:.1f}" for t in times[name])))
    setup = (f"{info.n_params / 1e6:.1f}M-parameter {info.arch} (preset 2m, vocabulary {info.vocab_size}), full "
             f"fine-tuning, {n_rows} rows per configuration and round, {rounds} rounds, {torch.get_num_threads()} "
             "threads")
    return table, setup


def _checkpointing_table(args: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, Any]], str, float]:
    from transformers import AutoTokenizer

    from finetune.standins import build_standin

    shape, tokens, steps = ("tiny", 96, 1) if args.smoke else ("qwen2-0.5b", args.tokens, args.steps)
    started = time.perf_counter()
    base = build_standin("qwen2.5", tmp / "base", shape=shape)
    build_s = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = tmp / "data"
    data.mkdir()
    rows = _rows(tokenizer, steps, tokens)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    results = []
    for checkpointing in (False, True):
        spec = {"base_model": str(base), "dataset_dir": str(data), "output_dir": str(tmp / f"run{checkpointing}"),
                "max_steps": steps, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                "gradient_checkpointing": checkpointing, "logging_steps": 1, "save_steps": 1000,
                "warmup_ratio": 0.0}
        results.append(_run(spec, in_process=args.smoke))
    first = results[0]
    title = (f"LoRA training on the {shape} stand-in ({first['total_params'] / 1e6:.1f}M parameters, "
             f"{first['trainable_params'] / 1e6:.2f}M trainable), batch 1, {first['max_length']} tokens/row, "
             f"{steps} steps, {first['device']}")
    return results, title, build_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, short rows, few steps, in this process (seconds; figures not comparable)")
    parser.add_argument("--only", choices=("checkpointing", "demo"), default=None, help="run one of the two tables")
    parser.add_argument("--tokens", type=int, default=1200, help="checkpointing table: tokens per training row")
    parser.add_argument("--steps", type=int, default=3, help="checkpointing table: optimizer steps (batch 1)")
    parser.add_argument("--rows", type=int, default=64, help="demo table: rows per configuration and round")
    parser.add_argument("--rounds", type=int, default=4, help="demo table: rounds of turns")
    parser.add_argument("--threads", type=int, default=0, help="demo table: torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables as Markdown here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    from rich.console import Console
    from rich.table import Table

    load_before = os.getloadavg()
    console = Console()
    lines: list[str] = []
    build_note = ""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.only != "demo":
            results, title, build_s = _checkpointing_table(args, tmp)
            build_note = f"; stand-in built in {build_s:.0f} s"
            first = results[0]
            table = Table(title=title)
            for col in ("checkpointing", "tokens/s", "ratio", f"peak memory GiB ({first['peak_memory_kind']})",
                        "ratio "):
                table.add_column(col, justify="right")
            for r in results:
                table.add_row("on" if r["gradient_checkpointing"] else "off", f"{r['train_tokens_per_s']:.1f}",
                              f"{r['train_tokens_per_s'] / first['train_tokens_per_s']:.2f}",
                              f"{r['peak_memory_gib']:.2f}", f"{r['peak_memory_gib'] / first['peak_memory_gib']:.2f}")
            console.print(table)
            lines += [f"# {title}", "", "| checkpointing | tokens/s | ratio | peak memory GiB | ratio |",
                      "|---|---|---|---|---|"]
            lines += [f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['train_tokens_per_s']:.1f} | "
                      f"{r['train_tokens_per_s'] / first['train_tokens_per_s']:.2f} | {r['peak_memory_gib']:.2f} | "
                      f"{r['peak_memory_gib'] / first['peak_memory_gib']:.2f} |" for r in results]
            lines.append("")
        if args.only != "checkpointing":
            demo, setup = _demo_table(args, tmp / "demo")
            title = f"demo --distill training step per row: {setup}"
            table = Table(title=title)
            for col in ("configuration", "ms per row (median)", "speed-up vs TRL default", "per round"):
                table.add_column(col, justify="right")
            for name, ms, ratio, per_round in demo:
                table.add_row(name, f"{ms:.2f}", f"{ratio:.2f}x", per_round)
            console.print(table)
            lines += [f"# {title}", "", "| configuration | ms per row (median) | speed-up vs TRL default | per round |",
                      "|---|---|---|---|"]
            lines += [f"| {name} | {ms:.2f} | {ratio:.2f}x | {per_round} |" for name, ms, ratio, per_round in demo]
            lines.append("")
    load_after = os.getloadavg()
    load = (f"load average before {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, after "
            f"{load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"
            f"{build_note}")
    console.print(load)
    if args.out:
        command = " ".join(["python benchmarks/train_speed.py", *sys.argv[1:]])
        lines += [load, f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}`", ""]
        args.out.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
