"""Ordered, named schema migrations (the habit of ``simonw/llm``'s ``migrations.py``).

Each migration is a function of a SQLAlchemy ``Connection``; ``migrate`` applies, in order and each
in its own transaction, those whose version is not yet recorded in ``schema_migrations``. Add new
migrations at the end of ``MIGRATIONS``; never edit or reorder applied ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlmodel import col
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

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
    # The schema as this migration first created it, spelled out (never today"s models): later migrations
    # add what came after, so every database gets the same columns in the same order of changes.
    meta = MetaData()
    Table(
        "campaigns", meta,
        Column("id", Integer(), primary_key=True),
        Column("name", AutoString(), nullable=False, index=True, unique=True),
        Column("offer", JSON(), nullable=False),
        Column("created_at", UTCDateTime(), nullable=False),
    )
    Table(
        "prospects", meta,
        Column("id", Integer(), primary_key=True),
        Column("campaign_id", Integer(), ForeignKey("campaigns.id"), nullable=False, index=True),
        Column("row_number", Integer(), nullable=False),
        Column("first_name", AutoString(), nullable=False),
        Column("last_name", AutoString(), nullable=False),
        Column("title", AutoString(), nullable=False),
        Column("email", AutoString(), nullable=False),
        Column("company", AutoString(), nullable=False),
        Column("website", AutoString(), nullable=False),
        Column("split", AutoString(), nullable=False),
        UniqueConstraint("campaign_id", "email", name="uq_prospect_campaign_email"),
    )
    Table(
        "runs", meta,
        Column("id", Integer(), primary_key=True),
        Column("campaign_id", Integer(), ForeignKey("campaigns.id"), nullable=False, index=True),
        Column("prospect_id", Integer(), ForeignKey("prospects.id"), nullable=False, index=True),
        Column("status", AutoString(), nullable=False, index=True),
        Column("error", Text(), nullable=True),
        Column("attempts", Integer(), nullable=False),
        Column("researcher", AutoString(), nullable=False),
        Column("writer", AutoString(), nullable=False),
        Column("started_at", UTCDateTime(), nullable=True),
        Column("finished_at", UTCDateTime(), nullable=True),
        UniqueConstraint("campaign_id", "prospect_id", name="uq_run_campaign_prospect"),
    )
    Table(
        "profiles", meta,
        Column("id", Integer(), primary_key=True),
        Column("run_id", Integer(), ForeignKey("runs.id"), nullable=False, unique=True),
        Column("company", AutoString(), nullable=False),
        Column("website", AutoString(), nullable=False),
        Column("dropped_facts", Integer(), nullable=False),
        Column("sources", JSON(), nullable=False),
        Column("created_at", UTCDateTime(), nullable=False),
    )
    Table(
        "facts", meta,
        Column("id", Integer(), primary_key=True),
        Column("profile_id", Integer(), ForeignKey("profiles.id"), nullable=False, index=True),
        Column("field", AutoString(), nullable=False, index=True),
        Column("value", Text(), nullable=False),
        Column("evidence", Text(), nullable=False),
        Column("source_url", AutoString(), nullable=False),
    )
    Table(
        "emails", meta,
        Column("id", Integer(), primary_key=True),
        Column("run_id", Integer(), ForeignKey("runs.id"), nullable=False, unique=True),
        Column("subject_template", Text(), nullable=False),
        Column("body_template", Text(), nullable=False),
        Column("subject", Text(), nullable=False),
        Column("body", Text(), nullable=False),
        Column("checks", JSON(), nullable=False),
        Column("valid", Boolean(), nullable=False),
        Column("created_at", UTCDateTime(), nullable=False),
    )
    Table(
        "traces", meta,
        Column("id", Integer(), primary_key=True),
        Column("run_id", Integer(), ForeignKey("runs.id"), nullable=True, index=True),
        Column("agent", AutoString(), nullable=False, index=True),
        Column("step", AutoString(), nullable=False),
        Column("backend", AutoString(), nullable=False, index=True),
        Column("messages", JSON(), nullable=False),
        Column("output", Text(), nullable=False),
        Column("input_tokens", Integer(), nullable=False),
        Column("output_tokens", Integer(), nullable=False),
        Column("latency_ms", Float(), nullable=False),
        Column("cost_usd", Float(), nullable=False),
        Column("error", Text(), nullable=True),
        Column("replay_of_id", Integer(), ForeignKey("traces.id"), nullable=True),
        Column("created_at", UTCDateTime(), nullable=False),
    )
    Table(
        "tool_calls", meta,
        Column("id", Integer(), primary_key=True),
        Column("run_id", Integer(), ForeignKey("runs.id"), nullable=True, index=True),
        Column("trace_id", Integer(), ForeignKey("traces.id"), nullable=True),
        Column("tool", AutoString(), nullable=False),
        Column("input", JSON(), nullable=False),
        Column("output", JSON(), nullable=False),
        Column("latency_ms", Float(), nullable=False),
        Column("error", Text(), nullable=True),
        Column("created_at", UTCDateTime(), nullable=False),
    )
    Table(
        "reviews", meta,
        Column("id", Integer(), primary_key=True),
        Column("trace_id", Integer(), ForeignKey("traces.id"), nullable=True, index=True),
        Column("email_id", Integer(), ForeignKey("emails.id"), nullable=True),
        Column("profile_id", Integer(), ForeignKey("profiles.id"), nullable=True),
        Column("status", AutoString(), nullable=False),
        Column("edited_output", Text(), nullable=True),
        Column("reviewer", AutoString(), nullable=False),
        Column("note", AutoString(), nullable=False),
        Column("created_at", UTCDateTime(), nullable=False),
    )
    Table(
        "miniatures", meta,
        Column("id", Integer(), primary_key=True),
        Column("name", AutoString(), nullable=False, index=True),
        Column("agent", AutoString(), nullable=False),
        Column("version", Integer(), nullable=False),
        Column("base_model", AutoString(), nullable=False),
        Column("adapter_path", AutoString(), nullable=False),
        Column("method", AutoString(), nullable=False),
        Column("training_config", JSON(), nullable=False),
        Column("dataset_hash", AutoString(), nullable=False),
        Column("metrics", JSON(), nullable=False),
        Column("parent_id", Integer(), ForeignKey("miniatures.id"), nullable=True),
        Column("created_at", UTCDateTime(), nullable=False),
        UniqueConstraint("name", "version", name="uq_miniature_name_version"),
    )
    Table(
        "engagement_events", meta,
        Column("id", Integer(), primary_key=True),
        Column("email_id", Integer(), ForeignKey("emails.id"), nullable=True, index=True),
        Column("message_id", AutoString(), nullable=False),
        Column("variant", AutoString(), nullable=False),
        Column("event", AutoString(), nullable=False, index=True),
        Column("recipient", AutoString(), nullable=False),
        Column("occurred_at", UTCDateTime(), nullable=False),
    )
    Table(
        "web_snapshots", meta,
        Column("id", Integer(), primary_key=True),
        Column("url", AutoString(), nullable=False, index=True),
        Column("final_url", AutoString(), nullable=False),
        Column("status_code", Integer(), nullable=False),
        Column("content_type", AutoString(), nullable=False),
        Column("html", Text(), nullable=False),
        Column("fetched_at", UTCDateTime(), nullable=False),
    )
    meta.create_all(conn)


def _m002_run_replay_of(conn: Connection) -> None:
    # Databases made while 001 still created the tables from the then-current models may have it already.
    if "replay_of_id" not in {c["name"] for c in inspect(conn).get_columns("runs")}:
        conn.execute(text("ALTER TABLE runs ADD COLUMN replay_of_id INTEGER REFERENCES runs(id)"))


def _m003_drop_reasons_personalised(conn: Connection) -> None:
    # Databases made while 001 still created the tables from the then-current models may have them already.
    profile_cols = {c["name"] for c in inspect(conn).get_columns("profiles")}
    if "drop_reasons" not in profile_cols:
        conn.execute(text("ALTER TABLE profiles ADD COLUMN drop_reasons JSON NOT NULL DEFAULT '{}'"))
    email_cols = {c["name"] for c in inspect(conn).get_columns("emails")}
    if "personalised" not in email_cols:
        conn.execute(text("ALTER TABLE emails ADD COLUMN personalised BOOLEAN NOT NULL DEFAULT TRUE"))


def _m004_run_leases(conn: Connection) -> None:
    # Spelled out (issue 15, store.claims): the claim of a run by a worker, and the index claims search by.
    timestamp = UTCDateTime().compile(dialect=conn.dialect)  # TIMESTAMP WITH TIME ZONE; SQLite: DATETIME
    inspector = inspect(conn)
    run_cols = {c["name"] for c in inspector.get_columns("runs")}
    if "lease_owner" not in run_cols:
        conn.execute(text("ALTER TABLE runs ADD COLUMN lease_owner VARCHAR"))
    if "lease_expires_at" not in run_cols:
        conn.execute(text(f"ALTER TABLE runs ADD COLUMN lease_expires_at {timestamp}"))
    if "claim_id" not in run_cols:
        conn.execute(text("ALTER TABLE runs ADD COLUMN claim_id INTEGER NOT NULL DEFAULT 0"))
    if "ix_runs_claim" not in {i["name"] for i in inspector.get_indexes("runs")}:
        conn.execute(text("CREATE INDEX ix_runs_claim ON runs (campaign_id, status, id)"))


def _m005_arms_message_ids(conn: Connection) -> None:
    # Spelled out (issue 17): runs.arm, campaigns.arms, emails.message_id (unique); emails written before get a
    # Message-ID at their campaign's sender domain, so every stored email has one.
    import json

    from store.exports import new_message_id

    inspector = inspect(conn)
    if "arm" not in {c["name"] for c in inspector.get_columns("runs")}:
        conn.execute(text("ALTER TABLE runs ADD COLUMN arm VARCHAR NOT NULL DEFAULT ''"))
    if "ix_runs_arm" not in {i["name"] for i in inspector.get_indexes("runs")}:
        conn.execute(text("CREATE INDEX ix_runs_arm ON runs (arm)"))
    if "arms" not in {c["name"] for c in inspector.get_columns("campaigns")}:
        conn.execute(text("ALTER TABLE campaigns ADD COLUMN arms JSON NOT NULL DEFAULT '{}'"))
    if "message_id" not in {c["name"] for c in inspector.get_columns("emails")}:
        conn.execute(text("ALTER TABLE emails ADD COLUMN message_id VARCHAR"))
    rows = conn.execute(text(
        "SELECT emails.id, campaigns.offer FROM emails LEFT JOIN runs ON runs.id = emails.run_id "
        "LEFT JOIN campaigns ON campaigns.id = runs.campaign_id WHERE emails.message_id IS NULL")).all()
    for email_id, offer in rows:
        offer = json.loads(offer) if isinstance(offer, str) else (offer or {})
        conn.execute(text("UPDATE emails SET message_id = :m WHERE id = :i"),
                     {"m": new_message_id(str(offer.get("sender_email", ""))), "i": email_id})
    if "ix_emails_message_id" not in {i["name"] for i in inspect(conn).get_indexes("emails")}:
        conn.execute(text("CREATE UNIQUE INDEX ix_emails_message_id ON emails (message_id)"))


def _m008_rate_limits(conn: Connection) -> None:
    # Spelled out (issue 15, graphs.ratelimit): one lock row per rate-limited backend, one row per request slot
    # (times in seconds since the epoch).
    inspector = inspect(conn)
    if not inspector.has_table("rate_limit_locks"):
        conn.execute(text("CREATE TABLE rate_limit_locks (backend VARCHAR(300) NOT NULL PRIMARY KEY, "
                          "taken INTEGER NOT NULL DEFAULT 0)"))
    if not inspector.has_table("rate_limit_slots"):
        conn.execute(text("CREATE TABLE rate_limit_slots (id INTEGER NOT NULL PRIMARY KEY, "
                          "backend VARCHAR(300) NOT NULL, started_at FLOAT NOT NULL, expires_at FLOAT NOT NULL, "
                          "released_at FLOAT)") if conn.dialect.name == "sqlite" else
                     text("CREATE TABLE rate_limit_slots (id SERIAL PRIMARY KEY, "
                          "backend VARCHAR(300) NOT NULL, started_at FLOAT NOT NULL, expires_at FLOAT NOT NULL, "
                          "released_at FLOAT)"))
        conn.execute(text("CREATE INDEX ix_rate_limit_slots_backend ON rate_limit_slots (backend)"))
        conn.execute(text("CREATE INDEX ix_rate_limit_slots_started_at ON rate_limit_slots (started_at)"))


def _m006_trace_task(conn: Connection) -> None:
    # Spelled out (issue 13): the typed task of each model call (core.tasks JSON); NULL for older traces.
    json_type = conn.dialect.type_compiler_instance.process(JSON())
    if "task" not in {c["name"] for c in inspect(conn).get_columns("traces")}:
        conn.execute(text(f"ALTER TABLE traces ADD COLUMN task {json_type}"))


def _m007_sends_suppressions(conn: Connection) -> None:
    # Spelled out (issue 17): one row per email sent over SMTP (intent, then the server's answer) and the
    # addresses never emailed. Core tables on their own MetaData, so the columns are these, not today's models'.
    from sqlalchemy import Column, DateTime, ForeignKey, Integer, MetaData, String, Table, Text

    meta = MetaData()
    inspector = inspect(conn)
    if not inspector.has_table("sends"):
        Table("emails", meta, Column("id", Integer, primary_key=True))  # the foreign key's target (not created)
        sends = Table(
            "sends", meta,
            Column("id", Integer, primary_key=True),
            Column("email_id", Integer, ForeignKey("emails.id"), nullable=False, unique=True),
            Column("message_id", String, nullable=False, index=True),
            Column("mailbox", String, nullable=False, index=True),
            Column("recipient", String, nullable=False, server_default=""),
            Column("status", String, nullable=False, index=True),
            Column("attempts", Integer, nullable=False, server_default="0"),
            Column("code", Integer, nullable=True),
            Column("answer", Text, nullable=False, server_default=""),
            Column("attempted_at", DateTime(timezone=True), nullable=False, index=True),
            Column("sent_at", DateTime(timezone=True), nullable=True),
        )
        sends.create(conn)
    if not inspector.has_table("suppressions"):
        Table(
            "suppressions", meta,
            Column("id", Integer, primary_key=True),
            Column("address", String, nullable=False, unique=True),
            Column("reason", String, nullable=False),
            Column("source", Text, nullable=False, server_default=""),
            Column("created_at", DateTime(timezone=True), nullable=False),
        ).create(conn)


MIGRATIONS: list[Migration] = [
    Migration(1, "initial tables", _m001_initial),
    Migration(2, "runs.replay_of_id: the run a replay run replays", _m002_run_replay_of),
    Migration(3, "profiles.drop_reasons (dropped facts by reason), emails.personalised",
              _m003_drop_reasons_personalised),
    Migration(4, "runs.lease_owner, runs.lease_expires_at, runs.claim_id (claims with leases), ix_runs_claim",
              _m004_run_leases),
    Migration(5, "runs.arm, campaigns.arms (A/B arms), emails.message_id (unique RFC 5322 Message-ID)",
              _m005_arms_message_ids),
    Migration(6, "traces.task: the typed task of each model call (NULL for older traces)", _m006_trace_task),
    Migration(7, "sends (SMTP intent and answer per email), suppressions (addresses never emailed)",
              _m007_sends_suppressions),
    Migration(8, "rate_limit_locks, rate_limit_slots: request limits shared by every worker", _m008_rate_limits),
]


def applied_versions(engine: Engine) -> list[int]:
    """Return the versions recorded in ``schema_migrations`` (empty for a new database)."""
    if not inspect(engine).has_table("schema_migrations"):
        return []
    with engine.connect() as conn:
        return list(conn.execute(select(col(models.SchemaMigration.version))).scalars())


def migrate(engine: Engine) -> list[int]:
    """Apply every pending migration in order; return the versions applied now.

    Safe when several processes open a new or old store at once: each migration runs in its own
    transaction under one lock (``store.claims.exclusive_transaction``: SQLite's ``BEGIN IMMEDIATE``,
    PostgreSQL's advisory lock ``pg_advisory_xact_lock``) and re-reads ``schema_migrations`` inside it,
    so a migration another process applied meanwhile is skipped, never applied twice. A store that is
    up to date is only read (no lock, so a read-only SQLite file opens).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: a migration failed; its transaction is rolled back and
            later migrations are not attempted.
    """
    from store.claims import exclusive_transaction

    wanted = sorted(MIGRATIONS, key=lambda m: m.version)
    if {m.version for m in wanted} <= set(applied_versions(engine)):
        return []
    applied = []
    for migration in wanted:
        with exclusive_transaction(engine, key="outreach:schema_migrations") as conn:
            models.SchemaMigration.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]
            done = set(conn.execute(select(col(models.SchemaMigration.version))).scalars())
            if migration.version in done:
                continue
            migration.apply(conn)
            conn.execute(
                models.SchemaMigration.__table__.insert().values(  # type: ignore[attr-defined]
                    version=migration.version, name=migration.name, applied_at=models.utcnow()
                )
            )
        logger.info("applied migration %03d %s", migration.version, migration.name)
        applied.append(migration.version)
    return applied
