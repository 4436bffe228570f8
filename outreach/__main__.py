"""``python -m outreach`` runs the CLI."""

from outreach.cli import run_cli

run_cli()
