"""The miniature registry: named, versioned miniatures over the store's ``miniatures`` table.

A miniature is a base model plus a LoRA adapter (``method="lora"``) or a fully fine-tuned model
(``method="full"``) for one agent, with the training config, the hash of the dataset it was
distilled from, its metrics and, when it was trained from another miniature, its parent. Versions
count up per name from 1, so ``miniature:writer-small`` means the latest version and
``miniature:writer-small@2`` a fixed one (``miniatures.specs``). The registry keeps records only;
it never writes or deletes adapter files.

Local folders are stored as resolved absolute paths (a Hugging Face model id stays as given), so a
miniature works from any working folder; ``check_miniature_paths`` is what every loader calls before
it touches the files, and names a moved, deleted or (in records from before absolute paths) relative
folder with what to do about it; ``relocate_miniature`` points a record at a folder's new place.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from core.errors import UserError
from store.engine import session_scope
from store.models import MiniatureRecord

__all__ = [
    "MINIATURE_METHODS",
    "MiniatureInUseError",
    "MiniatureNotFoundError",
    "MiniaturePathError",
    "check_miniature_paths",
    "get_miniature",
    "lineage",
    "list_miniatures",
    "register_miniature",
    "relocate_miniature",
    "remove_miniature",
    "resolve_model_location",
]

logger = logging.getLogger(__name__)

#: Fine-tuning methods a miniature can record: a LoRA adapter on a base, or a fully fine-tuned model.
MINIATURE_METHODS = ("lora", "full")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class MiniatureNotFoundError(UserError, LookupError):
    """No registered miniature matches a name (and version).

    The message lists the registered miniatures and says how to create one.

    Args:
        name: the name asked for.
        version: the version asked for (``None``: any version).
        registered: ``name@version`` labels of what is registered.
    """

    def __init__(self, name: str, version: int | None = None, registered: Iterable[str] = ()) -> None:
        self.name = name
        self.version = version
        self.registered = list(registered)
        wanted = f"{name!r}" if version is None else f"{name!r} version {version}"
        have = ", ".join(self.registered) if self.registered else "none"
        super().__init__(
            f"no miniature {wanted} is registered in this store (registered: {have}); "
            "distil one with `outreach finetune train`, or list them with `outreach miniatures list`"
        )


class MiniatureInUseError(UserError, ValueError):
    """A miniature version cannot be removed because other versions name it as their parent."""


class MiniaturePathError(UserError, FileNotFoundError):
    """A registered miniature's base or adapter folder cannot be used: moved, deleted, or stored relative.

    The message names the miniature, the path as stored and what to do (relocate, retrain or remove).
    """


#: How a path that is not there yet is told from a Hugging Face model id (``org/name``): it starts like a
#: path. The same rule as ``finetune.base.load_base``.
_PATH_PREFIXES = (".", "/", "~")


def resolve_model_location(value: str | Path) -> str:
    """A base model or adapter location as the registry stores it.

    An existing local folder, or anything that starts like a path (``./``, ``../``, ``/``, ``~``), becomes a
    resolved absolute path; anything else (``Qwen/Qwen2.5-0.5B-Instruct``) is a Hugging Face model id and is
    returned as given.

    Args:
        value: a folder (relative to the current folder, absolute or ``~``) or a model id.

    Returns:
        The absolute path, or the model id.
    """
    text = str(value)
    path = Path(text).expanduser()
    if isinstance(value, Path) or path.exists() or text.startswith(_PATH_PREFIXES) or path.is_absolute():
        return str(path.resolve())
    return text


def _relocate_hint(label: str, option: str) -> str:
    return (f"if the folder moved, run `outreach miniatures relocate {label} {option} NEW_FOLDER`; otherwise "
            f"retrain it with `outreach finetune train`, or remove it with `outreach miniatures rm {label}`")


def _stored_base_of_adapter(adapter: Path) -> str | None:
    """``base_model_name_or_path`` of the peft adapter in ``adapter`` (``None`` when unreadable)."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(base) if base else None


def check_miniature_paths(record: MiniatureRecord) -> MiniatureRecord:
    """Check that ``record``'s folders are where the registry says, before anything loads them.

    The adapter folder (``method="lora"``: holding ``adapter_config.json``; ``"full"``: the model's
    ``config.json``) must be an absolute path that exists; a LoRA miniature's base must be a Hugging Face
    model id or an existing absolute folder with a ``config.json``. A relative path (stored by a registry
    from before paths were made absolute) is refused rather than resolved against the current folder,
    which would load the wrong folder, or none, depending on where the command runs. A base stored as
    ``models/base`` is taken for a hub id unless the adapter's own ``adapter_config.json`` names an
    absolute base folder ending in the same parts, in which case it was a relative folder.

    Args:
        record: a registry record.

    Returns:
        ``record`` itself, unchanged.

    Raises:
        MiniaturePathError: a folder is relative, gone, or holds no config; the message names the path
            and says how to relocate, retrain or remove the miniature.
    """
    label = _label(record)
    kind = "adapter" if record.method == "lora" else "model"
    marker = "adapter_config.json" if record.method == "lora" else "config.json"
    adapter = Path(record.adapter_path).expanduser()
    if not adapter.is_absolute():
        raise MiniaturePathError(
            f"miniature {label}: its {kind} folder was registered as the relative path {record.adapter_path!r}, "
            "which means a different folder depending on where a command runs; "
            + _relocate_hint(label, "--adapter-path"))
    if not (adapter / marker).is_file():
        raise MiniaturePathError(
            f"miniature {label}: its {kind} folder {str(adapter)!r} is gone or holds no {marker} (moved or "
            "deleted?); " + _relocate_hint(label, "--adapter-path"))
    if record.method != "lora":
        return record
    base_text = record.base_model
    base = Path(base_text).expanduser()
    if base.is_absolute():
        if not (base / "config.json").is_file():
            raise MiniaturePathError(
                f"miniature {label}: its base model folder {str(base)!r} is gone or holds no config.json "
                "(moved or deleted?); " + _relocate_hint(label, "--base-model"))
        return record
    stored = _stored_base_of_adapter(adapter)
    looks_relative = base_text.startswith(_PATH_PREFIXES)
    if not looks_relative and stored and Path(stored).is_absolute():
        looks_relative = Path(stored).parts[-len(base.parts):] == base.parts
    if looks_relative:
        where = f" (its adapter was trained on {stored!r})" if stored and Path(stored).is_absolute() else ""
        raise MiniaturePathError(
            f"miniature {label}: its base model was registered as the relative path {base_text!r}{where}, "
            "which means a different folder depending on where a command runs; "
            + _relocate_hint(label, "--base-model"))
    return record  # a Hugging Face model id


def _label(record: MiniatureRecord) -> str:
    return f"{record.name}@{record.version}"


def _registered_labels(engine: Engine) -> list[str]:
    return [_label(r) for r in list_miniatures(engine)]


def register_miniature(
    engine: Engine,
    *,
    name: str,
    agent: str,
    base_model: str,
    adapter_path: str,
    method: str = "lora",
    training_config: dict[str, Any],
    dataset_hash: str,
    metrics: dict[str, Any],
    parent: tuple[str, int] | None = None,
) -> MiniatureRecord:
    """Register a new version of miniature ``name``.

    The version is one more than the highest version registered under ``name`` (1 for a new name).

    Args:
        engine: the store.
        name: the miniature's name: letters, digits, ``.``, ``_``, ``-`` (no ``:`` or ``@``, which
            the backend spec ``miniature:<name>@<version>`` uses), at most 128 characters.
        agent: the agent it serves (``researcher`` or ``writer``).
        base_model: a Hugging Face model id or local folder of the base model; a folder is stored as its
            resolved absolute path (``resolve_model_location``).
        adapter_path: folder of the LoRA adapter (``peft`` ``save_pretrained``), or of the full model
            and tokenizer for ``method="full"``; stored as its resolved absolute path.
        method: ``"lora"`` or ``"full"``.
        training_config: the training configuration (JSON-serialisable).
        dataset_hash: hash of the training dataset.
        metrics: evaluation metrics (JSON-serialisable).
        parent: ``(name, version)`` of the miniature this one was trained from, if any.

    Returns:
        The stored record (with ``id`` and ``version`` set).

    Raises:
        ValueError: ``name`` is malformed, ``agent``/``base_model``/``adapter_path`` is empty, or
            ``method`` is unknown.
        MiniatureNotFoundError: ``parent`` is not registered.
    """
    if not _NAME.match(name or ""):
        raise ValueError(
            f"miniature name {name!r} is not valid; use letters, digits, '.', '_' or '-' (no ':' or '@'), "
            "starting with a letter or digit, e.g. 'writer-small'"
        )
    for field_name, value in (("agent", agent), ("base_model", base_model), ("adapter_path", adapter_path)):
        if not value:
            raise ValueError(f"miniature {name!r}: {field_name} is empty; give the {field_name.replace('_', ' ')}")
    if method not in MINIATURE_METHODS:
        raise ValueError(f"miniature {name!r}: method {method!r} is unknown; use one of {MINIATURE_METHODS}")
    base_model = resolve_model_location(base_model)
    adapter_path = str(Path(adapter_path).expanduser().resolve())  # always a folder, never a hub id
    for attempt in range(3):
        try:
            with session_scope(engine) as session:
                parent_id = None
                if parent is not None:
                    parent_record = session.exec(
                        select(MiniatureRecord).where(
                            MiniatureRecord.name == parent[0], MiniatureRecord.version == parent[1]
                        )
                    ).first()
                    if parent_record is None:
                        raise MiniatureNotFoundError(parent[0], parent[1], _registered_labels(engine))
                    parent_id = parent_record.id
                latest = session.exec(
                    select(func.max(MiniatureRecord.version)).where(MiniatureRecord.name == name)
                ).one()
                record = MiniatureRecord(
                    name=name,
                    agent=agent,
                    version=(latest or 0) + 1,
                    base_model=base_model,
                    adapter_path=adapter_path,
                    method=method,
                    training_config=dict(training_config),
                    dataset_hash=dataset_hash,
                    metrics=dict(metrics),
                    parent_id=parent_id,
                )
                session.add(record)
                session.flush()
                session.refresh(record)
            logger.info("registered miniature %s (%s, %s on %s)", _label(record), agent, method, base_model)
            return record
        except IntegrityError:
            # Another writer took the same version between our read and our insert: count again.
            if attempt == 2:
                raise
            logger.warning("miniature %r: version taken concurrently, retrying", name)
    raise AssertionError("unreachable")  # pragma: no cover


def get_miniature(engine: Engine, name: str, version: int | None = None) -> MiniatureRecord:
    """Return miniature ``name`` at ``version`` (the latest version when ``None``).

    Raises:
        MiniatureNotFoundError: nothing matches; the message lists what is registered.
    """
    with session_scope(engine) as session:
        query = select(MiniatureRecord).where(MiniatureRecord.name == name)
        if version is not None:
            query = query.where(MiniatureRecord.version == version)
        record = session.exec(query.order_by(col(MiniatureRecord.version).desc())).first()
    if record is None:
        raise MiniatureNotFoundError(name, version, _registered_labels(engine))
    return record


def list_miniatures(engine: Engine, *, agent: str | None = None) -> list[MiniatureRecord]:
    """All registered miniatures, ordered by name then version (optionally only those of ``agent``)."""
    with session_scope(engine) as session:
        query = select(MiniatureRecord)
        if agent is not None:
            query = query.where(MiniatureRecord.agent == agent)
        return list(session.exec(query.order_by(col(MiniatureRecord.name), col(MiniatureRecord.version))).all())


def remove_miniature(engine: Engine, name: str, version: int | None = None, *, force: bool = False) -> int:
    """Remove miniature ``name`` at ``version`` (every version when ``None``) from the registry.

    Adapter files are left where they are. A version that another (kept) miniature names as its
    parent is only removed with ``force=True``, which leaves those children without a parent.

    Args:
        engine: the store.
        name: the miniature's name.
        version: the version to remove, or ``None`` for all versions.
        force: also remove versions that are parents of other miniatures.

    Returns:
        The number of records removed.

    Raises:
        MiniatureNotFoundError: nothing matches.
        MiniatureInUseError: a version to remove is a parent of another miniature and ``force`` is False.
    """
    with session_scope(engine) as session:
        query = select(MiniatureRecord).where(MiniatureRecord.name == name)
        if version is not None:
            query = query.where(MiniatureRecord.version == version)
        doomed = list(session.exec(query).all())
        if not doomed:
            raise MiniatureNotFoundError(name, version, _registered_labels(engine))
        doomed_ids = {r.id for r in doomed}
        children = list(
            session.exec(select(MiniatureRecord).where(col(MiniatureRecord.parent_id).in_(doomed_ids))).all()
        )
        outside = [c for c in children if c.id not in doomed_ids]
        if outside and not force:
            pairs = ", ".join(
                f"{_label(c)} (child of {next(_label(d) for d in doomed if d.id == c.parent_id)})" for c in outside
            )
            raise MiniatureInUseError(
                f"cannot remove {name!r}{'' if version is None else f' version {version}'}: other miniatures were "
                f"trained from it: {pairs}; remove those first, or pass force=True (--force) to keep them "
                "without a parent"
            )
        for child in children:
            child.parent_id = None
            session.add(child)
        session.flush()
        for record in doomed:
            session.delete(record)
    logger.info("removed %d version(s) of miniature %r", len(doomed), name)
    return len(doomed)


def lineage(engine: Engine, name: str, version: int | None = None) -> list[MiniatureRecord]:
    """The chain of parents of miniature ``name`` at ``version`` (latest when ``None``).

    Returns:
        ``[the miniature, its parent, the parent's parent, ...]``, ending at a miniature without parent.

    Raises:
        MiniatureNotFoundError: the miniature is not registered.
    """
    record = get_miniature(engine, name, version)
    chain = [record]
    seen = {record.id}
    with session_scope(engine) as session:
        while chain[-1].parent_id is not None:
            parent = session.get(MiniatureRecord, chain[-1].parent_id)
            if parent is None or parent.id in seen:  # a dangling or cyclic link ends the chain
                break
            seen.add(parent.id)
            chain.append(parent)
    return chain


def relocate_miniature(
    engine: Engine,
    name: str,
    version: int | None = None,
    *,
    adapter_path: str | Path | None = None,
    base_model: str | Path | None = None,
) -> MiniatureRecord:
    """Point miniature ``name`` at ``version`` (latest when ``None``) at its folders' new places.

    The new places are stored as resolved absolute paths (a base given as a hub id stays an id) and must
    pass ``check_miniature_paths`` before anything is written, so a typo changes nothing.

    Args:
        engine: the store.
        name: the miniature's name.
        version: the version to change (``None``: the latest).
        adapter_path: the adapter (or fully fine-tuned model) folder's new place, or ``None`` to keep it.
        base_model: the base model's new folder or model id, or ``None`` to keep it.

    Returns:
        The updated record.

    Raises:
        ValueError: neither ``adapter_path`` nor ``base_model`` is given.
        MiniatureNotFoundError: the miniature is not registered.
        MiniaturePathError: the record, with the new places, still names a missing or relative folder.
    """
    if adapter_path is None and base_model is None:
        raise ValueError("nothing to relocate: give the new adapter folder (--adapter-path) or base (--base-model)")
    record = get_miniature(engine, name, version)
    if adapter_path is not None:
        record.adapter_path = str(Path(adapter_path).expanduser().resolve())
    if base_model is not None:
        record.base_model = resolve_model_location(base_model)
    check_miniature_paths(record)
    with session_scope(engine) as session:
        stored = session.get(MiniatureRecord, record.id)
        if stored is None:  # removed since we read it
            raise MiniatureNotFoundError(name, record.version, _registered_labels(engine))
        stored.adapter_path, stored.base_model = record.adapter_path, record.base_model
        session.add(stored)
        session.flush()
        session.refresh(stored)
    logger.info("relocated miniature %s: adapter %s, base %s", _label(record), record.adapter_path, record.base_model)
    return stored
