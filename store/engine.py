"""The engine: SQLite file by default, any SQLAlchemy URL (PostgreSQL: ``postgresql+psycopg://``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import ArgumentError
from sqlmodel import Session, create_engine

from core.errors import UserError
from store.migrations import migrate

__all__ = ["DEFAULT_URL", "StoreError", "open_store", "session_scope"]

DEFAULT_URL = "sqlite:///outreach.sqlite"

#: SQLite result codes (sqlite.org/rescode.html) that mean the store file itself is unusable, with what
#: to tell the user: SQLITE_CORRUPT (11), SQLITE_CANTOPEN (14), SQLITE_NOTADB (26).
_UNUSABLE_SQLITE = {
    11: "is damaged ({error}); restore it from a backup, or salvage its rows with the sqlite3 shell's "
        "`.recover` command into a new file; or move it aside to start an empty store",
    14: "cannot be opened ({error}); check that the path names a file in a folder you can write to",
    26: "is not a SQLite database ({error}); point --store (setting store_url) at the store's file, "
        "or move this file aside to start an empty store",
}


class StoreError(UserError, RuntimeError):
    """The store's file is unusable (damaged, not a database, cannot be opened): the message is one line
    that names the file and what to do."""


def _sqlite_file_error(context: ExceptionContext) -> None:
    """``handle_error`` listener: turn SQLite's "the file is unusable" errors, on connecting or on any
    statement, into a ``StoreError`` naming the file; other errors pass through unchanged."""
    error = context.original_exception
    if not isinstance(error, sqlite3.DatabaseError):
        return
    advice = _UNUSABLE_SQLITE.get(getattr(error, "sqlite_errorcode", 0) & 0xFF)
    if advice is None:
        return
    database = context.engine.url.database if context.engine is not None else None
    raise StoreError(f"store {database or '(unknown file)'} {advice.format(error=error)}") from error


#: How long a SQLite statement waits for another process's write lock before "database is locked", ms.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: How long connecting to a PostgreSQL store may take before it counts as unreachable, seconds (libpq's
#: ``connect_timeout`` takes whole seconds).
PG_CONNECT_TIMEOUT_S = 10


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    """Per connection: wait for other processes' locks first (so that switching a new file to WAL, which
    needs a moment of exclusive access, waits too), then WAL (readers never block the one writer)."""
    cursor = dbapi_conn.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_store(url: str = DEFAULT_URL, *, migrate_schema: bool = True) -> Engine:
    """Create an engine for ``url`` and bring its schema up to date.

    Args:
        url: a SQLAlchemy URL; ``sqlite:///path`` creates the file's folder if needed.
        migrate_schema: apply pending migrations (``store.migrations``).

    Raises:
        sqlalchemy.exc.OperationalError: the database cannot be reached.
        StoreError: ``url`` is not a SQLAlchemy URL of an installed driver, or a SQLite store's file is
            damaged, not a database, or cannot be opened (also raised
            by any later statement on the returned engine that finds it so).
    """
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    sqlite = url.startswith("sqlite")
    # pysqlite's ``timeout`` is SQLite's busy timeout from the moment of connecting (before the pragmas run);
    # libpq's ``connect_timeout`` bounds the wait for an unreachable PostgreSQL (no limit by default).
    libpq = url.startswith(("postgresql://", "postgresql+psycopg"))  # psycopg 3 and psycopg2
    connect_args: dict[str, float] = ({"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000} if sqlite else
                                      {"connect_timeout": PG_CONNECT_TIMEOUT_S} if libpq else {})
    try:
        engine = create_engine(url, pool_pre_ping=not sqlite, connect_args=connect_args)
    except ArgumentError as exc:  # NoSuchModuleError (an unknown or uninstalled driver) included
        raise StoreError(f"store URL {url!r} cannot be used ({exc}); give a SQLAlchemy URL such as "
                         "sqlite:///outreach.sqlite or postgresql+psycopg://user@host/db") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "handle_error", _sqlite_file_error)
    if migrate_schema:
        migrate(engine)
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception (nothing half-written)."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
