"""The miniature registry: versions, lookup, parents and lineage, removal, errors (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from core.errors import UserError
from miniatures import (
    MiniatureInUseError,
    MiniatureNotFoundError,
    get_miniature,
    lineage,
    list_miniatures,
    register_miniature,
    remove_miniature,
)
from miniatures.registry import (
    MiniaturePathError,
    check_miniature_paths,
    relocate_miniature,
    resolve_model_location,
)
from store import MiniatureRecord
from store.engine import session_scope


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


# Paths: stored absolute, checked before loading, relocatable.


def _folder(path: Path, marker: str, content: dict[str, Any] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).write_text(json.dumps(content or {}))
    return path


def _legacy_record(engine: Engine, **fields: Any) -> MiniatureRecord:
    """A record written as registries before absolute paths wrote them: paths exactly as typed."""
    record = MiniatureRecord(name="writer-old", agent="writer", version=1, method="lora", **fields)
    with session_scope(engine) as session:
        session.add(record)
        session.flush()
        session.refresh(record)
    return record


def test_local_folders_are_stored_absolute_and_hub_ids_as_given(sqlite_engine: Engine, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "models" / "base", "config.json")
    _folder(tmp_path / "runs" / "w", "adapter_config.json")
    local = _register(sqlite_engine, "writer-local", base_model="models/base", adapter_path="runs/w")
    assert local.base_model == str(tmp_path / "models" / "base")
    assert local.adapter_path == str(tmp_path / "runs" / "w")
    hub = _register(sqlite_engine, "writer-hub", base_model="Qwen/Qwen2.5-0.5B-Instruct", adapter_path="./runs/w")
    assert hub.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and hub.adapter_path == str(tmp_path / "runs" / "w")
    assert resolve_model_location("./not-yet") == str(tmp_path / "not-yet")  # starts like a path: a path
    assert resolve_model_location("~/m") == str(Path("~/m").expanduser().resolve())
    monkeypatch.chdir(tmp_path / "runs")
    assert check_miniature_paths(get_miniature(sqlite_engine, "writer-local")).id == local.id
    assert check_miniature_paths(get_miniature(sqlite_engine, "writer-hub")).id == hub.id


def test_moved_folders_are_named_with_what_to_do(sqlite_engine: Engine, tmp_path: Path) -> None:
    base = _folder(tmp_path / "base", "config.json")
    adapter = _folder(tmp_path / "w", "adapter_config.json")
    record = _register(sqlite_engine, "writer-small", base_model=str(base), adapter_path=str(adapter))
    (adapter / "adapter_config.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(MiniaturePathError) as gone:
        check_miniature_paths(record)
    message = str(gone.value)
    assert f"{str(adapter)!r} is gone" in message and "writer-small@1" in message
    assert "outreach miniatures relocate writer-small@1 --adapter-path" in message and "miniatures rm" in message
    assert isinstance(gone.value, UserError) and isinstance(gone.value, FileNotFoundError)

    (tmp_path / "elsewhere.json").rename(adapter / "adapter_config.json")
    base.rename(tmp_path / "base-moved")
    with pytest.raises(MiniaturePathError, match=r"base model folder .*base' is gone.*--base-model"):
        check_miniature_paths(record)
    full = _register(sqlite_engine, "writer-full", method="full", adapter_path=str(tmp_path / "nothing"))
    with pytest.raises(MiniaturePathError, match="model folder .*nothing' is gone or holds no config.json"):
        check_miniature_paths(full)


def test_relative_paths_of_older_records_are_refused_not_guessed(sqlite_engine: Engine, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = _folder(tmp_path / "models" / "base", "config.json")
    adapter = _folder(tmp_path / "runs" / "w", "adapter_config.json", {"base_model_name_or_path": str(base)})
    # even from the folder it was registered in, a relative adapter path is refused (it works by chance)
    relative_adapter = _legacy_record(sqlite_engine, base_model=str(base), adapter_path="runs/w")
    with pytest.raises(MiniaturePathError, match=r"relative path 'runs/w'.*relocate writer-old@1 --adapter-path"):
        check_miniature_paths(relative_adapter)
    # 'models/base' reads like a hub id, but the adapter was trained on a folder ending in models/base
    hub_like = MiniatureRecord(name="writer-old", version=2, agent="writer", base_model="models/base",
                               adapter_path=str(adapter))
    with pytest.raises(MiniaturePathError, match=rf"relative path 'models/base' \(its adapter was trained on "
                                                 rf"'{base}'\).*--base-model"):
        check_miniature_paths(hub_like)
    dotted = MiniatureRecord(name="writer-old", version=3, agent="writer", base_model="./models/base",
                             adapter_path=str(adapter))
    with pytest.raises(MiniaturePathError, match="relative path './models/base'"):
        check_miniature_paths(dotted)


def test_relocate_points_a_record_at_the_new_place_and_refuses_typos(sqlite_engine: Engine, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = _folder(tmp_path / "models" / "base", "config.json")
    _folder(tmp_path / "runs" / "w", "adapter_config.json")
    old = _legacy_record(sqlite_engine, base_model="models/base", adapter_path="runs/w")
    with pytest.raises(MiniaturePathError, match="typo"):
        relocate_miniature(sqlite_engine, "writer-old", adapter_path="runs/typo")
    assert get_miniature(sqlite_engine, "writer-old").adapter_path == "runs/w"  # nothing written
    with pytest.raises(ValueError, match="nothing to relocate"):
        relocate_miniature(sqlite_engine, "writer-old")
    moved = relocate_miniature(sqlite_engine, "writer-old", 1, adapter_path="runs/w", base_model="models/base")
    assert (moved.id, moved.adapter_path, moved.base_model) == (old.id, str(tmp_path / "runs" / "w"), str(base))
    assert check_miniature_paths(get_miniature(sqlite_engine, "writer-old", 1)).adapter_path == moved.adapter_path
