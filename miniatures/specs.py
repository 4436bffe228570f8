"""Backend specs: the strings that name a chat model (see DESIGN.md, "Words").

Grammar::

    heuristic
    openai:<model>[@<base_url>]      any OpenAI-compatible server (vLLM, Ollama, llama.cpp, LM Studio)
    ollama:<model>[@<base_url>]
    miniature:<name>[@<version>]     a registered miniature run in-process
    vllm:<adapter>@<base_url>

A base URL may carry credentials: ``http://user:KEY@host/v1`` (sent as HTTP Basic credentials) or
query parameters such as ``?api_key=KEY`` (sent with every request). Specs are stored, printed and
logged only through ``miniatures.redaction.redact``, which masks them.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import UserError
from miniatures.redaction import redact

__all__ = ["BACKEND_KINDS", "BackendSpec", "BackendSpecError", "parse_backend_spec"]

BACKEND_KINDS = ("heuristic", "openai", "ollama", "miniature", "vllm")


class BackendSpecError(UserError, ValueError):
    """A backend spec string does not follow the grammar; the message shows the accepted forms."""


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec. ``raw`` is the original string, credentials included: store and show
    ``redact(raw)`` (as traces' ``backend`` and runs' ``researcher``/``writer`` are)."""

    kind: str
    model: str = ""
    base_url: str | None = None
    version: int | None = None
    raw: str = ""


_FORMS = (
    "heuristic | openai:<model>[@<base_url>] | ollama:<model>[@<base_url>] | "
    "miniature:<name>[@<version>] | vllm:<adapter>@<base_url>"
)


def _shown(spec: str) -> str:
    """``spec`` as error messages quote it: credentials masked."""
    return repr(redact(spec))


def parse_backend_spec(spec: str) -> BackendSpec:
    """Parse ``spec`` into a ``BackendSpec``.

    Raises:
        BackendSpecError: unknown kind, missing model name, a ``vllm:`` spec without a base URL, or
            a ``miniature:`` version that is not a positive integer.
    """
    raw = spec.strip()
    if raw == "heuristic":
        return BackendSpec(kind="heuristic", raw=raw)
    kind, sep, rest = raw.partition(":")
    if not sep or kind not in BACKEND_KINDS or kind == "heuristic":
        raise BackendSpecError(f"unknown backend spec {_shown(spec)}; use one of: {_FORMS}")
    model, at, tail = rest.partition("@")
    if not model:
        raise BackendSpecError(f"backend spec {_shown(spec)} names no model; use one of: {_FORMS}")
    if kind == "miniature":
        version = None
        if at:
            if not tail.isdigit() or int(tail) < 1:
                raise BackendSpecError(f"miniature version in {_shown(spec)} must be a positive integer")
            version = int(tail)
        return BackendSpec(kind=kind, model=model, version=version, raw=raw)
    if kind == "vllm" and not tail:
        raise BackendSpecError(f"backend spec {_shown(spec)} needs a base URL: vllm:<adapter>@http://host:8000/v1")
    return BackendSpec(kind=kind, model=model, base_url=tail or None, raw=raw)
