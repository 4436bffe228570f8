"""Fresh, empty stores for tests that open them from several processes: a SQLite file, or a new database on
the loopback PostgreSQL of OUTREACH_TEST_POSTGRES_URL (dropped afterwards)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

__all__ = ["STORE_KINDS", "fresh_store_url"]

#: Store kinds a multi-process test runs on: SQLite always, PostgreSQL when OUTREACH_TEST_POSTGRES_URL is set.
STORE_KINDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.skipif(not os.environ.get("OUTREACH_TEST_POSTGRES_URL"),
                                                      reason="OUTREACH_TEST_POSTGRES_URL not set")),
]


@contextmanager
def fresh_store_url(kind: str, tmp_path: Path, name: str) -> Iterator[str]:
    """The URL of an empty store of ``kind`` (``sqlite`` or ``postgres``) that nothing has opened yet."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / f'{name}.sqlite'}"
        return
    base = make_url(os.environ["OUTREACH_TEST_POSTGRES_URL"])
    database = f"outreach_{name}_{os.getpid()}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    try:
        yield base.set(database=database).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
