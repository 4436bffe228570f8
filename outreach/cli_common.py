"""What every ``outreach`` command module shares: the error console and settings loading with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from outreach.settings import Settings, load_settings

__all__ = ["err", "settings_or_exit"]

err = Console(stderr=True)


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
