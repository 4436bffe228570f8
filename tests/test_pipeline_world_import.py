"""outreach.pipeline.import_world_corpus: the demo world's pages extracted in worker processes are stored as
``tools.import_html`` stores them in one process (same documents, same order: the base model's tokenizer and
pretraining read the corpus in insertion order)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from evals.world import generate_world
from outreach.pipeline import import_world_corpus


def _rows(path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT id, key, url, data FROM documents ORDER BY id").fetchall()
    finally:
        conn.close()


def test_workers_store_the_same_documents_in_the_same_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import outreach.pipeline

    monkeypatch.setattr(outreach.pipeline, "_POOL_MIN_PAGES", 1)  # a small world, through the worker processes
    generate_world(tmp_path / "world", n_companies=6, seed=3)
    one = import_world_corpus(tmp_path / "world", tmp_path / "one.sqlite", workers=1)
    two = import_world_corpus(tmp_path / "world", tmp_path / "two.sqlite", workers=2)
    assert one == two > 20
    assert _rows(tmp_path / "one.sqlite") == _rows(tmp_path / "two.sqlite")


def test_workers_below_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        import_world_corpus(tmp_path / "world", tmp_path / "c.sqlite", workers=0)
