"""The miniature registry: versions, lookup, parents and lineage, removal, errors (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from miniatures import (
    MiniatureInUseError,
    MiniatureNotFoundError,
    get_miniature,
    lineage,
    list_miniatures,
    register_miniature,
    remove_miniature,
)
from store import MiniatureRecord


def _register(engine: Engine, name: str, parent: tuple[str, int] | None = None, **over: Any) -> MiniatureRecord:
    fields: dict[str, Any] = {
        "name": name,
        "agent": "writer",
        "base_model": "/models/tiny-base",
        "adapter_path": f"/runs/{name}/final",
        "training_config": {"lr": 2e-4, "epochs": 3},
        "dataset_hash": "sha256:abc",
        "metrics": {"eval_loss": 1.25},
        "parent": parent,
    }
    fields.update(over)
    return register_miniature(engine, **fields)


def test_versions_count_up_per_name_and_fields_round_trip(engine: Engine) -> None:
    first = _register(engine, "writer-small")
    second = _register(engine, "writer-small", metrics={"eval_loss": 0.9})
    other = _register(engine, "researcher-small", agent="researcher", method="full")
    assert (first.version, second.version, other.version) == (1, 2, 1)

    latest = get_miniature(engine, "writer-small")
    assert latest.id == second.id and latest.metrics == {"eval_loss": 0.9}
    pinned = get_miniature(engine, "writer-small", 1)
    assert pinned.training_config == {"lr": 2e-4, "epochs": 3}
    assert pinned.dataset_hash == "sha256:abc" and pinned.adapter_path == "/runs/writer-small/final"
    assert get_miniature(engine, "researcher-small").method == "full"

    labels = [(r.name, r.version) for r in list_miniatures(engine)]
    assert labels == [("researcher-small", 1), ("writer-small", 1), ("writer-small", 2)]
    assert [r.name for r in list_miniatures(engine, agent="researcher")] == ["researcher-small"]


def test_not_found_lists_registered_names_and_says_how_to_make_one(engine: Engine) -> None:
    with pytest.raises(MiniatureNotFoundError) as empty:
        get_miniature(engine, "writer-small")
    assert "registered: none" in str(empty.value)
    assert "outreach finetune train" in str(empty.value)

    _register(engine, "writer-small")
    with pytest.raises(MiniatureNotFoundError) as missing_version:
        get_miniature(engine, "writer-small", 7)
    message = str(missing_version.value)
    assert "version 7" in message and "writer-small@1" in message
    assert isinstance(missing_version.value, LookupError)


def test_parent_is_resolved_and_lineage_walks_back_to_the_root(engine: Engine) -> None:
    root = _register(engine, "writer-small")
    child = _register(engine, "writer-small", parent=("writer-small", 1))
    grandchild = _register(engine, "writer-tuned", parent=("writer-small", 2))
    assert child.parent_id == root.id and grandchild.parent_id == child.id

    chain = lineage(engine, "writer-tuned", 1)
    assert [(r.name, r.version) for r in chain] == [("writer-tuned", 1), ("writer-small", 2), ("writer-small", 1)]
    assert [r.name for r in lineage(engine, "writer-small", 1)] == ["writer-small"]

    with pytest.raises(MiniatureNotFoundError, match="'ghost' version 3"):
        _register(engine, "writer-x", parent=("ghost", 3))
    assert [r.name for r in list_miniatures(engine)].count("writer-x") == 0  # nothing half-written


def test_remove_refuses_parents_unless_forced(engine: Engine) -> None:
    _register(engine, "writer-small")
    _register(engine, "writer-small", parent=("writer-small", 1))
    _register(engine, "writer-tuned", parent=("writer-small", 2))

    with pytest.raises(MiniatureInUseError, match=r"writer-tuned@1 \(child of writer-small@2\)"):
        remove_miniature(engine, "writer-small", 2)
    with pytest.raises(MiniatureInUseError, match="force"):
        remove_miniature(engine, "writer-small")  # v2 is kept by writer-tuned
    assert len(list_miniatures(engine)) == 3  # refused removals change nothing

    assert remove_miniature(engine, "writer-tuned") == 1
    # v1 is a parent of v2, but both go together: allowed without force.
    assert remove_miniature(engine, "writer-small") == 2
    assert list_miniatures(engine) == []


def test_forced_removal_orphans_children(engine: Engine) -> None:
    _register(engine, "writer-small")
    child = _register(engine, "writer-tuned", parent=("writer-small", 1))
    assert remove_miniature(engine, "writer-small", 1, force=True) == 1
    orphan = get_miniature(engine, "writer-tuned")
    assert orphan.id == child.id and orphan.parent_id is None
    assert [r.name for r in lineage(engine, "writer-tuned")] == ["writer-tuned"]
    with pytest.raises(MiniatureNotFoundError):
        remove_miniature(engine, "writer-small")
    # the version after a removed latest version does not reuse numbers still present
    assert _register(engine, "writer-tuned").version == 2


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"name": "writer:small"}, "not valid"),
        ({"name": "writer@2"}, "not valid"),
        ({"name": ""}, "not valid"),
        ({"method": "qlora-ish"}, "method"),
        ({"adapter_path": ""}, "adapter_path is empty"),
        ({"agent": ""}, "agent is empty"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(sqlite_engine: Engine, over: dict[str, Any], match: str) -> None:
    fields = {"name": "writer-small", **over}
    name = fields.pop("name")
    with pytest.raises(ValueError, match=match):
        _register(sqlite_engine, name, **fields)
    assert list_miniatures(sqlite_engine) == []
