"""Tests of finetune.background: training numbers do not depend on the thread count (so threads can move
between side-by-side jobs), and a job in a child process hands back its progress, result and errors.

Everything is built locally (a tokenizer trained here, a 2m-preset model from a config); nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")  # transformers is asked for by the tests that train: a job's child imports this module

from finetune.background import BackgroundJob, bootstrap_job, set_threads  # noqa: E402
from finetune.base import bootstrap_base  # noqa: E402

WORDS = "acme analytics austin founded employees logistics platform software revenue customers growth".split()


def _texts(n: int = 80, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(20, 40))) + "." for _ in range(n)]


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(folder / "model.safetensors")))


def _bootstrap(folder: Path, **kwargs: object) -> dict[str, object]:
    bootstrap_base(folder, _texts(), preset="2m", vocab_size=400, pretrain_steps=6, seq_len=32, batch_size=4,
                   **kwargs)  # type: ignore[arg-type]
    return json.loads((folder / "bootstrap.json").read_text())  # type: ignore[no-any-return]


def test_bootstrap_numbers_do_not_depend_on_threads_even_when_they_change_mid_run(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import torch

    before = torch.get_num_threads()
    try:
        one = _bootstrap(tmp_path / "one", num_threads=lambda: 1)
        calls: list[int] = []

        def switching() -> int:  # 1 thread for the first 3 steps, then 2
            calls.append(1)
            return 1 if len(calls) <= 3 else 2

        mixed = _bootstrap(tmp_path / "mixed", num_threads=switching)
        assert len(calls) == 6 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert one["loss_history"] == mixed["loss_history"]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "mixed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_set_threads_clamps_to_one() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        set_threads(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _failing_job(message: str, *, on_progress: object, num_threads: object) -> None:
    raise ValueError(message)


def _counting_job(n: int, *, on_progress: object, num_threads: object) -> int:
    import torch

    for i in range(n):
        on_progress(i)  # type: ignore[operator]
    return int(num_threads()) * 100 + torch.get_num_threads()  # type: ignore[operator]  # asked, and what it runs with


def test_background_job_hands_back_updates_result_and_errors() -> None:
    job = BackgroundJob(_counting_job, 3, threads=2)
    seen: list[int] = []
    assert job.result(on_update=seen.append) == 202 and seen == [0, 1, 2]
    assert not job.running()
    failing = BackgroundJob(_failing_job, "bad input: say what to do")
    with pytest.raises(ValueError, match="bad input: say what to do"):
        failing.result()


@pytest.mark.slow
def test_bootstrap_job_in_a_child_matches_one_in_this_process(tmp_path: Path) -> None:
    """About 10 s: the child imports torch and transformers."""
    pytest.importorskip("transformers")
    from tools.corpus import Corpus
    from tools.types import Document

    corpus_path = tmp_path / "corpus.sqlite"
    with Corpus(corpus_path) as corpus:
        corpus.add_many([Document(url=f"https://x{i}.example/", html="", text=t) for i, t in enumerate(_texts())])
    kwargs = {"preset": "2m", "vocab_size": 400, "pretrain_steps": 4, "seq_len": 32, "batch_size": 4}
    job = BackgroundJob(bootstrap_job, str(corpus_path), str(tmp_path / "child"), threads=1, **kwargs)
    job.set_threads(2)
    info = job.result()
    from finetune.base import corpus_texts

    here = bootstrap_base(tmp_path / "here", list(corpus_texts(corpus_path)), **kwargs)  # type: ignore[arg-type]
    assert info.final_loss == here.final_loss and info.n_tokens == here.n_tokens
