"""Benchmark: LoRA training tokens/s and peak memory on the Qwen2-0.5B shape, with and without checkpointing.

The base is a stand-in (``finetune.standins.build_standin("qwen2.5", shape="qwen2-0.5b")``: ``Qwen2Config`` with
Qwen2-0.5B's dimensions and 151,936-token vocabulary, random weights, 494M parameters; speed and memory depend on
the shapes, not on the weights). Each configuration runs ``finetune.train.main`` (TRL ``SFTTrainer``, LoRA r=16 on
every projection, assistant-only loss) in its own process, so each peak is its own (``miniatures.device.PeakMemory``:
the process's RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), at batch 1 on chat rows of about
``--tokens`` tokens. Tokens/s is the Trainer's non-padding input tokens over its train runtime. The load average is
printed before and after: on a shared machine the figures move with it, so compare the ratios of one run.

Usage: python benchmarks/train_speed.py [--smoke] [--tokens 1200] [--steps 3] [--out benchmarks/results/train_speed.md]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, short rows, 1 step, in this process (seconds; peaks not comparable)")
    parser.add_argument("--tokens", type=int, default=1200, help="tokens per training row")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (batch 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as Markdown here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from finetune.standins import build_standin

    shape, tokens, steps = ("tiny", 96, 1) if args.smoke else ("qwen2-0.5b", args.tokens, args.steps)
    load_before = os.getloadavg()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        base = build_standin("qwen2.5", Path(tmp) / "base", shape=shape)
        build_s = time.perf_counter() - started
        tokenizer = AutoTokenizer.from_pretrained(base)
        data = Path(tmp) / "data"
        data.mkdir()
        rows = _rows(tokenizer, steps, tokens)
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        results = []
        for checkpointing in (False, True):
            spec = {"base_model": str(base), "dataset_dir": str(data), "output_dir": str(Path(tmp) / f"run{checkpointing}"),
                    "max_steps": steps, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                    "gradient_checkpointing": checkpointing, "logging_steps": 1, "save_steps": 1000,
                    "warmup_ratio": 0.0}
            results.append(_run(spec, in_process=args.smoke))
    load_after = os.getloadavg()
    first = results[0]
    table = Table(title=f"LoRA training on the {shape} stand-in ({first['total_params'] / 1e6:.1f}M parameters, "
                        f"{first['trainable_params'] / 1e6:.2f}M trainable), batch 1, {first['max_length']} tokens/row, "
                        f"{steps} steps, {first['device']}")
    for col in ("checkpointing", "tokens/s", "ratio", f"peak memory GiB ({first['peak_memory_kind']})", "ratio "):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row("on" if r["gradient_checkpointing"] else "off", f"{r['train_tokens_per_s']:.1f}",
                      f"{r['train_tokens_per_s'] / first['train_tokens_per_s']:.2f}", f"{r['peak_memory_gib']:.2f}",
                      f"{r['peak_memory_gib'] / first['peak_memory_gib']:.2f}")
    console.print(table)
    load = (f"load average before {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, after "
            f"{load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (1/5/15 min) on {os.cpu_count()} CPUs; "
            f"stand-in built in {build_s:.0f} s")
    console.print(load)
    if args.out:
        lines = [f"# {table.title}", "", "| checkpointing | tokens/s | ratio | peak memory GiB | ratio |",
                 "|---|---|---|---|---|"]
        lines += [f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['train_tokens_per_s']:.1f} | "
                  f"{r['train_tokens_per_s'] / first['train_tokens_per_s']:.2f} | {r['peak_memory_gib']:.2f} | "
                  f"{r['peak_memory_gib'] / first['peak_memory_gib']:.2f} |" for r in results]
        command = " ".join(["python benchmarks/train_speed.py", *sys.argv[1:]])
        lines += ["", load, f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}`", ""]
        args.out.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
