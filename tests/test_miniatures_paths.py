"""Registered paths work from any folder: register with relative paths, change folder, then build the
``miniature:`` backend, the vLLM command and ``outreach serve``; a moved folder is named with what to do."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from miniatures.local import LocalEngine, build_miniature_chat_model  # noqa: E402
from miniatures.registry import MiniaturePathError, register_miniature  # noqa: E402
from miniatures.server import select_records  # noqa: E402
from miniatures.specs import parse_backend_spec  # noqa: E402
from miniatures.vllm_cmd import build_vllm_commands  # noqa: E402
from outreach.cli_serve import relocate_command, serve_command  # noqa: E402
from store import open_store  # noqa: E402
from tests.miniature_fixtures import PROMPTS, build_adapter, build_tiny_base  # noqa: E402


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A project folder with models/base and runs/writer, registered as typed there (relative paths)."""
    root = tmp_path / "project"
    base = build_tiny_base(root / "models" / "base")
    build_adapter(base, root / "runs" / "writer", seed=5)
    store = open_store(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    monkeypatch.chdir(root)
    record = register_miniature(store, name="writer-rel", agent="writer", base_model="models/base",
                                adapter_path="runs/writer", training_config={}, dataset_hash="h", metrics={})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    yield {"root": root, "store": store, "record": record, "url": f"sqlite:///{tmp_path / 'registry.sqlite'}"}
    store.dispose()


def _cli(command: Any) -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def test_registered_relative_paths_work_from_another_folder(project: dict[str, Any]) -> None:
    root, store, record = project["root"], project["store"], project["record"]
    assert record.base_model == str(root / "models" / "base")
    assert record.adapter_path == str(root / "runs" / "writer")

    threads = torch.get_num_threads()
    engines: dict[str, LocalEngine] = {}
    chat = build_miniature_chat_model(parse_backend_spec("miniature:writer-rel"), store, engines=engines,
                                      device="cpu", max_new_tokens=4, num_threads=1)
    try:
        answer = chat.engine.generate_sync(chat.adapter, PROMPTS[2], max_new_tokens=4)
        assert answer.output_tokens >= 1
    finally:
        for engine in engines.values():
            engine.close()
        torch.set_num_threads(threads)

    [command] = build_vllm_commands(select_records(store, ["writer-rel"]))
    assert command.argv[2] == str(root / "models" / "base")
    assert f"writer-rel={root / 'runs' / 'writer'}" in command.argv

    printed = CliRunner().invoke(_cli(serve_command), ["--engine", "vllm", "--print", "--store", project["url"]])
    assert printed.exit_code == 0, printed.output
    assert printed.output.startswith(f"vllm serve {root / 'models' / 'base'} ")


def test_a_moved_folder_is_named_and_relocate_fixes_it(project: dict[str, Any], tmp_path: Path) -> None:
    root, store = project["root"], project["store"]
    moved = tmp_path / "moved-runs"
    shutil.move(str(root / "runs"), moved)
    with pytest.raises(MiniaturePathError, match=r"writer-rel@1: its adapter folder .*runs/writer' is gone"):
        build_vllm_commands(select_records(store, ["writer-rel"]))
    served = CliRunner().invoke(_cli(serve_command), ["--engine", "vllm", "--print", "--store", project["url"]])
    assert served.exit_code == 2
    assert "is gone" in served.output and "outreach miniatures relocate writer-rel@1" in served.output.replace("\n", "")

    typo = CliRunner().invoke(_cli(relocate_command), ["writer-rel", "--adapter-path", str(moved / "typo"),
                                                       "--store", project["url"]])
    assert typo.exit_code == 2 and "typo" in typo.output
    fixed = CliRunner().invoke(_cli(relocate_command), ["writer-rel@1", "--adapter-path", str(moved / "writer"),
                                                        "--store", project["url"]])
    assert fixed.exit_code == 0, fixed.output
    [command] = build_vllm_commands(select_records(store, ["writer-rel"]))
    assert f"writer-rel={moved / 'writer'}" in command.argv
