"""Claims with leases: how several worker processes, on one machine or many, share one campaign's runs.

A worker *claims* a run before it works on it: one transaction moves the run to ``running``, names the
worker in ``lease_owner``, sets ``lease_expires_at`` and increments ``claim_id``, the run's fencing token
(M. Kleppmann, "How to do distributed locking", 2016: a lease alone cannot stop a paused worker from
writing late; a token checked by the store can). The worker renews the lease while it works; a lease
that is not renewed expires and any worker may claim the run again, which increments ``claim_id``. The
final write of a run (``fence``) happens only while ``claim_id`` is still the worker's own, inside the
transaction that writes the results, so a late result never overwrites or duplicates the new owner's.
Correctness rests on the token alone: clock skew between machines or a wrongly judged owner costs
repeated work, never a duplicated row.

How a claim is made atomic:

* PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` (the queue pattern of the PostgreSQL manual,
  "The Locking Clause"): concurrent workers skip the rows others are claiming instead of waiting on them.
  Lease times are the database server's clock (``now()``), so worker clocks do not matter.
* SQLite: an immediate transaction (``BEGIN IMMEDIATE``, sqlite.org/lang_transaction.html) takes the
  write lock before the candidate is read, so two processes cannot pick the same run; the engine's
  ``busy_timeout`` makes the others wait for it. All workers share one machine (and clock) with SQLite.

``exclusive_transaction`` is the same idea for work that must not interleave at all (migrations, adding
prospects, creating runs): SQLite's immediate transaction, or a PostgreSQL transaction-level advisory
lock (``pg_advisory_xact_lock``) named by a key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, DateTime, Engine, Select, and_, func, or_, select, text, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col

from core.errors import UserError
from store.models import Run, RunStatus, utcnow

__all__ = [
    "Claim",
    "LeaseLost",
    "StoreUnavailableError",
    "claim_next",
    "claim_run",
    "dead_local_owners",
    "exclusive_session",
    "exclusive_transaction",
    "fence",
    "is_store_unavailable",
    "live_lease_owners",
    "new_worker_id",
    "release",
    "renew",
]

logger = logging.getLogger(__name__)

#: Default lease of a claim, seconds: renewed every third of it while the run works.
DEFAULT_LEASE_S = 60.0


@dataclass(frozen=True)
class Claim:
    """One worker's claim on one run: ``claim_id`` is the fencing token the final write must still match."""

    run_id: int
    prospect_id: int
    claim_id: int
    owner: str


class LeaseLost(RuntimeError):
    """The run was claimed by another worker after this claim's lease expired: its result must be dropped."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(f"run {claim.run_id}: lease of claim {claim.claim_id} by {claim.owner} was lost "
                         "(another worker claimed the run after the lease expired)")
        self.claim = claim


class StoreUnavailableError(UserError):
    """The store stopped answering while a worker ran (network, server down, disk): the worker stops.

    Nothing committed is lost; the runs the worker held stay claimed until their leases expire, then any
    worker (or the same command run again) redoes them.
    """


def is_store_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database cannot be reached or used right now (worth retrying later):
    a lost or refused connection, a server shut down, a SQLite file locked past the busy timeout, a disk
    I/O error. Integrity and programming errors are not."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def new_worker_id() -> str:
    """A worker name unique to this process: ``host:pid:random`` (8 hex digits).

    ``dead_local_owners`` reads the host and pid back to reclaim the runs of a process of this machine
    that died, without waiting for its leases to expire.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is alive (a zombie, killed but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def dead_local_owners(owners: Iterable[str]) -> set[str]:
    """The owners among ``owners`` named by ``new_worker_id`` on this host whose process has exited.

    An owner of another host, of an unknown form (a name given with ``worker_id``), or whose process is
    alive is not dead. A misjudged owner (two machines with one host name and separate process tables)
    costs repeated work only: its late result is refused by ``fence``.
    """
    host, dead = socket.gethostname(), set()
    for owner in owners:
        parts = owner.rsplit(":", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            dead.add(owner)
    return dead


def _lock_key(key: str) -> int:
    """A signed 64-bit advisory-lock key for ``key`` (``pg_advisory_xact_lock`` takes a bigint)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


@contextmanager
def exclusive_transaction(engine: Engine, key: str | None = None) -> Iterator[Connection]:
    """A transaction that excludes other writers from its start; commits on success, rolls back on error.

    Args:
        engine: the store.
        key: on PostgreSQL, the name of a transaction-level advisory lock taken first (held until commit;
            everything else of PostgreSQL runs concurrently). None: no advisory lock (row locks only).
            SQLite ignores it: ``BEGIN IMMEDIATE`` takes the database's write lock, waiting up to the
            engine's busy timeout for it.

    Yields:
        The connection, inside the transaction.

    Raises:
        sqlalchemy.exc.OperationalError: the lock could not be had in time, or the database is unreachable.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            # pysqlite (legacy transaction control) sends no BEGIN of its own before a BEGIN statement.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif key is not None and conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(key)})
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise


@contextmanager
def exclusive_session(engine: Engine, key: str | None = None) -> Iterator[Session]:
    """An ORM session inside ``exclusive_transaction(engine, key)``; flushed, then committed, on success."""
    with exclusive_transaction(engine, key) as conn:
        session = Session(bind=conn, expire_on_commit=False)
        try:
            yield session
            session.flush()
        finally:
            session.close()


def _now(conn: Connection) -> Any:
    """The current time as the store sees it: the server's clock on PostgreSQL (a SQL expression, so
    every worker compares against one clock), this machine's on SQLite (its workers share the machine)."""
    if conn.dialect.name == "postgresql":
        return func.now(type_=DateTime(timezone=True))
    return utcnow()


def _expired(now: Any, reclaim_owners: Collection[str]) -> ColumnElement[bool]:
    """Running runs that may be claimed again: lease expired or missing, or held by a dead owner."""
    expired = or_(col(Run.lease_expires_at).is_(None), col(Run.lease_expires_at) < now)
    if reclaim_owners:
        expired = or_(expired, col(Run.lease_owner).in_(sorted(reclaim_owners)))
    return and_(col(Run.status) == RunStatus.RUNNING, expired)


def _take(conn: Connection, run_id: int, old_claim_id: int, owner: str, lease_s: float) -> bool:
    """Move run ``run_id`` (still at ``old_claim_id``) to ``running`` under a new lease for ``owner``."""
    now = _now(conn)
    result = conn.execute(
        update(Run).where(col(Run.id) == run_id, col(Run.claim_id) == old_claim_id).values(
            status=RunStatus.RUNNING, lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
            claim_id=old_claim_id + 1, attempts=col(Run.attempts) + 1, started_at=utcnow(),
            finished_at=None, error=None,
        )
    )
    return bool(result.rowcount)


def claim_next(engine: Engine, campaign_id: int, owner: str, *, lease_s: float = DEFAULT_LEASE_S,
               reclaim_owners: Collection[str] = ()) -> Claim | None:
    """Claim the campaign's next run to do: a running one whose lease expired first, else a pending one.

    Args:
        engine: the store.
        campaign_id: whose runs.
        owner: this worker's name (``new_worker_id``).
        lease_s: seconds the lease lasts unless renewed, > 0.
        reclaim_owners: owners whose running runs may be taken although their leases have not expired
            (``dead_local_owners``).

    Returns:
        The claim, or None when no run can be claimed now (all finished, or held under live leases).

    Raises:
        ValueError: ``lease_s`` <= 0.
        sqlalchemy.exc.OperationalError: the store is unreachable or stayed locked past the busy timeout.
    """
    if lease_s <= 0:
        raise ValueError(f"lease_s must be > 0 seconds, got {lease_s}")
    with exclusive_transaction(engine) as conn:
        base: Select[Any] = select(col(Run.id), col(Run.prospect_id),  # type: ignore[assignment]
                                   col(Run.claim_id)).where(col(Run.campaign_id) == campaign_id)
        for condition in (_expired(_now(conn), reclaim_owners), col(Run.status) == RunStatus.PENDING):
            query = base.where(condition).order_by(col(Run.id)).limit(1).with_for_update(skip_locked=True)
            row = conn.execute(query).first()
            if row is not None:
                run_id, prospect_id, claim_id = row
                if _take(conn, run_id, claim_id, owner, lease_s):
                    return Claim(run_id=run_id, prospect_id=prospect_id, claim_id=claim_id + 1, owner=owner)
    return None


def claim_run(engine: Engine, run_id: int, expected_claim_id: int, statuses: Collection[str], owner: str, *,
              lease_s: float = DEFAULT_LEASE_S) -> Claim | None:
    """Claim one given run if nobody claimed it since ``expected_claim_id`` and its status is in ``statuses``.

    Reruns of finished runs (``--retry-failed``) use it with the ``claim_id`` read when the command started,
    so a run retried by one worker is not retried again by another.

    Returns:
        The claim, or None when the run changed since, or is not in one of ``statuses``.
    """
    with exclusive_transaction(engine) as conn:
        row = conn.execute(
            select(col(Run.prospect_id)).where(col(Run.id) == run_id, col(Run.claim_id) == expected_claim_id,
                                               col(Run.status).in_(sorted(statuses))).with_for_update(skip_locked=True)
        ).first()
        if row is not None and _take(conn, run_id, expected_claim_id, owner, lease_s):
            return Claim(run_id=run_id, prospect_id=row[0], claim_id=expected_claim_id + 1, owner=owner)
    return None


def _owned(claim: Claim) -> ColumnElement[bool]:
    return and_(col(Run.id) == claim.run_id, col(Run.claim_id) == claim.claim_id,
                col(Run.status) == RunStatus.RUNNING)


def renew(engine: Engine, claim: Claim, *, lease_s: float = DEFAULT_LEASE_S) -> bool:
    """Extend the claim's lease to ``lease_s`` seconds from now; False when the claim was lost meanwhile.

    Raises:
        sqlalchemy.exc.OperationalError: the store is unreachable (the lease is not extended).
    """
    with engine.begin() as conn:
        result = conn.execute(update(Run).where(_owned(claim)).values(
            lease_expires_at=_now(conn) + timedelta(seconds=lease_s)))
        return bool(result.rowcount)


def release(engine: Engine, claims: Iterable[Claim]) -> int:
    """Give back unfinished claims (a worker stopping early): their runs return to ``pending`` at once.

    Returns:
        How many of the claims were still held (and are released now).
    """
    released = 0
    with engine.begin() as conn:
        for claim in claims:
            result = conn.execute(update(Run).where(_owned(claim)).values(
                status=RunStatus.PENDING, lease_expires_at=None))
            released += result.rowcount
    return released


def fence(session: Session, claim: Claim, **values: Any) -> None:
    """Inside the transaction that writes a run's results: set its final ``values`` (status, error ...) if the
    claim still holds the run, and lock the run against a new claim until that transaction ends.

    Call it first in the transaction: the row lock (PostgreSQL) or write lock (SQLite) it takes keeps the
    check true until commit.

    Raises:
        LeaseLost: another worker claimed the run since; roll the transaction back and drop the result.
    """
    result = session.connection().execute(
        update(Run).where(_owned(claim)).values(lease_expires_at=None, **values))
    if not result.rowcount:
        raise LeaseLost(claim)


def live_lease_owners(engine: Engine, campaign_id: int) -> set[str]:
    """Owners of the campaign's running runs whose leases have not expired (work still held by others)."""
    with engine.connect() as conn:
        now = _now(conn)
        return {owner for owner in conn.execute(
            select(col(Run.lease_owner)).distinct().where(
                col(Run.campaign_id) == campaign_id, col(Run.status) == RunStatus.RUNNING,
                col(Run.lease_expires_at) >= now, col(Run.lease_owner).is_not(None))
        ).scalars() if owner}
