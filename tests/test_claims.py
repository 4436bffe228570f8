"""Claims with leases (store.claims) and migrations run by several processes at once, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect, text
from sqlmodel import Session, select

from store import open_store, session_scope
from store.claims import (
    LeaseLost,
    claim_next,
    claim_run,
    dead_local_owners,
    exclusive_session,
    fence,
    live_lease_owners,
    new_worker_id,
    release,
    renew,
)
from store.models import Campaign, Prospect, Run, RunStatus
from tests.store_urls import STORE_KINDS, fresh_store_url

ROOT = Path(__file__).resolve().parents[1]


def _campaign(engine: Engine, n: int, name: str = "c") -> int:
    with session_scope(engine) as s:
        c = Campaign(name=name, offer={})
        s.add(c)
        s.flush()
        for i in range(n):
            p = Prospect(campaign_id=c.id, first_name="A", email=f"a{i}@x.example", company=f"X{i}")  # type: ignore[arg-type]
            s.add(p)
            s.flush()
            s.add(Run(campaign_id=c.id, prospect_id=p.id))  # type: ignore[arg-type]
        assert c.id is not None
        return c.id


def _run(engine: Engine, run_id: int) -> Run:
    with Session(engine) as s:
        run = s.get(Run, run_id)
        assert run is not None
        return run


def _finish(engine: Engine, claim, status: str = RunStatus.DONE) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        fence(s, claim, status=status)


def test_claims_take_runs_in_order_once_each_and_fence_the_final_write(engine):
    cid = _campaign(engine, 3)
    a, b = new_worker_id(), new_worker_id()
    first, second = claim_next(engine, cid, a), claim_next(engine, cid, b)
    assert first and second and first.run_id < second.run_id
    assert (first.claim_id, first.owner) == (1, a)
    run = _run(engine, first.run_id)
    assert (run.status, run.lease_owner, run.attempts) == (RunStatus.RUNNING, a, 1) and run.lease_expires_at
    _finish(engine, first)
    run = _run(engine, first.run_id)
    assert run.status == RunStatus.DONE and run.lease_expires_at is None and run.lease_owner == a
    with pytest.raises(LeaseLost), session_scope(engine) as s:  # finished: a second final write is refused
        fence(s, first, status=RunStatus.FAILED)
    assert _run(engine, first.run_id).status == RunStatus.DONE
    third = claim_next(engine, cid, a)
    assert third and third.run_id not in {first.run_id, second.run_id}
    assert claim_next(engine, cid, a) is None  # two held under live leases, one done: nothing to claim
    assert live_lease_owners(engine, cid) == {a, b}


def test_an_expired_lease_is_claimed_again_and_the_old_owner_loses_its_write(engine):
    cid = _campaign(engine, 1)
    old = claim_next(engine, cid, "old", lease_s=0.2)
    assert old is not None and renew(engine, old, lease_s=0.2)
    assert claim_next(engine, cid, "new") is None  # still held
    time.sleep(0.4)
    new = claim_next(engine, cid, "new")
    assert new is not None and new.run_id == old.run_id and new.claim_id == old.claim_id + 1
    assert not renew(engine, old)  # the old owner learns it lost the run
    with pytest.raises(LeaseLost, match="lost"), session_scope(engine) as s:
        fence(s, old, status=RunStatus.DONE, error="late")
    run = _run(engine, new.run_id)
    assert (run.status, run.lease_owner, run.attempts, run.error) == (RunStatus.RUNNING, "new", 2, None)
    _finish(engine, new)
    assert _run(engine, new.run_id).status == RunStatus.DONE


def test_finished_runs_are_never_claimed_and_a_retry_claims_each_run_once(engine):
    cid = _campaign(engine, 2)
    for status in (RunStatus.DONE, RunStatus.FAILED):
        claim = claim_next(engine, cid, "w")
        assert claim is not None
        _finish(engine, claim, status)
    assert claim_next(engine, cid, "w") is None
    failed = next(r for r in _all_runs(engine) if r.status == RunStatus.FAILED)
    assert failed.id is not None
    retried = claim_run(engine, failed.id, failed.claim_id, {RunStatus.FAILED}, "a")
    assert retried is not None
    _finish(engine, retried, RunStatus.FAILED)
    # another worker that read the same failed run at its start does not retry it again
    assert claim_run(engine, failed.id, failed.claim_id, {RunStatus.FAILED}, "b") is None
    done = next(r for r in _all_runs(engine) if r.status == RunStatus.DONE)
    assert done.id is not None and claim_run(engine, done.id, done.claim_id, {RunStatus.FAILED}, "b") is None


def _all_runs(engine: Engine) -> list[Run]:
    with Session(engine) as s:
        return list(s.exec(select(Run).order_by(Run.id)).all())  # type: ignore[arg-type]


def test_released_claims_go_back_to_pending_at_once(engine):
    cid = _campaign(engine, 2)
    claims = [claim_next(engine, cid, "w") for _ in range(2)]
    assert all(claims)
    _finish(engine, claims[0])  # type: ignore[arg-type]
    assert release(engine, claims) == 1  # type: ignore[arg-type]
    assert [r.status for r in _all_runs(engine)] == [RunStatus.DONE, RunStatus.PENDING]
    again = claim_next(engine, cid, "other")
    assert again is not None and again.run_id == claims[1].run_id  # type: ignore[union-attr]


def _other_engine(engine: Engine) -> Engine:
    return open_store(engine.url.render_as_string(hide_password=False), migrate_schema=False)


def test_workers_claiming_at_once_take_every_run_exactly_once(engine):
    cid = _campaign(engine, 60)
    taken: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        own = _other_engine(engine)
        try:
            while (claim := claim_next(own, cid, name)) is not None:
                with lock:
                    taken.append(claim.run_id)
                _finish(own, claim)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(taken) == 60 and set(Counter(taken).values()) == {1}
    assert {r.status for r in _all_runs(engine)} == {RunStatus.DONE}
    assert all(r.attempts == 1 for r in _all_runs(engine))


def test_a_dead_process_of_this_machine_is_recognised_and_a_live_one_is_not():
    child = subprocess.run([sys.executable, "-c", "from store.claims import new_worker_id; print(new_worker_id())"],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    exited = child.stdout.strip()
    mine = new_worker_id()
    foreign = "some-other-host:1:abcd0123"
    assert dead_local_owners([exited, mine, foreign, "victim"]) == {exited}
    assert mine.split(":")[1] == str(os.getpid())


def test_exclusive_session_serialises_creation_of_one_campaign(engine):
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def add() -> None:
        own = _other_engine(engine)
        try:
            barrier.wait(timeout=30)
            with exclusive_session(own, "outreach:campaign:x") as s:
                if s.exec(select(Campaign).where(Campaign.name == "x")).first() is None:
                    s.add(Campaign(name="x", offer={}))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=add) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    with Session(engine) as s:
        assert len(s.exec(select(Campaign).where(Campaign.name == "x")).all()) == 1


_OPEN = "import sys; from store import open_store; open_store(sys.argv[1]).dispose()"


def _open_at_once(url: str, n: int) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN, url], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _versions(url: str) -> list[int]:
    eng = create_engine(url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(text("SELECT version FROM schema_migrations ORDER BY version")).scalars())
    finally:
        eng.dispose()


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_a_fresh_store_opened_by_several_processes_at_once_is_migrated_once(tmp_path, kind):
    from store.migrations import MIGRATIONS

    with fresh_store_url(kind, tmp_path, "fresh") as url:
        results = _open_at_once(url, 3)
        assert [r.returncode for r in results] == [0] * 3, [r.stderr[-800:] for r in results]
        assert _versions(url) == sorted(m.version for m in MIGRATIONS)


def test_migration_004_adds_the_claim_columns_to_an_older_store_and_its_interrupted_runs_are_claimable(
        tmp_path, monkeypatch):
    import store.migrations
    from store.migrations import MIGRATIONS, migrate

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old = open_store(url, migrate_schema=False)
    monkeypatch.setattr(store.migrations, "MIGRATIONS", [m for m in MIGRATIONS if m.version < 4])
    assert migrate(old) == [1, 2, 3]
    monkeypatch.undo()
    with old.begin() as conn:  # a campaign interrupted by kill -9 before claims existed: one run left running
        assert "claim_id" not in {c["name"] for c in inspect(conn).get_columns("runs")}
        conn.execute(text("INSERT INTO campaigns (id, name, offer, created_at) VALUES (1, 'old', '{}', '2025-01-01')"))
        conn.execute(text("INSERT INTO prospects (id, campaign_id, row_number, first_name, last_name, title, email, "
                          "company, website, split) VALUES (1, 1, 2, 'Ana', '', '', 'ana@x.example', 'X', '', '')"))
        conn.execute(text("INSERT INTO runs (id, campaign_id, prospect_id, status, attempts, researcher, writer) "
                          "VALUES (1, 1, 1, 'running', 1, 'heuristic', 'heuristic')"))
    assert 4 in migrate(old)
    run = _run(old, 1)
    assert (run.status, run.claim_id, run.lease_owner, run.lease_expires_at) == (RunStatus.RUNNING, 0, None, None)
    claim = claim_next(old, 1, "w")
    assert claim is not None and (claim.run_id, claim.claim_id) == (1, 1)
    with old.connect() as conn:
        assert "ix_runs_claim" in {i["name"] for i in inspect(conn).get_indexes("runs")}
    old.dispose()
