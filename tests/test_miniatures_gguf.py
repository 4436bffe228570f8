"""GGUF export and llama-server commands (miniatures.gguf, outreach serve --engine llama-cpp).

The command building and the errors run everywhere. The export runs llama.cpp's converters when a llama.cpp
folder is named in OUTREACH_LLAMA_CPP (e.g. the vendor/llama.cpp of llama-cpp-python's sdist; see the
module docstring), and the serving test also needs `llama-server` (on PATH or built in that folder); both
skip cleanly otherwise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from core.errors import UserError
from miniatures.gguf import (
    DECODING_ARGS,
    LLAMA_CPP_ENV,
    GgufError,
    GgufExport,
    GgufModel,
    build_llama_server_commands,
    declared_pretokenizer,
    export_miniatures,
    find_llama_cpp,
    find_llama_server,
)
from miniatures.registry import MiniaturePathError
from store.models import MiniatureRecord


def _tokenizer_json(folder: Path, pre_tokenizer: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre_tokenizer}))
    return folder


def test_the_declared_split_names_llama_cpps_pre_tokenizer(tmp_path: Path) -> None:
    from finetune.standins import SPLIT_PATTERN  # the Llama 3 / Qwen2.5 split the stand-ins declare

    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert declared_pretokenizer(_tokenizer_json(tmp_path / "a", gpt2)) == "gpt-2"
    assert declared_pretokenizer(_tokenizer_json(tmp_path / "b", {**gpt2, "add_prefix_space": True})) is None
    assert declared_pretokenizer(_tokenizer_json(tmp_path / "c", {**gpt2, "use_regex": False})) is None

    def sequence(regex: str) -> dict[str, Any]:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {**gpt2, "use_regex": False}]}

    assert declared_pretokenizer(_tokenizer_json(tmp_path / "d", sequence(SPLIT_PATTERN))) == "llama-bpe"
    qwen2 = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
    assert declared_pretokenizer(_tokenizer_json(tmp_path / "e", sequence(qwen2))) == "qwen2"
    assert declared_pretokenizer(_tokenizer_json(tmp_path / "f", sequence(r"\s+"))) is None
    assert declared_pretokenizer(tmp_path / "none") is None


def test_a_missing_converter_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LLAMA_CPP_ENV, raising=False)
    with pytest.raises(GgufError, match=r"no llama.cpp folder.*pip download --no-deps --no-binary :all: "
                                        r"llama-cpp-python.*OUTREACH_LLAMA_CPP") as none:
        find_llama_cpp()
    assert isinstance(none.value, UserError)
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    with pytest.raises(GgufError, match="has no convert_lora_to_gguf.py"):
        find_llama_cpp(tmp_path)
    (tmp_path / "convert_lora_to_gguf.py").write_text("")
    monkeypatch.setenv(LLAMA_CPP_ENV, str(tmp_path))
    assert find_llama_cpp() == tmp_path.resolve()


def test_export_checks_records_before_any_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LLAMA_CPP_ENV, raising=False)
    with pytest.raises(GgufError, match="no miniatures"):
        export_miniatures([], tmp_path)
    with pytest.raises(GgufError, match="type 'q4_k' is unknown"):
        export_miniatures([], tmp_path, outtype="q4_k")
    gone = MiniatureRecord(name="writer", agent="writer", version=1, base_model="Qwen/Qwen2.5-0.5B-Instruct",
                           adapter_path=str(tmp_path / "nowhere"))
    with pytest.raises(MiniaturePathError, match="writer@1: its adapter folder .*is gone"):
        export_miniatures([gone], tmp_path / "out")
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    tags = MiniatureRecord(name="researcher", agent="researcher", version=2, base_model="Qwen/Qwen2.5-0.5B-Instruct",
                           adapter_path=str(adapter), training_config={"answer_format": "sentence-tags"})
    with pytest.raises(GgufError, match="researcher@2 answers in the 'sentence-tags' format"):
        export_miniatures([tags], tmp_path / "out")
    brief = tags.model_copy(update={"training_config": {"answer_format": "writer-brief"}})
    with pytest.raises(GgufError, match="'writer-brief' format.*miniature:researcher"):
        export_miniatures([brief], tmp_path / "out")
    ok = MiniatureRecord(name="writer", agent="writer", version=1, base_model="Qwen/Qwen2.5-0.5B-Instruct",
                         adapter_path=str(adapter))
    with pytest.raises(GgufError, match="no llama.cpp folder"):
        export_miniatures([ok], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the converter is found


def test_llama_server_commands_one_process_per_miniature() -> None:
    export = GgufExport(folder=Path("/g"), outtype="q8_0", models=[
        GgufModel(label="writer@1", name="writer", model=Path("/g/base-q8_0.gguf"), adapter=Path("/g/writer@1.gguf")),
        GgufModel(label="writer@2", name="writer", model=Path("/g/base-q8_0.gguf"), adapter=Path("/g/writer@2.gguf")),
        GgufModel(label="researcher@3", name="researcher", model=Path("/g/researcher@3-q8_0.gguf")),
    ])
    w1, w2, r3 = build_llama_server_commands(export, port=9000, api_key="k", parallel=8, threads=2,
                                             extra_args=["--no-webui"])
    assert w1.argv[:5] == ["llama-server", "-m", "/g/base-q8_0.gguf", "--lora", "/g/writer@1.gguf"]
    assert w1.served == ["writer@1"] and w2.served == ["writer", "writer@2"] and r3.served == ["researcher",
                                                                                              "researcher@3"]
    assert w2.argv[w2.argv.index("--alias") + 1] == "writer,writer@2"
    assert "--lora" not in r3.argv and (w1.port, w2.port, r3.port) == (9000, 9001, 9002)
    for command in (w1, w2, r3):
        argv = command.argv
        joined = " ".join(argv)
        assert " ".join(DECODING_ARGS) in joined and "--temp 0" in joined and "--repeat-penalty 1" in joined
        assert "--jinja" in argv and argv[argv.index("--parallel") + 1] == "8"
        assert argv[argv.index("--threads") + 1] == "2" and argv[-3:] == ["--api-key", "k", "--no-webui"]
    with pytest.raises(GgufError, match="--parallel must be at least 1"):
        build_llama_server_commands(export, parallel=0)


def test_serve_engine_names_llama_cpp(tmp_path: Path) -> None:
    from outreach.cli_serve import serve_command

    app = typer.Typer()
    app.command()(serve_command)
    result = CliRunner().invoke(app, ["--engine", "llamacpp", "--store", f"sqlite:///{tmp_path / 's.sqlite'}"])
    assert result.exit_code == 2 and "local, vllm, llama-cpp" in result.output


# With llama.cpp's converters (and llama-server): the real export and serving.


def _llama_cpp() -> Path:
    try:
        return find_llama_cpp()
    except GgufError:
        pytest.skip(f"no llama.cpp converters: set {LLAMA_CPP_ENV} to a llama.cpp folder (see miniatures.gguf)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = _llama_cpp()
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from tests.miniature_fixtures import build_adapter, build_tiny_base

    root = tmp_path_factory.mktemp("gguf")
    base = build_tiny_base(root / "base", context=1024)
    adapter = build_adapter(base, root / "writer", seed=3)
    record = MiniatureRecord(id=1, name="writer", agent="writer", version=1, base_model=str(base),
                             adapter_path=str(adapter))
    export = export_miniatures([record], root / "out", outtype="q8_0", llama_cpp=folder)
    return {"root": root, "base": base, "record": record, "export": export, "llama_cpp": folder}


def _fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    values = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    values["tensor_types"] = {t.tensor_type.name for t in reader.tensors}
    values["tensor_names"] = [t.name for t in reader.tensors]
    return values


@pytest.mark.slow
def test_export_writes_a_quantised_base_and_a_lora_adapter(exported: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    export: GgufExport = exported["export"]
    [model] = export.models
    assert model.label == "writer@1" and model.adapter is not None
    base = _fields(model.model)
    assert base["general.architecture"] == "llama" and "Q8_0" in base["tensor_types"]
    assert base["tokenizer.ggml.model"] == "gpt2" and base["tokenizer.ggml.pre"] == "gpt-2"
    # the inference template is the one the miniature was trained with
    assert base["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(exported["base"]).chat_template
    adapter = _fields(model.adapter)
    assert adapter["general.type"] == "adapter" and adapter["adapter.type"] == "lora"
    assert any(name.endswith(".lora_a") for name in adapter["tensor_names"])
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_v.weight.lora_b"} <= set(adapter["tensor_names"])

    stamps = {p: p.stat().st_mtime_ns for p in (model.model, model.adapter)}
    again = export_miniatures([exported["record"]], export.folder, outtype="q8_0", llama_cpp=exported["llama_cpp"])
    assert again.models == export.models and {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def llama_server(exported: dict[str, Any]) -> Iterator[str]:
    executable = find_llama_server(llama_cpp=exported["llama_cpp"])
    if executable is None:
        pytest.skip("llama-server is not on PATH nor built in the llama.cpp folder (build/bin/llama-server)")
    port = _free_port()
    [command] = build_llama_server_commands(exported["export"], port=port, parallel=2, ctx_size=2048, threads=1,
                                            executable=executable)
    log = (exported["root"] / f"server-{port}.log").open("w")
    process = subprocess.Popen(command.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    import httpx

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"llama-server exited {process.returncode}: {command.shell()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("llama-server did not become healthy in 120 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_llama_server_answers_by_name_and_follows_a_grammar(llama_server: str) -> None:
    import httpx

    models = httpx.get(f"{llama_server}/v1/models", timeout=10).json()
    ids = {m["id"] for m in models["data"]} | {a for m in models.get("models", []) for a in m.get("aliases", [])}
    assert "writer" in ids or "writer@1" in ids
    grammar = 'root ::= "{\\"subject\\": \\"" [a-z]{1,8} "\\"}"'
    body = {"model": "writer", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24,
            "temperature": 0, "grammar": grammar}
    answer = httpx.post(f"{llama_server}/v1/chat/completions", json=body, timeout=60).json()
    text = answer["choices"][0]["message"]["content"]
    parsed = json.loads(text)  # the grammar holds a random tiny model to one JSON object
    assert set(parsed) == {"subject"} and parsed["subject"].isalpha() and parsed["subject"].islower()


@pytest.mark.slow
def test_serve_llama_cpp_reuses_the_export_and_starts_or_prints_llama_server(
        exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import miniatures.gguf as gguf_module
    from miniatures.registry import register_miniature
    from outreach.cli_serve import serve_command
    from store import open_store

    url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
    store = open_store(url)
    register_miniature(store, name="writer", agent="writer", base_model=str(exported["base"]),
                       adapter_path=exported["record"].adapter_path, training_config={}, dataset_hash="h", metrics={})
    store.dispose()
    export: GgufExport = exported["export"]
    app = typer.Typer()
    app.command()(serve_command)
    args = ["--engine", "llama-cpp", "--store", url, "--gguf-dir", str(export.folder), "--gguf-type", "q8_0",
            "--llama-cpp", str(exported["llama_cpp"]), "--port", "8090"]
    monkeypatch.setattr(gguf_module, "convert_model", lambda *a, **k: pytest.fail("the export should be reused"))
    monkeypatch.setattr(gguf_module, "convert_lora", lambda *a, **k: pytest.fail("the export should be reused"))

    printed = CliRunner().invoke(app, [*args, "--print"])
    assert printed.exit_code == 0, printed.output
    [model] = export.models
    assert f"-m {model.model} --lora {model.adapter} --alias writer,writer@1" in printed.output.replace("\n", " ")

    monkeypatch.setattr(gguf_module, "find_llama_server", lambda *a, **k: None)
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "llama-server` is not on PATH" in missing.output
    assert "--port 8090" in missing.output  # the command is still printed

    execs: list[Any] = []
    monkeypatch.setattr(gguf_module, "find_llama_server", lambda *a, **k: "/opt/bin/llama-server")
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append((path, argv)))
    ran = CliRunner().invoke(app, args)
    assert ran.exit_code == 0, ran.output
    assert execs[0][0] == "/opt/bin/llama-server" and execs[0][1][:2] == ["/opt/bin/llama-server", "-m"]
    assert "openai:writer@http://127.0.0.1:8090/v1#llama.cpp" in ran.output.replace("\n", "")
