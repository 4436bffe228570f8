"""Tests of finetune.config, finetune.train and finetune.plots on a tiny locally built base model.

The trainer is spied on (a subclass of TRL's SFTTrainer that snapshots the weights before training), so the
tests assert on what really moved: LoRA weights move and base weights stay put; full fine-tuning moves the
weights; the labels TRL trains on cover the assistant answers with their end-of-turn token and nothing else.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

from finetune.base import BaseModelInfo, bootstrap_base  # noqa: E402
from finetune.config import DEFAULT_TARGET_MODULES, TrainConfig  # noqa: E402
from finetune.plots import loss_curves, plot_losses  # noqa: E402
from finetune.train import TrainResult, load_chat_jsonl, main  # noqa: E402
from tests.helpers import TrainerSpy  # noqa: E402

CITIES = ["Austin", "Denver", "Boston", "Seattle", "Portland", "Chicago"]
PRODUCTS = ["analytics", "logistics", "payroll", "security", "retail", "billing"]


def _conversation(rnd: random.Random) -> dict[str, Any]:
    city, product = rnd.choice(CITIES), rnd.choice(PRODUCTS)
    return {
        "messages": [
            {"role": "system", "content": "Extract the city."},
            {"role": "user", "content": f"Acme sells {product} software from {city}."},
            {"role": "assistant", "content": f"city: {city}"},
        ]
    }


def _texts(n: int = 240) -> list[str]:
    rnd = random.Random(1)
    return [
        f"Acme sells {rnd.choice(PRODUCTS)} software from {rnd.choice(CITIES)}. The team of {rnd.randint(5, 90)} "
        f"people serves {rnd.choice(PRODUCTS)} customers."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> BaseModelInfo:
    return bootstrap_base(
        tmp_path_factory.mktemp("base"), _texts(), preset="2m", vocab_size=400, pretrain_steps=5, seq_len=32,
        batch_size=4, lr=3e-3,
    )


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dataset")
    rnd = random.Random(0)
    for split, n in (("train", 32), ("eval", 8)):
        with (folder / f"{split}.jsonl").open("w") as fh:
            for _ in range(n):
                fh.write(json.dumps(_conversation(rnd)) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"agent": "researcher", "n_train": 32, "n_eval": 8}))
    return folder


def _run(base: BaseModelInfo, dataset_dir: Path, out: Path, method: str) -> tuple[TrainResult, TrainerSpy]:
    config = TrainConfig(
        base_model=str(base.path), dataset_dir=str(dataset_dir), output_dir=str(out), method=method,  # type: ignore[arg-type]
        max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=1, logging_steps=1, eval_steps=2,
        save_steps=2, max_length=128,
        learning_rate=5e-3 if method == "lora" else 1e-3, warmup_ratio=0.0,
    )
    spy = TrainerSpy()
    with pytest.MonkeyPatch.context() as mp:
        spy.install(mp)
        result = main(config)
    return result, spy


@pytest.fixture(scope="module")
def lora_run(base: BaseModelInfo, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    tuple[TrainResult, TrainerSpy]
]:
    yield _run(base, dataset_dir, tmp_path_factory.mktemp("lora"), "lora")


def test_lora_moves_adapter_weights_and_leaves_base_weights(lora_run: tuple[TrainResult, TrainerSpy]) -> None:
    import torch

    result, spy = lora_run
    after = spy.trainer.model.state_dict()
    lora_keys = [k for k in spy.before if "lora_" in k]
    base_keys = [k for k in spy.before if "lora_" not in k]
    assert lora_keys and base_keys
    moved = [k for k in lora_keys if not torch.equal(spy.before[k], after[k])]
    assert moved == lora_keys, f"LoRA weights that did not move: {sorted(set(lora_keys) - set(moved))[:5]}"
    changed_base = [k for k in base_keys if not torch.equal(spy.before[k], after[k])]
    assert changed_base == []
    # every configured projection the model has got an adapter (Phi-3's fused names are absent from a Llama)
    for name in DEFAULT_TARGET_MODULES:
        if name in ("qkv_proj", "gate_up_proj"):
            assert not any(f".{name}." in k for k in lora_keys), name
        else:
            assert any(f".{name}.lora_A" in k for k in lora_keys), name
    n_lora = sum(after[k].numel() for k in lora_keys)
    assert result.trainable_params == n_lora
    assert result.method == "lora"


def test_lora_adapter_is_saved_and_loads_with_peft(
    lora_run: tuple[TrainResult, TrainerSpy], base: BaseModelInfo
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, spy = lora_run
    final = result.output_path
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file() and not (final / "model.safetensors").exists()
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]) == base.path.resolve()
    assert adapter_cfg["r"] == 16 and adapter_cfg["lora_alpha"] == 32
    plain = AutoModelForCausalLM.from_pretrained(base.path)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base_logits = plain(ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.path), final)
        adapted_logits = loaded(ids).logits
    assert not torch.allclose(base_logits, adapted_logits)
    trained = spy.trainer.model.state_dict()
    for key, value in loaded.state_dict().items():
        if "lora_" in key:
            assert torch.allclose(value, trained[key].cpu()), key
    checkpoints = sorted(p.name for p in (result.output_path.parent / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]


def test_training_labels_cover_assistant_answer_and_end_of_turn_only(lora_run: tuple[TrainResult, TrainerSpy]) -> None:
    _, spy = lora_run
    tok = spy.trainer.processing_class
    row = spy.trainer.train_dataset[0]
    ids = row["input_ids"]
    mask = [label != -100 for label in row["labels"]]  # TRL turns the assistant mask into labels (-100: no loss)
    assert [label for label in row["labels"] if label != -100] == [t for t, m in zip(ids, mask, strict=True) if m]
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained.startswith("city: ") and trained.endswith("<|im_end|>")
    assert trained.removeprefix("city: ").removesuffix("<|im_end|>") in CITIES
    untrained = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "Extract the city." in untrained and "Acme sells" in untrained
    assert "city: " not in untrained


def test_metrics_and_loss_plot(lora_run: tuple[TrainResult, TrainerSpy]) -> None:
    result, _ = lora_run
    out = result.output_path.parent
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["global_step"] == 4 and metrics["n_train"] == 32 and metrics["n_eval"] == 8
    assert [s for s, _ in metrics["train_loss_history"]] == [1, 2, 3, 4]
    assert [s for s, _ in metrics["eval_loss_history"]] == [2, 4]
    assert metrics["train_tokens"] > 0 and result.train_tokens_per_s > 0
    assert metrics["dataset_manifest"]["agent"] == "researcher"
    assert metrics["learning_rate"] == 5e-3 and metrics["device"] in ("cpu", "cuda")
    assert metrics["chat_template"] == {"source": "native", "end_of_turn": "<|im_end|>", "checked_conversations": 18}
    assert metrics["peak_memory_bytes"] > 0 and metrics["peak_memory_kind"] in ("cpu_rss", "cuda_max_allocated")
    assert metrics["gradient_checkpointing"] is False  # a 2M-parameter base: below CHECKPOINTING_MIN_PARAMS
    assert metrics["effective_batch_size"] == 8
    assert result.loss_png is not None and result.loss_png.is_file()
    assert result.loss_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TrainConfig.from_file(out / "train_config.json").method == "lora"


def test_full_finetuning_moves_weights(base: BaseModelInfo, dataset_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    result, spy = _run(base, dataset_dir, tmp_path / "full", "full")
    after = spy.trainer.model.state_dict()
    assert not any("lora_" in k for k in after)
    moved = [k for k in spy.before if not torch.equal(spy.before[k], after[k])]
    assert len(moved) == len(spy.before)
    assert result.trainable_params == base.n_params
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_path)
    for key, value in reloaded.state_dict().items():
        assert torch.allclose(value, after[key].cpu()), key


def test_plot_losses(tmp_path: Path) -> None:
    history = [{"loss": 2.0, "step": 1}, {"eval_loss": 1.9, "step": 2}, {"loss": 1.5, "step": 2},
               {"train_loss": 1.7, "step": 2}]
    assert loss_curves(history) == ([(1, 2.0), (2, 1.5)], [(2, 1.9)])
    png = plot_losses(history, tmp_path / "sub" / "loss.png")
    assert png.is_file() and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="logging_steps"):
        plot_losses([{"train_loss": 1.0, "step": 1}], tmp_path / "x.png")


# -- config ------------------------------------------------------------------------------------------------------


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(base_model="base", dataset_dir="ds", output_dir="out", **kw)


def test_config_defaults_help_and_learning_rates() -> None:
    cfg = _cfg()
    assert cfg.method == "lora" and cfg.lora_r == 16 and cfg.lora_alpha == 32
    assert cfg.target_modules == DEFAULT_TARGET_MODULES
    assert cfg.effective_learning_rate == 2e-4
    assert _cfg(method="full").effective_learning_rate == 5e-5
    assert _cfg(learning_rate=1e-3).effective_learning_rate == 1e-3
    helps = TrainConfig.field_help()
    assert set(helps) == {f for f in cfg.to_dict()} and all(helps.values())


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_round_trip(tmp_path: Path, suffix: str) -> None:
    cfg = _cfg(method="full", max_steps=7, target_modules=("q_proj", "v_proj"), learning_rate=3e-4)
    path = cfg.to_file(tmp_path / f"train{suffix}")
    assert TrainConfig.from_file(path) == cfg
    default_lr = _cfg()
    assert TrainConfig.from_file(default_lr.to_file(tmp_path / f"d{suffix}")) == default_lr


def test_config_from_toml_with_train_table_and_comma_modules(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(
        '[train]\nbase_model = "b"\ndataset_dir = "d"\noutput_dir = "o"\ntarget_modules = "q_proj, k_proj"\n'
    )
    cfg = TrainConfig.from_file(path)
    assert cfg.target_modules == ("q_proj", "k_proj") and cfg.base_model == "b"


def test_config_overrides() -> None:
    cfg = _cfg()
    new = cfg.with_overrides(lora_r=4, max_steps=10, seed=None)
    assert (new.lora_r, new.max_steps, new.seed) == (4, 10, 0) and cfg.lora_r == 16
    assert new.with_overrides(learning_rate=1e-3).with_overrides(learning_rate=None).learning_rate is None
    with pytest.raises(ValueError, match="unknown training option.*lora_rank"):
        cfg.with_overrides(lora_rank=4)
    with pytest.raises(ValueError, match="lora_r"):
        cfg.with_overrides(lora_r=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "qlora"}, "method must be one of lora, full"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"max_steps": 0}, "max_steps"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"target_modules": ()}, "target_modules"),
        ({"answer_format": "tags"}, "answer_format must be one of json, sentence-tags"),
        ({"negative_fraction": 0.0}, "negative_fraction"),
        ({"system_prompt": "no"}, "system_prompt must be true or false"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(**kwargs)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        TrainConfig.from_file(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('base_model = "b"\ndataset_dir = "d"\noutput_dir = "o"\nlora_rank = 4\n')
    with pytest.raises(ValueError, match=r"bad.toml: unknown key\(s\) lora_rank"):
        TrainConfig.from_file(bad)
    bad.write_text('base_model = "b"\n')
    with pytest.raises(ValueError, match="missing required key.*dataset_dir"):
        TrainConfig.from_file(bad)
    bad.write_text("base_model = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        TrainConfig.from_file(bad)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("x: 1")
    with pytest.raises(ValueError, match=".toml or .json"):
        TrainConfig.from_file(yaml)


def test_main_rejects_missing_dataset_and_bad_rows(tmp_path: Path, base: BaseModelInfo) -> None:
    with pytest.raises(FileNotFoundError, match="dataset_dir .* is not a folder"):
        main(TrainConfig(base_model=str(base.path), dataset_dir=str(tmp_path / "none"), output_dir=str(tmp_path)))
    ds = tmp_path / "ds"
    ds.mkdir()
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        main(TrainConfig(base_model=str(base.path), dataset_dir=str(ds), output_dir=str(tmp_path / "o")))
    (ds / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:1: no non-empty assistant message"):
        main(TrainConfig(base_model=str(base.path), dataset_dir=str(ds), output_dir=str(tmp_path / "o")))
    (ds / "train.jsonl").write_text('\n{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:2: message 0 has role 'robot'"):
        load_chat_jsonl(ds / "train.jsonl")
    (ds / "train.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"train.jsonl:1: not valid JSON"):
        load_chat_jsonl(ds / "train.jsonl")


def test_main_refuses_conversations_longer_than_max_length(tmp_path: Path, base: BaseModelInfo,
                                                         dataset_dir: Path) -> None:
    cfg = TrainConfig(base_model=str(base.path), dataset_dir=str(dataset_dir), output_dir=str(tmp_path),
                      max_length=8, max_steps=1)
    with pytest.raises(ValueError, match=r"40 of 40 conversations are longer than max_length=8 tokens .*Raise "
                                         r"max_length to at least \d+"):
        main(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before any training


def test_main_rejects_lora_targets_absent_from_model(
    tmp_path: Path, base: BaseModelInfo, dataset_dir: Path
) -> None:
    cfg = TrainConfig(base_model=str(base.path), dataset_dir=str(dataset_dir), output_dir=str(tmp_path),
                      target_modules=("c_attn", "c_proj"), max_steps=1)
    with pytest.raises(ValueError, match="none of target_modules .*c_attn.* its linear layers are .*q_proj"):
        main(cfg)


@pytest.mark.gpu
def test_trains_on_cuda_in_bf16(base: BaseModelInfo, dataset_dir: Path, tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    result, spy = _run(base, dataset_dir, tmp_path / "gpu", "lora")
    assert result.metrics["device"] == "cuda"
    assert result.metrics["bf16"] == torch.cuda.is_bf16_supported()
    assert next(spy.trainer.model.parameters()).device.type == "cuda"
    after = spy.trainer.model.state_dict()
    moved = [k for k in spy.before if "lora_B" in k and not torch.equal(spy.before[k], after[k])]
    assert moved


def _extraction_row(rnd: random.Random) -> dict[str, Any]:
    year, people = rnd.randint(1990, 2020), rnd.randint(5, 90)
    user = ("Company: Acme\nWebsite: https://acme.example/\n\nFields:\n- founded_year: the year\n"
            "- employee_count: how many people\n\nSentences:\nSource 1: https://acme.example/\n"
            f"S1: Acme was founded in {year}.\nS2: We like tea.\nS3: The company employs {people} people.\n\n"
            "Answer with the JSON object only.")
    answer = {"facts": [{"field": "founded_year", "evidence": "S1", "value": str(year)},
                        {"field": "employee_count", "evidence": "S3", "value": str(people)}]}
    return {"messages": [{"role": "system", "content": "Extract the facts."}, {"role": "user", "content": user},
                         {"role": "assistant", "content": json.dumps(answer)}]}


def test_sentence_tags_train_on_one_row_per_sentence_without_system_prompt(tmp_path: Path,
                                                                           base: BaseModelInfo) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    rnd = random.Random(0)
    (ds / "train.jsonl").write_text("".join(json.dumps(_extraction_row(rnd)) + "\n" for _ in range(8)))
    cfg = TrainConfig(base_model=str(base.path), dataset_dir=str(ds), output_dir=str(tmp_path / "o"), method="full",
                      answer_format="sentence-tags", negative_fraction=1.0, system_prompt=False, max_steps=2,
                      per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1, save_steps=10)
    spy = TrainerSpy()
    with pytest.MonkeyPatch.context() as mp:
        spy.install(mp)
        result = main(cfg)
    assert result.metrics["n_train"] == 24  # 8 conversations x 3 sentences, the "-" one kept (fraction 1.0)
    tokenizer = spy.trainer.processing_class
    first = tokenizer.decode(spy.trainer.train_dataset[0]["input_ids"])
    assert "Sentence: Acme was founded in" in first and "founded_year | " in first
    assert "Extract the facts" not in first and "S2:" not in first
    json_ds = tmp_path / "json"
    json_ds.mkdir()
    (json_ds / "train.jsonl").write_text(json.dumps(_conversation(rnd)) + "\n")
    with pytest.raises(ValueError, match="no extraction rows .*sentence-tags"):
        main(cfg.with_overrides(dataset_dir=str(json_ds)))
