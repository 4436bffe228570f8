"""Several workers on one campaign (graphs.runner with store.claims): a lease that expires while its run still
works, a worker that loses the store, retries shared by workers, and `outreach run` processes killed with -9."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlmodel import Session, select

from core.errors import UserError
from graphs.models import ModelPool
from graphs.runner import add_prospects, run_campaign
from store import open_store
from store.claims import StoreUnavailableError
from store.models import EmailRecord, Run, RunStatus, Trace
from tests.helpers import scripted, small_world
from tests.store_urls import STORE_KINDS, fresh_store_url
from tools import CorpusWeb
from tools.corpus import Corpus
from tools.types import Document, SearchHit

ROOT = Path(__file__).resolve().parents[1]


def _rows(engine: Engine, model):  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        return list(s.exec(select(model)).all())


def _other_engine(engine: Engine) -> Engine:
    return open_store(engine.url.render_as_string(hide_password=False), migrate_schema=False)


def _assert_each_run_once(engine: Engine, n: int) -> None:
    """Every run done, one email per run, exactly one researcher and one writer trace per run."""
    assert Counter(r.status for r in _rows(engine, Run)) == {RunStatus.DONE: n}
    assert sorted(Counter(e.run_id for e in _rows(engine, EmailRecord)).values()) == [1] * n
    traces = Counter((t.run_id, t.agent) for t in _rows(engine, Trace))
    assert len(traces) == 2 * n and set(traces.values()) == {1}, traces


class _StallingWeb:
    """A web whose first fetch freezes its worker's event loop (a stalled process: no lease is renewed) until
    ``go_on`` is set."""

    def __init__(self, inner: CorpusWeb, stalled: threading.Event, go_on: threading.Event) -> None:
        self.inner, self.stalled, self.go_on = inner, stalled, go_on

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        return await self.inner.search(query, max_results=max_results)

    async def fetch(self, url: str) -> Document:
        if not self.stalled.is_set():
            self.stalled.set()
            self.go_on.wait(timeout=60)  # blocks the thread, so the whole loop of this worker
        return await self.inner.fetch(url)


def test_a_lease_that_expires_while_its_run_works_loses_the_late_result(tmp_path, engine, caplog):
    _, corpus, offer, prospects = small_world(tmp_path, n=3)
    add_prospects(engine, "c", offer, prospects)
    stalled, go_on = threading.Event(), threading.Event()
    late: dict[str, object] = {}

    def stalled_worker() -> None:
        own = _other_engine(engine)
        try:
            web = _StallingWeb(CorpusWeb(Corpus(corpus.path)), stalled, go_on)
            late["report"] = asyncio.run(run_campaign(own, "c", web=web, concurrency=1, limit=1, lease_s=0.6,
                                                      worker_id="stalled"))
        except BaseException as exc:  # noqa: BLE001 - checked below
            late["error"] = exc
        finally:
            own.dispose()

    caplog.set_level(logging.WARNING, logger="graphs.runner")
    thread = threading.Thread(target=stalled_worker)
    thread.start()
    try:
        assert stalled.wait(timeout=60), "the stalled worker never fetched"
        time.sleep(1.0)  # its lease (0.6 s) ends without renewal
        report = asyncio.run(run_campaign(engine, "c", web=CorpusWeb(corpus), worker_id="new", lease_s=5))
    finally:
        go_on.set()
        thread.join(timeout=60)
    assert "error" not in late, late.get("error")
    assert (report.total, report.done) == (3, 3)  # the new owner took the stalled run over, and the rest
    stale = late["report"]
    assert (stale.total, stale.done, stale.discarded) == (1, 0, 1)  # type: ignore[attr-defined]
    _assert_each_run_once(engine, 3)
    assert sorted(r.attempts for r in _rows(engine, Run)) == [1, 1, 2]
    assert {r.lease_owner for r in _rows(engine, Run)} == {"new"}
    assert any("discarded" in r.getMessage() and "stalled" in r.getMessage() for r in caplog.records)


def test_a_worker_that_loses_the_store_stops_with_a_clear_error_and_its_runs_are_redone(tmp_path, engine):
    _, corpus, offer, prospects = small_world(tmp_path, n=6)
    add_prospects(engine, "c", offer, prospects)
    flaky = _other_engine(engine)
    cut = threading.Event()

    @event.listens_for(flaky, "before_cursor_execute")
    def _lost(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if cut.is_set():
            raise flaky.dialect.loaded_dbapi.OperationalError("connection to the store was lost (test)")

    done = []

    def on_event(ev) -> None:  # type: ignore[no-untyped-def]
        if ev.status == RunStatus.DONE:
            done.append(ev.prospect)
            cut.set()  # the store goes away after the first run is saved, with others in flight

    try:
        with pytest.raises(StoreUnavailableError) as info:
            asyncio.run(run_campaign(flaky, "c", web=CorpusWeb(corpus), concurrency=2, lease_s=0.8,
                                     worker_id="cut-off", on_event=on_event))
    finally:
        flaky.dispose()
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "lost the store" in message and "run the command again" in message and "cut-off" not in message
    assert len(done) == 1
    runs = _rows(engine, Run)
    saved = [r for r in runs if r.status == RunStatus.DONE]
    assert len(saved) == 1 and [r for r in runs if r.status == RunStatus.RUNNING]  # some left claimed
    assert len([t for t in _rows(engine, Trace) if t.run_id == saved[0].id]) == 2  # nothing lost
    time.sleep(1.0)  # the cut-off worker's leases end
    report = asyncio.run(run_campaign(engine, "c", web=CorpusWeb(corpus), worker_id="next"))
    assert report.done == len(prospects) - 1
    _assert_each_run_once(engine, len(prospects))


def test_workers_retrying_failed_runs_at_once_retry_each_one_once(tmp_path, engine):
    _, corpus, offer, prospects = small_world(tmp_path, n=4)
    bad = json.dumps({"subject": "Hi", "body": "Buy now. {{first_name}}"})
    pool = ModelPool(preloaded={"openai:bad": scripted(*[bad] * 200)})
    add_prospects(engine, "c", offer, prospects)
    first = asyncio.run(run_campaign(engine, "c", web=CorpusWeb(corpus), writer="openai:bad", models=pool))
    assert first.failed == len(prospects)

    async def two_workers():  # type: ignore[no-untyped-def]
        return await asyncio.gather(*(
            run_campaign(engine, "c", web=CorpusWeb(corpus), writer="openai:bad", models=pool, retry_failed=True,
                         concurrency=1, worker_id=f"w{i}") for i in range(2)))

    reports = asyncio.run(two_workers())
    assert sum(r.total for r in reports) == len(prospects) and all(r.total for r in reports)
    runs = _rows(engine, Run)
    assert all(r.status == RunStatus.FAILED and r.attempts == 2 for r in runs), [(r.status, r.attempts) for r in runs]


# --- `outreach run` processes ------------------------------------------------------------------------------------


def _counts(url: str, owner_like: str) -> tuple[int, int]:
    """(done runs, runs held by workers named like ``owner_like``) as the store has them now; (0, 0) before it
    exists."""
    eng = create_engine(url)
    try:
        with eng.connect() as conn:
            done = conn.execute(text("SELECT count(*) FROM runs WHERE status = 'done'")).scalar_one()
            held = conn.execute(text("SELECT count(*) FROM runs WHERE status = 'running' AND lease_owner LIKE :o"),
                                {"o": owner_like}).scalar_one()
            return int(done), int(held)
    except Exception:  # noqa: BLE001 - the store is still being made
        return 0, 0
    finally:
        eng.dispose()


def _processes_on_one_campaign(tmp_path: Path, url: str, *, prospects: int, workers: int, victim_args: list[str],
                               kill_after_done: int, lease_s: float, rerun: bool) -> None:
    """``workers`` ``outreach run`` processes at once on a fresh store, the first one (the victim, named by
    ``victim_args`` or by default) killed with -9 once ``kill_after_done`` runs are done while it holds a claim;
    then the checks of issue 15 (after a rerun of the command with ``rerun``)."""
    world, _, _, _ = small_world(tmp_path, n=prospects, seed=5)  # the demo world and its corpus, made here
    corpus = ["--corpus", str(tmp_path / "corpus.sqlite")]
    env = {**os.environ, "OUTREACH_CONFIG": str(tmp_path / "none.toml")}
    cli = [sys.executable, "-m", "outreach"]
    run = [*cli, "run", str(world / "prospects_train.csv"), "--offer", str(world / "offer.toml"), "--campaign", "k",
           "--concurrency", "2", "--lease-s", f"{lease_s:g}", "--store", url, *corpus]
    logs = [tmp_path / f"worker{i}.log" for i in range(workers)]
    procs = [subprocess.Popen([*run, *(victim_args if i == 0 else [])], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=logs[i].open("w")) for i in range(workers)]
    victim = victim_args[-1] if victim_args else f"{socket.gethostname()}:{procs[0].pid}:%"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and procs[0].poll() is None:
            done, held = _counts(url, victim)
            if done >= kill_after_done and held:
                break
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=30)
        done_at_kill, held_at_kill = _counts(url, victim)
        assert done_at_kill < prospects and held_at_kill, f"the kill should land mid-campaign ({done_at_kill} done)"
        codes = [p.wait(timeout=600) for p in procs[1:]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0] * (workers - 1), [log.read_text()[-2000:] for log in logs[1:]]
    if rerun:
        again = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
    engine = open_store(url, migrate_schema=False)
    try:
        _assert_each_run_once(engine, prospects)
        assert len(_rows(engine, Run)) == prospects
        assert sum(r.attempts for r in _rows(engine, Run)) >= prospects + 1  # the victim's claims were redone
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_two_processes_one_killed_its_runs_redone_after_their_leases(tmp_path, kind):
    """The victim has a name of its own (as a worker of another machine would), so the survivor cannot see that it
    died: it takes the victim's runs over when their 2 s leases end."""
    with fresh_store_url(kind, tmp_path, "two") as url:
        _processes_on_one_campaign(tmp_path, url, prospects=30, workers=2, victim_args=["--worker-id", "victim"],
                                   kill_after_done=6, lease_s=2, rerun=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_three_processes_on_300_prospects_one_killed_every_run_done_once(tmp_path, kind):
    """Issue 15's test: three `outreach run` on one campaign of 300 demo prospects, one killed with -9 midway.
    The victim has the default worker name (host:pid:random), so the others take its runs over at once."""
    with fresh_store_url(kind, tmp_path, "three") as url:
        _processes_on_one_campaign(tmp_path, url, prospects=300, workers=3, victim_args=[],
                                   kill_after_done=60, lease_s=60, rerun=True)
