"""Benchmark: the OpenAI-compatible miniature server: 16 concurrent clients vs sequential in-process generation, and
short requests while one long request runs.

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

3. **Long request** (``--scenario long``): for each server setting, ``--short-clients`` clients send short
   requests (``--short-max-tokens``) back to back, first alone, then while one long request runs (sent 0.2 s
   before them); the latency of the short requests begun while it ran is what one long request costs the others.
   Before: no cap (``max_tokens_cap=None``), the long request asks 10^9 tokens and gets what the model's context
   leaves. After: the default cap (``miniatures.server.DEFAULT_MAX_TOKENS_CAP``), 10^9 is refused (400) and the
   long request asks for the cap. The long request's prompt is the first that does not end within 48 tokens.
   Then ``/health`` is polled every 20 ms while a 3.9 MB prompt is tokenised (and refused as too long).

Usage: python benchmarks/serve_speed.py [--smoke] [--scenario all|throughput|long] [--requests 128] [--clients 16]
       [--max-tokens 32] [--preset 2m] [--threads 1] [--out benchmarks/results/serve_speed.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Iterator
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
                max_tokens: int, max_tokens_cap: int) -> None:
    """Child process: serve the registered miniatures on 127.0.0.1:port until killed (``max_tokens_cap`` 0: none)."""
    from miniatures.server import create_app, load_served_models, run_server
    from store import open_store

    models = load_served_models(open_store(store_url), device="cpu", num_threads=threads, max_new_tokens=max_tokens)
    app = create_app(models, max_batch_size=batch_size, batch_window_ms=window_ms,
                     max_tokens_cap=max_tokens_cap or None)
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


@contextlib.contextmanager
def served_child(store_url: str, args: argparse.Namespace, max_tokens_cap: int | None) -> Iterator[str]:
    """Run ``serve_child`` in a child process; yields its base URL (``http://127.0.0.1:<port>/v1``)."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve-child", store_url, "--port", str(port), "--batch-size",
           str(args.batch_size), "--batch-window-ms", str(args.batch_window_ms), "--max-tokens", str(args.max_tokens),
           "--max-tokens-cap", str(max_tokens_cap or 0)]
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
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        child.terminate()
        child.wait(timeout=30)


def run_served(store_url: str, requests: list[tuple[str, list[dict[str, str]]]], args: argparse.Namespace) -> \
        dict[str, Any]:
    from miniatures.server import DEFAULT_MAX_TOKENS_CAP

    with served_child(store_url, args, DEFAULT_MAX_TOKENS_CAP) as base_url:
        return asyncio.run(_run_clients(base_url, requests, args.max_tokens, args.clients))


async def _shorts(client: Any, prompts: list[list[dict[str, str]]], args: argparse.Namespace,
                  running: asyncio.Event | None, count: int) -> list[float]:
    """Latencies (ms) of short requests from ``args.short_clients`` clients: ``count`` each, or (``running``
    given) as many as each begins while ``running`` is set."""
    latencies: list[float] = []

    async def one_client(c: int) -> None:
        i = 0
        while (running.is_set() if running is not None else i < count):
            t0 = time.perf_counter()
            response = await client.post("/chat/completions", json={
                "model": NAMES[1], "messages": prompts[(c * 7 + i) % len(prompts)],
                "max_tokens": args.short_max_tokens})
            response.raise_for_status()
            latencies.append((time.perf_counter() - t0) * 1000)
            i += 1

    await asyncio.gather(*(one_client(c) for c in range(args.short_clients)))
    return latencies


async def _long_prompt(client: Any, prompts: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """The first prompt whose answer does not end within 48 tokens (so the long request runs long)."""
    for messages in prompts:
        body = (await client.post("/chat/completions", json={"model": NAMES[0], "messages": messages,
                                                              "max_tokens": 48})).json()
        if body["choices"][0]["finish_reason"] == "length":
            return messages
    return prompts[0]


async def _long_vs_short(base_url: str, prompts: list[list[dict[str, str]]], args: argparse.Namespace,
                         cap: int | None) -> dict[str, Any]:
    """Short latencies alone and while one long request runs (10^9 tokens without a cap, the cap with one)."""
    import httpx

    limits = httpx.Limits(max_connections=args.short_clients + 4)
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=600, limits=limits) as client:
        long_messages = await _long_prompt(client, prompts)
        alone = await _shorts(client, prompts, args, None, 6)
        refused: tuple[int, float] | None = None
        if cap is not None:
            t0 = time.perf_counter()
            response = await client.post("/chat/completions", json={"model": NAMES[0], "messages": long_messages,
                                                                     "max_tokens": 10**9})
            refused = (response.status_code, (time.perf_counter() - t0) * 1000)
        long_tokens = cap or 10**9
        running = asyncio.Event()
        running.set()

        async def long_request() -> dict[str, Any]:
            t0 = time.perf_counter()
            response = await client.post("/chat/completions", json={"model": NAMES[0], "messages": long_messages,
                                                                     "max_tokens": long_tokens})
            running.clear()
            response.raise_for_status()
            return {"s": time.perf_counter() - t0, "tokens": response.json()["usage"]["completion_tokens"]}

        task = asyncio.ensure_future(long_request())
        await asyncio.sleep(0.2)  # the long request is in the engine first
        during = await _shorts(client, prompts, args, running, 0)
        long = await task
    return {"alone": alone, "during": during, "long": long, "asked": long_tokens,
            "refused": refused}


async def _health_during_huge_prompt(base_url: str) -> dict[str, Any]:
    import httpx

    root = base_url.removesuffix("/v1")
    prompt = "freight " * 490_000
    async with httpx.AsyncClient(trust_env=False, timeout=600) as client:
        t0 = time.perf_counter()
        huge = asyncio.ensure_future(client.post(f"{base_url}/chat/completions", json={
            "model": NAMES[0], "messages": [{"role": "user", "content": prompt}]}))
        health: list[float] = []
        while not huge.done():
            h0 = time.perf_counter()
            (await client.get(f"{root}/health")).raise_for_status()
            health.append((time.perf_counter() - h0) * 1000)
            await asyncio.sleep(0.02)
        response = await huge
    return {"status": response.status_code, "code": response.json().get("error", {}).get("code"),
            "s": time.perf_counter() - t0, "health": health, "bytes": len(prompt)}


def run_long(store_url: str, prompts: list[list[dict[str, str]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Scenario 3 for no cap (before) and the default cap (after)."""
    from miniatures.server import DEFAULT_MAX_TOKENS_CAP

    results = []
    for label, cap in (("before: no cap", None), (f"after: cap {DEFAULT_MAX_TOKENS_CAP}", DEFAULT_MAX_TOKENS_CAP)):
        with served_child(store_url, args, cap) as base_url:
            result = asyncio.run(_long_vs_short(base_url, prompts, args, cap))
            if cap is not None:
                result["huge"] = asyncio.run(_health_during_huge_prompt(base_url))
        results.append({"label": label, **result})
    return results


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} / {_percentile(values, 0.95):.0f} / {max(values):.0f}"


def long_lines(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        "## Short requests while one long request runs",
        "",
        f"{args.short_clients} clients send short requests (`max_tokens` {args.short_max_tokens}) back to back, alone "
        "and while one long request runs; latencies as the client sees them, ms.",
        "",
        "| server | 10^9 max_tokens | long request: asked / made tokens, s | short alone p50 / p95 / max | "
        "short during the long one: n, p50 / p95 / max |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        refused = "runs" if r["refused"] is None else f"{r['refused'][0]} in {r['refused'][1]:.0f} ms"
        asked = "10^9" if r["asked"] == 10**9 else str(r["asked"])
        lines.append(f"| {r['label']} | {refused} | "
                     f"{asked} / {r['long']['tokens']}, {r['long']['s']:.1f} s | {_ms(r['alone'])} | "
                     f"{len(r['during'])}, {_ms(r['during'])} |")
    huge = results[-1]["huge"]
    lines += [
        "",
        f"**p95 of short requests while one long request runs: {_percentile(results[0]['during'], 0.95):.0f} ms "
        f"before, {_percentile(results[-1]['during'], 0.95):.0f} ms after.**",
        "",
        f"`/health` polled every 20 ms while a {huge['bytes'] / 1e6:.1f} MB prompt was tokenised off the event loop "
        f"(answer {huge['status']} {huge['code']} after {huge['s']:.1f} s): {len(huge['health'])} answers, "
        f"p50 / p95 / max {_ms(huge['health'])} ms.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="smallest run that checks the script works (throughput only, 4 requests of 4 tokens, "
                             "2 clients, no pretraining, nothing written)")
    parser.add_argument("--scenario", default="all", choices=["all", "throughput", "long"])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--short-clients", type=int, default=8, help="long scenario: clients of short requests")
    parser.add_argument("--short-max-tokens", type=int, default=8, help="long scenario: max_tokens of a short request")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--preset", default="2m", choices=["2m", "10m", "30m"])
    parser.add_argument("--pretrain-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in both runs (1: steady on a CPU shared with other jobs, see LocalEngine)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_speed.md")
    parser.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens-cap", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.scenario, args.requests, args.clients, args.max_tokens, args.pretrain_steps = "throughput", 4, 2, 4, 0
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.serve_child:
        serve_child(args.serve_child, args.port, args.batch_size, args.batch_window_ms, args.threads, args.max_tokens,
                    args.max_tokens_cap)
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store_url, prompts = build_setup(Path(tmp), args.preset, args.pretrain_steps)
        setup_s = time.perf_counter() - t0
        requests = [(NAMES[i % 2], prompts[i % len(prompts)]) for i in range(args.requests)]
        sequential = served = None
        if args.scenario in ("all", "throughput"):
            sequential = run_sequential(store_url, requests, args.max_tokens, args.threads)
            served = run_served(store_url, requests, args)
        long = run_long(store_url, prompts, args) if args.scenario in ("all", "long") else None
    load_after = os.getloadavg()
    import torch

    lines = [
        "# Serving speed: OpenAI-compatible server vs sequential in-process generation; long and short requests",
        "",
        f"`python benchmarks/serve_speed.py --scenario {args.scenario} --requests {args.requests} --clients "
        f"{args.clients} --max-tokens {args.max_tokens} --short-clients {args.short_clients} --short-max-tokens "
        f"{args.short_max_tokens} --batch-size {args.batch_size} --batch-window-ms {args.batch_window_ms:g} --preset "
        f"{args.preset}`, run {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"- machine: {_cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__} (CPU), torch threads "
        f"{args.threads or torch.get_num_threads()}",
        f"- load average (1/5/15 min): before {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (other jobs shared this machine)",
        f"- model: tiny Llama, preset {args.preset} (`finetune.base.bootstrap_base`, {args.pretrain_steps} pretraining "
        "steps, 4096 positions), two rank-8 LoRA adapters on it; greedy; prompts of a system line and 500 characters "
        f"of a demo-world page; setup (world, base, adapters) {setup_s:.1f} s",
        "",
    ]
    if sequential is not None and served is not None:
        lines += throughput_lines(sequential, served, requests, args)
    if long is not None:
        lines += long_lines(long, args)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))
    print("\n".join(lines))  # noqa: T201 - a script's report


def throughput_lines(sequential: dict[str, Any], served: dict[str, Any], requests: list[Any],
                     args: argparse.Namespace) -> list[str]:
    same = sum(a == b for a, b in zip(sequential["texts"], served["texts"], strict=True))
    rows = []
    for label, result in (("sequential in-process (generate_sync)", sequential),
                          (f"served, {args.clients} concurrent clients", served)):
        rows.append((label, result["wall_s"], result["tokens"], result["tokens"] / result["wall_s"],
                     len(requests) / result["wall_s"], statistics.median(result["latencies"]),
                     _percentile(result["latencies"], 0.95)))
    ratio = rows[1][3] / rows[0][3]
    lines = [
        "## Throughput: 16 concurrent clients vs sequential in-process",
        "",
        f"Requests alternate between the two adapters, at most {args.max_tokens} new tokens each; identical answers "
        f"in both runs: {same} of {len(requests)}; served errors: {served['errors']}.",
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
    return lines


if __name__ == "__main__":
    main()
