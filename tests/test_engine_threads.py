"""CPU engines of one process share its CPUs: torch threads per engine's model thread, rebalanced on make and close.

Runs on a tiny Llama built from a config (no downloads); the CPU count is set by the test, so the shares are the
same on any machine.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest

import miniatures.local as local
from miniatures import LocalEngine

torch = pytest.importorskip("torch")

from tests.miniature_fixtures import PROMPTS, build_tiny_base  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("threads") / "base")


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process with 4 usable CPUs and no other live engine (engines of other test modules are not counted)."""
    monkeypatch.setattr(local, "usable_cpus", lambda: 4)
    monkeypatch.setattr(local, "_CPU_ENGINES", weakref.WeakSet())


def _model_thread_threads(engine: LocalEngine) -> int:
    """torch's thread count as the engine's model thread sees it (after the tasks queued before)."""
    return int(engine._executor.submit(torch.get_num_threads).result())


def test_engines_share_the_cpus_and_get_them_back(base: Path, four_cpus: None) -> None:
    main_threads = torch.get_num_threads()
    first = LocalEngine(str(base), device="cpu", max_new_tokens=4)
    second = None
    try:
        assert first.threads == 4 and _model_thread_threads(first) == 4
        second = LocalEngine(str(base), device="cpu", max_new_tokens=4)
        assert (first.threads, second.threads) == (2, 2)
        assert _model_thread_threads(first) == 2 and _model_thread_threads(second) == 2
        # the engines still answer, with the same tokens as each other (same weights, greedy)
        one = first.generate_sync("__base__", PROMPTS[0])
        two = second.generate_sync("__base__", PROMPTS[0])
        assert one.text == two.text and one.output_tokens == two.output_tokens
        second.close()
        assert first.threads == 4 and _model_thread_threads(first) == 4
    finally:
        first.close()
        if second is not None:
            second.close()
    assert torch.get_num_threads() == main_threads  # the calling thread's setting is not touched


def test_an_explicit_thread_count_is_kept_and_counted(base: Path, four_cpus: None) -> None:
    shared = LocalEngine(str(base), device="cpu", max_new_tokens=4)
    assert shared.threads == 4
    fixed = LocalEngine(str(base), device="cpu", max_new_tokens=4, num_threads=1)
    try:
        assert fixed.threads == 1 and _model_thread_threads(fixed) == 1
        assert shared.threads == 2 and _model_thread_threads(shared) == 2  # 4 CPUs over 2 live engines
    finally:
        fixed.close()
    assert shared.threads == 4  # the explicit engine's share comes back
    shared.close()


def test_more_engines_than_cpus_get_one_thread_each(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "usable_cpus", lambda: 1)
    monkeypatch.setattr(local, "_CPU_ENGINES", weakref.WeakSet())
    engines = [LocalEngine(str(base), device="cpu", max_new_tokens=4) for _ in range(2)]
    try:
        assert [e.threads for e in engines] == [1, 1]
    finally:
        for engine in engines:
            engine.close()


def test_usable_cpus_is_the_affinity_mask() -> None:
    import os

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert local.usable_cpus() == expected
