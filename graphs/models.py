"""The one function that turns a backend spec into a chat model (DESIGN.md, "The one interface")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from miniatures.specs import BackendSpec, BackendSpecError, parse_backend_spec

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

__all__ = ["ModelPool", "build_chat_model"]


def build_chat_model(spec: str | BackendSpec, *, timeout_s: float = 60.0) -> BaseChatModel:
    """Build the chat model a backend spec names.

    Args:
        spec: ``heuristic``, ``openai:<model>[@<base_url>]``, ``ollama:<model>[@<base_url>]``,
            ``vllm:<adapter>@<base_url>`` (see ``miniatures.specs``).
        timeout_s: per-request timeout of remote backends, seconds.

    Raises:
        BackendSpecError: the spec is malformed, or names a kind this installation cannot build
            (``miniature:`` needs a registered miniature; see ``outreach miniatures list``).
    """
    parsed = parse_backend_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "heuristic":
        from agents.heuristic import HeuristicChatModel

        return HeuristicChatModel()
    if parsed.kind in ("openai", "ollama", "vllm"):
        from miniatures.remote import build_remote_chat_model

        return build_remote_chat_model(parsed, timeout_s=timeout_s)
    raise BackendSpecError(
        f"backend {parsed.raw!r}: no miniature named {parsed.model!r} is registered in this store; "
        "distil one first or pick another backend (heuristic, openai:<model>@<url>, ollama:<model>)"
    )


class ModelPool:
    """Builds each backend spec's model once and hands the same instance to every run.

    Args:
        timeout_s: per-request timeout of remote backends, seconds.
        preloaded: models already built, by spec (a scripted fake chat model in tests, a local
            miniature shared by several campaigns).
    """

    def __init__(self, timeout_s: float = 60.0, preloaded: Mapping[str, BaseChatModel] | None = None) -> None:
        self.timeout_s = timeout_s
        self._models: dict[str, BaseChatModel] = dict(preloaded or {})

    def get(self, spec: str) -> BaseChatModel:
        """Return the model for ``spec``, building it on first use. Raises ``BackendSpecError``."""
        if spec not in self._models:
            self._models[spec] = build_chat_model(spec, timeout_s=self.timeout_s)
        return self._models[spec]
