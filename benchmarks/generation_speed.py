"""Benchmark: generation tokens/s at batch 1 and 8, in-process engine against llama.cpp (f16 and q8_0), one run.

The model is a stand-in of Qwen2-0.5B (``finetune.standins.build_standin("qwen2.5", shape="qwen2-0.5b")``:
``Qwen2Config`` with Qwen2-0.5B's dimensions and 151,936-token vocabulary, random weights, 494M parameters;
generation speed depends on the shapes, not on the weights). Engines, side by side on the same prompts:

- ``miniatures.local.LocalEngine`` (transformers, float32 on CPU): batch 1 is requests one after the other,
  batch 8 is eight requests gathered with asyncio, which the engine decodes together (continuous batching);
- llama.cpp's ``llama-server`` on the GGUF export of the same folder (``miniatures.gguf``), ``f16`` and
  ``q8_0``, ``--parallel 8``: batch 1 is requests one after the other, batch 8 is eight concurrent requests,
  which the server decodes together (continuous batching).

Every request makes exactly ``--new-tokens`` tokens (the engine's stop ids replaced by one no model emits;
llama-server's ``ignore_eos``), greedy. Tokens/s is generated tokens over the wall time of the requests,
prompt processing included, the same measure for both engines; each engine answers one warm-up request
first. Threads: ``--threads`` for both (torch ``set_num_threads``; llama-server ``--threads``,
``--threads-batch``). The load average is printed before and after: on a shared machine the figures move
with it, so compare the ratios of one run.

llama.cpp runs when its converters and ``llama-server`` are found (``--llama-cpp`` or ``OUTREACH_LLAMA_CPP``;
see ``miniatures.gguf``); otherwise its rows say why they are missing. ``--smoke`` uses a tiny stand-in and
skips llama.cpp unless ``--with-llama-cpp`` is given (the GGUF conversion alone takes longer than a smoke run).

Usage: python benchmarks/generation_speed.py [--smoke] [--new-tokens 32] [--threads 2] [--llama-cpp DIR]
       [--work DIR] [--out benchmarks/results/generation_speed.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

BATCHES = (1, 8)
SYSTEM = "You write short, specific cold emails for a B2B logistics software vendor."
USER = ("Write to Dana Reyes, Head of Operations at Acme Freight (Austin, Texas; 85 people; founded 2012). "
        "Acme Freight builds dispatch software for regional carriers and recently opened a Denver office. "
        "Offer: route planning that cuts empty miles. Call to action: a 15-minute call next week.")


@dataclass
class Row:
    """One measured configuration."""

    engine: str
    batch: int
    requests: int
    prompt_tokens: float
    tokens: int
    seconds: float
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _chats(n: int) -> list[list[dict[str, str]]]:
    """``n`` distinct chats of about the same length (a number differs, so no prompt cache is shared whole)."""
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{USER} (request {i + 1})"}]
            for i in range(n)]


def build_model(folder: Path, smoke: bool) -> Path:
    """The stand-in base: tiny for ``--smoke``, else Qwen2-0.5B's shape."""
    from finetune.standins import build_standin

    return build_standin("qwen2.5", folder, shape="tiny" if smoke else "qwen2-0.5b")


async def _gather(engine: Any, chats: list[list[dict[str, str]]], new_tokens: int) -> tuple[int, float, float]:
    """Generated tokens, wall seconds and mean prompt tokens of ``chats`` answered together."""
    from miniatures.local import BASE_ADAPTER

    started = time.perf_counter()
    answers = await asyncio.gather(*[engine.generate(BASE_ADAPTER, c, max_new_tokens=new_tokens) for c in chats])
    seconds = time.perf_counter() - started
    return sum(a.output_tokens for a in answers), seconds, sum(a.input_tokens for a in answers) / len(answers)


async def bench_local(base: Path, new_tokens: int, threads: int, sequential: int) -> list[Row]:
    """LocalEngine at batch 1 (``sequential`` requests one after the other) and batch 8 (one gathered batch)."""
    from miniatures.local import LocalEngine

    engine = LocalEngine(str(base), device="cpu", dtype="float32", max_batch_size=max(BATCHES), num_threads=threads,
                         max_new_tokens=new_tokens, batch_window_ms=20.0)
    engine.stop_token_ids = [len(engine.tokenizer) + 1_000_000]  # no model emits it: exactly new_tokens each
    rows: list[Row] = []
    try:
        await _gather(engine, _chats(1), 2)  # warm-up
        tokens, seconds, prompt = 0, 0.0, 0.0
        for chat in _chats(sequential):
            made, took, prompt = await _gather(engine, [chat], new_tokens)
            tokens, seconds = tokens + made, seconds + took
        rows.append(Row("in-process (transformers f32)", 1, sequential, prompt, tokens, seconds))
        calls = engine.generate_calls
        made, took, prompt = await _gather(engine, _chats(8), new_tokens)
        rows.append(Row("in-process (transformers f32)", 8, 8, prompt, made, took,
                        f"{engine.generate_calls - calls} decoding run(s)"))
    finally:
        engine.close()
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _post_all(client: Any, url: str, chats: list[list[dict[str, str]]],
                    new_tokens: int) -> tuple[int, float, float]:
    """Generated tokens, wall seconds and mean prompt tokens of ``chats`` sent at once."""
    body = {"model": "bench", "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    answers = await asyncio.gather(*[client.post(url, json={**body, "messages": c}) for c in chats])
    seconds = time.perf_counter() - started
    for answer in answers:
        answer.raise_for_status()
    usage = [a.json()["usage"] for a in answers]
    return (sum(int(u["completion_tokens"]) for u in usage), seconds,
            sum(int(u["prompt_tokens"]) for u in usage) / len(usage))


async def _bench_server(argv: list[str], port: int, label: str, new_tokens: int, sequential: int,
                        log: Path) -> list[Row]:
    import httpx

    with log.open("w") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"llama-server exited {process.returncode}; see {log}")
                try:
                    if (await client.get(f"{base}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server not healthy after 300 s; see {log}")
                await asyncio.sleep(0.5)
            url = f"{base}/v1/chat/completions"
            await _post_all(client, url, _chats(1), 2)  # warm-up
            tokens, seconds, prompt = 0, 0.0, 0.0
            for chat in _chats(sequential):
                made, took, prompt = await _post_all(client, url, [chat], new_tokens)
                tokens, seconds = tokens + made, seconds + took
            rows = [Row(label, 1, sequential, prompt, tokens, seconds)]
            made, took, prompt = await _post_all(client, url, _chats(8), new_tokens)
            rows.append(Row(label, 8, 8, prompt, made, took, "--parallel 8"))
            return rows
    finally:
        process.terminate()
        process.wait(timeout=60)


async def bench_llama_cpp(base: Path, work: Path, new_tokens: int, threads: int, sequential: int,
                          llama_cpp: str | None) -> tuple[list[Row], list[str]]:
    """llama-server on the f16 and q8_0 GGUF of ``base``; returns rows and notes (why something is missing)."""
    from miniatures.gguf import GgufError, convert_model, find_llama_cpp, find_llama_server

    try:
        folder = find_llama_cpp(llama_cpp)
    except GgufError as exc:
        return [], [f"llama.cpp not measured: {exc}"]
    executable = find_llama_server(llama_cpp=folder)
    if executable is None:
        return [], [f"llama.cpp not measured: no llama-server on PATH nor in {folder}/build/bin"]
    rows: list[Row] = []
    notes: list[str] = []
    for outtype in ("f16", "q8_0"):
        started = time.perf_counter()
        gguf = work / f"bench-{outtype}.gguf"
        if not gguf.is_file() or gguf.stat().st_mtime < (base / "config.json").stat().st_mtime:
            convert_model(base, gguf, outtype=outtype, llama_cpp=folder)
            notes.append(f"{outtype}: GGUF {gguf.stat().st_size / 2**20:.0f} MiB, converted in "
                         f"{time.perf_counter() - started:.0f} s")
        else:
            notes.append(f"{outtype}: GGUF {gguf.stat().st_size / 2**20:.0f} MiB (kept from an earlier run)")
        port = _free_port()
        ctx = 8 * 512
        argv = [executable, "-m", str(gguf), "--alias", "bench", "--jinja", "--temp", "0", "--parallel", "8",
                "--ctx-size", str(ctx), "--threads", str(threads), "--threads-batch", str(threads),
                "--host", "127.0.0.1", "--port", str(port)]
        rows += await _bench_server(argv, port, f"llama.cpp llama-server {outtype}", new_tokens, sequential,
                                    work / f"server-{outtype}.log")
    return rows, notes


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def render(rows: list[Row], notes: list[str], args: argparse.Namespace, load_before: str, load_after: str,
           shape: str) -> str:
    """The results as a Markdown table with ratios to the in-process engine at batch 1."""
    reference = next((r.tokens_per_s for r in rows if r.engine.startswith("in-process") and r.batch == 1), 0.0)
    lines = [
        f"Generation speed: {shape} stand-in (random weights), {args.new_tokens} new tokens per request, greedy, "
        f"{args.threads} thread(s); tokens/s = generated tokens / wall time, prompt processing included",
        "",
        "| engine | batch | requests | prompt tokens | tokens | wall s | tokens/s | x in-process batch 1 | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r.tokens_per_s / reference:.2f}" if reference else "-"
        lines.append(f"| {r.engine} | {r.batch} | {r.requests} | {r.prompt_tokens:.0f} | {r.tokens} | {r.seconds:.1f} | "
                     f"{r.tokens_per_s:.1f} | {ratio} | {r.note} |")
    lines += ["", *[f"- {n}" for n in notes],
              f"- load average (1/5/15 min) before: {load_before}; after: {load_after}; "
              f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny stand-in, few tokens, no llama.cpp (seconds)")
    parser.add_argument("--with-llama-cpp", action="store_true", help="with --smoke: measure llama.cpp too")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--sequential", type=int, default=2, help="requests of the batch-1 rows")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads of both")
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp folder (default: $OUTREACH_LLAMA_CPP)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the stand-in and GGUF files here and reuse them in later runs (default: a temp dir)")
    args = parser.parse_args()
    if args.smoke:
        args.new_tokens, args.sequential, args.threads = min(args.new_tokens, 4), 1, 1
    import logging

    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="generation-speed-") as tmp:
        work = (args.work / ("smoke" if args.smoke else "qwen2-0.5b")) if args.work else Path(tmp)
        shape = "tiny" if args.smoke else "Qwen2-0.5B-shaped"
        started = time.perf_counter()
        if (work / "base" / "config.json").is_file():
            base = work / "base"
        else:
            base = build_model(work / "base", args.smoke)
            print(f"stand-in built in {time.perf_counter() - started:.0f} s", flush=True)
        rows = asyncio.run(bench_local(base, args.new_tokens, args.threads, args.sequential))
        for row in rows:
            print(f"  {row.engine} batch {row.batch}: {row.tokens_per_s:.1f} tokens/s", flush=True)
        notes: list[str] = []
        if args.smoke and not args.with_llama_cpp:
            notes.append("llama.cpp not measured: --smoke (add --with-llama-cpp)")
        else:
            more, notes = asyncio.run(bench_llama_cpp(base, work, args.new_tokens, args.threads, args.sequential,
                                                      args.llama_cpp))
            rows += more
    table = render(rows, notes, args, load_before, _load(), shape)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
