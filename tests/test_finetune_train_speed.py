"""``finetune.train.labelled_positions_only``: TRL's fused LM head scores only labelled positions on CPU, with the
same loss, gradients and metrics as TRL's default, and TRL's switch is restored afterwards."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


def _tiny_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    return model


def _batch() -> dict[str, Any]:
    """Two right-padded rows whose labels cover only their last tokens (an assistant answer)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (2, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    ids[1, 15:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 14:] = ids[0, 14:]
    labels[1, 10:15] = ids[1, 10:15]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _step(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any], list[Any]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return out, {"entropy": out.entropy.detach(), "is_top1": out.is_top1.detach()}, grads


def test_compact_head_gives_the_same_loss_gradients_and_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl.trainer import utils as trl_utils

    from finetune.train import labelled_positions_only

    model, batch = _tiny_model(), _batch()
    rows_scored: list[int] = []
    original_apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden: Any, *args: Any) -> Any:
        rows_scored.append(int(hidden.shape[0]))
        return original_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    default_out, default_metrics, default_grads = _step(model, batch)
    with labelled_positions_only() as active:
        compact_out, compact_metrics, compact_grads = _step(model, batch)
    assert active
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert rows_scored == [2 * 19, labelled]  # every shifted position by default, the labelled ones inside
    torch.testing.assert_close(compact_out.loss, default_out.loss)
    for name in ("entropy", "is_top1"):
        torch.testing.assert_close(compact_metrics[name], default_metrics[name])
    for got, want in zip(compact_grads, default_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_switch_is_restored_even_after_an_error() -> None:
    from trl.trainer import utils as trl_utils

    from finetune.train import labelled_positions_only

    original = trl_utils._use_triton
    with pytest.raises(RuntimeError, match="boom"), labelled_positions_only():
        assert trl_utils._use_triton(torch.device("cpu"))
        raise RuntimeError("boom")
    assert trl_utils._use_triton is original
    assert not trl_utils._use_triton(torch.device("cpu"))  # TRL's own rule: CPU scores every position


def test_a_trl_without_the_switch_trains_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl.trainer import utils as trl_utils

    from finetune.train import labelled_positions_only

    monkeypatch.delattr(trl_utils, "_use_triton")
    with labelled_positions_only() as active:
        assert not active
    assert not hasattr(trl_utils, "_use_triton")
