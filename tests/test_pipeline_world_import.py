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
    import tools.corpus_import

    monkeypatch.setattr(tools.corpus_import, "_POOL_MIN_PAGES", 1)  # a small world, through the worker processes
    generate_world(tmp_path / "world", n_companies=6, seed=3)
    one = import_world_corpus(tmp_path / "world", tmp_path / "one.sqlite", workers=1)
    two = import_world_corpus(tmp_path / "world", tmp_path / "two.sqlite", workers=2)
    assert one == two > 20
    assert _rows(tmp_path / "one.sqlite") == _rows(tmp_path / "two.sqlite")


def test_workers_below_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        import_world_corpus(tmp_path / "world", tmp_path / "c.sqlite", workers=0)


def test_a_page_that_cannot_be_decoded_is_skipped_in_a_worker_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tools.corpus_import
    from tools import Corpus, import_html

    monkeypatch.setattr(tools.corpus_import, "_POOL_MIN_PAGES", 1)
    host = tmp_path / "sites" / "acme.example"
    host.mkdir(parents=True)
    for name in ("index", "about"):
        (host / f"{name}.html").write_text(f"<html><body><p>Acme {name} page, a real sentence.</p></body></html>",
                                           encoding="utf-8")
    (host / "broken.html").write_bytes(b"<html><body><p>caf\xe9 \xff\xfe</p></body></html>")  # not UTF-8
    corpus = Corpus(tmp_path / "c.sqlite")
    try:
        assert import_html(tmp_path / "sites", corpus, root=tmp_path / "sites", workers=2) == 2
    finally:
        corpus.close()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        import_html(tmp_path / "sites", Corpus(":memory:"), workers=0)
