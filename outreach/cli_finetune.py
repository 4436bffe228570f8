"""``outreach finetune ...`` and ``outreach miniatures ...``: distil traces into miniatures and manage them.

Only typer and rich are imported at start-up; torch, transformers, peft and trl load inside the commands. The
progress bars of training phases live here too (``demo --distill`` draws them as well).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from outreach.cli_common import (
    StoreOpt,
    err,
    open_engine,
    quiet_library_bars,
    require_extras,
    settings_or_exit,
    store_label,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from finetune.train import TrainProgress
    from store.models import MiniatureRecord

finetune_app = typer.Typer(help="Distil a teacher's traces into miniatures (datasets, base models, TRL training).")
miniatures_app = typer.Typer(help="Registered miniatures (one LoRA adapter or fine-tuned model per agent and version).")

console = Console()


def _engine(store: str | None) -> Engine:
    return open_engine(settings_or_exit(None, store_url=store))


def _loss_text(update: TrainProgress) -> str:
    loss = "-" if update.loss is None else f"{update.loss:.3f}"
    return loss + ("" if update.eval_loss is None else f" (eval {update.eval_loss:.3f})")


@contextmanager
def training_progress(description: str, bar_console: Console | None = None) -> Iterator[Callable[[TrainProgress], None]]:
    """One rich progress bar for one training run: optimizer steps done of planned, the latest loss (and eval
    loss), elapsed and remaining time. Yields the ``on_progress`` function of ``finetune.train.main`` /
    ``finetune.distill.distill``; until the first update (the dataset is being built) the bar pulses.

    Args:
        description: the phase, e.g. ``"training demo-writer"``.
        bar_console: where to draw (default: standard error; nothing is drawn when it is not a terminal).
    """
    where = bar_console or err
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=where, disable=not where.is_terminal) as progress:
        task = progress.add_task(description, total=None, loss="-")

        def update(state: TrainProgress) -> None:
            progress.update(task, total=state.total_steps or None, completed=state.step, loss=_loss_text(state))

        yield update


@contextmanager
def phase_progress(description: str) -> Iterator[None]:
    """A spinner with the elapsed time on standard error for a phase that reports no steps (e.g. bootstrapping
    a base model)."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  disable=not err.is_terminal) as progress:
        progress.add_task(description, total=None)
        yield


@finetune_app.command("bootstrap-base")
def bootstrap_base_command(
    out: Annotated[Path, typer.Option(help="Folder for the base model and tokenizer.")] = Path("models/base"),
    corpus: Annotated[Path | None, typer.Option(help="Corpus whose texts train the tokenizer and the model.")] = None,
    traces_store: Annotated[str | None, typer.Option("--store", help="Also learn from the traces in this store.")] = None,
    arch: Annotated[str, typer.Option(help="llama or qwen2.")] = "llama",
    preset: Annotated[str, typer.Option(help="2m, 10m or 30m parameters.")] = "10m",
    steps: Annotated[int, typer.Option(help="Pretraining steps.")] = 300,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Build a tiny base model offline: a byte-level BPE tokenizer trained on the corpus, a Llama- or
    Qwen2-style model of 2M-30M parameters, briefly pretrained as a causal LM, saved like any Hugging Face model.

    Example: `outreach finetune bootstrap-base --corpus corpus.sqlite --out models/base --preset 10m`
    """
    require_extras("outreach finetune bootstrap-base", "train")
    from finetune.base import bootstrap_base, corpus_texts
    from outreach.settings import load_settings

    corpus_path = corpus or load_settings().corpus_path
    if not Path(corpus_path).is_file():
        err.print(f"[red]no corpus at {corpus_path}; run `outreach world generate` or `outreach corpus import`[/red]")
        raise typer.Exit(2)
    texts = list(corpus_texts(corpus_path))
    if traces_store:
        from outreach.queries import select_traces

        for trace in select_traces(_engine(traces_store)):
            texts.extend(str(m.get("content", "")) for m in trace.messages)
            texts.append(trace.output)
    with phase_progress(f"bootstrapping a {preset} {arch} base: tokenizer, then {steps} pretraining steps"):
        info = bootstrap_base(out, texts, arch=arch, preset=preset, pretrain_steps=steps, seed=seed)  # type: ignore[arg-type]
    console.print_json(json.dumps(info.to_json()))


@finetune_app.command("dataset")
def dataset_command(
    agent: Annotated[str, typer.Option(help="researcher or writer.")],
    out: Annotated[Path, typer.Option(help="Folder for train.jsonl, eval.jsonl, manifest.json.")],
    campaign: Annotated[list[str] | None, typer.Option(help="Only traces of this campaign (repeat).")] = None,
    backend: Annotated[list[str] | None, typer.Option(help="Only traces of this backend spec (repeat).")] = None,
    review: Annotated[str, typer.Option(help="any, approved (approved or edited) or reviewed (not rejected).")] = "any",
    include_failed: Annotated[bool, typer.Option(help="Also runs that failed validation.")] = False,
    store: StoreOpt = None,
) -> None:
    """Build an SFT dataset for one agent from the store's traces (deduplicated, split by company).

    Example: `outreach finetune dataset --agent writer --campaign demo-train --out data/writer`
    """
    from finetune.datasets import build_sft_dataset, save_dataset

    ds = build_sft_dataset(_engine(store), agent=agent, campaigns=campaign, backends=backend, review=review,  # type: ignore[arg-type]
                           valid_only=not include_failed)
    path = save_dataset(ds, out)
    console.print(f"wrote {len(ds.train)} train and {len(ds.eval)} eval examples to {path} "
                  f"(hash {ds.manifest.content_hash[:12]})")
    console.print_json(json.dumps(ds.manifest.counts))


@finetune_app.command("train")
def train_command(
    agent: Annotated[str, typer.Option(help="researcher or writer.")],
    name: Annotated[str, typer.Option(help="Registry name of the miniature (a new version if it exists).")],
    base_model: Annotated[str, typer.Option(help="Hugging Face model id or local folder (see bootstrap-base).")],
    work_dir: Annotated[Path, typer.Option(help="Where datasets and training runs are written.")] = Path("models"),
    campaign: Annotated[list[str] | None, typer.Option(help="Only traces of this campaign (repeat).")] = None,
    backend: Annotated[list[str] | None, typer.Option(help="Only traces of this teacher backend (repeat).")] = None,
    review: Annotated[str, typer.Option(help="any, approved or reviewed.")] = "any",
    method: Annotated[str, typer.Option(help="lora or full.")] = "lora",
    config: Annotated[Path | None, typer.Option(help="TrainConfig TOML/JSON file.")] = None,
    parent: Annotated[str | None, typer.Option(help="NAME@VERSION of the miniature this one succeeds (recorded as its parent in the lineage).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a TrainConfig field: FIELD=VALUE (repeat).")] = None,
    chat_template: Annotated[Path | None, typer.Option("--chat-template", help="Jinja file with a training version of the base's chat template (answers inside {% generation %} ... {% endgeneration %}); default: the base's own, TRL's patched copy or one derived from it.")] = None,
    store: StoreOpt = None,
) -> None:
    """Distil: build the agent's dataset from the store, fine-tune with TRL (LoRA or full, assistant-only
    loss), and register the result.

    Example: `outreach finetune train --agent writer --name writer --base-model models/base --set num_train_epochs=2`
    """
    require_extras("outreach finetune train", "train")
    from core.errors import UserError
    from finetune.distill import distill
    from miniatures.registry import MiniatureNotFoundError

    overrides: dict[str, object] = {"chat_template": str(chat_template.expanduser().resolve())} if chat_template else {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            err.print(f"[red]--set takes FIELD=VALUE, got {item!r}[/red]")
            raise typer.Exit(2)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    parent_ref = None
    if parent:
        pname, _, pver = parent.partition("@")
        parent_ref = (pname, int(pver)) if pver.isdigit() else None
        if parent_ref is None:
            err.print("[red]--parent takes NAME@VERSION[/red]")
            raise typer.Exit(2)
    engine = _engine(store)
    quiet_library_bars()
    try:
        with training_progress(f"training {name} ({agent}, {method})") as on_progress:
            result = distill(engine, agent=agent, name=name, base_model=base_model, work_dir=work_dir,
                             campaigns=campaign, backends=backend, review=review, method=method,  # type: ignore[arg-type]
                             parent=parent_ref, train_overrides=overrides, config_file=config, on_progress=on_progress)
    except (UserError, ValueError, MiniatureNotFoundError, FileNotFoundError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    m = result.miniature
    console.print(f"registered miniature:{m.name}@{m.version} ({m.method}, agent {m.agent}) at {m.adapter_path}; "
                  f"final train loss {result.metrics.get('train_loss', float('nan')):.3f}")


@miniatures_app.command("list")
def miniatures_list(store: StoreOpt = None) -> None:
    """List registered miniatures. Example: `outreach miniatures list`"""
    from miniatures.registry import list_miniatures

    settings = settings_or_exit(None, store_url=store)
    records = list_miniatures(open_engine(settings))
    if not records:
        err.print(f"no miniatures registered in the store {store_label(settings)}; distil one with "
                  "`outreach finetune train` (or `outreach demo --distill`)", highlight=False, soft_wrap=True)
        return
    table = Table("name", "version", "agent", "method", "base model", "dataset", "created",
                  title=f"miniatures in {store_label(settings)}")
    for m in records:
        table.add_row(m.name, str(m.version), m.agent, m.method, m.base_model, m.dataset_hash[:12],
                      m.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@miniatures_app.command("show")
def miniatures_show(
    name: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    store: StoreOpt = None,
) -> None:
    """Show one miniature: base, adapter, training config, dataset hash, metrics and lineage.

    Example: `outreach miniatures show writer@2`
    """
    from miniatures.registry import MiniatureNotFoundError, get_miniature, lineage

    mname, _, ver = name.partition("@")
    engine = _engine(store)
    try:
        record = get_miniature(engine, mname, int(ver) if ver.isdigit() else None)
        chain = lineage(engine, record.name, record.version)
    except MiniatureNotFoundError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print_json(json.dumps({
        **record.model_dump(mode="json"),
        "lineage": [f"{r.name}@{r.version} (dataset {r.dataset_hash[:12]})" for r in chain],
    }))
    console.print("lineage (newest first):")
    for depth, r in enumerate(chain):
        console.print(f"{'  ' * depth}{'<- ' if depth else ''}{describe_lineage_step(r)}", markup=False,
                      highlight=False, soft_wrap=True)


def describe_lineage_step(record: MiniatureRecord) -> str:
    """One line of ``miniatures show``'s lineage: the version, its method and the data it was trained on."""
    ds = record.training_config.get("dataset") or {}
    line = f"{record.name}@{record.version} [{record.method} on {record.base_model}] dataset {record.dataset_hash[:12]}"
    if not ds:
        return line
    campaigns = ", ".join(f"{name} ({n})" for name, n in ds.get("campaigns", {}).items())
    reviewed = ds.get("reviewed", {})
    return (f"{line}: {ds.get('train', 0)} train / {ds.get('eval', 0)} eval rows from {campaigns or '-'}; "
            f"{ds.get('replayed_rows', 0)} replayed; reviewed: {reviewed.get('approved', 0)} approved, "
            f"{reviewed.get('edited', 0)} edited, {reviewed.get('rejected_excluded', 0)} rejected (excluded); "
            f"review filter {ds.get('filters', {}).get('review', 'any')}; folder {ds.get('dir', '-')}")


@miniatures_app.command("rm")
def miniatures_rm(
    name: Annotated[str, typer.Argument(help="NAME (all versions) or NAME@VERSION.")],
    force: Annotated[bool, typer.Option(help="Also remove versions that are parents of others.")] = False,
    store: StoreOpt = None,
) -> None:
    """Remove a miniature from the registry (its files stay on disk). Example: `outreach miniatures rm writer@1`"""
    from miniatures.registry import MiniatureInUseError, MiniatureNotFoundError, remove_miniature

    mname, _, ver = name.partition("@")
    try:
        n = remove_miniature(_engine(store), mname, int(ver) if ver.isdigit() else None, force=force)
    except (MiniatureNotFoundError, MiniatureInUseError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"removed {n} version(s) of {mname}")
