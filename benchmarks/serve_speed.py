"""Benchmark: the OpenAI-compatible miniature server under 16 concurrent clients vs sequential in-process generation.

Setup (offline, in a temporary folder): a tiny Llama base (``finetune.base.bootstrap_base``, preset ``2m`` by
default, briefly pretrained on the text of a small demo world), two LoRA adapters on it (random, non-zero, so
they differ), registered as miniatures ``writer-bench`` and ``researcher-bench`` in a SQLite store.

1. **Sequential in-process**: one ``LocalEngine`` in this process answers the requests one by one with
   ``generate_sync`` (no batching), the way a single caller uses the ``miniature:`` backend.
2. **Served**: ``miniatures.server`` runs in a child process (uvicorn on 127.0.0.1, dynamic batching with
   ``--batch-size`` and ``--batch-window-ms``); 16 ``httpx.AsyncClient`` workers in this process send the same
   requests (same prompts, same adapters, ``max_tokens``, ``temperature`` 0) as fast as answers come back.

Both runs decode greedily, so they generate the same tokens; throughput is completion tokens per second of
wall time, latency is per request (served: as the client sees it, HTTP included). The target is a served
throughput at least 3x the sequential one.

Usage: python benchmarks/serve_speed.py [--requests 128] [--clients 16] [--max-tokens 32] [--preset 2m]
       [--threads 1] [--out benchmarks/results/serve_speed.md]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

NAMES = ("writer-bench", "researcher-bench")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_setup(folder: Path, preset: str, pretrain_steps: int) -> tuple[str, list[list[dict[str, str]]]]:
    """Make the base, two adapters and the store; return (store URL, prompts)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from evals.world import generate_world
    from finetune.base import bootstrap_base, corpus_texts
    from miniatures.registry import register_miniature
    from store import open_store
    from tools import Corpus, import_html

    world = folder / "world"
    generate_world(world, n_companies=12, seed=5, heldout_fraction=0.0)
    corpus = Corpus(folder / "corpus.sqlite")
    import_html(world / "sites", corpus, root=world / "sites")
    texts = list(corpus_texts(folder / "corpus.sqlite"))
    bootstrap_base(folder / "base", texts, preset=preset, pretrain_steps=pretrain_steps, vocab_size=2048,  # type: ignore[arg-type]
                   device="cpu")
    store_url = f"sqlite:///{folder / 'store.sqlite'}"
    store = open_store(store_url)
    for seed, name in enumerate(NAMES):
        torch.manual_seed(100 + seed)
        model = AutoModelForCausalLM.from_pretrained(folder / "base")
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(str(folder / name))
        register_miniature(store, name=name, agent=name.split("-")[0], base_model=str(folder / "base"),
                           adapter_path=str(folder / name), training_config={}, dataset_hash="bench", metrics={})
    store.dispose()
    rng = random.Random(0)
    prompts = []
    for i in range(64):
        text = texts[i % len(texts)]
        start = rng.randrange(max(1, len(text) - 500))
        prompts.append([
            {"role": "system", "content": "You write short, personal cold emails grounded in the page."},
            {"role": "user", "content": f"Page:\n{text[start:start + 500]}\n\nWrite the email (request {i})."},
        ])
    return store_url, prompts


def serve_child(store_url: str, port: int, batch_size: int, window_ms: float, threads: int | None,
                max_tokens: int) -> None:
    """Child process: serve the registered miniatures on 127.0.0.1:port until killed."""
    from miniatures.server import create_app, load_served_models, run_server
    from store import open_store

    models = load_served_models(open_store(store_url), device="cpu", num_threads=threads, max_new_tokens=max_tokens)
    app = create_app(models, max_batch_size=batch_size, batch_window_ms=window_ms)
    run_server(app, host="127.0.0.1", port=port, log_level="warning")


def run_sequential(store_url: str, requests: list[tuple[str, list[dict[str, str]]]], max_tokens: int,
                   threads: int | None) -> dict[str, Any]:
    from miniatures.server import load_served_models
    from store import open_store

    models = {m.name: m for m in load_served_models(open_store(store_url), device="cpu", num_threads=threads,
                                                     max_new_tokens=max_tokens)}
    engine = next(iter(models.values())).engine
    engine.generate_sync(models[NAMES[0]].adapter, requests[0][1], max_new_tokens=max_tokens)  # warm-up
    latencies, tokens, texts = [], 0, []
    started = time.perf_counter()
    for name, messages in requests:
        t0 = time.perf_counter()
        generation = engine.generate_sync(models[name].adapter, messages, max_new_tokens=max_tokens)
        latencies.append((time.perf_counter() - t0) * 1000)
        tokens += generation.output_tokens
        texts.append(generation.text)
    wall = time.perf_counter() - started
    engine.close()
    return {"wall_s": wall, "tokens": tokens, "latencies": latencies, "texts": texts}


async def _run_clients(base_url: str, requests: list[tuple[str, list[dict[str, str]]]], max_tokens: int,
                       clients: int) -> dict[str, Any]:
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    latencies: list[float] = [0.0] * len(requests)
    texts: list[str] = [""] * len(requests)
    tokens = 0
    errors = 0

    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=300,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        # warm-up: one request per adapter
        for name in NAMES:
            await client.post("/chat/completions", json={"model": name, "messages": requests[0][1], "max_tokens": 2})

        async def worker() -> None:
            nonlocal tokens, errors
            while not queue.empty():
                i = queue.get_nowait()
                name, messages = requests[i]
                t0 = time.perf_counter()
                response = await client.post("/chat/completions", json={
                    "model": name, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
                latencies[i] = (time.perf_counter() - t0) * 1000
                if response.status_code != 200:
                    errors += 1
                    continue
                body = response.json()
                tokens += body["usage"]["completion_tokens"]
                texts[i] = body["choices"][0]["message"]["content"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "latencies": latencies, "texts": texts, "errors": errors}


def run_served(store_url: str, requests: list[tuple[str, list[dict[str, str]]]], args: argparse.Namespace) -> \
        dict[str, Any]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve-child", store_url, "--port", str(port), "--batch-size",
           str(args.batch_size), "--batch-window-ms", str(args.batch_window_ms), "--max-tokens", str(args.max_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {child.stderr.read() if child.stderr else ''}")
            time.sleep(0.2)
        return asyncio.run(_run_clients(f"http://127.0.0.1:{port}/v1", requests, args.max_tokens, args.clients))
    finally:
        child.terminate()
        child.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--preset", default="2m", choices=["2m", "10m", "30m"])
    parser.add_argument("--pretrain-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in both runs (1: steady on a CPU shared with other jobs, see LocalEngine)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_speed.md")
    parser.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.serve_child:
        serve_child(args.serve_child, args.port, args.batch_size, args.batch_window_ms, args.threads, args.max_tokens)
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store_url, prompts = build_setup(Path(tmp), args.preset, args.pretrain_steps)
        setup_s = time.perf_counter() - t0
        requests = [(NAMES[i % 2], prompts[i % len(prompts)]) for i in range(args.requests)]
        sequential = run_sequential(store_url, requests, args.max_tokens, args.threads)
        served = run_served(store_url, requests, args)
    load_after = os.getloadavg()

    same = sum(a == b for a, b in zip(sequential["texts"], served["texts"], strict=True))
    rows = []
    for label, result in (("sequential in-process (generate_sync)", sequential),
                          (f"served, {args.clients} concurrent clients", served)):
        rows.append((label, result["wall_s"], result["tokens"], result["tokens"] / result["wall_s"],
                     len(requests) / result["wall_s"], statistics.median(result["latencies"]),
                     _percentile(result["latencies"], 0.95)))
    ratio = rows[1][3] / rows[0][3]
    import torch

    lines = [
        "# Serving speed: OpenAI-compatible server vs sequential in-process generation",
        "",
        f"`python benchmarks/serve_speed.py --requests {args.requests} --clients {args.clients} --max-tokens "
        f"{args.max_tokens} --batch-size {args.batch_size} --batch-window-ms {args.batch_window_ms:g} --preset "
        f"{args.preset}`, run {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"- machine: {_cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__} (CPU), torch threads "
        f"{args.threads or torch.get_num_threads()}",
        f"- load average (1/5/15 min): before {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (other jobs shared this machine)",
        f"- model: tiny Llama, preset {args.preset} (`finetune.base.bootstrap_base`, {args.pretrain_steps} pretraining "
        "steps), two rank-8 LoRA adapters on it, requests alternating between them; greedy, at most "
        f"{args.max_tokens} new tokens; prompts of a system line and 500 characters of a demo-world page",
        f"- setup (world, base, adapters) {setup_s:.1f} s; identical answers in both runs: {same} of {len(requests)}; "
        f"served errors: {served['errors']}",
        "",
        "| run | wall s | completion tokens | tokens/s | requests/s | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.0f} | {r[6]:.0f} |" for r in rows]
    lines += [
        "",
        f"**Throughput ratio served / sequential: {ratio:.2f}x** (target >= 3x).",
        "",
        "Served latency is what a client sees (HTTP on loopback, JSON, queueing in the batch window and behind the "
        "batch in progress); the server runs in its own process, the clients in this one.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))  # noqa: T201 - a script's report


if __name__ == "__main__":
    main()
