"""Ordered, named schema migrations (the habit of ``simonw/llm``'s ``migrations.py``).

Each migration is a function of a SQLAlchemy ``Connection``; ``migrate`` applies, in order and each
in its own transaction, those whose version is not yet recorded in ``schema_migrations``. Add new
migrations at the end of ``MIGRATIONS``; never edit or reorder applied ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, inspect, select, text
from sqlmodel import col

from store import models

__all__ = ["MIGRATIONS", "Migration", "applied_versions", "migrate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One schema change: ``version`` orders it, ``name`` says what it does."""

    version: int
    name: str
    apply: Callable[[Connection], None]


def _m001_initial(conn: Connection) -> None:
    tables = [
        models.Campaign,
        models.Prospect,
        models.Run,
        models.ProfileRecord,
        models.FactRecord,
        models.EmailRecord,
        models.Trace,
        models.ToolCall,
        models.Review,
        models.MiniatureRecord,
        models.EngagementEvent,
        models.WebSnapshot,
    ]
    models.SQLModel.metadata.create_all(conn, tables=[t.__table__ for t in tables])  # type: ignore[attr-defined]


def _m002_run_replay_of(conn: Connection) -> None:
    # A database created after this migration was written already has the column (001 creates
    # the tables from the current models); older ones get it added.
    if "replay_of_id" not in {c["name"] for c in inspect(conn).get_columns("runs")}:
        conn.execute(text("ALTER TABLE runs ADD COLUMN replay_of_id INTEGER REFERENCES runs(id)"))


def _m003_drop_reasons_personalised(conn: Connection) -> None:
    # Spelled out, not created from today's models: databases made by 001 before these columns existed
    # lack them; newer ones have them from 001 already.
    profile_cols = {c["name"] for c in inspect(conn).get_columns("profiles")}
    if "drop_reasons" not in profile_cols:
        conn.execute(text("ALTER TABLE profiles ADD COLUMN drop_reasons JSON NOT NULL DEFAULT '{}'"))
    email_cols = {c["name"] for c in inspect(conn).get_columns("emails")}
    if "personalised" not in email_cols:
        conn.execute(text("ALTER TABLE emails ADD COLUMN personalised BOOLEAN NOT NULL DEFAULT TRUE"))


MIGRATIONS: list[Migration] = [
    Migration(1, "initial tables", _m001_initial),
    Migration(2, "runs.replay_of_id: the run a replay run replays", _m002_run_replay_of),
    Migration(3, "profiles.drop_reasons (dropped facts by reason), emails.personalised",
              _m003_drop_reasons_personalised),
]


def applied_versions(engine: Engine) -> list[int]:
    """Return the versions recorded in ``schema_migrations`` (empty for a new database)."""
    if not inspect(engine).has_table("schema_migrations"):
        return []
    with engine.connect() as conn:
        return list(conn.execute(select(col(models.SchemaMigration.version))).scalars())


def migrate(engine: Engine) -> list[int]:
    """Apply every pending migration in order; return the versions applied now.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: a migration failed; its transaction is rolled back and
            later migrations are not attempted.
    """
    models.SchemaMigration.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]
    done = set(applied_versions(engine))
    applied = []
    for migration in sorted(MIGRATIONS, key=lambda m: m.version):
        if migration.version in done:
            continue
        with engine.begin() as conn:
            migration.apply(conn)
            conn.execute(
                models.SchemaMigration.__table__.insert().values(  # type: ignore[attr-defined]
                    version=migration.version, name=migration.name, applied_at=models.utcnow()
                )
            )
        logger.info("applied migration %03d %s", migration.version, migration.name)
        applied.append(migration.version)
    return applied
