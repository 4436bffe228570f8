"""Benchmark: one campaign of demo prospects run by 1, 2 and 4 workers, local processes and Ray actors.

Both agents are backed by a fake OpenAI-compatible teacher on loopback (``evals.fake_teacher``: the heuristic
teacher's answer to the same messages, no sooner than 200 ms after the request arrived; in its own process),
so the work waits on I/O as it does with an API teacher. The teacher stands in for an API whose CPU is not
ours: an untimed warm-up pass (one worker over one copy of each distinct prospect, in a store of its own)
has it compute and keep the heuristic answer to every message the campaign sends, and each timed
configuration then gets those answers by lookup (``--no-warmup``: it forgets them before each configuration
and computes them again; the table's ``computed`` column counts answers computed in the timed part). Each
configuration gets a fresh store (SQLite file). Printed per configuration: wall seconds from the call to
the end of the last worker (worker start-up included), prospects/s, the ratio to one worker of the same
executor, seconds from the call to the first finished run (worker start-up plus one run), prospects/s
between the first and the last finished run (start-up left out), the CPU milliseconds per prospect of the
workers with the driver (local executor only) and of the teacher, and whether any trace is duplicated (each
run must have exactly one researcher and one writer trace). Then what the 1-worker store holds per run
(rows per table, bytes of the SQLite file) and the load average.

Usage: python benchmarks/campaign_scale.py [--prospects 2000] [--workers 1,2,4] [--executors local,ray]
       [--concurrency 4] [--latency-ms 200] [--out benchmarks/results/campaign_scale.md] [--smoke] [--no-warmup]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
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
    first_s: float
    steady_rate: float
    worker_cpu_ms: float
    teacher_cpu_ms: float
    computed: int
    max_in_flight: int
    duplicated: int
    missing: int
    load: tuple[float, float, float]


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def _load(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _post(url: str, body: dict[str, object] | None = None) -> None:
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback fake teacher
        answer.read()


def _stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=10) as answer:  # noqa: S310
        return dict(json.loads(answer.read()))


class _CpuMeter:
    """CPU seconds (user + system) used by this process and all its descendants but ``skip`` (the teacher)
    between ``start`` and ``stop``: the driver, the workers (forked from a fork server, or Ray's processes).
    Descendants are sampled every ``every_s`` seconds in a thread (a worker's last sample counts, so up to
    ``every_s`` of a worker's last CPU may be missed)."""

    def __init__(self, skip: int, every_s: float = 0.25) -> None:
        self.skip, self.every_s = skip, every_s
        self._seen: dict[int, float] = {}
        self._base: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            if proc.pid == self.skip:
                continue
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            self._seen[proc.pid] = times.user + times.system

    def start(self) -> None:
        self._sample()
        self._base = dict(self._seen)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return sum(cpu - self._base.get(pid, 0.0) for pid, cpu in self._seen.items())


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
             workers: int, concurrency: int, *, teacher_pid: int, keep_answers: bool, name: str | None = None,
             ) -> tuple[Row, str, Path]:
    path = root / f"store-{name or f'{executor}-{workers}'}.sqlite"
    url = f"sqlite:///{path}"
    engine = open_store(url)
    add_prospects(engine, "scale", offer, prospects)
    engine.dispose()
    spec = f"openai:fake@{base_url}"
    job = WorkerJob(store_url=url, campaign="scale", make_web=functools.partial(corpus_web, corpus_path),
                    researcher=spec, writer=spec, concurrency=concurrency)
    _post(base_url.removesuffix("/v1") + "/reset", {"answers": not keep_answers})
    teacher_cpu, meter = float(_stats(base_url)["cpu_s"]), _CpuMeter(teacher_pid)
    meter.start()
    started_at, started = time.time(), time.perf_counter()
    report = asyncio.run(run_campaign_workers(job, workers=workers, executor=executor, poll_s=1.0))  # type: ignore[arg-type]
    wall = time.perf_counter() - started
    cpu = meter.stop()
    stats = _stats(base_url)
    done, failed, duplicated, missing, finished = _check(url)
    steady = (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 and finished[-1] > finished[0] else 0.0
    assert report.done == done, f"the driver counted {report.done} done runs, the store holds {done}"
    n = len(prospects)
    return Row(executor, workers, done, failed, wall, n / wall, (finished[0] - started_at) if finished else 0.0,
               steady, 1000 * cpu / n,
               1000 * (float(stats["cpu_s"]) - teacher_cpu) / n, int(stats["computed"]),
               int(stats["max_in_flight"]), duplicated, missing, os.getloadavg()), url, path


def _warm_up(root: Path, corpus_path: Path, offer, prospects, base_url: str, concurrency: int,  # type: ignore[no-untyped-def]
             teacher_pid: int) -> tuple[int, float]:
    """The untimed pass that fills the teacher's answers: two local worker processes over one copy of each
    distinct prospect (copies differ only in their email address, which no prompt shows). In processes, not
    in this one's event loop: langchain-openai keeps one async HTTP client per base URL for a process, bound
    to the first event loop, so this process runs one campaign only (the timed 1-worker one). It also starts
    the fork server the local workers of every configuration fork from. Returns (answers held, seconds)."""
    seen: set[tuple[str, ...]] = set()
    distinct = []
    for row, p in prospects:
        key = (p.first_name, p.last_name, p.title, p.company, p.website)
        if key not in seen:
            seen.add(key)
            distinct.append((row, p))
    started = time.perf_counter()
    _run_one(root, corpus_path, offer, distinct, base_url, "local", 2, concurrency * 2, teacher_pid=teacher_pid,
             keep_answers=False, name="warm-up")
    return int(_stats(base_url)["answers"]), time.perf_counter() - started


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
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="no warm-up pass: the teacher computes its answers again in each configuration")
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
    warm: tuple[int, float] | None = None
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
        assert server.pid is not None
        try:
            if args.warmup:
                warm = _warm_up(root, corpus_path, offer, prospects, base_url, args.concurrency, server.pid)
                console.print(f"warm-up (untimed, fork server start included): the teacher holds {warm[0]} answers "
                              f"after {warm[1]:.1f} s")
            for executor in executors:
                if executor == "ray":
                    import ray

                    started = time.perf_counter()
                    ray.init(num_cpus=max(worker_counts), include_dashboard=False, log_to_driver=False)
                    ray_start_s = time.perf_counter() - started
                for workers in worker_counts:
                    row, url, path = _run_one(root, corpus_path, offer, prospects, base_url, executor, workers,
                                              args.concurrency, teacher_pid=server.pid, keep_answers=args.warmup)
                    rows.append(row)
                    console.print(f"{executor} x{workers}: {row.done} done in {row.wall_s:.1f} s "
                                  f"({row.rate:.2f} prospects/s, steady {row.steady_rate:.2f}), CPU ms/prospect "
                                  f"{row.worker_cpu_ms:.0f} + teacher {row.teacher_cpu_ms:.0f}, load {_load(row.load)}")
                    if not figures:
                        figures = _store_figures(url, path)
                if executor == "ray":
                    ray.shutdown()
        finally:
            server.terminate()
            server.join()
    load_after = os.getloadavg()

    base = {r.executor: r.rate for r in rows if r.workers == 1}
    table = Table(title=f"{args.prospects} demo prospects, fake teacher {args.latency_ms:.0f} ms per call, "
                        f"concurrency {args.concurrency} per worker")
    columns = ("executor", "workers", "done", "failed", "wall s", "prospects/s", "x 1 worker", "first run s",
               "steady prospects/s", "CPU ms/prospect", "teacher CPU ms/prospect", "computed", "most in flight",
               "duplicated traces", "load 1/5/15 after")
    for c in columns:
        table.add_column(c, justify="left" if c == "executor" else "right")
    cells = [[r.executor, str(r.workers), str(r.done), str(r.failed), f"{r.wall_s:.1f}", f"{r.rate:.2f}",
              f"{r.rate / base[r.executor]:.2f}x" if r.executor in base else "n/a", f"{r.first_s:.1f}",
              f"{r.steady_rate:.2f}", f"{r.worker_cpu_ms:.0f}", f"{r.teacher_cpu_ms:.1f}", str(r.computed),
              str(r.max_in_flight), str(r.duplicated + r.missing), _load(r.load)] for r in rows]
    for cell_row in cells:
        table.add_row(*cell_row)
    console.print(table)
    best4 = {r.executor: r.rate / base[r.executor] for r in rows if r.workers == 4 and r.executor in base}
    verdict = ", ".join(f"{e} {x:.2f}x" for e, x in best4.items()) or "no 4-worker configuration"
    steady_base = {r.executor: r.steady_rate for r in rows if r.workers == 1 and r.steady_rate}
    steady4 = ", ".join(f"{r.executor} {r.steady_rate / steady_base[r.executor]:.2f}x" for r in rows
                        if r.workers == 4 and r.executor in steady_base) or "n/a"
    console.print(f"4 workers vs 1: {verdict} (target >= {TARGET_RATIO:.0f}x); steady rates: {steady4}")
    dup = sum(r.duplicated + r.missing for r in rows)
    console.print(f"traces duplicated or missing: {dup} (target 0)")
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
        f"--latency-ms {args.latency_ms:g}{'' if args.warmup else ' --no-warmup'}`.",
        f"Load average (1/5/15 min): before {_load(load_before)}, after {_load(load_after)} (the machine is shared).",
        "", "| " + " | ".join(columns) + " |", "|---|" + "---|" * (len(columns) - 1),
        *["| " + " | ".join(c) + " |" for c in cells], "",
        f"4 workers vs 1: **{verdict}** (target >= {TARGET_RATIO:.0f}x); steady rates: {steady4}. "
        f"Traces duplicated or missing: **{dup}**.",
        "Wall s runs from the call to the end of the last worker: worker start-up (a process forked from the fork "
        "server, or a Ray actor importing the project) included; first run s: from the call to the first finished "
        "run; steady prospects/s counts from the first to the last finished run. CPU ms/prospect: this process "
        "(the driver) and all its descendants but the teacher (local workers; Ray's processes), per prospect; "
        "teacher CPU: the fake teacher's process.",
    ]
    if warm is not None:
        lines.append(f"Teacher: an untimed warm-up pass (two local workers, one copy of each distinct prospect, "
                     f"{warm[1]:.0f} s with the fork server's start) left it {warm[0]} heuristic answers; `computed` "
                     "counts answers it computed during a timed configuration (the rest were looked up), each "
                     "answered no sooner than the latency. The fork server the local workers fork from was started "
                     "by the warm-up, so no timed configuration pays its start (it is paid once per command).")
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
