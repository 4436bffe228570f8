"""``vllm serve`` command lines built from registry records (no vLLM needed; the real launch is marked vllm)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from miniatures.registry import MiniaturePathError
from miniatures.vllm_cmd import (
    DECODING,
    VLLM_LORA_RANKS,
    VllmCommandError,
    adapter_rank,
    build_vllm_commands,
    vllm_lora_rank,
)
from store.models import MiniatureRecord


def _adapter(folder: Path, r: int, rank_pattern: dict[str, int] | None = None) -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _full(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def _record(name: str, version: int, path: Path | str, base: str = "Qwen/Qwen2.5-0.5B-Instruct",
            method: str = "lora") -> MiniatureRecord:
    return MiniatureRecord(name=name, agent="writer", version=version, base_model=base, adapter_path=str(path),
                           method=method)


@pytest.mark.parametrize(("rank", "expected"), [(1, 8), (4, 8), (8, 8), (9, 16), (24, 32), (64, 64), (200, 256),
                                                (300, 320), (321, 512), (512, 512)])
def test_rank_rounds_up_to_a_value_vllm_accepts(rank: int, expected: int) -> None:
    assert vllm_lora_rank(rank) == expected and expected in VLLM_LORA_RANKS


def test_ranks_out_of_range_are_refused() -> None:
    with pytest.raises(VllmCommandError, match="above 512"):
        vllm_lora_rank(513)
    with pytest.raises(VllmCommandError, match="at least 1"):
        vllm_lora_rank(0)


def test_adapter_rank_reads_r_and_rank_pattern(tmp_path: Path) -> None:
    assert adapter_rank(_adapter(tmp_path / "plain", 16)) == 16
    assert adapter_rank(_adapter(tmp_path / "pattern", 8, {"q_proj": 48})) == 48
    with pytest.raises(VllmCommandError, match="adapter_config.json"):
        adapter_rank(tmp_path / "missing")
    (tmp_path / "norank").mkdir()
    (tmp_path / "norank" / "adapter_config.json").write_text("{}")
    with pytest.raises(VllmCommandError, match="names no LoRA rank"):
        adapter_rank(tmp_path / "norank")


def test_lora_miniatures_on_one_base_make_one_command(tmp_path: Path) -> None:
    w1, w2, r1 = _adapter(tmp_path / "w1", 8), _adapter(tmp_path / "w2", 24), _adapter(tmp_path / "r1", 4)
    records = [_record("writer", 1, w1), _record("writer", 2, w2), _record("researcher", 1, r1)]
    [command] = build_vllm_commands(records, port=9000, api_key="k", extra_args=["--gpu-memory-utilization", "0.5"])
    argv = command.argv
    assert argv[:4] == ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct", "--enable-lora"]
    modules = argv[argv.index("--lora-modules") + 1: argv.index("--max-lora-rank")]
    # each adapter once: the latest version of a name under the plain name, older ones pinned
    assert modules == [f"writer@1={w1}", f"writer={w2}", f"researcher={r1}"]
    assert len({m.partition("=")[2] for m in modules}) == len(modules)
    assert argv[argv.index("--max-lora-rank") + 1] == "32"  # largest rank 24, rounded up
    assert argv[argv.index("--max-loras") + 1] == "3"
    assert argv[-8:] == ["--host", "127.0.0.1", "--port", "9000", "--api-key", "k", "--gpu-memory-utilization", "0.5"]
    assert command.served == ["writer@1", "writer", "researcher"]
    assert shlex.split(command.shell()) == argv


def test_a_single_version_is_listed_once_under_its_plain_name(tmp_path: Path) -> None:
    """The issue's case: writer-qwen@1 and writer-qwen took two slots for one adapter."""
    folder = _adapter(tmp_path / "wq", 16)
    [command] = build_vllm_commands([_record("writer-qwen", 1, folder)])
    modules = command.argv[command.argv.index("--lora-modules") + 1: command.argv.index("--max-lora-rank")]
    assert modules == [f"writer-qwen={folder}"]
    assert command.argv[command.argv.index("--max-loras") + 1] == "1"


def test_decoding_is_explicit_not_the_bases_generation_config(tmp_path: Path) -> None:
    lora, full = _adapter(tmp_path / "lora", 8), _full(tmp_path / "full")
    commands = build_vllm_commands([_record("researcher", 1, lora), _record("writer", 1, full, method="full")])
    for command in commands:
        argv = command.argv
        assert argv[argv.index("--generation-config") + 1] == "vllm"  # the base's generation_config.json is not read
        decoding = json.loads(argv[argv.index("--override-generation-config") + 1])
        assert decoding == DECODING and decoding["temperature"] == 0.0 and decoding["repetition_penalty"] == 1.0


def test_relative_or_missing_folders_are_named_before_vllm_sees_them(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _adapter(tmp_path / "runs" / "w", 8)
    with pytest.raises(MiniaturePathError, match=r"writer@1: .*relative path 'runs/w'.*relocate writer@1"):
        build_vllm_commands([_record("writer", 1, "runs/w")])
    with pytest.raises(MiniaturePathError, match=r"writer@1: .*'/nowhere/w' is gone.*--adapter-path"):
        build_vllm_commands([_record("writer", 1, "/nowhere/w")])
    with pytest.raises(MiniaturePathError, match=r"base model folder '/nowhere/base' is gone.*--base-model"):
        build_vllm_commands([_record("writer", 1, tmp_path / "runs" / "w", base="/nowhere/base")])


def test_mixed_bases_are_refused_with_the_miniatures_named(tmp_path: Path) -> None:
    a, b = _adapter(tmp_path / "a", 8), _adapter(tmp_path / "b", 8)
    with pytest.raises(VllmCommandError, match=r"2 different bases .*writer@1.*researcher@1.*one base per"):
        build_vllm_commands([_record("writer", 1, a, base="base-a"), _record("researcher", 1, b, base="base-b")])
    with pytest.raises(VllmCommandError, match="no miniatures"):
        build_vllm_commands([])


@pytest.mark.parametrize("answer_format", ["sentence-tags", "writer-brief"])
def test_miniatures_asked_from_their_task_are_refused(tmp_path: Path, answer_format: str) -> None:
    record = _record("researcher", 2, _adapter(tmp_path / "a", 8))
    record.training_config = {"answer_format": answer_format}
    with pytest.raises(VllmCommandError, match=rf"researcher@2 \('{answer_format}'\).*miniature:<name>"):
        build_vllm_commands([record])


def test_full_fine_tunes_get_their_own_process_on_the_next_port(tmp_path: Path) -> None:
    lora = _adapter(tmp_path / "lora", 8)
    full1, full2 = _full(tmp_path / "full1"), _full(tmp_path / "full2")
    records = [_record("researcher", 1, lora), _record("writer", 1, full1, method="full"),
               _record("writer", 2, full2, method="full")]
    group, first, second = build_vllm_commands(records, port=8000)
    assert group.port == 8000 and "--enable-lora" in group.argv and "writer" not in " ".join(group.served)
    assert first.argv[:5] == ["vllm", "serve", str(full1), "--served-model-name", "writer@1"]
    assert first.argv[-4:] == ["--host", "127.0.0.1", "--port", "8001"]
    assert second.served == ["writer@2", "writer"] and second.port == 8002 and "--enable-lora" not in second.argv


@pytest.mark.vllm
@pytest.mark.gpu
def test_vllm_accepts_the_printed_command(tmp_path: Path) -> None:
    """With vLLM installed (CUDA machine, its own environment): `vllm serve --help` knows every flag we pass."""
    import subprocess

    if shutil.which("vllm") is None:
        pytest.skip("vllm is not installed here (pip install '.[vllm]' in a CUDA environment)")
    [command] = build_vllm_commands([_record("writer", 1, _adapter(tmp_path / "w", 8))])
    help_text = subprocess.run(["vllm", "serve", "--help=all"], capture_output=True, text=True, timeout=120).stdout
    for flag in ("--enable-lora", "--lora-modules", "--max-lora-rank", "--max-loras", "--served-model-name",
                 "--generation-config", "--override-generation-config"):
        assert flag in help_text
    assert command.argv[0] == "vllm"
