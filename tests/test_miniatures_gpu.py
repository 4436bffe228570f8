"""The real-base serving paths on a CUDA GPU (marked gpu / vllm; they skip without one).

The same code paths as scripts/gpu_check.sh, at test size: the in-process engine in bf16 on CUDA with a LoRA
adapter and the writer's answer grammar; and vLLM serving the adapter with the command this project builds
(``miniatures.vllm_cmd``), asked through the project's ``vllm:`` backend, which sends the grammar.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from core.tasks import MergeTag, OfferBrief, WritingTask  # noqa: E402
from tests.miniature_fixtures import PROMPTS, build_adapter, build_tiny_base  # noqa: E402

TASK = WritingTask(
    offer=OfferBrief(sender_title="Founder", product="RouteWise", value_proposition="cuts empty miles",
                     call_to_action="a 15-minute call next week", opt_out_line="Reply stop to opt out."),
    merge_tags=(MergeTag(name="first_name", description="the prospect's first name"),
                MergeTag(name="company", description="the prospect's company")))


def _follows(tokenizer: Any, grammar: str, text: str, finished: bool) -> bool:
    """``text`` is in the grammar's language (a prefix of it when the answer was cut by its token cap)."""
    from miniatures.grammar import llg_tokenizer, matcher

    check = matcher(llg_tokenizer(tokenizer), grammar)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if check.validate_tokens(ids) != len(ids):
        return False
    return not finished or (check.consume_tokens(ids) and check.is_accepting())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu")
    base = build_tiny_base(root / "base", context=1024)
    return {"root": root, "base": base, "adapter": build_adapter(base, root / "writer", seed=7)}


@pytest.mark.gpu
def test_in_process_bf16_on_cuda_follows_the_grammar(tiny: dict[str, Path]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from miniatures.grammar import email_grammar
    from miniatures.local import LocalEngine

    engine = LocalEngine(str(tiny["base"]), device="cuda", dtype="bfloat16", max_new_tokens=48)
    try:
        assert next(engine._model.parameters()).dtype == torch.bfloat16  # noqa: SLF001 - the engine's own model
        engine.add_adapter("writer@1", tiny["adapter"])
        grammar = email_grammar(TASK)
        for prompt in PROMPTS[:2]:
            answer = engine.generate_sync("writer@1", prompt, grammar=grammar)
            assert _follows(engine.tokenizer, grammar, answer.text, answer.finish_reason == "stop"), answer.text
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_serves_the_adapter_and_answers_follow_the_grammar(tiny: dict[str, Path], tmp_path: Path) -> None:
    if not torch.cuda.is_available() or shutil.which("vllm") is None:
        pytest.skip("needs a CUDA device and vllm on PATH (pip install '.[vllm]' in its own environment)")
    import httpx
    from transformers import AutoTokenizer

    from miniatures.grammar import email_grammar
    from miniatures.remote import build_remote_chat_model
    from miniatures.specs import parse_backend_spec
    from miniatures.vllm_cmd import build_vllm_commands
    from store.models import MiniatureRecord

    record = MiniatureRecord(name="writer", agent="writer", version=1, base_model=str(tiny["base"]),
                             adapter_path=str(tiny["adapter"]))
    [command] = build_vllm_commands([record], port=8012, extra_args=["--gpu-memory-utilization", "0.3"])
    with (tmp_path / "vllm.log").open("w") as log:
        process = subprocess.Popen(command.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (tmp_path / "vllm.log").read_text()[-2000:]
            try:
                if httpx.get("http://127.0.0.1:8012/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vLLM did not start in 300 s"
            time.sleep(1)
        model = build_remote_chat_model(parse_backend_spec("vllm:writer@http://127.0.0.1:8012/v1"), max_tokens=48)
        tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
        grammar = email_grammar(TASK)
        for prompt in PROMPTS[:2]:
            reply = model.invoke([(m["role"], m["content"]) for m in prompt], task=TASK)
            finished = (reply.response_metadata or {}).get("finish_reason") == "stop"
            assert _follows(tokenizer, grammar, reply.text, finished), reply.text
    finally:
        process.terminate()
        process.wait(timeout=60)
