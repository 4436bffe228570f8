"""Backend specs: the strings that name a chat model (see DESIGN.md, "Words").

Grammar::

    heuristic
    openai:<model>[@<base_url>]      any OpenAI-compatible server (vLLM, Ollama, llama.cpp, LM Studio)
    ollama:<model>[@<base_url>]
    miniature:<name>[@<version>]     a registered miniature run in-process
    vllm:<adapter>@<base_url>
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKEND_KINDS", "BackendSpec", "BackendSpecError", "parse_backend_spec"]

BACKEND_KINDS = ("heuristic", "openai", "ollama", "miniature", "vllm")


class BackendSpecError(ValueError):
    """A backend spec string does not follow the grammar; the message shows the accepted forms."""


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec. ``raw`` is the original string (stored on traces as ``backend``)."""

    kind: str
    model: str = ""
    base_url: str | None = None
    version: int | None = None
    raw: str = ""


_FORMS = (
    "heuristic | openai:<model>[@<base_url>] | ollama:<model>[@<base_url>] | "
    "miniature:<name>[@<version>] | vllm:<adapter>@<base_url>"
)


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
        raise BackendSpecError(f"unknown backend spec {spec!r}; use one of: {_FORMS}")
    model, at, tail = rest.partition("@")
    if not model:
        raise BackendSpecError(f"backend spec {spec!r} names no model; use one of: {_FORMS}")
    if kind == "miniature":
        version = None
        if at:
            if not tail.isdigit() or int(tail) < 1:
                raise BackendSpecError(f"miniature version in {spec!r} must be a positive integer")
            version = int(tail)
        return BackendSpec(kind=kind, model=model, version=version, raw=raw)
    if kind == "vllm" and not tail:
        raise BackendSpecError(f"backend spec {spec!r} needs a base URL: vllm:<adapter>@http://host:8000/v1")
    return BackendSpec(kind=kind, model=model, base_url=tail or None, raw=raw)
