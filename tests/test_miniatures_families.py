"""The in-process engine on stand-ins of real families: asked with the family's own template, stopping at its
end-of-turn token (tiny random weights, the real config classes, the families' real templates)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from finetune.standins import build_standin  # noqa: E402
from miniatures import BASE_ADAPTER, LocalEngine  # noqa: E402

END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>",
               "gemma3": "<end_of_turn>", "phi3": "<|end|>", "smollm2": "<|im_end|>", "mistral": "</s>"}
CHAT = [{"role": "user", "content": "Write one line."}]


@pytest.mark.parametrize("family", sorted(END_OF_TURN))
def test_engine_asks_with_the_family_template_and_stops_at_its_end_of_turn(family, tmp_path):  # type: ignore[no-untyped-def]
    folder = build_standin(family, tmp_path / family)
    engine = LocalEngine(str(folder), device="cpu", max_new_tokens=4, num_threads=1)
    try:
        tok = engine.tokenizer
        assert engine.render_prompt(CHAT) == tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert tok.convert_tokens_to_ids(END_OF_TURN[family]) in engine.stop_token_ids
        assert engine.generate_sync(BASE_ADAPTER, CHAT).output_tokens <= 4
    finally:
        engine.close()

