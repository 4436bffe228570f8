"""Migrations are spelled out: a store built by them has exactly the tables and columns of the models."""

from __future__ import annotations

from sqlalchemy import Engine, inspect
from sqlmodel import SQLModel

from store import models
from store.migrations import MIGRATIONS, migrate


def _columns(engine: Engine) -> dict[str, dict[str, bool]]:
    found = inspect(engine)
    return {t: {c["name"]: bool(c["nullable"]) for c in found.get_columns(t)} for t in found.get_table_names()}


def test_migrated_store_matches_the_models(engine):  # type: ignore[no-untyped-def]
    # ``engine`` was built by migrate() alone (SQLite, and PostgreSQL when configured).
    tables = _columns(engine)
    for table in SQLModel.metadata.sorted_tables:
        assert table.name in tables, f"no migration creates table {table.name}"
        wanted = {c.name: bool(c.nullable) for c in table.columns}
        assert set(tables[table.name]) == set(wanted), f"{table.name}: migrated columns differ from the model"
        # Columns added by ALTER TABLE get defaults instead of NOT NULL on some backends; where the model
        # says NOT NULL the migrated column must not accept NULL either.
        loose = [c for c, nullable in wanted.items() if not nullable and tables[table.name][c]]
        assert not loose, f"{table.name}: columns {loose} accept NULL in the migrated store"


def test_migrations_do_not_build_from_todays_models():  # type: ignore[no-untyped-def]
    import inspect as pyinspect

    for migration in MIGRATIONS:
        source = pyinspect.getsource(migration.apply)
        assert "models." not in source.replace("models.utcnow", ""), (
            f"migration {migration.version} reads today's models; spell its schema out")


def test_a_store_made_by_the_old_initial_migration_upgrades(tmp_path):  # type: ignore[no-untyped-def]
    # Stores made while 001 still ran create_all on the models of its day (here: every table but the
    # newest columns) must migrate without error and end with the models' columns.
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    SQLModel.metadata.create_all(engine)  # an old 001 on models that already had later columns
    models.SchemaMigration.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(models.SchemaMigration.__table__.insert().values(  # type: ignore[attr-defined]
            version=1, name="initial tables", applied_at=models.utcnow()))
    applied = migrate(engine)
    assert applied == [m.version for m in sorted(MIGRATIONS, key=lambda m: m.version)][1:]
    assert migrate(engine) == []
