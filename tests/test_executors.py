"""Workers sharing one store (graphs.executors): Ray actors (a local Ray, started once for this module) and
local processes, against a fake OpenAI-compatible teacher on loopback.

Every run must end exactly once, with exactly one researcher and one writer trace, however the workers
share the runs, and when a Ray worker is killed in the middle of a run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from evals.fake_teacher import FakeTeacher
from graphs.executors import ExecutorError, WorkerJob, check_executor, corpus_web, run_campaign_workers
from graphs.runner import RunEvent, add_prospects
from store import open_store
from store.models import Run, RunStatus, Trace
from tests.helpers import small_world


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def campaign(tmp_path: Path) -> tuple[str, Path, int]:
    """A campaign of 6 demo prospects in a SQLite file store: (store URL, corpus path, prospects)."""
    _, corpus, offer, prospects = small_world(tmp_path, n=6)
    corpus.close()
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    engine = open_store(url)
    add_prospects(engine, "c", offer, prospects)
    engine.dispose()
    return url, tmp_path / "corpus.sqlite", len(prospects)


def _assert_each_run_once(url: str, n: int) -> list[Run]:
    engine = open_store(url)
    with Session(engine) as s:
        runs = s.exec(select(Run)).all()
        traces = s.exec(select(Trace)).all()
    engine.dispose()
    assert len(runs) == n and all(r.status == RunStatus.DONE for r in runs)
    assert Counter((t.run_id, t.agent) for t in traces) == Counter(
        {(r.id, agent): 1 for r in runs for agent in ("researcher", "writer")})
    return list(runs)


def test_ray_workers_run_every_prospect_once(local_ray, campaign) -> None:
    url, corpus, n = campaign
    events: list[RunEvent] = []
    with FakeTeacher(latency_s=0.05) as base_url:
        spec = f"openai:fake@{base_url}"
        job = WorkerJob(store_url=url, campaign="c", make_web=functools.partial(corpus_web, corpus),
                        researcher=spec, writer=spec, concurrency=2)
        report = asyncio.run(run_campaign_workers(job, workers=2, executor="ray", on_event=events.append,
                                                  poll_s=0.2))
    assert (report.total, report.done, report.failed, report.skipped) == (n, n, 0, 0)
    assert sorted(e.status for e in events) == [RunStatus.DONE] * n
    _assert_each_run_once(url, n)
    again = asyncio.run(run_campaign_workers(job, workers=2, executor="ray"))  # finished: nothing to redo
    assert (again.total, again.done, again.skipped) == (0, 0, n)


def test_a_killed_ray_worker_loses_nothing_and_doubles_nothing(local_ray, campaign) -> None:
    url, corpus, n = campaign
    engine = open_store(url)
    killed: list[str] = []

    def kill_when_busy(actor: Any, pid: int) -> None:
        """Kill ``actor`` as soon as it holds a run that is working (its lease names the actor's process)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with Session(engine) as s:
                busy = [r for r in s.exec(select(Run).where(Run.status == RunStatus.RUNNING)).all()
                        if f":{pid}:" in (r.lease_owner or "")]
            if busy:
                local_ray.kill(actor)
                killed.append(str(busy[0].id))
                return
            time.sleep(0.05)

    def on_actors(actors: list[Any]) -> None:
        pids = local_ray.get([a.pid.remote() for a in actors])
        threading.Thread(target=kill_when_busy, args=(actors[0], pids[0]), daemon=True).start()

    with FakeTeacher(latency_s=0.4) as base_url:
        spec = f"openai:fake@{base_url}"
        job = WorkerJob(store_url=url, campaign="c", make_web=functools.partial(corpus_web, corpus),
                        researcher=spec, writer=spec, concurrency=1, run_options={"lease_s": 3.0})
        report = asyncio.run(run_campaign_workers(job, workers=2, executor="ray", on_ray_actors=on_actors,
                                                  poll_s=0.2))
    engine.dispose()
    assert killed, "the worker was never seen holding a run"
    assert (report.done, report.failed) == (n, 0)
    runs = _assert_each_run_once(url, n)
    assert max(r.attempts for r in runs) >= 2  # the killed worker's run was claimed again and redone


def test_local_worker_processes_share_the_runs(campaign) -> None:
    url, corpus, n = campaign
    job = WorkerJob(store_url=url, campaign="c", make_web=functools.partial(corpus_web, corpus), concurrency=2)
    report = asyncio.run(run_campaign_workers(job, workers=2, executor="local", poll_s=0.2))
    assert (report.total, report.done, report.failed) == (n, n, 0)
    runs = _assert_each_run_once(url, n)
    assert len({r.lease_owner for r in runs}) >= 1


@pytest.mark.parametrize(("url", "executor", "workers", "address", "message"), [
    ("sqlite:///s.sqlite", "ray", 2, "10.0.0.5:6379", "cannot share the SQLite store"),
    ("sqlite:///s.sqlite", "ray", 2, "auto", "use a PostgreSQL store"),
    ("sqlite://", "local", 2, None, "lives in one process's memory"),
    ("sqlite:///s.sqlite", "local", 0, None, "--workers must be >= 1"),
    ("sqlite:///s.sqlite", "dask", 1, None, "unknown executor 'dask'"),
    ("sqlite:///s.sqlite", "local", 1, "10.0.0.5:6379", "needs --executor ray"),
])
def test_what_an_executor_cannot_do_is_refused_before_any_work(url, executor, workers, address, message) -> None:
    pytest.importorskip("ray")
    with pytest.raises(ExecutorError, match=message):
        check_executor(url, executor, workers, address)


def test_a_postgres_store_may_use_a_ray_cluster() -> None:
    pytest.importorskip("ray")
    check_executor("postgresql+psycopg://u@db.internal/outreach", "ray", 8, "ray://head:10001")


def _done(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("select count(*) from runs where status = 'done'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def _workers_of(pid: int) -> list[int]:
    """Pids of the live processes (a fork server and its workers) that ``pid`` started, found in /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.slow
def test_killing_the_driver_ends_its_workers_and_a_rerun_resumes(tmp_path: Path) -> None:
    world = tmp_path / "world"
    db = tmp_path / "store.sqlite"
    env = {**os.environ, "OUTREACH_CONFIG": str(tmp_path / "none.toml")}
    cli = [sys.executable, "-m", "outreach"]
    common = ["--store", f"sqlite:///{db}", "--corpus", str(tmp_path / "corpus.sqlite")]
    subprocess.run([*cli, "world", "generate", "--out", str(world), "--companies", "60", "--seed", "5",
                    "--heldout", "0", *common[2:]], check=True, env=env, capture_output=True, timeout=300)
    run = [*cli, "run", str(world / "prospects_train.csv"), "--offer", str(world / "offer.toml"), "--campaign", "k",
           "--concurrency", "1", "--workers", "2", *common]
    driver = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _done(db) < 5 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    children = _workers_of(driver.pid)
    grandchildren = [g for c in children for g in _workers_of(c)]
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    assert 5 <= _done(db) < 60, "the kill should land mid-campaign"
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() for p in grandchildren) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in grandchildren if Path(f"/proc/{p}").exists()]
    assert grandchildren and not alive, "the workers outlived their driver"
    finished = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    with sqlite3.connect(db) as conn:
        assert Counter(s for (s,) in conn.execute("select status from runs")) == {"done": 60}
        traces = Counter(conn.execute("select run_id, agent from traces").fetchall())
        assert len(traces) == 120 and set(traces.values()) == {1}
