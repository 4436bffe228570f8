"""Lineage: distilling from replayed and reviewed data records the dataset and the parent; `miniatures show`
prints it. Trains a tiny base for two steps per version (a few seconds)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from finetune.base import bootstrap_base
from finetune.distill import distill
from finetune.replay import replay
from graphs.runner import add_prospects, run_campaign
from miniatures.registry import MiniatureNotFoundError, lineage
from outreach.cli import app
from store import session_scope
from store.models import Review, Trace
from tests.helpers import good_draft_json, small_world
from tools import CorpusWeb

TRAIN = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "eval_steps": 1, "save_steps": 2,
         "max_length": 2048, "warmup_ratio": 0.0}


def test_distilling_from_replayed_and_reviewed_data_records_lineage(tmp_path: Path, sqlite_engine) -> None:  # type: ignore[no-untyped-def]
    world, corpus, offer, prospects = small_world(tmp_path, n=4)
    add_prospects(sqlite_engine, "src", offer, prospects)
    asyncio.run(run_campaign(sqlite_engine, "src", web=CorpusWeb(corpus)))
    asyncio.run(replay(sqlite_engine, "src", writer="heuristic", pages=CorpusWeb(corpus), name="again"))
    with Session(sqlite_engine) as s:
        writers = list(s.exec(select(Trace).where(Trace.agent == "writer").order_by(Trace.id)))  # type: ignore[arg-type]
    with session_scope(sqlite_engine) as s:
        s.add(Review(trace_id=writers[0].id, status="edited", edited_output=good_draft_json(offer), reviewer="ana"))
        s.add(Review(trace_id=writers[1].id, status="rejected", reviewer="ana"))
        s.add(Review(trace_id=writers[-1].id, status="approved", reviewer="ana"))
    texts = [p.read_text(encoding="utf-8") for p in sorted((world / "sites").rglob("*.html"))]
    base = bootstrap_base(tmp_path / "base", texts, preset="2m", vocab_size=2000, pretrain_steps=2, seq_len=64,
                          batch_size=4)
    with pytest.raises(MiniatureNotFoundError):
        distill(sqlite_engine, agent="writer", name="w", base_model=str(base.path), work_dir=tmp_path / "m",
                parent=("w", 7), train_overrides=TRAIN)
    first = distill(sqlite_engine, agent="writer", name="w", base_model=str(base.path), work_dir=tmp_path / "m",
                    campaigns=["src", "again"], method="full", train_overrides=TRAIN)
    second = distill(sqlite_engine, agent="writer", name="w", base_model=str(base.path), work_dir=tmp_path / "m",
                     campaigns=["again"], review="reviewed", parent=("w", 1), method="full", train_overrides=TRAIN)
    assert (first.miniature.version, second.miniature.version) == (1, 2)
    ds = first.miniature.training_config["dataset"]
    counts = first.manifest.counts
    assert set(ds["campaigns"]) == {"src", "again"} and ds["backends"] == {"heuristic": ds["train"] + ds["eval"]}
    assert ds["reviewed"] == {"approved": 1, "edited": 1, "rejected_excluded": 1}
    # A replay through the same deterministic teacher repeats its source: exact duplicates are dropped once.
    assert counts["exact_duplicates"] >= 1 and ds["train"] + ds["eval"] == counts["kept"]
    assert 1 <= ds["replayed_rows"] <= ds["campaigns"]["again"]
    assert ds["content_hash"] == first.miniature.dataset_hash and Path(ds["dir"], "manifest.json").is_file()
    assert second.miniature.training_config["dataset"]["campaigns"] == {"again": 1}  # only the approved replay
    assert [m.version for m in lineage(sqlite_engine, "w", 2)] == [2, 1]

    url = str(sqlite_engine.url)
    result = CliRunner().invoke(app, ["miniatures", "show", "w@2", "--store", url])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "lineage (newest first):" in out and "<- w@1 [full on" in out
    assert "from again (1)" in out and f"from again ({ds['campaigns']['again']}), src ({ds['campaigns']['src']})" in out
    assert "1 approved, 1 edited, 1 rejected (excluded)" in out
    shown = json.loads(result.output[: result.output.index("lineage (newest first):")])
    assert shown["parent_id"] == first.miniature.id
