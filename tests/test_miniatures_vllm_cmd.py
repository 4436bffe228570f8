"""``vllm serve`` command lines built from registry records (no vLLM needed; the real launch is marked vllm)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from miniatures.vllm_cmd import (
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
    assert modules == [f"writer@1={w1}", f"writer@2={w2}", f"researcher@1={r1}", f"researcher={r1}", f"writer={w2}"]
    assert argv[argv.index("--max-lora-rank") + 1] == "32"  # largest rank 24, rounded up
    assert argv[argv.index("--max-loras") + 1] == "3"  # adapters, not aliases
    assert argv[-8:] == ["--host", "127.0.0.1", "--port", "9000", "--api-key", "k", "--gpu-memory-utilization", "0.5"]
    assert command.served == ["writer@1", "writer@2", "researcher@1", "researcher", "writer"]
    assert shlex.split(command.shell()) == argv


def test_mixed_bases_are_refused_with_the_miniatures_named(tmp_path: Path) -> None:
    a, b = _adapter(tmp_path / "a", 8), _adapter(tmp_path / "b", 8)
    with pytest.raises(VllmCommandError, match=r"2 different bases .*writer@1.*researcher@1.*one base per"):
        build_vllm_commands([_record("writer", 1, a, base="base-a"), _record("researcher", 1, b, base="base-b")])
    with pytest.raises(VllmCommandError, match="no miniatures"):
        build_vllm_commands([])



def test_sentence_tags_miniatures_are_refused(tmp_path: Path) -> None:
    record = _record("researcher", 2, _adapter(tmp_path / "a", 8))
    record.training_config = {"answer_format": "sentence-tags"}
    with pytest.raises(VllmCommandError, match=r"researcher@2 .*sentence-tags.*outreach serve"):
        build_vllm_commands([record])

def test_full_fine_tunes_get_their_own_process_on_the_next_port(tmp_path: Path) -> None:
    lora = _adapter(tmp_path / "lora", 8)
    records = [_record("researcher", 1, lora), _record("writer", 1, tmp_path / "full1", method="full"),
               _record("writer", 2, tmp_path / "full2", method="full")]
    group, full1, full2 = build_vllm_commands(records, port=8000)
    assert group.port == 8000 and "--enable-lora" in group.argv and "writer" not in " ".join(group.served)
    assert full1.argv == ["vllm", "serve", str(tmp_path / "full1"), "--served-model-name", "writer@1",
                          "--host", "127.0.0.1", "--port", "8001"]
    assert full2.served == ["writer@2", "writer"] and full2.port == 8002 and "--enable-lora" not in full2.argv


@pytest.mark.vllm
@pytest.mark.gpu
def test_vllm_accepts_the_printed_command(tmp_path: Path) -> None:
    """With vLLM installed (CUDA machine, its own environment): `vllm serve --help` knows every flag we pass."""
    import subprocess

    if shutil.which("vllm") is None:
        pytest.skip("vllm is not installed here (pip install '.[vllm]' in a CUDA environment)")
    [command] = build_vllm_commands([_record("writer", 1, _adapter(tmp_path / "w", 8))])
    help_text = subprocess.run(["vllm", "serve", "--help=all"], capture_output=True, text=True, timeout=120).stdout
    for flag in ("--enable-lora", "--lora-modules", "--max-lora-rank", "--max-loras", "--served-model-name"):
        assert flag in help_text
    assert command.argv[0] == "vllm"
