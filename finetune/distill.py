"""Distillation: a teacher's traces in the store -> an SFT dataset -> TRL training -> a registered miniature.

The loop of "Trained Miniatures" (arXiv 2508.15617): teacher-generated data, (optional) human review,
then LoRA or full fine-tuning of a small model that replaces the teacher for one agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from finetune.config import TrainConfig
from finetune.datasets import DatasetManifest, build_sft_dataset, save_dataset
from miniatures.registry import get_miniature, register_miniature
from store.models import Campaign, MiniatureRecord, Run, Trace

if TYPE_CHECKING:
    from finetune.train import TrainProgress

__all__ = ["DistillResult", "dataset_provenance", "distill"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillResult:
    """A registered miniature with the dataset manifest and training metrics it came from."""

    miniature: MiniatureRecord
    manifest: DatasetManifest
    dataset_dir: Path
    output_path: Path
    metrics: dict[str, Any]


def dataset_provenance(engine: Engine, manifest: DatasetManifest, dataset_dir: Path) -> dict[str, Any]:
    """Where a dataset's rows came from, as the registry records it (``training_config["dataset"]``).

    Returns:
        ``{"dir", "content_hash", "filters", "train", "eval", "campaigns": {name: rows}, "backends":
        {spec: rows}, "replayed_rows", "reviewed": {"approved", "edited", "rejected_excluded"}}``.
    """
    ids = [*manifest.train_trace_ids, *manifest.eval_trace_ids]
    campaigns: dict[str, int] = {}
    backends: dict[str, int] = {}
    replayed = 0
    with Session(engine) as session:
        rows = session.exec(
            select(Trace.id, Trace.backend, Trace.replay_of_id, Campaign.name)
            .join(Run, col(Run.id) == col(Trace.run_id), isouter=True)
            .join(Campaign, col(Campaign.id) == col(Run.campaign_id), isouter=True)
            .where(col(Trace.id).in_(ids))
        ).all()
    for _id, backend, replay_of, campaign in rows:
        campaigns[campaign or "(no campaign)"] = campaigns.get(campaign or "(no campaign)", 0) + 1
        backends[backend] = backends.get(backend, 0) + 1
        replayed += replay_of is not None
    counts = manifest.counts
    return {
        "dir": str(dataset_dir), "content_hash": manifest.content_hash, "filters": manifest.filters,
        "train": len(manifest.train_trace_ids), "eval": len(manifest.eval_trace_ids),
        "campaigns": dict(sorted(campaigns.items())), "backends": dict(sorted(backends.items())),
        "replayed_rows": replayed,
        "reviewed": {"approved": counts.get("approved", 0), "edited": counts.get("edited", 0),
                     "rejected_excluded": counts.get("rejected", 0)},
    }


def distill(
    engine: Engine,
    *,
    agent: str,
    name: str,
    base_model: str,
    work_dir: Path,
    campaigns: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    review: Literal["any", "approved", "reviewed"] = "any",
    method: Literal["lora", "full"] = "lora",
    parent: tuple[str, int] | None = None,
    train_overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
) -> DistillResult:
    """Build ``agent``'s dataset from the store, train a miniature on it and register it as ``name``.

    The registry records the dataset's provenance (``dataset_provenance``: campaigns, replayed rows,
    review counts, hash, folder) in ``training_config["dataset"]`` and the parent, so ``outreach
    miniatures show`` can print which data and which miniature a version came from.

    Args:
        engine: the store with the teacher's traces (and the registry).
        agent: ``researcher`` or ``writer``.
        name: registry name; a new version is added when the name exists.
        base_model: Hugging Face model id or local folder (e.g. one made by ``bootstrap_base``).
        work_dir: where ``datasets/<name>/`` and ``runs/<name>-v<N>/`` are written.
        campaigns, backends, review: dataset filters (``finetune.datasets.build_sft_dataset``).
        method: ``lora`` or ``full`` fine-tuning.
        parent: ``(name, version)`` of the miniature this one succeeds, recorded as its parent (lineage);
            training starts from ``base_model`` as always.
        train_overrides: ``TrainConfig`` fields to override (e.g. ``{"num_train_epochs": 2}``).
        config_file: a TOML/JSON ``TrainConfig`` file to start from.
        on_progress: called with each ``finetune.train.TrainProgress`` of the training run (a progress bar).

    Raises:
        ValueError: the filters leave no training example (the message names the filters).
        miniatures.registry.MiniatureNotFoundError: ``parent`` is not registered (checked before training).
        finetune.templates.ChatTemplateError: the base's chat template cannot train (checked before the dataset
            is built, on the tokenizer alone).
    """
    if parent is not None:
        get_miniature(engine, *parent)  # an unknown parent fails now, not after training
    preview: dict[str, Any] = {"base_model": base_model, "dataset_dir": str(work_dir / "datasets" / name),
                               "output_dir": str(work_dir / "runs"), "method": method}
    planned = TrainConfig.from_file(config_file).with_overrides(**preview) if config_file else TrainConfig(**preview)
    from finetune.train import check_base_template

    check_base_template(planned.with_overrides(**(train_overrides or {})))  # a template that cannot train fails now
    dataset = build_sft_dataset(engine, agent=agent, campaigns=campaigns, backends=backends, review=review)
    if not dataset.train:
        raise ValueError(
            f"no training examples for agent {agent!r} (campaigns={list(campaigns or [])}, "
            f"backends={list(backends or [])}, review={review}); run a campaign with the teacher first"
        )
    dataset_dir = save_dataset(dataset, work_dir / "datasets" / name)
    run_dir = work_dir / "runs" / f"{name}-{dataset.manifest.content_hash[:8]}-{method}"
    fields: dict[str, Any] = {"base_model": base_model, "dataset_dir": str(dataset_dir), "output_dir": str(run_dir),
                              "method": method}
    config = TrainConfig.from_file(config_file).with_overrides(**fields) if config_file else TrainConfig(**fields)
    if train_overrides:
        config = config.with_overrides(**train_overrides)
    from finetune.train import main as train_main

    logger.info("training %s (%s, %s) on %d examples", name, agent, method, len(dataset.train))
    result = train_main(config, on_progress=on_progress)
    record = register_miniature(
        engine, name=name, agent=agent, base_model=base_model, adapter_path=str(result.output_path), method=method,
        training_config={**config.to_dict(), "dataset": dataset_provenance(engine, dataset.manifest, dataset_dir)},
        dataset_hash=dataset.manifest.content_hash, metrics=result.metrics, parent=parent,
    )
    return DistillResult(record, dataset.manifest, dataset_dir, result.output_path, result.metrics)
