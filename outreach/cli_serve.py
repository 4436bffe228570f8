"""``outreach serve`` (local engine, vLLM or llama.cpp) and the miniatures' serving chores.

``outreach serve`` serves registered miniatures over an OpenAI-compatible API: in this process
(``--engine local``, ``miniatures.server``, which also takes the agents' typed tasks from
``openai:<name>@<url>#outreach`` backends), or by starting or printing the command of vLLM (GPU) or llama.cpp's
``llama-server`` (CPU, on GGUF files exported first). ``outreach miniatures export-gguf`` writes those GGUF files
and prints the server commands; ``outreach miniatures relocate`` points a registered miniature at its folders' new
place.

Only typer and rich are imported at start-up; fastapi, uvicorn, torch and the converters load inside the
commands.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from core.errors import UserError
from outreach.cli_common import StoreOpt, err, open_engine, require_extras, settings_or_exit

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from miniatures.gguf import GgufExport
    from store.models import MiniatureRecord

console = Console()

__all__ = ["ENGINES", "export_gguf_command", "relocate_command", "serve_command"]

#: What ``outreach serve --engine`` accepts.
ENGINES = ("local", "vllm", "llama-cpp")

GgufDirOpt = Annotated[Path, typer.Option(
    "--gguf-dir", help="llama-cpp: folder of the GGUF files (exported there when missing or stale).")]
GgufTypeOpt = Annotated[str, typer.Option(
    "--gguf-type", help="llama-cpp: GGUF type of the models: f32, f16, bf16 or q8_0 (8-bit, quantised).")]
MergeOpt = Annotated[bool, typer.Option(
    "--merge/--adapters", help="llama-cpp: merge each LoRA into its base (one model per miniature) instead of "
                               "one base plus a GGUF adapter each.")]
LlamaCppOpt = Annotated[str | None, typer.Option(
    "--llama-cpp", envvar="OUTREACH_LLAMA_CPP",
    help="llama-cpp: llama.cpp source folder with convert_hf_to_gguf.py (e.g. the vendor/llama.cpp of "
         "llama-cpp-python's sdist).")]


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
    engine: Annotated[str, typer.Option(
        help="local (transformers + peft, this process), vllm (GPU) or llama-cpp (CPU, llama-server on GGUF "
             "files).")] = "local",
    print_only: Annotated[bool, typer.Option(
        "--print", help="vllm, llama-cpp: print the server command(s) instead of running them.")] = False,
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
    gguf_dir: GgufDirOpt = Path("gguf"),
    gguf_type: GgufTypeOpt = "q8_0",
    merge: MergeOpt = False,
    llama_cpp: LlamaCppOpt = None,
    parallel: Annotated[int, typer.Option(
        min=1, help="llama-cpp: server slots, requests decoded together (llama-server --parallel).")] = 4,
    ctx_size: Annotated[int | None, typer.Option(
        help="llama-cpp: context of all slots together, tokens (default: the model's).")] = None,
    store: StoreOpt = None,
) -> None:
    """Serve registered miniatures over an OpenAI-compatible API (/v1/chat/completions, /v1/models).

    With the local engine, LoRA miniatures on one base share it in memory and concurrent requests are batched.
    Point an agent at one with `openai:<name>@http://127.0.0.1:8000/v1#outreach`: the #outreach fragment sends
    the agent's typed task with each request (field outreach_task), and the miniature answers through its answer
    format as the in-process miniature:<name> backend does. A sentence-tags researcher or a writer-brief writer
    asked without the task (a #vllm or plain OpenAI client) gets HTTP 400; json-format miniatures also serve
    such clients as before.

    With llama-cpp, the miniatures are exported to GGUF in --gguf-dir first (kept while their folders do not
    change), and each gets its own llama-server process on --port, --port + 1, ...

    Example: `outreach serve writer researcher --port 8000`, `outreach serve --engine vllm --print` or
    `outreach serve writer --engine llama-cpp --gguf-type q8_0 --llama-cpp ~/llama.cpp`
    """
    if engine not in ENGINES:
        _fail(f"--engine {engine!r} is unknown; use one of {', '.join(ENGINES)}")
        raise typer.Exit(2)
    # The local engine runs the miniatures in-process (train extra) behind FastAPI (serve extra); the vLLM
    # command is only built from the registry; llama.cpp's converters need torch and transformers (train).
    require_extras("outreach serve", *{"local": ("train", "serve"), "vllm": (), "llama-cpp": ("train",)}[engine])
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
    if engine == "llama-cpp":
        _serve_llama_cpp(store_engine, miniatures or [], host=host, port=port, api_key=api_key,
                         print_only=print_only, gguf_dir=gguf_dir, gguf_type=gguf_type, merge=merge,
                         llama_cpp=llama_cpp, parallel=parallel, ctx_size=ctx_size, threads=threads)
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
    except (VllmCommandError, MiniatureNotFoundError, UserError, ValueError) as exc:
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
    from miniatures.registry import MiniatureNotFoundError, check_miniature_paths
    from miniatures.server import DEFAULT_MAX_TOKENS_CAP, create_app, load_served_models, run_server, select_records

    if max_tokens_cap is None:
        max_tokens_cap = max(DEFAULT_MAX_TOKENS_CAP, max_new_tokens)
    try:
        for record in select_records(store_engine, selectors):  # name a moved folder before loading anything
            check_miniature_paths(record)
        models = load_served_models(store_engine, selectors, device=device, max_new_tokens=max_new_tokens,
                                    num_threads=threads)
        app = create_app(models, api_key=api_key, max_prompt_tokens=max_prompt_tokens, max_tokens_cap=max_tokens_cap,
                         max_batch_size=batch_size, batch_window_ms=batch_window_ms, repair_json_output=repair_json,
                         allowed_hosts=allowed_hosts)
    except (MiniatureNotFoundError, AdapterPathError, UserError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        raise typer.Exit(2) from exc
    ids = sorted({m.id for m in models} | {m.name for m in models})
    err.print(f"serving {', '.join(ids)} on http://{host}:{port}/v1  (Ctrl-C stops)", markup=False, soft_wrap=True)
    err.print(f"use it as: openai:{models[0].name}@http://{host}:{port}/v1#outreach  (#outreach sends the agent's "
              "typed task, which sentence-tags and writer-brief miniatures need)", markup=False, soft_wrap=True)
    run_server(app, host=host, port=port)


def _export(store_engine: Engine, selectors: list[str], *, gguf_dir: Path, gguf_type: str, merge: bool,
            llama_cpp: str | None) -> tuple[list[MiniatureRecord], GgufExport]:
    """Select the records and export them to GGUF (kept files reused); exits 2 on a user error."""
    from miniatures.gguf import export_miniatures
    from miniatures.server import select_records

    try:
        records = select_records(store_engine, selectors)
        with console.status(f"exporting {len(records)} miniature(s) to GGUF ({gguf_type}) in {gguf_dir} ..."):
            export = export_miniatures(records, gguf_dir, outtype=gguf_type, merge=merge, llama_cpp=llama_cpp)
    except (UserError, ValueError) as exc:
        _fail(str(exc))
        raise typer.Exit(2) from exc
    return records, export


def _serve_llama_cpp(store_engine: Engine, selectors: list[str], *, host: str, port: int, api_key: str | None,
                     print_only: bool, gguf_dir: Path, gguf_type: str, merge: bool, llama_cpp: str | None,
                     parallel: int, ctx_size: int | None, threads: int | None) -> None:
    import subprocess

    from miniatures.gguf import GgufError, build_llama_server_commands, find_llama_server

    _, export = _export(store_engine, selectors, gguf_dir=gguf_dir, gguf_type=gguf_type, merge=merge,
                        llama_cpp=llama_cpp)
    executable = find_llama_server(llama_cpp=llama_cpp)
    try:
        commands = build_llama_server_commands(export, host=host, port=port, api_key=api_key, parallel=parallel,
                                               ctx_size=ctx_size, threads=threads,
                                               executable=executable or "llama-server")
    except GgufError as exc:
        _fail(str(exc))
        raise typer.Exit(2) from exc
    if print_only or executable is None:
        if executable is None and not print_only:
            _fail("`llama-server` is not on PATH (nor built in the --llama-cpp folder's build/bin): build it from "
                  "llama.cpp (`cmake -S LLAMA_CPP -B LLAMA_CPP/build -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF && "
                  "cmake --build LLAMA_CPP/build --target llama-server`), then run:")
        for command in commands:
            typer.echo(command.shell())
        if executable is None and not print_only:
            raise typer.Exit(2)
        return
    for command in commands:
        err.print(f"use it as: openai:{command.served[0]}@http://{host}:{command.port}/v1#llama.cpp", markup=False,
                  soft_wrap=True)
    err.print("(#llama.cpp sends the Lark answer grammar, which needs a llama-server built with "
              "-DLLAMA_LLGUIDANCE=ON; without the fragment the backend sends a JSON schema, which any build takes)",
              markup=False, soft_wrap=True)
    if len(commands) == 1:
        err.print(f"starting: {commands[0].shell()}", markup=False, soft_wrap=True)
        os.execv(executable, commands[0].argv)
        return  # execv does not return; only a test's stand-in does
    processes = [subprocess.Popen(command.argv) for command in commands]  # one per miniature, Ctrl-C stops all
    try:
        for process in processes:
            process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait()


def export_gguf_command(
    miniatures: Annotated[list[str] | None, typer.Argument(
        help="Miniatures to export: name (latest version) or name@version. Default: the latest version of "
             "every registered miniature.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the GGUF files and manifest.json.")] = Path("gguf"),
    gguf_type: Annotated[str, typer.Option(
        "--type", help="GGUF type of the models: f32, f16, bf16 or q8_0 (8-bit, quantised).")] = "q8_0",
    merge: MergeOpt = False,
    llama_cpp: LlamaCppOpt = None,
    port: Annotated[int, typer.Option(help="Port of the first llama-server in the printed commands.")] = 8080,
    store: StoreOpt = None,
) -> None:
    """Export miniatures as GGUF (base plus a GGUF LoRA adapter each, or merged) and print llama-server commands.

    Uses llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) from --llama-cpp.
    Files made from unchanged folders are kept.

    Example: `outreach miniatures export-gguf writer researcher --type q8_0 --llama-cpp ~/llama.cpp`
    """
    from miniatures.gguf import build_llama_server_commands

    require_extras("outreach miniatures export-gguf", "train")
    store_engine = open_engine(settings_or_exit(None, store_url=store))
    _, export = _export(store_engine, miniatures or [], gguf_dir=out, gguf_type=gguf_type, merge=merge,
                        llama_cpp=llama_cpp)
    for model in export.models:
        files = f"{model.model}" + (f" + {model.adapter}" if model.adapter else "")
        console.print(f"{model.label}: {files}", markup=False, soft_wrap=True)
    for command in build_llama_server_commands(export, port=port):
        typer.echo(command.shell())


def relocate_command(
    miniature: Annotated[str, typer.Argument(help="The miniature: name (latest version) or name@version.")],
    adapter_path: Annotated[Path | None, typer.Option(
        "--adapter-path", help="The adapter (or fully fine-tuned model) folder's new place.")] = None,
    base_model: Annotated[str | None, typer.Option(
        "--base-model", help="The base model's new folder (or a Hugging Face model id).")] = None,
    store: StoreOpt = None,
) -> None:
    """Point a registered miniature at its moved folders (stored as absolute paths, checked first).

    Example: `outreach miniatures relocate writer@2 --adapter-path runs/writer/final --base-model models/base`
    """
    from miniatures.registry import relocate_miniature
    from miniatures.server import select_records

    store_engine = open_engine(settings_or_exit(None, store_url=store))
    try:
        [record] = select_records(store_engine, [miniature])
        moved = relocate_miniature(store_engine, record.name, record.version, adapter_path=adapter_path,
                                   base_model=base_model)
    except (UserError, ValueError) as exc:
        _fail(str(exc))
        raise typer.Exit(2) from exc
    console.print(f"{moved.name}@{moved.version}: adapter {moved.adapter_path}, base {moved.base_model}",
                  markup=False, soft_wrap=True)
