"""Tests of finetune.templates (training chat templates) and the real-base paths of finetune.train, on stand-ins.

Stand-ins (``finetune.standins``): the real transformers config classes with tiny random weights, a tokenizer
trained here with each family's special tokens, and each family's real chat template read from TRL's installed
copies (Qwen2.5, Qwen3, Llama 3.1, Llama 3.2, Gemma 3, Phi-3); SmolLM2's and Mistral's are written in the
family's style (no installed package ships them). The fast tests check the masks and prefixes on the tokenizer
alone; the slow ones train each family and assert that the LoRA weights moved and the labels cover the answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

from core.errors import UserError  # noqa: E402
from finetune.config import CHECKPOINTING_MIN_PARAMS, TrainConfig  # noqa: E402
from finetune.standins import FAMILIES, build_standin, build_standin_tokenizer, family_template  # noqa: E402
from finetune.templates import (  # noqa: E402
    ChatTemplateError,
    derive_training_template,
    end_of_turn_token,
    has_generation_markers,
    read_chat_template_file,
    resolve_training_template,
)
from tests.helpers import TrainerSpy  # noqa: E402

#: family -> (the template source expected to pass, its end-of-turn token)
EXPECTED = {
    "qwen2.5": ("trl", "<|im_end|>"),
    "qwen3": ("derived", "<|im_end|>"),  # TRL's copy renders earlier answers with an empty think block
    "llama3.1": ("derived", "<|eot_id|>"),  # TRL ships the template but no training copy
    "llama3.2": ("derived", "<|eot_id|>"),
    "gemma3": ("trl", "<end_of_turn>"),
    "phi3": ("trl", "<|end|>"),
    "smollm2": ("derived", "<|im_end|>"),
    "mistral": ("derived", "</s>"),
}
CITIES = ("Austin", "Boston", "Denver", "Seattle")


def _rows(n: int, *, system: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        city = rnd.choice(CITIES)
        head = [{"role": "system", "content": "Extract the city."}] if system else []
        rows.append({"messages": [*head, {"role": "user", "content": f"Acme sells software from {city}."},
                                  {"role": "assistant", "content": f"city: {city}"}]})
    return rows


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    return {name: build_standin_tokenizer(name) for name in EXPECTED}


def test_family_templates_are_trls_installed_copies() -> None:
    from trl import chat_template_utils as ctu

    assert family_template("llama3.1") == ctu.llama3_1_chat_template
    assert family_template("qwen2.5") == ctu.qwen2_5_chat_template
    assert family_template("gemma3") == ctu.gemma3_chat_template
    assert not any(has_generation_markers(family_template(f)) for f in FAMILIES)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_family_masks_only_the_answer_and_its_end_of_turn(family: str, tokenizers: dict[str, Any]) -> None:
    tok = tokenizers[family]
    system = family != "mistral"  # Mistral puts the system message before the last user message only (below)
    rows = _rows(4, system=system)
    template = resolve_training_template(tok, [r["messages"] for r in rows], system=system)
    source, eot = EXPECTED[family]
    assert (template.source, template.end_of_turn) == (source, eot)
    assert template.inference == family_template(family) and tok.chat_template == template.inference
    eot_id = tok.convert_tokens_to_ids(eot)
    for row in rows:
        messages = row["messages"]
        out = tok.apply_chat_template(messages, chat_template=template.training, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ids[:len(prompt["input_ids"])] == prompt["input_ids"]  # asked as trained
        trained = [t for t, m in zip(ids, mask, strict=True) if m]
        answer = messages[-1]["content"]
        assert eot_id in trained
        text = tok.decode(trained[:trained.index(eot_id) + 1])
        # the answer and its end-of-turn token, nothing of the prompt (Qwen3's template opens the last answer with
        # an empty think block, which the model then learns to write)
        think = "<think>\n\n</think>\n\n" if family == "qwen3" else ""
        assert text.strip() == think + answer + eot
        untrained = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        assert messages[-2]["content"] in untrained and answer not in untrained


def test_mistral_system_message_fails_early_naming_the_options(tokenizers: dict[str, Any]) -> None:
    rows = [r["messages"] for r in _rows(2)]
    with pytest.raises(ChatTemplateError, match=r"not a prefix.*--chat-template FILE.*assistant_only_loss=false.*"
                                                r"system_prompt=false") as info:
        resolve_training_template(tokenizers["mistral"], rows)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_full_sequence_override_and_user_template(tokenizers: dict[str, Any], tmp_path: Path) -> None:
    tok = tokenizers["smollm2"]
    rows = [r["messages"] for r in _rows(2)]
    full = resolve_training_template(tok, rows, assistant_only_loss=False)
    assert full.source == "full-sequence" and full.training == full.inference
    marked = family_template("smollm2").replace(
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}",
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}")
    assert has_generation_markers(marked)
    file = tmp_path / "train.jinja"
    file.write_text(marked)
    user = resolve_training_template(tok, rows, user_template=read_chat_template_file(file))
    assert user.source == "user" and user.training == marked
    other = marked.replace("{{ '<|im_start|>assistant\n' }}{% generation %}",
                           "{{ '<|im_start|>bot\n' }}{% generation %}")
    assert other != marked
    with pytest.raises(ChatTemplateError, match="renders it differently from the base's template"):
        resolve_training_template(tok, rows, user_template=other)


def test_template_file_and_end_of_turn_errors(tmp_path: Path, tokenizers: dict[str, Any]) -> None:
    with pytest.raises(ChatTemplateError, match="not found"):
        read_chat_template_file(tmp_path / "none.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatTemplateError, match=r"bad.jinja is not valid Jinja \(line 1"):
        read_chat_template_file(bad)
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="holds no special token"):
        end_of_turn_token(tokenizers["qwen2.5"], plain)
    with pytest.raises(ChatTemplateError, match="cannot derive"):
        derive_training_template(plain, "'")


def test_config_memory_defaults_and_new_fields() -> None:
    from finetune.train import use_checkpointing

    cfg = TrainConfig(base_model="b", dataset_dir="d", output_dir="o")
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (1, 8)
    assert cfg.gradient_checkpointing is None and cfg.assistant_only_loss and not cfg.data_parallel
    assert not use_checkpointing(cfg, CHECKPOINTING_MIN_PARAMS) and use_checkpointing(cfg, CHECKPOINTING_MIN_PARAMS + 1)
    assert use_checkpointing(cfg.with_overrides(gradient_checkpointing=True), 10)
    assert not use_checkpointing(cfg.with_overrides(gradient_checkpointing=False), 10**9)
    assert cfg.with_overrides(assistant_only_loss=False).assistant_only_loss is False
    assert cfg.with_overrides(chat_template="t.jinja").chat_template == "t.jinja"
    with pytest.raises(ValueError, match="assistant_only_loss must be true or false"):
        cfg.with_overrides(assistant_only_loss="no")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        cfg.with_overrides(gradient_checkpointing="auto")


def test_gemma3_vision_base_gets_lora_on_the_language_model_only(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.config import DEFAULT_TARGET_MODULES
    from finetune.train import _resolve_targets

    model = AutoModelForCausalLM.from_pretrained(build_standin("gemma3-vision", tmp_path / "g"))
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    targets = _resolve_targets(model, DEFAULT_TARGET_MODULES)
    assert isinstance(targets, str) and "language_model" in targets
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=targets))
    adapted = [n for n, _ in peft.named_modules() if n.endswith(".lora_A")]
    assert adapted and all(".language_model." in n for n in adapted)
    assert not any("vision_tower" in n or "multi_modal" in n for n in adapted)
    assert {n.split(".")[-2] for n in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}


def test_text_only_base_keeps_plain_target_names(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from finetune.train import _resolve_targets

    model = AutoModelForCausalLM.from_pretrained(build_standin("phi3", tmp_path / "p"))
    assert _resolve_targets(model, ("q_proj", "qkv_proj", "o_proj", "gate_up_proj")) == ["qkv_proj", "o_proj",
                                                                                         "gate_up_proj"]


def test_gemma_never_runs_in_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from miniatures.device import fp16_safe, pick_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype(None, "cuda", model_type="gemma3") == "float32"
    assert pick_dtype(None, "cuda", model_type="gemma3_text") == "float32"
    assert pick_dtype(None, "cuda", model_type="qwen2") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("auto", "cuda", model_type="gemma3") == "bfloat16"
    assert not fp16_safe("gemma2") and fp16_safe("llama")


def test_peak_memory_sees_a_large_allocation() -> None:
    import numpy as np

    from miniatures.device import PeakMemory

    with PeakMemory("cpu", interval_s=0.01) as before:
        pass
    with PeakMemory("cpu", interval_s=0.01) as peak:
        block = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB, written so the pages are resident
        import time

        time.sleep(0.1)  # let the sampler see it (not a timing assertion)
        del block
    assert peak.kind == "cpu_rss" and peak.peak_bytes >= before.peak_bytes + 200 * 2**20


def test_one_device_unless_data_parallel() -> None:
    from transformers.training_args import ParallelMode

    from finetune.train import _one_device

    class Args(SimpleNamespace):
        @property
        def n_gpu(self) -> int:
            return int(self._n_gpu)

    cfg = TrainConfig(base_model="b", dataset_dir="d", output_dir="o")
    assert _one_device(Args(parallel_mode=ParallelMode.NOT_DISTRIBUTED, _n_gpu=4), cfg) == 1
    assert _one_device(Args(parallel_mode=ParallelMode.NOT_DISTRIBUTED, _n_gpu=4),
                       cfg.with_overrides(data_parallel=True)) == 4
    assert _one_device(Args(parallel_mode=ParallelMode.NOT_PARALLEL, _n_gpu=0), cfg) == 0


def test_trl_errors_become_user_errors() -> None:
    from finetune.train import TrainingMemoryError, _trainer_error

    msg = ("You're using `assistant_only_loss=True`, but at least one example has no assistant tokens. This usually "
           "means the tokenizer's chat template doesn't generate assistant masks")
    assert isinstance(_trainer_error(RuntimeError(msg)), ChatTemplateError)
    assert isinstance(_trainer_error(RuntimeError("DefaultCPUAllocator: can't allocate memory")), TrainingMemoryError)
    assert _trainer_error(RuntimeError("shape mismatch")) is None


def _dataset(folder: Path, *, system: bool = True, n: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, system=system)))
    return folder


def test_main_refuses_a_template_before_loading_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.base
    from finetune.train import main

    base = build_standin("mistral", tmp_path / "mistral")

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded before the template check")

    monkeypatch.setattr(finetune.base, "load_base", no_weights)
    cfg = TrainConfig(base_model=str(base), dataset_dir=str(_dataset(tmp_path / "ds")), output_dir=str(tmp_path / "o"))
    with pytest.raises(ChatTemplateError, match="system_prompt=false"):
        main(cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", [*sorted(EXPECTED), "gemma3-vision"])
def test_each_family_trains_with_lora_and_is_asked_with_its_own_template(family: str, tmp_path: Path) -> None:
    import torch

    from finetune.train import main

    system = family != "mistral"
    base = build_standin(family, tmp_path / "base")
    cfg = TrainConfig(base_model=str(base), dataset_dir=str(_dataset(tmp_path / "ds", system=system)),
                      output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                      gradient_accumulation_steps=1, learning_rate=5e-3, warmup_ratio=0.0, logging_steps=1,
                      save_steps=100, system_prompt=system)
    spy = TrainerSpy()
    with pytest.MonkeyPatch.context() as mp:
        spy.install(mp)
        result = main(cfg)
    after = spy.trainer.model.state_dict()
    lora = [k for k in spy.before if "lora_B" in k]
    assert lora and all(not torch.equal(spy.before[k], after[k]) for k in lora)
    assert all(torch.equal(spy.before[k], after[k]) for k in spy.before if "lora_" not in k)
    source, eot = EXPECTED["gemma3" if family == "gemma3-vision" else family]
    assert result.metrics["chat_template"]["source"] == source
    assert result.metrics["peak_memory_bytes"] > 0 and result.metrics["gradient_checkpointing"] is False
    tok = spy.trainer.processing_class
    row = spy.trainer.train_dataset[0]
    trained = tok.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])
    assert trained.strip().removesuffix(tok.eos_token if family == "phi3" else "").strip().endswith(eot)
    assert trained.strip().split(eot)[0].split("</think>")[-1].strip().removeprefix("city: ") in CITIES
    saved = json.loads((result.output_path / "tokenizer_config.json").read_text())
    template_file = result.output_path / "chat_template.jinja"
    saved_template = template_file.read_text() if template_file.is_file() else saved.get("chat_template")
    assert saved_template == family_template(family)  # the miniature is asked with the base's own template
    if family == "gemma3-vision":
        assert not any("vision_tower" in k for k in after if "lora_" in k)


@pytest.mark.gpu
def test_trains_on_one_cuda_device_in_bf16(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from finetune.train import main

    base = build_standin("gemma3", tmp_path / "base")
    cfg = TrainConfig(base_model=str(base), dataset_dir=str(_dataset(tmp_path / "ds")), output_dir=str(tmp_path / "o"),
                      max_steps=2, gradient_accumulation_steps=1, logging_steps=1, save_steps=100)
    m = main(cfg).metrics
    assert m["device"].startswith("cuda") and m["n_gpu"] == 1
    assert m["bf16"] == torch.cuda.is_bf16_supported() and m["fp16"] is False  # Gemma: never fp16
    assert m["peak_memory_kind"] == "cuda_max_allocated" and m["peak_memory_bytes"] > 0


def test_cli_chat_template_option_fails_early_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import finetune.distill
    from outreach.cli import app
    from store import open_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUTREACH_CONFIG", raising=False)
    open_store("sqlite:///s.sqlite").dispose()
    build_standin_tokenizer("llama3.1").save_pretrained(tmp_path / "base")

    def no_dataset(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the dataset was built before the chat template was checked")

    monkeypatch.setattr(finetune.distill, "build_sft_dataset", no_dataset)
    args = ["finetune", "train", "--agent", "writer", "--name", "w", "--base-model", str(tmp_path / "base"),
            "--store", "sqlite:///s.sqlite"]
    result = CliRunner().invoke(app, [*args, "--chat-template", "missing.jinja"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "chat template file" in said and "missing.jinja not found" in said
    (tmp_path / "plain.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    result = CliRunner().invoke(app, [*args, "--chat-template", "plain.jinja"])
    assert result.exit_code == 2 and "no chat template to train" in " ".join(result.output.split())
