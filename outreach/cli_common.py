"""What every ``outreach`` command module shares: the error console, the common options, settings loading with
clear errors, and opening the store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from outreach.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["ConfigOpt", "CorpusOpt", "StoreOpt", "err", "open_engine", "settings_or_exit"]

err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="Settings file (default: ./outreach.toml or $OUTREACH_CONFIG).")
]
StoreOpt = Annotated[str | None, typer.Option("--store", help="SQLAlchemy URL of the store (setting store_url).")]
CorpusOpt = Annotated[Path | None, typer.Option("--corpus", help="Corpus file (setting corpus_path).")]


def open_engine(settings: Settings) -> Engine:
    """The store the settings name (``store_url``), migrated to the current schema."""
    from store import open_store

    return open_store(settings.store_url)


def settings_or_exit(config: Path | None, **overrides: object) -> Settings:
    """Load settings (``config`` file if given, else ``outreach.toml``/``$OUTREACH_CONFIG``, then the
    environment, then ``overrides``); print a clear error and exit with status 2 when they are invalid."""
    from pydantic import ValidationError

    if config is not None:
        if not config.is_file():
            err.print(f"[red]settings file {config} not found[/red]")
            raise typer.Exit(2)
        os.environ["OUTREACH_CONFIG"] = str(config)
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        err.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc
