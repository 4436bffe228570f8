"""The training configuration of a miniature, in the style of TRL's ``SFTConfig``.

Every field carries ``metadata={"help": ...}`` so a CLI can list the options with their help text.
A config is built in code, read from a TOML or JSON file (``TrainConfig.from_file``), and changed
field by field with ``with_overrides``; each way validates the values and names the bad one.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from miniatures.formats import ANSWER_FORMATS
from miniatures.grammar import EMAIL_GRAMMARS

__all__ = ["CHECKPOINTING_MIN_PARAMS", "DEFAULT_LEARNING_RATES", "DEFAULT_TARGET_MODULES", "TrainConfig"]

#: The projection layers of Llama/Qwen2/Mistral/Gemma-style decoders (and Phi-3's fused ``qkv_proj`` and
#: ``gate_up_proj``): LoRA on all linear layers, as in QLoRA (Dettmers et al. 2023, arXiv 2305.14314), which found
#: that adapting every layer matters most. Names a model lacks are skipped.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                           "qkv_proj", "gate_up_proj")

#: ``gradient_checkpointing=None`` turns activation checkpointing on for bases with more parameters than this.
#: Activations, not weights, fill memory in LoRA training: measured on this 2-core CPU with
#: ``benchmarks/train_speed.py`` (batch 1, 1,311 tokens per row, ``benchmarks/results/train_speed.md``), the
#: Qwen2-0.5B shape (494M parameters) peaks at 10.3 GiB RSS without checkpointing and 6.6 GiB with it (0.64x), at
#: 0.77x the tokens/s; the project's own bootstrapped bases (2M-30M parameters) stay near 0.5 GiB either way
#: (``tests/test_finetune_templates.py`` stand-ins), where recomputing activations only costs time. Every real
#: instruct base (SmolLM2-135M and up) is above the line, so checkpointing is on for them.
CHECKPOINTING_MIN_PARAMS = 100_000_000

#: Learning rates used when ``learning_rate`` is None: the common LoRA default (PEFT/TRL examples) and a
#: conservative full fine-tuning rate.
DEFAULT_LEARNING_RATES: dict[str, float] = {"lora": 2e-4, "full": 5e-5}

_METHODS = ("lora", "full")


@dataclass
class TrainConfig:
    """How to fine-tune one miniature (TRL ``SFTConfig`` style: each field has a help text).

    Paths are kept as given (``str``); ``main`` resolves them. ``learning_rate`` None means the default of
    the method (``DEFAULT_LEARNING_RATES``); read the effective value from ``effective_learning_rate``.

    Raises:
        ValueError: on construction, when a value is out of range or of the wrong kind; the message
            names the field and what to give instead.
    """

    base_model: str = field(
        metadata={"help": "Hugging Face model id (e.g. 'Qwen/Qwen2.5-0.5B-Instruct') or local folder of the base "
                  "model."}
    )
    dataset_dir: str = field(
        metadata={
            "help": "Folder with train.jsonl, eval.jsonl (optional) and manifest.json; each line is "
            '{"messages": [...]} in OpenAI chat format.'
        }
    )
    output_dir: str = field(
        metadata={"help": "Where checkpoints/, final/ (adapter or model + tokenizer), train_metrics.json and the loss "
                  "plot are written."}
    )
    method: Literal["lora", "full"] = field(
        default="lora", metadata={"help": "'lora' trains a LoRA adapter on a frozen base; 'full' trains every weight."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r (Hu et al. 2021, arXiv 2106.09685)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={"help": "Names of the linear modules that get LoRA adapters; names absent from the model are "
                  "skipped (at least one must exist)."},
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training set (ignored when "
                                                                    "max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; -1 means use num_train_epochs."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate; None means 2e-4 for lora and 5e-5 for full."}
    )
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Sequences per device per micro-batch. 1 keeps activation memory lowest; the "
                             "effective batch is this times gradient_accumulation_steps."})
    gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "Micro-batches accumulated per optimizer step (effective batch 8 by default)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in the backward pass (less memory, ~30% more "
                                "compute). None: on for bases above 100M parameters (CHECKPOINTING_MIN_PARAMS)."})
    assistant_only_loss: bool = field(
        default=True, metadata={"help": "Compute the loss on the assistant answers (and their end-of-turn token) "
                                "only; false trains on the whole conversation."})
    chat_template: str | None = field(
        default=None, metadata={"help": "A Jinja file with a training version of the base's chat template (same "
                                "text, answers inside {% generation %} ... {% endgeneration %}); None: the base's own "
                                "template, TRL's patched copy, or one derived from it (finetune.templates)."})
    data_parallel: bool = field(
        default=False, metadata={"help": "Train on every visible GPU of this process (torch DataParallel). Default: "
                                 "one GPU (the first of CUDA_VISIBLE_DEVICES); for several, prefer `accelerate "
                                 "launch` or torchrun."})
    max_length: int | None = field(
        default=None, metadata={"help": "Longest tokenized conversation in tokens; None: the longest training "
                                "conversation. A longer one is refused, since truncation would cut its answer."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and dropout."})
    logging_steps: int = field(default=5, metadata={"help": "Log the training loss every this many steps."})
    eval_steps: int = field(default=50, metadata={"help": "Compute the eval loss every this many steps."})
    save_steps: int = field(default=100, metadata={"help": "Save a checkpoint every this many steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Share of the steps with a linear learning-rate warmup, in [0, 1)."}
    )
    answer_format: str = field(
        default="json", metadata={"help": "How the miniature is asked (miniatures.formats): 'json' (the agent's "
                                  "own prompt and answer), 'sentence-tags' (researcher: one short prompt "
                                  "per numbered sentence, answered '<field> | <value>' or '-') or "
                                  "'writer-brief' (writer: a short brief of the writing task, answered in the "
                                  "agent's JSON with the offer's texts as {{cta}}, {{proof}}, {{opt_out}})."})
    email_grammar: str = field(
        default="format", metadata={"help": "Writer miniatures in-process: 'format' holds the answer to the email's "
                                    "JSON format and merge tags; 'craft' also to the rules of craft the rubric "
                                    "checks (miniatures.grammar.craft_email_grammar: greeting, opener, the "
                                    "product once, the proof point, one call to action, word band). On the "
                                    "demo's 1.7M-parameter writer 'craft' lowered the rubric all-pass rate "
                                    "(README, Miniatures)."})
    system_prompt: bool = field(
        default=True, metadata={"help": "Keep the system message in training rows. False trains without it and "
                                "the miniature is then asked without it (its rules are learned from the "
                                "examples): fewer tokens per step and per call."})
    negative_fraction: float = field(
        default=0.3, metadata={"help": "sentence-tags: share of sentences that state no fact kept as '-' "
                               "examples, in (0, 1]."})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(m.strip() for m in self.target_modules.split(",") if m.strip())
        else:
            self.target_modules = tuple(self.target_modules)
        for name in ("base_model", "dataset_dir", "output_dir"):
            value = getattr(self, name)
            if isinstance(value, Path):
                setattr(self, name, str(value))
            elif not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty path or model id, got {value!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}")
        if self.email_grammar not in EMAIL_GRAMMARS:
            raise ValueError(f"email_grammar must be one of {', '.join(EMAIL_GRAMMARS)}, got {self.email_grammar!r}")
        for name in ("system_prompt", "assistant_only_loss", "data_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.gradient_checkpointing is not None and not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true, false or unset (auto), got "
                             f"{self.gradient_checkpointing!r}")
        if isinstance(self.chat_template, Path):
            self.chat_template = str(self.chat_template)
        if self.chat_template is not None and (not isinstance(self.chat_template, str)
                                               or not self.chat_template.strip()):
            raise ValueError(f"chat_template must be the path of a Jinja file, got {self.chat_template!r}")
        if not 0.0 < self.negative_fraction <= 1.0:
            raise ValueError(f"negative_fraction must be in (0, 1], got {self.negative_fraction!r}")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {self.method!r}")
        positive = ("lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "max_length", "logging_steps", "eval_steps", "save_steps", "save_total_limit")
        for name in positive:
            value = getattr(self, name)
            if name == "max_length" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or (
            self.max_steps < 1 and self.max_steps != -1
        ):
            raise ValueError(f"max_steps must be -1 (use num_train_epochs) or >= 1, got {self.max_steps!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be a whole number, got {self.seed!r}")
        if not isinstance(self.num_train_epochs, int | float) or self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs must be > 0, got {self.num_train_epochs!r}")
        if not isinstance(self.lora_dropout, int | float) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.warmup_ratio, int | float) or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.learning_rate is not None and (
            not isinstance(self.learning_rate, int | float) or not 0.0 < self.learning_rate < 1.0
        ):
            raise ValueError(f"learning_rate must be in (0, 1) or None for the method's default, got "
                             f"{self.learning_rate!r}")
        if self.method == "lora" and not self.target_modules:
            raise ValueError("target_modules is empty; name the linear modules to adapt, e.g. q_proj,v_proj")

    @property
    def effective_learning_rate(self) -> float:
        """``learning_rate``, or the method's default (2e-4 for lora, 5e-5 for full) when it is None."""
        return float(self.learning_rate) if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.method]

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Map each field name to its help text (for CLIs and docs)."""
        return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build a config from a mapping, naming unknown and missing keys.

        Args:
            data: field name -> value; lists become tuples.
            source: what to call the input in error messages (a file name).

        Raises:
            ValueError: unknown keys, missing required keys (``base_model``, ``dataset_dir``, ``output_dir``),
                or a bad value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(names))}"
            )
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {', '.join(missing)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a config from a TOML (``.toml``) or JSON (``.json``) file of field names and values.

        A TOML file may hold the fields at the top level or under a ``[train]`` table. Relative paths in
        the file are kept as written (relative to the working folder, as TRL does).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: an unsupported extension, a syntax error, or a bad/unknown/missing field (the
                message names the file and the key).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} not found")
        suffix = path.suffix.lower()
        text = path.read_text(encoding="utf-8")
        data: Any
        try:
            if suffix == ".toml":
                data = tomllib.loads(text)
                if isinstance(data.get("train"), dict):
                    data = data["train"]
            elif suffix == ".json":
                data = json.loads(text)
            else:
                raise ValueError(f"training config {path} must be a .toml or .json file")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"training config {path} is not valid {suffix[1:].upper()}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"training config {path} must hold a table/object of field names, got {type(data).__name__}"
            )
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON/TOML-ready dict (tuples as lists; None values are kept)."""
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    def to_file(self, path: str | Path) -> Path:
        """Write the config as TOML (``.toml``; None values are left out) or JSON (``.json``).

        Raises:
            ValueError: an unsupported extension.
        """
        path = Path(path).expanduser()
        data = self.to_dict()
        if path.suffix.lower() == ".toml":
            import tomli_w

            path.write_text(tomli_w.dumps({k: v for k, v in data.items() if v is not None}), encoding="utf-8")
        elif path.suffix.lower() == ".json":
            path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        else:
            raise ValueError(f"training config {path} must be a .toml or .json file")
        return path

    def with_overrides(self, **kwargs: Any) -> TrainConfig:
        """Return a copy with some fields changed (validated like a new config); ``None`` values are ignored
        except for ``learning_rate``, where None means the method's default.

        Raises:
            ValueError: an unknown field name or a bad value.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"unknown training option(s) {', '.join(unknown)}; valid ones are {', '.join(sorted(names))}"
            )
        changes = {k: v for k, v in kwargs.items() if v is not None or k == "learning_rate"}
        return dataclasses.replace(self, **changes)
