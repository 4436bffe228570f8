"""``python -m outreach`` runs the CLI."""

from outreach.cli import run_cli

if __name__ == "__main__":  # a spawned worker (finetune.background, corpus import) re-imports this module
    run_cli()
