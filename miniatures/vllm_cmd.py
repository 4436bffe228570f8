"""``vllm serve`` command lines for registered miniatures (GPU serving with vLLM's OpenAI-compatible server).

vLLM serves one base model per process and LoRA adapters on it by name::

    vllm serve BASE --enable-lora --lora-modules writer=/path/w2 writer@1=/path/w1 researcher=/path/r1 \\
        --max-lora-rank 16 --max-loras 3 --generation-config vllm --override-generation-config '{...}'

Each adapter is listed once, because vLLM gives every ``--lora-modules`` entry its own adapter id, so two
names for one folder load it twice and take two of the ``--max-loras`` slots in a batch. The highest
selected version of each name is listed under the plain name (``writer``), the id an agent's backend spec
can carry (``openai:writer@http://host:8000/v1``: the spec grammar takes the first ``@`` as the start of the
URL, so ``writer@2`` cannot be named there); other selected versions of the same name keep
``<name>@<version>`` (for clients that pin one). The project's own server (``miniatures.server``) answers
both ids for every miniature, since it loads each adapter once whatever it is called.

``--max-lora-rank`` must be at least the largest adapter rank (vLLM refuses to load an adapter above it) and
one of the values vLLM accepts (``VLLM_LORA_RANKS``); ``--max-loras`` is how many adapters can be in one batch
(see vLLM's "LoRA Adapters" docs and ``vllm.config.LoRAConfig``).

Decoding is set explicitly: vLLM's default ``--generation-config auto`` reads the base's
``generation_config.json`` and applies its ``temperature``, ``top_p``, ``top_k`` and ``repetition_penalty`` to
every request that does not set them (an instruct base often ships sampling and a repetition penalty), which
the miniatures were never evaluated with. ``--generation-config vllm`` loads none of it, and
``--override-generation-config`` then sets the server's defaults to greedy decoding without penalties
(``DECODING``), the decoding of the in-process engine (``miniatures.local``) and of the project's server
(vLLM docs, "Engine Arguments": ``--generation-config``, ``--override-generation-config``).

A fully fine-tuned miniature is a whole model, not an adapter: it is served by its own ``vllm serve <its
folder> --served-model-name <name>@<version> <name>`` process, on the next port (one model with several
served names costs nothing extra). LoRA miniatures on different bases cannot share a process; building a
command for them is refused (serve them in separate selections). Every record's folders are checked first
(``miniatures.registry.check_miniature_paths``), so a moved adapter is named here, not by vLLM at start-up.

vLLM itself is an optional extra (``pip install '.[vllm]'``), installed in its own CUDA environment because
its wheels pin their own torch and transformers (DESIGN.md, known traps); this module only builds the
command line and never imports vLLM.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import UserError

if TYPE_CHECKING:
    from store.models import MiniatureRecord

__all__ = [
    "DECODING",
    "VLLM_LORA_RANKS",
    "VllmCommand",
    "VllmCommandError",
    "adapter_rank",
    "build_vllm_commands",
    "vllm_lora_rank",
]

#: The server-wide decoding defaults passed as ``--override-generation-config`` (with ``--generation-config vllm``):
#: greedy, no nucleus cut, no repetition penalty; a request's own fields still win.
DECODING: dict[str, float] = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}

#: ``--max-lora-rank`` values vLLM accepts (``vllm.config.LoRAConfig.max_lora_rank``), ascending.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VllmCommandError(UserError, ValueError):
    """The selected miniatures cannot be served by one ``vllm serve`` command as asked (the message says why)."""


@dataclass(frozen=True)
class VllmCommand:
    """One ``vllm serve`` process.

    Attributes:
        argv: the command line, ``["vllm", "serve", ...]``.
        model: the model the process loads (the shared base, or a fully fine-tuned miniature's folder).
        served: the model ids clients can send to it.
        port: the port it listens on.
    """

    argv: list[str]
    model: str
    served: list[str] = field(default_factory=list)
    port: int = 8000

    def shell(self) -> str:
        """The command line quoted for a POSIX shell."""
        return shlex.join(self.argv)


def adapter_rank(folder: str | Path) -> int:
    """The largest LoRA rank of the adapter saved in ``folder`` (``r`` and any ``rank_pattern`` entry).

    Args:
        folder: a folder written by peft's ``save_pretrained`` (holding ``adapter_config.json``).

    Raises:
        VllmCommandError: the folder has no readable ``adapter_config.json`` or it names no rank.
    """
    path = Path(folder).expanduser() / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VllmCommandError(
            f"cannot read the LoRA rank from {str(path)!r} ({exc}); the adapter folder must hold the "
            "adapter_config.json that peft's save_pretrained writes"
        ) from exc
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    ranks = [int(r) for r in ranks if isinstance(r, int | float) and r > 0]
    if not ranks:
        raise VllmCommandError(f"{str(path)!r} names no LoRA rank ('r'); is it a LoRA adapter?")
    return max(ranks)


def vllm_lora_rank(rank: int) -> int:
    """Round ``rank`` up to the next ``--max-lora-rank`` value vLLM accepts (4 -> 8, 24 -> 32, 300 -> 320).

    Raises:
        VllmCommandError: ``rank`` is below 1 or above 512, the largest rank vLLM supports.
    """
    if rank < 1:
        raise VllmCommandError(f"LoRA rank must be at least 1, got {rank}")
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise VllmCommandError(
        f"LoRA rank {rank} is above {VLLM_LORA_RANKS[-1]}, the largest rank vLLM serves; retrain with a smaller "
        "rank or serve it with the local engine (outreach serve --engine local)"
    )


def _common(host: str, port: int, api_key: str | None, extra_args: Sequence[str]) -> list[str]:
    args = ["--generation-config", "vllm", "--override-generation-config", json.dumps(DECODING, sort_keys=True),
            "--host", host, "--port", str(port)]
    if api_key:
        args += ["--api-key", api_key]
    return args + list(extra_args)


def _served_id(record: MiniatureRecord, latest: dict[str, MiniatureRecord]) -> str:
    """The one id an adapter is listed under: its plain name for the highest selected version, else name@version."""
    return record.name if latest[record.name] is record else f"{record.name}@{record.version}"


def build_vllm_commands(
    records: Sequence[MiniatureRecord],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    executable: str = "vllm",
) -> list[VllmCommand]:
    """``vllm serve`` commands for ``records``: one for all LoRA miniatures (sharing one base), then one per
    fully fine-tuned miniature, on ports ``port``, ``port + 1``, ...

    Args:
        records: registry records (``miniatures.registry``); LoRA ones must share one ``base_model``.
        host: address vLLM binds to.
        port: port of the first command; each further command takes the next port.
        api_key: passed as ``--api-key`` (vLLM then requires ``Authorization: Bearer <key>``).
        extra_args: more ``vllm serve`` arguments, appended to each command (``--gpu-memory-utilization 0.8``).
        executable: the ``vllm`` executable.

    Returns:
        The commands, LoRA group first.

    Raises:
        VllmCommandError: no records, LoRA miniatures on different bases, an adapter whose rank cannot
            be read or is above 512, or a miniature whose answer format is not ``json`` (vLLM would get the
            agent's whole prompt, not the prompts it was trained on).
        miniatures.registry.MiniaturePathError: a record's adapter or base folder is missing or relative.
    """
    from miniatures.registry import check_miniature_paths

    if not records:
        raise VllmCommandError("no miniatures to serve; register one with `outreach finetune train`")
    for record in records:
        check_miniature_paths(record)
    split = [f"{r.name}@{r.version} ('{(r.training_config or {}).get('answer_format')}')" for r in records
             if str((r.training_config or {}).get("answer_format", "json")) != "json"]
    if split:
        raise VllmCommandError(
            f"{', '.join(split)} answer(s) in a format other than 'json': only the in-process backend builds their "
            "prompts from the agent's typed task (sentence prompts, a writer brief), vLLM would not; use them as "
            "miniature:<name> backends, or serve them with `outreach serve` and `openai:<name>@<url>#outreach`")
    lora = [r for r in records if r.method == "lora"]
    full = [r for r in records if r.method != "lora"]
    latest: dict[str, MiniatureRecord] = {}  # the plain-name alias goes to the highest version of each name
    for record in records:
        if record.name not in latest or record.version > latest[record.name].version:
            latest[record.name] = record
    commands: list[VllmCommand] = []
    if lora:
        bases = sorted({r.base_model for r in lora})
        if len(bases) > 1:
            detail = "; ".join(f"{b}: " + ", ".join(f"{r.name}@{r.version}" for r in lora if r.base_model == b)
                               for b in bases)
            raise VllmCommandError(
                f"the LoRA miniatures are on {len(bases)} different bases ({detail}); one vLLM process serves one "
                "base, so name the miniatures of one base per `outreach serve --engine vllm` (on its own --port)"
            )
        modules = [f"{_served_id(r, latest)}={r.adapter_path}" for r in lora]  # one entry (one slot) per adapter
        rank = vllm_lora_rank(max(adapter_rank(r.adapter_path) for r in lora))
        argv = [executable, "serve", bases[0], "--enable-lora", "--lora-modules", *modules,
                "--max-lora-rank", str(rank), "--max-loras", str(len(lora)), *_common(host, port, api_key, extra_args)]
        served = [m.partition("=")[0] for m in modules]
        commands.append(VllmCommand(argv=argv, model=bases[0], served=served, port=port))
    for record in full:
        next_port = port + len(commands)
        names = [f"{record.name}@{record.version}"] + ([record.name] if latest[record.name] is record else [])
        argv = [executable, "serve", record.adapter_path, "--served-model-name", *names,
                *_common(host, next_port, api_key, extra_args)]
        commands.append(VllmCommand(argv=argv, model=record.adapter_path, served=names, port=next_port))
    return commands
