"""Benchmark: one campaign of demo prospects run by 1, 2 and 4 workers, local processes and Ray actors.

Both agents are backed by a fake OpenAI-compatible teacher on loopback (``evals.fake_teacher``: the heuristic
teacher's answer to the same messages, no sooner than 200 ms after the request arrived; in its own process),
so the work waits on I/O as it does with an API teacher. Each configuration gets a fresh store (SQLite file)
and the teacher forgets its computed answers before each, so each pays the same. Printed per configuration:
wall seconds from the call to the end of the last worker (worker start-up included), prospects/s, the ratio
to one worker of the same executor, prospects/s between the first and the last finished run (start-up left
out), and whether any trace is duplicated (each run must have exactly one researcher and one writer trace).
Then what the 1-worker store holds per run (rows per table, bytes of the SQLite file) and the load average.

Usage: python benchmarks/campaign_scale.py [--prospects 2000] [--workers 1,2,4] [--executors local,ray]
       [--concurrency 4] [--latency-ms 200] [--out benchmarks/results/campaign_scale.md] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, text
from sqlmodel import Session, select

from evals.fake_teacher import FakeTeacher
from evals.world import generate_world
from graphs.executors import WorkerJob, corpus_web, run_campaign_workers
from graphs.inputs import load_offer, read_prospects_csv
from graphs.runner import add_prospects
from store import open_store
from store.models import EmailRecord, FactRecord, ProfileRecord, Run, RunStatus, ToolCall, Trace
from tools import Corpus, import_html

#: Issue 15's target: prospects/s at 4 workers over 1 worker.
TARGET_RATIO = 3.0


@dataclass
class Row:
    executor: str
    workers: int
    done: int
    failed: int
    wall_s: float
    rate: float
    steady_rate: float
    duplicated: int
    missing: int
    load: tuple[float, float, float]


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def _load(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _post(url: str) -> None:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback fake teacher
        answer.read()


def _prospects(world: Path, n: int) -> list:  # type: ignore[type-arg]
    """``n`` prospects: the world's train prospects again and again, each copy with its own email address."""
    base = read_prospects_csv(world / "prospects_train.csv").prospects
    out = []
    for i in range(n):
        row, p = base[i % len(base)]
        local, domain = p.email.split("@", 1)
        out.append((i + 2, p.model_copy(update={"email": f"{local}.{i // len(base)}@{domain}"})))
    return out


def _check(store_url: str) -> tuple[int, int, int, int, list[float]]:
    """(done, failed, duplicated trace keys, runs missing a trace, finish times in seconds) of a store."""
    engine = open_store(store_url)
    with Session(engine) as s:
        runs = s.exec(select(Run)).all()
        keys = Counter((t.run_id, t.agent) for t in s.exec(select(Trace)).all())
    engine.dispose()
    done = sum(r.status == RunStatus.DONE for r in runs)
    failed = sum(r.status == RunStatus.FAILED for r in runs)
    duplicated = sum(1 for c in keys.values() if c > 1)
    missing = sum(1 for r in runs if r.status == RunStatus.DONE
                  for agent in ("researcher", "writer") if keys[(r.id, agent)] == 0)
    finished = sorted(r.finished_at.timestamp() for r in runs if r.finished_at is not None)
    return done, failed, duplicated, missing, finished


def _store_figures(store_url: str, path: Path) -> dict[str, float]:
    """Rows per run of each table and bytes per run of the SQLite file (after VACUUM) of a finished store."""
    engine = open_store(store_url)
    with Session(engine) as s:
        runs = s.exec(select(func.count()).select_from(Run)).one()
        rows = {name: s.exec(select(func.count()).select_from(model)).one() / runs for name, model in (
            ("traces", Trace), ("tool_calls", ToolCall), ("profiles", ProfileRecord), ("facts", FactRecord),
            ("emails", EmailRecord))}
        trace_bytes = s.execute(text("SELECT sum(length(CAST(messages AS TEXT)) + length(output)) FROM traces")).scalar()
    with engine.connect() as conn:
        conn.execute(text("VACUUM"))
    engine.dispose()
    return {**rows, "runs": runs, "bytes_per_run": path.stat().st_size / runs,
            "trace_text_bytes_per_run": (trace_bytes or 0) / runs}


def _run_one(root: Path, corpus_path: Path, offer, prospects, base_url: str, executor: str,  # type: ignore[no-untyped-def]
             workers: int, concurrency: int) -> tuple[Row, str, Path]:
    path = root / f"store-{executor}-{workers}.sqlite"
    url = f"sqlite:///{path}"
    engine = open_store(url)
    add_prospects(engine, "scale", offer, prospects)
    engine.dispose()
    spec = f"openai:fake@{base_url}"
    job = WorkerJob(store_url=url, campaign="scale", make_web=functools.partial(corpus_web, corpus_path),
                    researcher=spec, writer=spec, concurrency=concurrency)
    _post(base_url.removesuffix("/v1") + "/reset")
    started = time.perf_counter()
    report = asyncio.run(run_campaign_workers(job, workers=workers, executor=executor, poll_s=1.0))  # type: ignore[arg-type]
    wall = time.perf_counter() - started
    done, failed, duplicated, missing, finished = _check(url)
    steady = (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 and finished[-1] > finished[0] else 0.0
    assert report.done == done, f"the driver counted {report.done} done runs, the store holds {done}"
    return Row(executor, workers, done, failed, wall, len(prospects) / wall, steady, duplicated, missing,
               os.getloadavg()), url, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prospects", type=int, default=2000)
    parser.add_argument("--companies", type=int, default=200)
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--executors", default="local,ray", help="local and/or ray, comma-separated")
    parser.add_argument("--concurrency", type=int, default=4, help="runs in flight per worker")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="the fake teacher's latency per call")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as Markdown here")
    parser.add_argument("--smoke", action="store_true", help="smallest settings: 16 prospects, 1 and 2 local workers")
    args = parser.parse_args()
    if args.smoke:
        args.prospects, args.companies, args.workers, args.executors, args.latency_ms = 16, 8, "1,2", "local", 50.0
    worker_counts = [int(w) for w in args.workers.split(",")]
    executors = [e.strip() for e in args.executors.split(",")]
    console = Console() if Console().is_terminal else Console(width=160)
    load_before = os.getloadavg()
    rows: list[Row] = []
    figures: dict[str, float] = {}
    ray_start_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = root / "world"
        generate_world(world, n_companies=args.companies, seed=7, heldout_fraction=0.0)
        corpus_path = root / "corpus.sqlite"
        corpus = Corpus(corpus_path)
        import_html(world / "sites", corpus, root=world / "sites")
        corpus.close()
        offer = load_offer(world / "offer.toml")
        prospects = _prospects(world, args.prospects)
        server, base_url = FakeTeacher.in_subprocess(args.latency_ms / 1000)
        try:
            for executor in executors:
                if executor == "ray":
                    import ray

                    started = time.perf_counter()
                    ray.init(num_cpus=max(worker_counts), include_dashboard=False, log_to_driver=False)
                    ray_start_s = time.perf_counter() - started
                for workers in worker_counts:
                    row, url, path = _run_one(root, corpus_path, offer, prospects, base_url, executor, workers,
                                              args.concurrency)
                    rows.append(row)
                    console.print(f"{executor} x{workers}: {row.done} done in {row.wall_s:.1f} s "
                                  f"({row.rate:.2f} prospects/s), load {_load(row.load)}")
                    if not figures:
                        figures = _store_figures(url, path)
                if executor == "ray":
                    ray.shutdown()
            with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=10) as answer:  # noqa: S310
                stats = json.loads(answer.read())
        finally:
            server.terminate()
            server.join()
    load_after = os.getloadavg()

    base = {r.executor: r.rate for r in rows if r.workers == 1}
    table = Table(title=f"{args.prospects} demo prospects, fake teacher {args.latency_ms:.0f} ms per call, "
                        f"concurrency {args.concurrency} per worker")
    columns = ("executor", "workers", "done", "failed", "wall s", "prospects/s", "x 1 worker", "steady prospects/s",
               "duplicated traces", "load 1/5/15 after")
    for c in columns:
        table.add_column(c, justify="left" if c == "executor" else "right")
    cells = [[r.executor, str(r.workers), str(r.done), str(r.failed), f"{r.wall_s:.1f}", f"{r.rate:.2f}",
              f"{r.rate / base[r.executor]:.2f}x" if r.executor in base else "n/a", f"{r.steady_rate:.2f}",
              str(r.duplicated + r.missing), _load(r.load)] for r in rows]
    for cell_row in cells:
        table.add_row(*cell_row)
    console.print(table)
    best4 = {r.executor: r.rate / base[r.executor] for r in rows if r.workers == 4 and r.executor in base}
    verdict = ", ".join(f"{e} {x:.2f}x" for e, x in best4.items()) or "no 4-worker configuration"
    console.print(f"4 workers vs 1: {verdict} (target >= {TARGET_RATIO:.0f}x)")
    dup = sum(r.duplicated + r.missing for r in rows)
    console.print(f"traces duplicated or missing: {dup} (target 0); teacher requests {stats['requests']}, "
                  f"statuses {stats['statuses']}, most in flight {stats['max_in_flight']}")
    if figures:
        console.print("per run in the store: " + ", ".join(
            f"{k} {v:.2f}" for k, v in figures.items() if k not in ("runs", "bytes_per_run", "trace_text_bytes_per_run"))
            + f"; {figures['bytes_per_run']:.0f} bytes of SQLite file ({figures['trace_text_bytes_per_run']:.0f} of "
            "them trace messages and outputs)")
    if ray_start_s:
        console.print(f"Ray start (ray.init, not in the walls above): {ray_start_s:.1f} s")
    console.print(f"load average (1/5/15 min): before {_load(load_before)}, after {_load(load_after)}; {_machine()}")
    if args.out is None:
        return
    lines = [
        "# Campaign scale", "",
        f"Machine: {_machine()}. Command: `python benchmarks/campaign_scale.py --prospects {args.prospects} "
        f"--workers {args.workers} --executors {args.executors} --concurrency {args.concurrency} "
        f"--latency-ms {args.latency_ms:g}`.",
        f"Load average (1/5/15 min): before {_load(load_before)}, after {_load(load_after)} (the machine is shared).",
        "", "| " + " | ".join(columns) + " |", "|---|" + "---|" * (len(columns) - 1),
        *["| " + " | ".join(c) + " |" for c in cells], "",
        f"4 workers vs 1: **{verdict}** (target >= {TARGET_RATIO:.0f}x). Traces duplicated or missing: **{dup}**.",
        f"Fake teacher: {stats['requests']} requests in the last configuration, most in flight at once "
        f"{stats['max_in_flight']}.",
        "Wall s runs from the call to the end of the last worker: worker start-up (a process or actor importing "
        "the project) included; steady prospects/s counts from the first to the last finished run.",
    ]
    if ray_start_s:
        lines.append(f"Ray start (`ray.init`, once, not in the walls): {ray_start_s:.1f} s.")
    if figures:
        lines += ["", f"Per run in the 1-worker store ({figures['runs']:.0f} runs): " + ", ".join(
            f"{k} {v:.2f} rows" for k, v in figures.items()
            if k not in ("runs", "bytes_per_run", "trace_text_bytes_per_run"))
            + f"; **{figures['bytes_per_run']:.0f} bytes** of SQLite file after VACUUM, "
            f"{figures['trace_text_bytes_per_run']:.0f} of them the traces' messages and outputs."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
