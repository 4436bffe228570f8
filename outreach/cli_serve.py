"""``outreach serve``: serve registered miniatures over an OpenAI-compatible API (local engine or vLLM).

Only typer and rich are imported at start-up; fastapi, uvicorn and torch load inside the command.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from outreach.cli_common import StoreOpt, err, open_engine, require_extras, settings_or_exit

if TYPE_CHECKING:
    from sqlalchemy import Engine

console = Console()

__all__ = ["serve_command"]


def _fail(message: str) -> None:
    err.print(message, style="red", markup=False, soft_wrap=True)


def serve_command(
    miniatures: Annotated[list[str] | None, typer.Argument(
        help="Miniatures to serve: name (latest version), name@version or name:version. Default: the latest "
             "version of every registered miniature.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (vLLM: the first of its processes).")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="OUTREACH_SERVE_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every /v1 request.")] = None,
    engine: Annotated[str, typer.Option(help="local (transformers + peft, this process) or vllm (GPU).")] = "local",
    print_only: Annotated[bool, typer.Option(
        "--print", help="vllm: print the vllm serve command(s) instead of running them.")] = False,
    batch_size: Annotated[int, typer.Option(help="local: most requests in one generate call.")] = 16,
    batch_window_ms: Annotated[float, typer.Option(help="local: wait for more requests to batch, ms.")] = 10.0,
    max_new_tokens: Annotated[int, typer.Option(help="local: tokens made when a request sets no max_tokens.")] = 512,
    max_prompt_tokens: Annotated[int | None, typer.Option(
        help="local: longest accepted prompt in tokens (default: the model's context).")] = None,
    max_tokens_cap: Annotated[int | None, typer.Option(
        min=1, help="local: most completion tokens one request may ask for (more: 400); bounds how long one "
                    "request holds the others. Default: 512, or --max-new-tokens when larger.")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", help="local: a Host name to answer for besides loopback names and the bound address "
                               "(repeatable; '*' for any). Others get 400, which stops DNS rebinding.")] = None,
    device: Annotated[str | None, typer.Option(help="local: cuda, cpu... (default: CUDA when present).")] = None,
    threads: Annotated[int | None, typer.Option(help="local: torch CPU threads.")] = None,
    repair_json: Annotated[bool, typer.Option(
        "--repair-json/--raw", help="local: repair truncated JSON answers as the in-process backend does.")] = True,
    store: StoreOpt = None,
) -> None:
    """Serve registered miniatures over an OpenAI-compatible API (/v1/chat/completions, /v1/models).

    With the local engine, LoRA miniatures on one base share it in memory and concurrent requests are batched.
    Point an agent at one with `openai:<name>@http://127.0.0.1:8000/v1`.

    Example: `outreach serve writer researcher --port 8000` or `outreach serve --engine vllm --print`
    """
    if engine not in ("local", "vllm"):
        _fail(f"--engine {engine!r} is unknown; use local or vllm")
        raise typer.Exit(2)
    # The local engine runs the miniatures in-process (train extra) behind FastAPI (serve extra); the vLLM
    # command is only built from the registry.
    require_extras("outreach serve", *(("train", "serve") if engine == "local" else ()))
    from miniatures.server import InsecureBindError, check_bind

    try:
        check_bind(host, api_key)
    except InsecureBindError as exc:
        _fail(str(exc))
        raise typer.Exit(2) from exc
    store_engine = open_engine(settings_or_exit(None, store_url=store))
    if engine == "vllm":
        _serve_vllm(store_engine, miniatures or [], host=host, port=port, api_key=api_key, print_only=print_only)
        return
    _serve_local(store_engine, miniatures or [], host=host, port=port, api_key=api_key, batch_size=batch_size,
                 batch_window_ms=batch_window_ms, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                 max_tokens_cap=max_tokens_cap, allowed_hosts=allowed_host or [], device=device, threads=threads,
                 repair_json=repair_json)


def _serve_vllm(store_engine: Engine, selectors: list[str], *, host: str, port: int, api_key: str | None,
                print_only: bool) -> None:
    from miniatures.registry import MiniatureNotFoundError
    from miniatures.server import select_records
    from miniatures.vllm_cmd import VllmCommandError, build_vllm_commands

    try:
        commands = build_vllm_commands(select_records(store_engine, selectors), host=host, port=port, api_key=api_key)
    except (VllmCommandError, MiniatureNotFoundError, ValueError) as exc:
        _fail(str(exc))
        raise typer.Exit(2) from exc
    if print_only:
        for command in commands:
            typer.echo(command.shell())
        return
    if len(commands) > 1:
        _fail("these miniatures need more than one vLLM process (a fully fine-tuned miniature is its own "
              "model); start each command in its own terminal:")
        for command in commands:
            typer.echo(command.shell())
        raise typer.Exit(2)
    executable = shutil.which(commands[0].argv[0])
    if executable is None:
        _fail("`vllm` is not on PATH. vLLM is an optional extra for CUDA machines: install it in a separate "
              "environment (its wheels pin their own torch), e.g. `python -m venv .venv-vllm && "
              ".venv-vllm/bin/pip install '.[vllm]'`, or print the command with --print.")
        raise typer.Exit(2)
    err.print(f"starting: {commands[0].shell()}", markup=False)
    os.execv(executable, commands[0].argv)


def _serve_local(store_engine: Engine, selectors: list[str], *, host: str, port: int, api_key: str | None,
                 batch_size: int, batch_window_ms: float, max_new_tokens: int, max_prompt_tokens: int | None,
                 max_tokens_cap: int | None, allowed_hosts: list[str], device: str | None, threads: int | None,
                 repair_json: bool) -> None:
    from miniatures.local import AdapterPathError
    from miniatures.registry import MiniatureNotFoundError
    from miniatures.server import DEFAULT_MAX_TOKENS_CAP, create_app, load_served_models, run_server

    if max_tokens_cap is None:
        max_tokens_cap = max(DEFAULT_MAX_TOKENS_CAP, max_new_tokens)
    try:
        models = load_served_models(store_engine, selectors, device=device, max_new_tokens=max_new_tokens,
                                    num_threads=threads)
        app = create_app(models, api_key=api_key, max_prompt_tokens=max_prompt_tokens, max_tokens_cap=max_tokens_cap,
                         max_batch_size=batch_size, batch_window_ms=batch_window_ms, repair_json_output=repair_json,
                         allowed_hosts=allowed_hosts)
    except (MiniatureNotFoundError, AdapterPathError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        raise typer.Exit(2) from exc
    ids = sorted({m.id for m in models} | {m.name for m in models})
    err.print(f"serving {', '.join(ids)} on http://{host}:{port}/v1  (Ctrl-C stops)", markup=False, soft_wrap=True)
    err.print(f"use it as: openai:{models[0].name}@http://{host}:{port}/v1", markup=False, soft_wrap=True)
    run_server(app, host=host, port=port)
