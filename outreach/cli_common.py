"""What every ``outreach`` command module shares: the error console, the common options, settings loading with
clear errors, opening the store, checks that an optional extra is installed, and backend probes."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from outreach.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from miniatures.specs import BackendSpec

__all__ = ["EXTRA_MODULES", "ConfigOpt", "CorpusOpt", "StoreOpt", "backend_endpoint", "describe_backend", "err",
           "open_engine", "probe_backends", "quiet_library_bars", "require_extras", "settings_or_exit", "store_label"]

err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="Settings file (default: ./outreach.toml or $OUTREACH_CONFIG).")
]
StoreOpt = Annotated[str | None, typer.Option("--store", help="SQLAlchemy URL of the store (setting store_url).")]
CorpusOpt = Annotated[Path | None, typer.Option("--corpus", help="Corpus file (setting corpus_path).")]

#: The modules (import names) each optional extra of ``pyproject.toml`` brings, checked before a command needs them.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("torch", "transformers", "peft", "trl", "datasets", "tokenizers", "accelerate", "matplotlib"),
    "eval": ("scipy", "statsmodels", "matplotlib", "jinja2"),
    "serve": ("fastapi", "uvicorn", "jinja2"),
    "ray": ("ray",),
    "llama-cpp": ("gguf", "sentencepiece"),
}
#: Where the public OpenAI API answers (an ``openai:`` spec without ``@<base_url>``).
OPENAI_API_URL = "https://api.openai.com/v1"
PROBE_TIMEOUT_S = 5.0


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a __spec__ (e.g. replaced by a test double): importable
        return True


def require_extras(command: str, *extras: str) -> None:
    """Exit with status 2, naming the extras to install, when a module of one of ``extras`` is missing.

    Checked with ``importlib.util.find_spec`` (nothing is imported), so a command fails before it does any work
    instead of with a ``ModuleNotFoundError`` traceback half-way through.

    Args:
        command: what needs them, as the user typed it (e.g. ``"outreach demo --distill"``).
        extras: keys of ``EXTRA_MODULES``.

    Raises:
        typer.Exit: some module is missing (after printing which, and the ``pip install`` line).
    """
    missing = {extra: [m for m in EXTRA_MODULES[extra] if not _installed(m)] for extra in extras}
    missing = {extra: modules for extra, modules in missing.items() if modules}
    if not missing:
        return
    modules = sorted({m for ms in missing.values() for m in ms})
    names = " and ".join(f"'{extra}'" for extra in missing)
    torch_first = (" (on a CPU-only machine first `pip install torch==2.13.0`, the CPU wheel: an unpinned torch "
                   "pulls the CUDA build)") if "torch" in modules else ""
    message = (f"{command} needs the {names} extra{'s' if len(missing) > 1 else ''} of outreach-miniatures, and "
               f"{', '.join(modules)} {'is' if len(modules) == 1 else 'are'} not installed. Install "
               f"{'them' if len(missing) > 1 else 'it'}: pip install -e \".[{','.join(missing)}]\"{torch_first}")
    err.print(f"[red]{escape(message)}[/red]", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def quiet_library_bars() -> None:
    """Switch off the tqdm bars that ``datasets`` (one per dataset ``map``) and ``transformers`` (loading and
    writing weights) draw, for this process: the CLI draws one bar per phase instead. Needs the ``train`` extra."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, or None for an in-memory SQLite, another database, or an unreadable URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def store_label(settings: Settings) -> str:
    """The store's URL as it may be shown: the password of a database URL hidden."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(settings.store_url).render_as_string(hide_password=True)
    except ArgumentError:
        return settings.store_url


def open_engine(settings: Settings, *, create: bool = False) -> Engine:
    """The store the settings name (``store_url``), migrated to the current schema.

    Args:
        settings: whose ``store_url`` is opened.
        create: make a SQLite store that does not exist yet (commands that write a campaign). Without it a
            missing SQLite file is an error, so a command that only reads (``traces list``, ``emails export``,
            ``miniatures list``, ...) run in another folder says so instead of creating an empty store and
            reporting 0 rows.

    Raises:
        typer.Exit: status 1 when the SQLite file is missing and ``create`` is False (after saying which file
            was looked for and how to name another store); status 2 when the store is damaged or unreadable
            (``store.StoreError``, printed as one line).
    """
    from store import StoreError, open_store

    path = _sqlite_file(settings.store_url)
    if not create and path is not None and not path.is_file():
        err.print(f"[red]{escape(f'no store at {path} (store_url {store_label(settings)})')}: nothing has been run "
                  "with this store. Name the store a campaign wrote with --store (e.g. --store "
                  "sqlite:///demo/outreach.sqlite after `outreach demo --out demo`) or store_url in outreach.toml, "
                  "or run `outreach run` first.[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    try:
        return open_store(settings.store_url)
    except StoreError as exc:  # a damaged or unreadable store: one line, never a traceback
        err.print(f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc


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


def backend_endpoint(spec: BackendSpec) -> str | None:
    """The base URL a remote backend spec talks to (credentials, query and the ``#<server kind>`` fragment left
    out), or None for a local one."""
    from urllib.parse import urlsplit, urlunsplit

    from miniatures.redaction import redact, split_url_credentials
    from miniatures.remote import OLLAMA_DEFAULT_URL

    if spec.kind not in ("openai", "ollama", "vllm"):
        return None
    url = spec.base_url or (OLLAMA_DEFAULT_URL if spec.kind == "ollama" else OPENAI_API_URL)
    try:
        clean = split_url_credentials(url).url
    except ValueError:
        return redact(url)
    return urlunsplit(urlsplit(clean)._replace(fragment=""))


def _probe_failure(agent: str, spec: BackendSpec, settings: Settings | None) -> str | None:
    """Why ``spec`` cannot serve ``agent`` now, or None when it can (see ``probe_backends``)."""
    import httpx

    from miniatures.redaction import redact, split_url_credentials
    from miniatures.registry import MiniatureNotFoundError, get_miniature
    from miniatures.remote import build_remote_chat_model
    from miniatures.specs import BackendSpecError

    if spec.kind == "miniature":
        require_extras(f"the {agent} backend miniature:{spec.model}", "train")
        if settings is None:
            return None
        path = _sqlite_file(settings.store_url)
        if path is not None and not path.is_file():
            return (f"the {agent} backend miniature:{spec.model} is looked up in the store {store_label(settings)}, "
                    f"and {path} does not exist; name the store that registers it with --store")
        try:
            get_miniature(open_engine(settings), spec.model, spec.version)
        except MiniatureNotFoundError as exc:
            return str(exc)
        return None
    endpoint = backend_endpoint(spec)
    if endpoint is None:
        return None
    try:
        build_remote_chat_model(spec)  # the public API without $OPENAI_API_KEY fails here
    except BackendSpecError as exc:
        return str(exc)
    key = os.environ.get("OPENAI_API_KEY")
    url = split_url_credentials(spec.base_url or endpoint)  # its userinfo and query go with the probe, as with calls
    try:
        response = httpx.get(endpoint.rstrip("/") + "/models", timeout=PROBE_TIMEOUT_S, auth=url.auth,
                             params=url.params, headers={"Authorization": f"Bearer {key}"} if key else None)
    except httpx.HTTPError as exc:
        reason = redact(type(exc).__name__ + (f": {exc}" if str(exc) else ""))
        return (f"the {agent} backend does not answer at {endpoint} ({reason}); start the server, or fix the URL "
                f"in the {agent} spec (`openai:<model>@http://host:port/v1`)")
    if response.status_code in (401, 403):
        return (f"the {agent} backend at {endpoint} refused the API key (HTTP {response.status_code}); set "
                "$OPENAI_API_KEY to a key it accepts")
    return None  # any other answer: a server is there (some lack GET /models)


def probe_backends(specs: Mapping[str, BackendSpec], settings: Settings | None = None) -> None:
    """Check each agent's backend before a campaign (or a replay) runs anything; exit with status 2 naming the
    first that cannot work.

    A remote backend (``openai:``, ``ollama:``, ``vllm:``) gets one ``GET <base_url>/models`` (free on every
    OpenAI-compatible server, timeout ``PROBE_TIMEOUT_S`` s): a connection error or timeout, or HTTP 401/403, fail;
    any other answer passes, since the server is there. A ``miniature:`` backend needs the ``train`` extra and,
    given ``settings``, its registration in their store (a SQLite store that does not exist is not created);
    when one passes, the libraries' own bars are switched off (``quiet_library_bars``) before it loads.
    ``heuristic`` always passes.

    Args:
        specs: ``{agent: parsed spec}``, e.g. ``{"researcher": ..., "writer": ...}``.
        settings: whose store's registry ``miniature:`` specs are looked up in (None: not checked).

    Raises:
        typer.Exit: a backend cannot serve its agent (after printing why and what to do).
    """
    checked: dict[str, str | None] = {}
    for agent, spec in specs.items():
        if spec.raw not in checked:
            checked[spec.raw] = _probe_failure(agent, spec, settings)
        if (reason := checked[spec.raw]) is not None:
            err.print(f"[red]{escape(reason)}. Nothing was run.[/red]", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    if any(spec.kind == "miniature" for spec in specs.values()):
        quiet_library_bars()


def describe_backend(spec: str) -> str:
    """A backend spec as it may be shown: ``kind:model at <endpoint>`` for a remote one (no credentials, no
    query), the spec itself otherwise (an unparseable spec redacted)."""
    from miniatures.redaction import redact
    from miniatures.specs import BackendSpecError, parse_backend_spec

    try:
        parsed = parse_backend_spec(spec)
    except BackendSpecError:
        return redact(spec)
    endpoint = backend_endpoint(parsed)
    return f"{parsed.kind}:{parsed.model} at {endpoint}" if endpoint else parsed.raw
