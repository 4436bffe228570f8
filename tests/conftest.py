"""Shared fixtures. Sockets are disabled by pytest-socket (see pyproject addopts) except loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from store import open_store

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def _store_urls() -> list[str]:
    urls = ["sqlite"]
    if os.environ.get("OUTREACH_TEST_POSTGRES_URL"):
        urls.append("postgres")
    return urls


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """A fresh, migrated SQLite store in a temporary folder."""
    engine = open_store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    yield engine
    engine.dispose()


@pytest.fixture(params=_store_urls())
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A fresh, migrated store: SQLite always, and PostgreSQL when OUTREACH_TEST_POSTGRES_URL is set
    (``.ci/run`` installs and starts one on loopback). The PostgreSQL schema is dropped afterwards."""
    if request.param == "sqlite":
        eng = open_store(f"sqlite:///{tmp_path / 'store.sqlite'}")
        yield eng
        eng.dispose()
        return
    from sqlalchemy import text

    from store.models import SQLModel

    url = os.environ["OUTREACH_TEST_POSTGRES_URL"]
    eng = open_store(url, migrate_schema=False)
    with eng.begin() as conn:
        SQLModel.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS schema_migrations"))
    eng.dispose()
    eng = open_store(url)
    yield eng
    with eng.begin() as conn:
        SQLModel.metadata.drop_all(conn)
    eng.dispose()


@pytest.fixture
def realdata() -> Path:
    """The shared real data folder; tests using it skip when it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data folder {REALDATA} is absent (it lives in ../shared/realdata)")
    return REALDATA
