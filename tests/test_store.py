"""The store on SQLite and, when OUTREACH_TEST_POSTGRES_URL is set, on a real PostgreSQL server; an unusable
SQLite file is one clear ``StoreError``."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from store import (
    MIGRATIONS,
    Campaign,
    EmailRecord,
    FactRecord,
    ProfileRecord,
    Prospect,
    Run,
    Trace,
    migrate,
    open_store,
    session_scope,
)
from store.engine import StoreError
from store.migrations import applied_versions


def test_migrations_are_ordered_and_recorded(engine):
    versions = [m.version for m in MIGRATIONS]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert applied_versions(engine) == versions
    assert migrate(engine) == []  # idempotent
    tables = set(inspect(engine).get_table_names())
    assert {"campaigns", "prospects", "runs", "profiles", "facts", "emails", "traces", "tool_calls", "reviews",
            "miniatures", "engagement_events", "web_snapshots", "schema_migrations"} <= tables


def test_campaign_round_trip_with_json_columns(engine):
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "é ✓"}]
    with session_scope(engine) as s:
        c = Campaign(name="q4", offer={"product": "Widget", "call_to_action": "a call?"})
        s.add(c)
        s.flush()
        p = Prospect(campaign_id=c.id, first_name="Ana", email="ana@x.example", company="X")
        s.add(p)
        s.flush()
        r = Run(campaign_id=c.id, prospect_id=p.id, status="done")
        s.add(r)
        s.flush()
        prof = ProfileRecord(run_id=r.id, company="X", sources=["https://x.example/"])
        s.add(prof)
        s.flush()
        s.add(FactRecord(profile_id=prof.id, field="location", value="Austin, Texas",
                         evidence="We are based in Austin, Texas.", source_url="https://x.example/"))
        s.add(EmailRecord(run_id=r.id, subject_template="Hi {{first_name}}", body_template="b", subject="Hi Ana",
                          body="b", checks={"length": True}))
        s.add(Trace(run_id=r.id, agent="writer", backend="heuristic", messages=messages, output="{}",
                    input_tokens=12, output_tokens=3, latency_ms=1.5, cost_usd=0.0))
    with session_scope(engine) as s:
        trace = s.exec(select(Trace)).one()
        assert trace.messages == messages and trace.input_tokens == 12
        assert s.exec(select(Campaign)).one().offer["product"] == "Widget"
        assert s.exec(select(FactRecord)).one().value == "Austin, Texas"
        assert s.exec(select(EmailRecord)).one().checks == {"length": True}


def test_failed_transaction_leaves_nothing(engine):
    with pytest.raises(IntegrityError):
        with session_scope(engine) as s:
            s.add(Campaign(name="dup"))
            s.add(Campaign(name="dup"))
    with session_scope(engine) as s:
        assert s.exec(select(Campaign)).all() == []


def test_one_run_per_prospect_and_campaign(engine):
    with session_scope(engine) as s:
        c = Campaign(name="c")
        s.add(c)
        s.flush()
        p = Prospect(campaign_id=c.id, first_name="A", email="a@x.example", company="X")
        s.add(p)
        s.flush()
        s.add(Run(campaign_id=c.id, prospect_id=p.id))
    with pytest.raises(IntegrityError):
        with session_scope(engine) as s:
            s.add(Run(campaign_id=1, prospect_id=1))


def test_migration_002_adds_replay_link_to_an_older_store(tmp_path):
    from sqlalchemy import create_engine, text

    from store.engine import open_store

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old = create_engine(url)
    with old.begin() as conn:  # the runs table as migration 001 made it before runs.replay_of_id existed
        conn.execute(text("CREATE TABLE runs (id INTEGER PRIMARY KEY, campaign_id INTEGER NOT NULL, "
                          "prospect_id INTEGER NOT NULL, status VARCHAR NOT NULL, error TEXT, attempts INTEGER NOT "
                          "NULL, researcher VARCHAR NOT NULL, writer VARCHAR NOT NULL, started_at DATETIME, "
                          "finished_at DATETIME)"))
        conn.execute(text("INSERT INTO runs VALUES (1, 1, 1, 'done', NULL, 1, 'heuristic', 'heuristic', NULL, NULL)"))
    old.dispose()
    engine = open_store(url)
    assert "replay_of_id" in {c["name"] for c in inspect(engine).get_columns("runs")}
    with session_scope(engine) as s:
        run = s.get(Run, 1)
        assert run is not None and run.status == "done" and run.replay_of_id is None  # kept, not lost
    assert applied_versions(engine) == [m.version for m in MIGRATIONS]


@pytest.fixture(params=["sqlite", "postgres"])
def empty_store_url(request, tmp_path):  # type: ignore[no-untyped-def]
    """The URL of an empty database with no tables: a SQLite file, or the PostgreSQL server named by
    OUTREACH_TEST_POSTGRES_URL (skipped when unset; its tables are dropped before and after)."""
    import os

    from sqlalchemy import text

    from store.engine import open_store
    from store.models import SQLModel

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.sqlite'}"
        return
    url = os.environ.get("OUTREACH_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("OUTREACH_TEST_POSTGRES_URL is not set")

    def drop_all() -> None:
        eng = open_store(url, migrate_schema=False)
        with eng.begin() as conn:
            SQLModel.metadata.drop_all(conn)
            conn.execute(text("DROP TABLE IF EXISTS schema_migrations"))
        eng.dispose()

    drop_all()
    yield url
    drop_all()


def test_migration_003_upgrades_a_store_made_before_it_and_keeps_its_rows(empty_store_url, monkeypatch):
    from sqlalchemy import MetaData, Table

    import store.migrations
    from store.engine import open_store
    from store.models import utcnow

    old = open_store(empty_store_url, migrate_schema=False)
    monkeypatch.setattr(store.migrations, "MIGRATIONS", MIGRATIONS[:2])
    assert migrate(old) == [1, 2]
    monkeypatch.undo()
    with old.begin() as conn:  # rows written through the old schema itself (today's models have more columns)
        campaigns, prospects, runs = (Table(name, MetaData(), autoload_with=conn)
                                      for name in ("campaigns", "prospects", "runs"))
        conn.execute(campaigns.insert().values(id=1, name="old", offer={"product": "Widget"}, created_at=utcnow()))
        conn.execute(prospects.insert().values(id=1, campaign_id=1, row_number=1, first_name="Ana", last_name="",
                                               title="", email="ana@x.example", company="X", website="", split=""))
        conn.execute(runs.insert().values(id=1, campaign_id=1, prospect_id=1, status="done", attempts=1,
                                          researcher="heuristic", writer="heuristic"))
    with old.begin() as conn:
        profiles, emails = (Table(name, MetaData(), autoload_with=conn) for name in ("profiles", "emails"))
        assert "drop_reasons" not in profiles.c and "personalised" not in emails.c
        conn.execute(profiles.insert().values(id=1, run_id=1, company="X", website="https://x.example",
                                              dropped_facts=3, sources=["https://x.example/"],
                                              created_at=utcnow()))
        conn.execute(emails.insert().values(id=1, run_id=1, subject_template="Hi {{first_name}}",
                                            body_template="b", subject="Hi Ana", body="b", checks={"length": True},
                                            valid=True, created_at=utcnow()))
    old.dispose()

    engine = open_store(empty_store_url)
    assert applied_versions(engine) == [m.version for m in MIGRATIONS]
    with session_scope(engine) as s:
        profile = s.exec(select(ProfileRecord)).one()
        assert (profile.company, profile.dropped_facts, profile.sources) == ("X", 3, ["https://x.example/"])
        assert profile.drop_reasons == {}  # the reasons were not recorded then
        mail = s.exec(select(EmailRecord)).one()
        assert (mail.subject, mail.checks, mail.valid, mail.personalised) == ("Hi Ana", {"length": True}, True, True)
        assert s.exec(select(Run)).one().status == "done"
    assert migrate(engine) == []
    engine.dispose()


def _unusable(url: str) -> str:
    with pytest.raises(StoreError) as info:
        engine = open_store(url)
        with session_scope(engine) as s:
            s.exec(select(Trace)).all()
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value.__cause__, Exception)
    return message


def test_a_file_that_is_not_a_database_is_one_clear_error(tmp_path):
    path = tmp_path / "store.sqlite"
    path.write_bytes(bytes(range(256)) * 32)
    message = _unusable(f"sqlite:///{path}")
    assert str(path) in message and "is not a SQLite database" in message and "move this file aside" in message


def test_a_damaged_store_is_one_clear_error(tmp_path):
    path = tmp_path / "store.sqlite"
    engine = open_store(f"sqlite:///{path}")
    with session_scope(engine) as s:
        s.add(Campaign(name="c", offer={}))
    engine.dispose()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * 3996  # page 1 past the header: the schema table
    path.write_bytes(bytes(data))
    message = _unusable(f"sqlite:///{path}")
    assert str(path) in message and "is damaged" in message and ".recover" in message


def test_damage_found_by_a_later_statement_is_the_same_error(tmp_path):
    path = tmp_path / "store.sqlite"
    engine = open_store(f"sqlite:///{path}")
    with session_scope(engine) as s:
        for i in range(40):
            s.add(Trace(agent="writer", step="write", backend="heuristic", output="x" * 4000 + str(i)))
    engine.dispose()
    data = bytearray(path.read_bytes())
    data[-4096 * 8:] = b"\xff" * (4096 * 8)  # the last pages: the traces just written
    path.write_bytes(bytes(data))
    engine = open_store(f"sqlite:///{path}")  # the schema pages are intact
    with pytest.raises(StoreError, match="is damaged"), session_scope(engine) as s:
        s.exec(select(Trace)).all()
    engine.dispose()


def test_a_folder_as_store_is_one_clear_error(tmp_path):
    message = _unusable(f"sqlite:///{tmp_path}")
    assert str(tmp_path) in message and "cannot be opened" in message
