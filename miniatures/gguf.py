"""GGUF export of registered miniatures and ``llama-server`` command lines (CPU serving with llama.cpp).

llama.cpp serves a GGUF base model with LoRA adapters in GGUF form (``llama-server -m base.gguf --lora
adapter.gguf``), on CPU, with per-request grammars (``grammar``: GBNF; ``json_schema`` / ``response_format``)
behind an OpenAI-compatible API. This module turns registry records into those files with llama.cpp's own
converters and builds the server's command:

- ``convert_hf_to_gguf.py`` converts a Hugging Face model folder (the base, a fully fine-tuned miniature,
  or a LoRA merged into its base with peft's ``merge_and_unload``) to one GGUF file, ``f32``, ``f16``,
  ``bf16`` or ``q8_0`` (quantised to 8 bits in blocks of 32 with one scale each);
- ``convert_lora_to_gguf.py`` converts a peft LoRA adapter folder to a GGUF adapter for that base.

Neither converter is on PyPI as a module: the ``gguf`` package carries the file format only (reader,
writer, tensor names), not the model converters. Both ship in llama.cpp's source tree, which is also
vendored whole inside ``llama-cpp-python``'s source distribution, so a llama.cpp folder is had with::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    # converters: llama_cpp_python-0.3.36/vendor/llama.cpp/convert_*_to_gguf.py
    # llama-server: cmake -S vendor/llama.cpp -B build -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \\
    #                 && cmake --build build --target llama-server

and named with ``llama_cpp=`` (``--llama-cpp``) or the ``OUTREACH_LLAMA_CPP`` environment variable. The
converters run in a subprocess of this Python (they need torch, transformers, safetensors, numpy and, for
sentencepiece-style Llama folders, ``sentencepiece``), with the converters' own ``gguf-py`` first on the
path, as the scripts arrange themselves.

A byte-level BPE vocabulary that llama.cpp has no entry for (the converter recognises a tokenizer by hashing
the tokens of one test text; a vocabulary trained here, like ``bootstrap_base``'s or a stand-in's, is in no
list) is exported with the pre-tokenizer its ``tokenizer.json`` declares, when llama.cpp implements that split
by name (``declared_pretokenizer``: GPT-2's, Llama 3's, Qwen2's); any other unknown tokenizer stops with the
converter's own message.

Serving: one ``llama-server`` process per miniature (base plus its adapter applied to every request, or
the merged or fully fine-tuned model), with ``--alias <name>,<name>@<version>``, so the ``openai:`` backend
reaches it by name without llama.cpp's per-request ``lora`` field: ``openai:writer@http://127.0.0.1:8080/v1#llama.cpp``
sends the Lark answer grammar as ``grammar`` (``miniatures.remote``), which llama-server reads when built with
``-DLLAMA_LLGUIDANCE=ON``; without the ``#llama.cpp`` fragment the backend sends the task's JSON schema as
``response_format``, which every build turns into its own grammar.
Decoding defaults are set explicitly to greedy without penalties (``DECODING_ARGS``), as for vLLM
(``miniatures.vllm_cmd``). The chat template is the one the converter copies from the tokenizer
(``tokenizer.chat_template``), applied with ``--jinja``: the template the miniature was trained with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import UserError

if TYPE_CHECKING:
    from store.models import MiniatureRecord

__all__ = [
    "DECODING_ARGS",
    "GGUF_TYPES",
    "LLAMA_CPP_ENV",
    "GgufError",
    "GgufExport",
    "LlamaServerCommand",
    "build_llama_server_commands",
    "convert_lora",
    "convert_model",
    "declared_pretokenizer",
    "export_miniatures",
    "find_llama_cpp",
    "find_llama_server",
    "declared_pretokenizer",
]

logger = logging.getLogger(__name__)

#: Environment variable naming a llama.cpp source folder (holding ``convert_hf_to_gguf.py``).
LLAMA_CPP_ENV = "OUTREACH_LLAMA_CPP"

#: Output types of the converters: float32, float16, bfloat16, and Q8_0 (8-bit blocks, about 1.06 bytes/weight).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

#: ``llama-server`` decoding defaults: greedy (temperature 0), no top-k/top-p/min-p cut, no repetition penalty.
DECODING_ARGS = ("--temp", "0", "--top-k", "0", "--top-p", "1", "--min-p", "0", "--repeat-penalty", "1")

_CONVERTERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
_INSTALL = (
    "get llama.cpp's converters with `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36` and "
    "`tar xzf llama_cpp_python-0.3.36.tar.gz`, then pass --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp "
    f"(or set {LLAMA_CPP_ENV})"
)


class GgufError(UserError):
    """A GGUF export or ``llama-server`` command cannot be made as asked (the message says why and what to do)."""


def find_llama_cpp(llama_cpp: str | Path | None = None) -> Path:
    """The llama.cpp source folder whose converters to use.

    Args:
        llama_cpp: the folder; ``None`` reads ``OUTREACH_LLAMA_CPP``.

    Returns:
        The folder (absolute), holding ``convert_hf_to_gguf.py`` and ``convert_lora_to_gguf.py``.

    Raises:
        GgufError: none is named, or the named folder lacks a converter; the message says how to get one.
    """
    named = llama_cpp if llama_cpp is not None else os.environ.get(LLAMA_CPP_ENV)
    if not named:
        raise GgufError(f"no llama.cpp folder is named for the GGUF converters; {_INSTALL}")
    folder = Path(named).expanduser().resolve()
    missing = [name for name in _CONVERTERS if not (folder / name).is_file()]
    if missing:
        raise GgufError(f"llama.cpp folder {str(folder)!r} has no {', '.join(missing)}; {_INSTALL}")
    return folder


def find_llama_server(executable: str | None = None, llama_cpp: str | Path | None = None) -> str | None:
    """The ``llama-server`` to run: ``executable`` if given, else on PATH, else built in ``llama_cpp``/build/bin.

    Returns:
        Its path, or ``None`` when there is none (then the command can only be printed).
    """
    if executable:
        return shutil.which(executable) or (executable if Path(executable).is_file() else None)
    found = shutil.which("llama-server")
    if found:
        return found
    named = llama_cpp if llama_cpp is not None else os.environ.get(LLAMA_CPP_ENV)
    if named:
        built = Path(named).expanduser() / "build" / "bin" / "llama-server"
        if built.is_file() and os.access(built, os.X_OK):
            return str(built.resolve())
    return None


#: The split regexes of ``tokenizer.json`` that llama.cpp implements under a pre-tokenizer name
#: (``src/llama-vocab.cpp``: the "original regex from tokenizer.json" of ``LLAMA3`` and ``QWEN2``).
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}


def _byte_level(spec: Any, *, regex: bool) -> bool:
    return (isinstance(spec, dict) and spec.get("type") == "ByteLevel" and spec.get("use_regex", True) is regex
            and not spec.get("add_prefix_space", False))


def declared_pretokenizer(model_dir: str | Path) -> str | None:
    """llama.cpp's name for the split that ``model_dir/tokenizer.json`` declares, when it is one llama.cpp has.

    llama.cpp's converter recognises a tokenizer by a hash of the tokens of one test text, which no vocabulary
    trained here matches; the split itself is declared in ``tokenizer.json`` and llama.cpp implements a few
    by name: a lone ``ByteLevel`` with GPT-2's regex is ``gpt-2``; a ``Split`` on Llama 3's regex (or
    Qwen2's) followed by a regex-free ``ByteLevel`` is ``llama-bpe`` (or ``qwen2``).

    Returns:
        ``"gpt-2"``, ``"llama-bpe"``, ``"qwen2"``, or ``None`` for anything else or no readable file.
    """
    try:
        spec = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    if _byte_level(spec, regex=True):
        return "gpt-2"
    parts = spec.get("pretokenizers") if isinstance(spec, dict) and spec.get("type") == "Sequence" else None
    if isinstance(parts, list) and len(parts) == 2 and _byte_level(parts[1], regex=False):
        split = parts[0]
        if (isinstance(split, dict) and split.get("type") == "Split" and split.get("behavior") == "Isolated"
                and not split.get("invert", False) and isinstance(split.get("pattern"), dict)):
            return _SPLITS.get(str(split["pattern"].get("Regex")))
    return None


def _check_type(outtype: str) -> None:
    if outtype not in GGUF_TYPES:
        raise GgufError(f"GGUF type {outtype!r} is unknown; use one of {', '.join(GGUF_TYPES)}")


def _run(argv: list[str], what: str) -> None:
    logger.info("running %s", shlex.join(argv))
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise GgufError(f"{what} failed (exit {done.returncode}): {tail}")


def convert_model(model_dir: str | Path, out_file: str | Path, *, outtype: str = "f16",
                  llama_cpp: str | Path | None = None) -> Path:
    """Convert a Hugging Face model folder to one GGUF file with ``convert_hf_to_gguf.py``.

    Args:
        model_dir: folder with ``config.json``, the weights (safetensors) and the tokenizer.
        out_file: the ``.gguf`` file to write (its folder is created).
        outtype: one of ``GGUF_TYPES``.
        llama_cpp: llama.cpp folder (see ``find_llama_cpp``).

    Returns:
        ``out_file`` as an absolute path.

    Raises:
        GgufError: bad type, no converter, or the converter failed (its last lines are in the message).
    """
    _check_type(outtype)
    folder = find_llama_cpp(llama_cpp)
    out = Path(out_file).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [str(Path(model_dir).expanduser().resolve()), "--outfile", str(out), "--outtype", outtype]
    declared = declared_pretokenizer(model_dir)
    if declared:  # may be a vocabulary llama.cpp has no hash for: its declared split names the pre-tokenizer
        argv = [sys.executable, "-m", "miniatures.gguf", "convert-hf", str(folder), declared, *args]
    else:
        argv = [sys.executable, str(folder / "convert_hf_to_gguf.py"), *args]
    _run(argv, f"converting {str(model_dir)!r} to GGUF")
    return out


def convert_lora(adapter_dir: str | Path, base_dir: str | Path, out_file: str | Path, *, outtype: str = "f32",
                 llama_cpp: str | Path | None = None) -> Path:
    """Convert a peft LoRA adapter folder to a GGUF adapter with ``convert_lora_to_gguf.py``.

    Args:
        adapter_dir: folder written by peft's ``save_pretrained`` (``adapter_config.json``, safetensors).
        base_dir: the base model's folder (only its config is read).
        out_file: the ``.gguf`` file to write.
        outtype: one of ``GGUF_TYPES``; adapters are small, so ``f32`` (exact) is the default.
        llama_cpp: llama.cpp folder (see ``find_llama_cpp``).

    Returns:
        ``out_file`` as an absolute path.

    Raises:
        GgufError: bad type, no converter, or the converter failed.
    """
    _check_type(outtype)
    folder = find_llama_cpp(llama_cpp)
    out = Path(out_file).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(folder / "convert_lora_to_gguf.py"), "--base", str(Path(base_dir).expanduser()),
            "--outfile", str(out), "--outtype", outtype, str(Path(adapter_dir).expanduser())]
    _run(argv, f"converting the LoRA adapter {str(adapter_dir)!r} to GGUF")
    return out


@dataclass(frozen=True)
class GgufModel:
    """One miniature in GGUF form.

    Attributes:
        label: ``<name>@<version>``.
        name: the miniature's name.
        model: the model file the server loads (``-m``): the shared base, or the miniature's own model.
        adapter: the GGUF LoRA adapter (``--lora``), or ``None`` for a merged or fully fine-tuned model.
    """

    label: str
    name: str
    model: Path
    adapter: Path | None = None


@dataclass(frozen=True)
class GgufExport:
    """The result of ``export_miniatures``: a folder of GGUF files and what each miniature uses.

    Attributes:
        folder: where the files are, with ``manifest.json`` describing them.
        outtype: the models' GGUF type (adapters are ``f32``).
        models: one entry per exported miniature, in the order given.
    """

    folder: Path
    outtype: str
    models: list[GgufModel] = field(default_factory=list)


def _local_model_dir(base_model: str) -> Path:
    """A base's local folder: itself when it is a path, else its Hugging Face cache snapshot (never downloaded)."""
    path = Path(base_model).expanduser()
    if path.is_absolute():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_model, local_files_only=True))
    except Exception as exc:  # not in the cache, or hub client missing: a one-line what-to-do
        raise GgufError(
            f"base model {base_model!r} is a Hugging Face id that is not in the local cache ({type(exc).__name__}); "
            f"download it first (`hf download {base_model}`) or register the miniature on a local folder"
        ) from exc


def _fingerprint(path: Path) -> str:
    """Name, size and modification time of the files in ``path`` (a folder or file), hashed: what a cache keys on."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns};"
                      .encode())
    return digest.hexdigest()[:16]


class _Cache:
    """``manifest.json`` in an export folder: output file -> fingerprint of what it was made from."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "manifest.json"
        try:
            self.entries: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError, AttributeError):
            self.entries = {}

    def fresh(self, out: Path, key: str) -> bool:
        return out.is_file() and self.entries.get(out.name, {}).get("key") == key

    def note(self, out: Path, key: str, source: str) -> None:
        self.entries[out.name] = {"key": key, "source": source}

    def save(self, models: list[GgufModel], outtype: str) -> None:
        body = {"outtype": outtype, "files": self.entries,
                "miniatures": [{"label": m.label, "model": m.model.name,
                                "adapter": m.adapter.name if m.adapter else None} for m in models]}
        self.path.write_text(json.dumps(body, indent=2, sort_keys=True), encoding="utf-8")


def _merged_folder(record: MiniatureRecord, base_dir: Path, work: Path) -> Path:
    """The LoRA of ``record`` merged into its base (peft ``merge_and_unload``), saved with the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    merged = PeftModel.from_pretrained(model, record.adapter_path).merge_and_unload()
    merged.save_pretrained(work)
    AutoTokenizer.from_pretrained(record.adapter_path if (Path(record.adapter_path) / "tokenizer_config.json")
                                  .is_file() else base_dir).save_pretrained(work)
    return work


def export_miniatures(records: Sequence[MiniatureRecord], out_dir: str | Path, *, outtype: str = "f16",
                      merge: bool = False, llama_cpp: str | Path | None = None) -> GgufExport:
    """Export registered miniatures to GGUF: each base once, each LoRA as a GGUF adapter (or merged).

    Files already in ``out_dir`` that were made from the same source files (same names, sizes and
    modification times, recorded in ``manifest.json``) and type are kept, so a second export, or
    ``outreach serve --engine llama-cpp`` after an export, converts nothing.

    Args:
        records: registry records (their folders are checked with ``check_miniature_paths`` first).
        out_dir: folder for the files: ``base-<hash>-<type>.gguf`` per base, ``<name>@<version>-lora.gguf``
            per adapter, ``<name>@<version>-<type>.gguf`` per merged or fully fine-tuned miniature.
        outtype: GGUF type of the models (``GGUF_TYPES``); ``q8_0`` is the quantised one.
        merge: merge each LoRA into its base (peft ``merge_and_unload``) and export one model per miniature,
            instead of one shared base plus an adapter each.
        llama_cpp: llama.cpp folder (see ``find_llama_cpp``).

    Returns:
        What was exported.

    Raises:
        GgufError: no records, a bad type, a ``sentence-tags`` miniature, a hub base not in the cache, no
            converter, or a converter failure.
        miniatures.registry.MiniaturePathError: a record's folder is missing or relative.
    """
    from miniatures.registry import check_miniature_paths

    _check_type(outtype)
    if not records:
        raise GgufError("no miniatures to export; register one with `outreach finetune train`")
    for record in records:
        check_miniature_paths(record)
        answer_format = str((record.training_config or {}).get("answer_format", "json"))
        if answer_format != "json":
            raise GgufError(
                f"{record.name}@{record.version} answers in the '{answer_format}' format, which only the in-process "
                f"backend builds from the agent's typed task; use it as `miniature:{record.name}`, serve it with "
                f"`outreach serve` and `openai:{record.name}@<url>#outreach`, or export a miniature trained with "
                "answer_format 'json'")
    find_llama_cpp(llama_cpp)  # fail before any work
    folder = Path(out_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    cache = _Cache(folder)
    models: list[GgufModel] = []
    for record in records:
        label = f"{record.name}@{record.version}"
        if record.method != "lora":
            source = Path(record.adapter_path)
            out = folder / f"{label}-{outtype}.gguf"
            key = f"{_fingerprint(source)}:{outtype}"
            if not cache.fresh(out, key):
                convert_model(source, out, outtype=outtype, llama_cpp=llama_cpp)
                cache.note(out, key, str(source))
            models.append(GgufModel(label=label, name=record.name, model=out))
            continue
        base_dir = _local_model_dir(record.base_model)
        adapter_dir = Path(record.adapter_path)
        if merge:
            out = folder / f"{label}-merged-{outtype}.gguf"
            key = f"{_fingerprint(base_dir)}:{_fingerprint(adapter_dir)}:{outtype}"
            if not cache.fresh(out, key):
                with tempfile.TemporaryDirectory(prefix="merged-", dir=folder) as work:
                    convert_model(_merged_folder(record, base_dir, Path(work)), out, outtype=outtype,
                                  llama_cpp=llama_cpp)
                cache.note(out, key, f"{base_dir} + {adapter_dir}")
            models.append(GgufModel(label=label, name=record.name, model=out))
            continue
        base_out = folder / f"base-{hashlib.sha256(str(base_dir).encode()).hexdigest()[:8]}-{outtype}.gguf"
        base_key = f"{_fingerprint(base_dir)}:{outtype}"
        if not cache.fresh(base_out, base_key):
            convert_model(base_dir, base_out, outtype=outtype, llama_cpp=llama_cpp)
            cache.note(base_out, base_key, str(base_dir))
        adapter_out = folder / f"{label}-lora.gguf"
        adapter_key = f"{_fingerprint(adapter_dir)}:{_fingerprint(base_dir / 'config.json')}:f32"
        if not cache.fresh(adapter_out, adapter_key):
            convert_lora(adapter_dir, base_dir, adapter_out, outtype="f32", llama_cpp=llama_cpp)
            cache.note(adapter_out, adapter_key, str(adapter_dir))
        models.append(GgufModel(label=label, name=record.name, model=base_out, adapter=adapter_out))
    cache.save(models, outtype)
    logger.info("exported %d miniature(s) to GGUF (%s) in %s", len(models), outtype, folder)
    return GgufExport(folder=folder, outtype=outtype, models=models)


@dataclass(frozen=True)
class LlamaServerCommand:
    """One ``llama-server`` process.

    Attributes:
        argv: the command line.
        served: the model ids (aliases) clients can send.
        port: the port it listens on.
    """

    argv: list[str]
    served: list[str]
    port: int

    def shell(self) -> str:
        """The command line quoted for a POSIX shell."""
        return shlex.join(self.argv)


def build_llama_server_commands(
    export: GgufExport,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    parallel: int = 4,
    ctx_size: int | None = None,
    threads: int | None = None,
    extra_args: Sequence[str] = (),
    executable: str = "llama-server",
) -> list[LlamaServerCommand]:
    """``llama-server`` commands for an export: one process per miniature, on ``port``, ``port + 1``, ...

    The highest version of each name also answers to the plain name (``writer``), the id a backend spec can
    carry; every process answers ``<name>@<version>``.

    Args:
        export: what ``export_miniatures`` made.
        host: address to bind.
        port: port of the first process.
        api_key: passed as ``--api-key`` (llama-server then requires ``Authorization: Bearer <key>``).
        parallel: server slots (``--parallel``): requests decoded together by continuous batching.
        ctx_size: context of all slots together in tokens (``--ctx-size``); ``None``: the model's (0).
        threads: CPU threads (``--threads``); ``None``: llama.cpp's default.
        extra_args: more arguments, appended to each command.
        executable: the ``llama-server`` executable.

    Returns:
        The commands, in the export's order.

    Raises:
        GgufError: ``parallel`` below 1 or an export with no miniatures.
    """
    if parallel < 1:
        raise GgufError(f"--parallel must be at least 1, got {parallel}")
    if not export.models:
        raise GgufError("the export holds no miniatures; export some with `outreach miniatures export-gguf`")
    highest: dict[str, str] = {}
    for model in export.models:
        version = int(model.label.rpartition("@")[2])
        if model.name not in highest or version > int(highest[model.name].rpartition("@")[2]):
            highest[model.name] = model.label
    commands: list[LlamaServerCommand] = []
    for offset, model in enumerate(export.models):
        served = [model.label] + ([model.name] if highest[model.name] == model.label else [])
        argv = [executable, "-m", str(model.model)]
        if model.adapter is not None:
            argv += ["--lora", str(model.adapter)]
        argv += ["--alias", ",".join(reversed(served)), "--jinja", *DECODING_ARGS, "--parallel", str(parallel),
                 "--ctx-size", str(ctx_size or 0)]
        if threads:
            argv += ["--threads", str(threads)]
        argv += ["--host", host, "--port", str(port + offset)]
        if api_key:
            argv += ["--api-key", api_key]
        commands.append(LlamaServerCommand(argv=argv + list(extra_args), served=list(reversed(served)),
                                           port=port + offset))
    return commands


def _convert_hf_main(argv: list[str]) -> None:
    """Run ``convert_hf_to_gguf.py`` with a pre-tokenizer name for vocabularies it has no hash for.

    ``argv``: the llama.cpp folder, the pre-tokenizer name (``declared_pretokenizer``), then the converter's
    own arguments. Called in a subprocess by ``convert_model``; a recognised hash keeps the converter's answer.
    """
    folder, declared = Path(argv[0]), argv[1]
    script = folder / "convert_hf_to_gguf.py"
    sys.path.insert(0, str(folder))
    sys.path.insert(1, str(folder / "gguf-py"))
    sys.argv = [str(script), *argv[2:]]
    try:
        from conversion import base  # llama.cpp's converter package (newer trees), found through the folder above

        text_model: Any = base.TextModel
        run = lambda: runpy.run_path(str(script), run_name="__main__")  # noqa: E731
    except ImportError:  # older trees: one script holding the model classes
        import importlib.util

        spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
        if spec is None or spec.loader is None:
            raise SystemExit(f"cannot load {script}") from None
        module = importlib.util.module_from_spec(spec)
        sys.modules["convert_hf_to_gguf"] = module
        spec.loader.exec_module(module)
        text_model = getattr(module, "TextModel", None) or module.Model
        run = module.main
    recognise = text_model.get_vocab_base_pre

    def pre_tokenizer(self: Any, tokenizer: Any) -> str:
        try:
            return str(recognise(self, tokenizer))
        except NotImplementedError:
            logger.warning("vocabulary not in llama.cpp's list; tokenizer.json declares the %s split", declared)
            return declared

    text_model.get_vocab_base_pre = pre_tokenizer
    run()


if __name__ == "__main__":  # python -m miniatures.gguf convert-hf LLAMA_CPP_DIR PRE MODEL_DIR --outfile ... (internal)
    if len(sys.argv) < 4 or sys.argv[1] != "convert-hf":
        raise SystemExit("usage: python -m miniatures.gguf convert-hf LLAMA_CPP_DIR PRE_TOKENIZER MODEL_DIR [options]")
    _convert_hf_main(sys.argv[2:])
