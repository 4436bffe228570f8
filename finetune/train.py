"""Fine-tune a miniature: chat traces in, LoRA adapter (or full model) out, with TRL's ``SFTTrainer``.

The TRL habit (DESIGN.md, "Habits"): a config dataclass (``finetune.config.TrainConfig``), a ``main(config)``
that does the work, heavy imports inside the function. The loss is computed on the assistant turns only
(``assistant_only_loss=True``, unless set off), which needs a chat template whose answers and end-of-turn tokens
are inside ``{% generation %}`` markers: ``finetune.templates`` picks or derives one from the base's own template
and checks it on the tokenizer before any weights are loaded (DESIGN.md, "Known traps").

Output folder layout::

    <output_dir>/checkpoints/checkpoint-<step>/   every save_steps (at most save_total_limit kept)
    <output_dir>/final/                           LoRA adapter (adapter_config.json, adapter_model.safetensors)
                                                  or the full model, plus the tokenizer in both cases
    <output_dir>/train_metrics.json               loss histories, tokens/s, seconds, trainable parameters
    <output_dir>/train_config.json                the TrainConfig used
    <output_dir>/loss.png                         train and eval loss against the step
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import UserError
from finetune.config import CHECKPOINTING_MIN_PARAMS, TrainConfig
from finetune.templates import OPTION_HINT, ChatTemplateError, TrainingTemplate

if TYPE_CHECKING:
    from torch import nn

__all__ = ["TrainProgress", "TrainResult", "TrainingMemoryError", "check_base_template", "labelled_positions_only",
           "linear_module_names", "load_chat_jsonl", "main", "progress_callback", "training_template",
           "use_checkpointing"]

logger = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class TrainResult:
    """What ``main`` produced.

    Attributes:
        output_path: ``<output_dir>/final``: the LoRA adapter (load with ``peft.PeftModel.from_pretrained``
            on the base) or the full model (``AutoModelForCausalLM.from_pretrained``), with the tokenizer.
        method: ``"lora"`` or ``"full"``.
        metrics: the content of ``train_metrics.json``.
        loss_png: the loss plot, or None when nothing was logged.
        trainable_params: parameters updated by the optimizer.
        train_tokens_per_s: non-padding input tokens per second of training wall time.
    """

    output_path: Path
    method: str
    metrics: dict[str, Any] = field(repr=False)
    loss_png: Path | None
    trainable_params: int
    train_tokens_per_s: float


@dataclass(frozen=True)
class TrainProgress:
    """Where a training run stands, handed to ``main``'s ``on_progress`` after every optimizer step and log.

    Attributes:
        step: optimizer steps done.
        total_steps: optimizer steps planned (``TrainerState.max_steps``).
        epoch: epochs done (fractional).
        loss: the latest logged training loss (every ``logging_steps``), None before the first.
        eval_loss: the latest eval loss (every ``eval_steps``), None before the first or without eval rows.
    """

    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    eval_loss: float | None = None


def progress_callback(on_progress: Callable[[TrainProgress], None] | None) -> Any:
    """A ``transformers.TrainerCallback`` that logs each of the Trainer's log records (``logger.info``) and hands
    a ``TrainProgress`` to ``on_progress`` (when given) at the start, after every optimizer step and every log.

    It replaces the Trainer's own printing (``PrinterCallback`` prints each log dict on standard output), so a
    caller draws its own progress bar (the CLI's is a rich bar with the loss).
    """
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.loss: float | None = None
            self.eval_loss: float | None = None

        def _emit(self, state: Any) -> None:
            if on_progress is not None:
                on_progress(TrainProgress(step=int(state.global_step), total_steps=int(state.max_steps),
                                          epoch=float(state.epoch or 0.0), loss=self.loss, eval_loss=self.eval_loss))

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._emit(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._emit(state)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                self.loss = float(logs["loss"])
            if "eval_loss" in logs:
                self.eval_loss = float(logs["eval_loss"])
            logger.info("step %d/%d: %s", state.global_step, state.max_steps,
                        ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()))
            self._emit(state)

    return _Progress()


def load_chat_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a chat JSONL file: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` object per line.

    Messages are reduced to ``role`` and ``content`` (a string; OpenAI content parts of type ``text`` are
    joined), so every row has the same Arrow schema. Blank lines are skipped.

    Args:
        path: the JSONL file.

    Returns:
        Rows ``{"messages": [{"role": str, "content": str}, ...]}``, with the row's ``task`` (a typed task as
        ``finetune.datasets`` writes it) when it has one.

    Raises:
        ValueError: a line that is not JSON, has no ``messages`` list, has a message with an unknown role or
            non-text content, or has no assistant message; the message names the file and the line number.
    """
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc}); each line must be one JSON object") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ValueError(f'{where}: expected {{"messages": [...]}} with a non-empty list of chat messages')
            clean: list[dict[str, str]] = []
            for i, msg in enumerate(messages):
                role = msg.get("role") if isinstance(msg, dict) else None
                if role not in _ROLES:
                    raise ValueError(f"{where}: message {i} has role {role!r}; use one of {', '.join(_ROLES)}")
                content = msg.get("content")
                if isinstance(content, list):
                    parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                    if len(parts) != len(content):
                        raise ValueError(f"{where}: message {i} has non-text content parts; only text can be trained")
                    content = "".join(str(p) for p in parts)
                if content is None:
                    content = ""
                if not isinstance(content, str):
                    raise ValueError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
                clean.append({"role": str(role), "content": content})
            if not any(m["role"] == "assistant" and m["content"] for m in clean):
                raise ValueError(f"{where}: no non-empty assistant message, so nothing to train on")
            row: dict[str, Any] = {"messages": clean}
            if isinstance(obj.get("task"), dict):  # the typed task finetune.datasets writes with each row
                row["task"] = obj["task"]
            rows.append(row)
    return rows


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted short names (last dotted component) of the ``torch.nn.Linear`` modules, ``lm_head`` excluded."""
    from torch import nn

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def _resolve_targets(model: nn.Module, wanted: tuple[str, ...]) -> list[str] | str:
    """The LoRA targets: the ``wanted`` short names present in ``model``; for a model whose language model is one
    part of several (``Gemma3ForConditionalGeneration``: a vision tower with its own ``q_proj`` ...), a regex that
    PEFT matches against full module names, so that only the language model (``model.get_decoder()``) is adapted.

    Raises:
        ValueError: none of ``wanted`` is a linear layer of the model.
    """
    import re

    from torch import nn

    present = set(linear_module_names(model))
    targets = [m for m in wanted if m in present]
    missing = [m for m in wanted if m not in present]
    if not targets:
        raise ValueError(
            f"none of target_modules ({', '.join(wanted)}) is a linear layer of this model; its linear layers are "
            f"{', '.join(sorted(present)) or '(none)'}: set target_modules to some of them"
        )
    if missing:
        logger.info("LoRA target modules not in this model, skipped: %s", ", ".join(missing))
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    prefix = next((name for name, mod in model.named_modules() if mod is decoder and name), None)
    if prefix is None:
        return targets
    outside = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)
               and name.rsplit(".", 1)[-1] in targets and not name.startswith(prefix + ".")]
    if not outside:
        return targets
    logger.info("LoRA on the language model (%s) only; %d matching layers outside it (e.g. %s) stay frozen", prefix,
                len(outside), outside[0])
    return rf"^{re.escape(prefix)}\..*\.(?:{'|'.join(re.escape(t) for t in targets)})$"


def _checked_max_length(tokenizer: Any, rows: list[dict[str, Any]], max_length: int | None) -> int:
    """The sequence length to train with: ``max_length``, or the longest conversation when it is None.

    TRL truncates from the right, so a conversation longer than ``max_length`` loses the end of its
    answer (the model then never learns to finish it: broken JSON at inference). Such data is refused.

    Raises:
        ValueError: some conversations are longer than ``max_length`` (the message gives the numbers).
    """
    lengths = [len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False))["input_ids"])
               for r in rows]
    longest = max(lengths, default=1)
    if max_length is None:
        return longest
    too_long = sum(n > max_length for n in lengths)
    if too_long:
        raise ValueError(
            f"{too_long} of {len(lengths)} conversations are longer than max_length={max_length} tokens (the longest "
            f"has {longest}); truncation would cut their answers. Raise max_length to at least {longest} "
            "(--set max_length=...) or leave it unset to use the longest")
    return max_length


def _sentence_rows(rows: list[dict[str, Any]], config: TrainConfig) -> list[dict[str, Any]]:
    """The ``sentence-tags`` rows of extraction ``rows`` (``finetune.datasets.sentence_tag_rows``: from each row's
    task, or the one read back from an old row's messages), seeded."""
    import random

    from finetune.datasets import sentence_tag_rows

    return sentence_tag_rows(rows, negative_fraction=config.negative_fraction, rng=random.Random(config.seed))


def _load_rows(config: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The train and eval rows of ``config.dataset_dir`` (system messages dropped, sentence rows made, as the
    config says) and its manifest. Raises ``FileNotFoundError`` / ``ValueError`` as ``main`` documents."""
    dataset_dir = Path(config.dataset_dir).expanduser()
    if not dataset_dir.is_dir():
        raise FileNotFoundError(
            f"dataset_dir {dataset_dir} is not a folder; build one from traces first (it must hold train.jsonl)"
        )
    train_file = dataset_dir / "train.jsonl"
    if not train_file.is_file():
        raise FileNotFoundError(
            f"{train_file} not found; a dataset folder holds train.jsonl, eval.jsonl (optional) and manifest.json"
        )
    train_rows = load_chat_jsonl(train_file)
    if not train_rows:
        raise ValueError(f"{train_file} has no rows; nothing to train on")
    eval_file = dataset_dir / "eval.jsonl"
    eval_rows = load_chat_jsonl(eval_file) if eval_file.is_file() else []
    if not config.system_prompt:
        train_rows, eval_rows = ([{**r, "messages": [m for m in r["messages"] if m.get("role") != "system"]}
                                  for r in rows] for rows in (train_rows, eval_rows))
    if config.answer_format == "sentence-tags":
        train_rows, eval_rows = (_sentence_rows(rows, config) for rows in (train_rows, eval_rows))
        if not train_rows:
            raise ValueError(f"{train_file}: no extraction rows with numbered sentences for answer_format "
                             "'sentence-tags'; it is meant for researcher datasets")
    if config.answer_format == "writer-brief":
        from finetune.datasets import writer_brief_rows

        train_rows, eval_rows = writer_brief_rows(train_rows), writer_brief_rows(eval_rows)
        if not train_rows:
            raise ValueError(f"{train_file}: no writer rows with a writing task for answer_format 'writer-brief'; "
                             "it is meant for writer datasets built by `outreach finetune dataset`")
    manifest_file = dataset_dir / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    else:
        logger.warning("%s not found; training without dataset provenance", manifest_file)
    return train_rows, eval_rows, manifest


def training_template(tokenizer: Any, config: TrainConfig, rows: Sequence[dict[str, Any]] = ()) -> TrainingTemplate:
    """The checked chat template ``config`` trains with (``finetune.templates.resolve_training_template``), from
    the base's tokenizer alone, so a template that cannot train fails before weights are loaded.

    Raises:
        ChatTemplateError: ``chat_template`` cannot be read, or no template passes the checks.
    """
    from finetune.templates import read_chat_template_file, resolve_training_template

    user = read_chat_template_file(config.chat_template) if config.chat_template else None
    return resolve_training_template(tokenizer, [r["messages"] for r in rows], system=config.system_prompt,
                                     assistant_only_loss=config.assistant_only_loss, user_template=user)


def check_base_template(config: TrainConfig) -> TrainingTemplate:
    """Check, on probe conversations and the base's tokenizer alone, that ``config`` can train its base's chat
    template (``training_template``); ``finetune.distill`` calls it before building a dataset.

    Raises:
        ChatTemplateError: see ``training_template``.
        FileNotFoundError, ValueError, OSError: see ``finetune.base.load_tokenizer``.
    """
    from finetune.base import load_tokenizer

    return training_template(load_tokenizer(config.base_model), config)


def use_checkpointing(config: TrainConfig, n_params: int) -> bool:
    """``config.gradient_checkpointing``, or (None) whether the base has more than ``CHECKPOINTING_MIN_PARAMS``."""
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    return n_params > CHECKPOINTING_MIN_PARAMS


def _one_device(args: Any, config: TrainConfig) -> int:
    """Keep the Trainer on one GPU unless ``data_parallel``: without a distributed launch transformers wraps the
    model in ``torch.nn.DataParallel`` over every visible GPU; returns the GPUs used (0 on CPU)."""
    from transformers.training_args import ParallelMode

    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED and not config.data_parallel:
        logger.info("%d GPUs visible: training on the first only (set data_parallel=true, or launch with "
                    "torchrun / accelerate, for more)", args.n_gpu)
        args._n_gpu = 1
    return int(args.n_gpu)


def _trainer_error(exc: Exception) -> UserError | None:
    """A one-line ``UserError`` for what TRL or torch raise for a cause the user can fix, else None."""
    text = str(exc)
    if "chat template" in text.lower() or "assistant_only_loss" in text or "assistant tokens" in text:
        return ChatTemplateError(f"TRL refused the chat template: {text.splitlines()[0]}; {OPTION_HINT}")
    if "out of memory" in text.lower() or "can't allocate memory" in text or "not enough memory" in text.lower():
        return TrainingMemoryError(
            f"training ran out of memory ({text.splitlines()[0][:200]}); keep per_device_train_batch_size=1, set "
            "gradient_checkpointing=true, lower max_length or use a smaller base")
    return None


class TrainingMemoryError(UserError, RuntimeError):
    """Training ran out of memory; the message says which settings lower it."""


@contextlib.contextmanager
def labelled_positions_only() -> Iterator[bool]:
    """Make TRL's fused LM head score only the positions that have a label, on CPU too; yields whether it could.

    TRL's ``SFTTrainer`` computes the loss with a fused LM head (``trl.trainer.utils.add_fused_lm_head``) that
    projects, in tiles, only the positions whose next-token label is not -100 when the device runs Triton (CUDA,
    XPU), and every position elsewhere, so that tile shapes stay fixed for compilers that recompile on a new shape
    (its comment names Neuron). Eager PyTorch on CPU compiles nothing, and with assistant-only loss most positions
    are prompt: 87% of the demo's sentence-tags rows and 69% of its writer rows, each projected onto the whole
    vocabulary, its log-softmax, entropy and top-1 computed, forward and backward, then thrown away. Inside this
    context the CPU takes TRL's own compact path (the one it runs on CUDA): the same loss, gradients and metrics
    (``tests/test_finetune_train_speed.py`` checks both against TRL's default). Measured per row of a training step
    on the bootstrapped 1.7M shape, 1 thread, load average about 5: 1.42x on the demo's researcher rows and 1.39x on
    its writer rows (batch 4); 1.37x and 1.60x on ``benchmarks/train_speed.py --only demo``'s demo-shaped rows.

    The switch is TRL's private ``trl.trainer.utils._use_triton``, read at call time and restored on exit; a TRL
    without it trains as before (logged once), and the test above fails, so an upgrade cannot drop it silently.
    """
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - TRL is a dependency of the train extra
        yield False
        return
    original = getattr(trl_utils, "_use_triton", None)
    if not callable(original):
        logger.info("this TRL has no trl.trainer.utils._use_triton: its LM head scores every position on CPU")
        yield False
        return

    def _compact(device: Any) -> bool:
        return bool(original(device)) or getattr(device, "type", None) == "cpu"

    trl_utils._use_triton = _compact
    try:
        yield True
    finally:
        trl_utils._use_triton = original


def main(config: TrainConfig, *, on_progress: Callable[[TrainProgress], None] | None = None) -> TrainResult:
    """Fine-tune ``config.base_model`` on the chat dataset in ``config.dataset_dir``.

    Steps: read the JSONL splits (turned into one row per sentence for ``answer_format="sentence-tags"``, see
    ``miniatures.formats``); load the base's tokenizer and pick and check the training chat template on it
    (``training_template``; before any weights are loaded); check the lengths; load the base with
    ``finetune.base.load_base`` (CUDA when available: bf16 weights for LoRA, float32 master weights with bf16
    autocast for full fine-tuning, fp16 only where bf16 is unsupported and never for Gemma; CPU: float32); train
    with TRL ``SFTTrainer`` (loss on the assistant answers and their end-of-turn token unless
    ``assistant_only_loss=False``; batch ``per_device_train_batch_size`` with ``gradient_accumulation_steps``;
    activation checkpointing per ``use_checkpointing``; one GPU unless ``data_parallel``; checkpoints every
    ``save_steps``, eval loss every ``eval_steps`` when ``eval.jsonl`` has rows), with the peak memory measured
    (``miniatures.device.PeakMemory``: CUDA allocator peak, or the process's RSS on CPU). Nothing is printed: the
    Trainer's tqdm bar and log printing are off, its log records go to ``logger.info`` and ``TrainProgress``
    updates to ``on_progress``. LoRA (Hu et al. 2021, arXiv 2106.09685) via ``peft.LoraConfig(task_type=
    "CAUSAL_LM")`` on the configured modules that exist in the model (of the language model only, for a
    vision-language base); or every weight for ``method="full"``. The saved tokenizer keeps the base's own chat
    template (the one the miniature is asked with).

    Args:
        config: the run's settings.
        on_progress: called with a ``TrainProgress`` at the start, after every optimizer step and every log
            (see ``progress_callback``), e.g. to draw a progress bar.

    Returns:
        ``TrainResult``; the artefacts are in ``config.output_dir`` (see the module docstring).

    Raises:
        FileNotFoundError: ``dataset_dir`` or its ``train.jsonl`` is missing, or a local base folder is missing.
        ValueError: a malformed dataset line, an empty training split, a conversation longer than
            ``max_length``, no LoRA target module in the model, or a base whose tokenizer has no chat template.
        finetune.templates.ChatTemplateError: no chat template can train the rows (a ``UserError`` and a
            ``ValueError``), or TRL refused the template.
        TrainingMemoryError: training ran out of memory.
    """
    train_rows, eval_rows, manifest = _load_rows(config)
    dataset_dir = Path(config.dataset_dir).expanduser()

    from finetune.base import load_base, load_tokenizer

    tokenizer = load_tokenizer(config.base_model)
    template = training_template(tokenizer, config, train_rows)
    max_length = _checked_max_length(tokenizer, train_rows + eval_rows, config.max_length)

    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from finetune.plots import plot_losses
    from miniatures.device import PeakMemory, fp16_safe, pick_device

    out_dir = Path(config.output_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
    set_seed(config.seed)

    device = pick_device(None)
    on_cuda = device.startswith("cuda")
    bf16 = bool(on_cuda and torch.cuda.is_bf16_supported())
    load_dtype = "auto" if config.method == "lora" else "float32"
    model, tokenizer = load_base(config.base_model, device=device, dtype=load_dtype, tokenizer=tokenizer)
    model_type = str(getattr(model.config, "model_type", ""))
    fp16 = bool(on_cuda and not bf16 and fp16_safe(model_type))
    total_params = int(sum(p.numel() for p in model.parameters()))
    checkpointing = use_checkpointing(config, total_params)

    peft_config = None
    if config.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=_resolve_targets(model, config.target_modules),
            bias="none",
        )

    train_ds = Dataset.from_list([{"messages": r["messages"]} for r in train_rows])  # TRL trains on messages only
    eval_ds = Dataset.from_list([{"messages": r["messages"]} for r in eval_rows]) if eval_rows else None
    # transformers 5.x renamed gradient checkpointing to activation checkpointing; older 5.x only know the old name.
    checkpointing_field = "activation_checkpointing" if "activation_checkpointing" in {
        f.name for f in dataclasses.fields(SFTConfig)} else "gradient_checkpointing"
    extra: dict[str, Any] = {checkpointing_field: checkpointing}
    args = SFTConfig(
        **extra,
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=float(config.num_train_epochs),
        max_steps=config.max_steps,
        learning_rate=config.effective_learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=float(config.warmup_ratio),  # transformers 5: a float in [0, 1) is a ratio of the steps
        max_length=max_length,
        assistant_only_loss=config.assistant_only_loss,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        use_cpu=not on_cuda,
        bf16=bf16,
        fp16=fp16,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=on_cuda,
        disable_tqdm=True,
    )
    n_gpu = _one_device(args, config)
    tokenizer.chat_template = template.training  # marked: TRL takes it as it is (no swap of its own)
    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[progress_callback(on_progress)],
        )
    except (ValueError, RuntimeError) as exc:
        tokenizer.chat_template = template.inference
        mapped = _trainer_error(exc)
        if mapped is None:
            raise
        raise mapped from exc
    trainer.remove_callback(PrinterCallback)  # it prints every log dict on standard output
    trained_model: Any = trainer.model
    trainable = int(sum(p.numel() for p in trained_model.parameters() if p.requires_grad))
    logger.info(
        "training %s on %s: %d train / %d eval conversations, %d of %d parameters trainable, %s%s, batch %d x %d "
        "accumulated, checkpointing %s, template %s",
        config.method, config.base_model, len(train_rows), len(eval_rows), trainable, total_params, device,
        " bf16" if bf16 else (" fp16" if fp16 else ""), config.per_device_train_batch_size,
        config.gradient_accumulation_steps, "on" if checkpointing else "off", template.source,
    )
    started = time.perf_counter()
    try:
        with PeakMemory(device) as peak, labelled_positions_only():
            output = trainer.train()
    except (RuntimeError, MemoryError) as exc:
        mapped = _trainer_error(exc) if isinstance(exc, RuntimeError) else TrainingMemoryError(
            "training ran out of memory; keep per_device_train_batch_size=1, set gradient_checkpointing=true, "
            "lower max_length or use a smaller base")
        if mapped is None:
            raise
        raise mapped from exc
    finally:
        tokenizer.chat_template = template.inference  # what the miniature is asked with
    seconds = time.perf_counter() - started
    final_eval: float | None = None
    if eval_ds is not None:
        evals_at_end = [r for r in trainer.state.log_history
                        if "eval_loss" in r and r.get("step") == trainer.state.global_step]
        if evals_at_end:
            final_eval = float(evals_at_end[-1]["eval_loss"])
        else:
            with labelled_positions_only():
                final_eval = float(trainer.evaluate()["eval_loss"])

    final_dir = out_dir / "final"
    trained_model.save_pretrained(str(final_dir))
    tokenizer.save_pretrained(str(final_dir))

    history = list(trainer.state.log_history)
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    runtime = float(output.metrics.get("train_runtime", seconds)) or seconds
    tokens_per_s = tokens / runtime if runtime > 0 else 0.0
    train_curve = [(int(r["step"]), float(r["loss"])) for r in history if "loss" in r]
    eval_curve = [(int(r["step"]), float(r["eval_loss"])) for r in history if "eval_loss" in r]
    metrics: dict[str, Any] = {
        "method": config.method,
        "base_model": config.base_model,
        "dataset_dir": str(dataset_dir),
        "dataset_manifest": manifest,
        "n_train": len(train_rows),
        "n_eval": len(eval_rows),
        "device": device,
        "n_gpu": n_gpu,
        "bf16": bf16,
        "fp16": fp16,
        "learning_rate": config.effective_learning_rate,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "effective_batch_size": config.per_device_train_batch_size * config.gradient_accumulation_steps
        * max(1, n_gpu),
        "gradient_checkpointing": checkpointing,
        "assistant_only_loss": config.assistant_only_loss,
        "chat_template": template.to_json(),
        "max_length": max_length,
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_gib": round(peak.peak_gib, 3),
        "peak_memory_kind": peak.kind,
        "global_step": int(trainer.state.global_step),
        "epochs": float(trainer.state.epoch or 0.0),
        "train_loss": float(output.training_loss),
        "final_train_loss": train_curve[-1][1] if train_curve else None,
        "final_eval_loss": final_eval,
        "train_loss_history": train_curve,
        "eval_loss_history": eval_curve,
        "train_tokens": tokens,
        "train_seconds": runtime,
        "train_tokens_per_s": tokens_per_s,
        "trainable_params": trainable,
        "total_params": total_params,
        "log_history": history,
    }
    metrics = json.loads(json.dumps(metrics, default=_json_default))
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    loss_png: Path | None = None
    if train_curve or eval_curve:
        title = f"{config.method} on {Path(config.base_model).name}"
        loss_png = plot_losses(history, out_dir / "loss.png", title=title)
    logger.info(
        "trained %d steps in %.1f s (%.0f tokens/s, peak memory %.2f GiB %s), train loss %.4f%s; saved %s",
        trainer.state.global_step, runtime, tokens_per_s, peak.peak_gib, peak.kind, output.training_loss,
        f", eval loss {final_eval:.4f}" if final_eval is not None else "", final_dir,
    )
    return TrainResult(
        output_path=final_dir,
        method=config.method,
        metrics=metrics,
        loss_png=loss_png,
        trainable_params=trainable,
        train_tokens_per_s=tokens_per_s,
    )


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
