"""The one function that turns a backend spec into a chat model (DESIGN.md, "The one interface")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from graphs.ratelimit import RateLimit, RateLimitedChatModel, StoreRateLimiter, limit_key
from miniatures.specs import BackendSpec, BackendSpecError, parse_backend_spec

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from sqlalchemy import Engine

__all__ = ["ModelPool", "build_chat_model"]


def build_chat_model(
    spec: str | BackendSpec, *, timeout_s: float = 60.0, store: Engine | None = None,
    engines: dict[str, Any] | None = None,
) -> BaseChatModel:
    """Build the chat model a backend spec names.

    Args:
        spec: ``heuristic``, ``openai:<model>[@<base_url>]``, ``ollama:<model>[@<base_url>]``,
            ``vllm:<adapter>@<base_url>`` (see ``miniatures.specs``).
        timeout_s: per-request timeout of remote backends, seconds.
        store: the store whose registry ``miniature:`` specs are looked up in.
        engines: loaded local engines by base model, shared between miniatures (see
            ``miniatures.local.build_miniature_chat_model``).

    Raises:
        BackendSpecError: the spec is malformed, or is a ``miniature:`` spec without a store.
        miniatures.registry.MiniatureNotFoundError: no such miniature is registered.
        miniatures.registry.MiniaturePathError: the registered adapter or base folder is gone or moved.
    """
    parsed = parse_backend_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "heuristic":
        from agents.heuristic import HeuristicChatModel

        return HeuristicChatModel()
    if parsed.kind in ("openai", "ollama", "vllm"):
        from miniatures.remote import build_remote_chat_model

        return build_remote_chat_model(parsed, timeout_s=timeout_s)
    if store is None:
        raise BackendSpecError(f"backend {parsed.raw!r} needs the store that registers miniatures")
    from miniatures.local import build_miniature_chat_model

    return build_miniature_chat_model(parsed, store, engines=engines)


class ModelPool:
    """Builds each backend spec's model once and hands the same instance to every run.

    Args:
        timeout_s: per-request timeout of remote backends, seconds.
        preloaded: models already built, by spec (a scripted fake chat model in tests, a local
            miniature shared by several campaigns).
        store: the store whose registry ``miniature:`` specs are looked up in, and where the slots of
            ``rate_limits`` are taken.
        rate_limits: limits by backend spec (``graphs.ratelimit.RateLimit``), shared through the store by every
            worker and process that uses it: each call of such a spec's model holds one slot. A preloaded or
            ``put`` model is not wrapped.
    """

    def __init__(self, timeout_s: float = 60.0, preloaded: Mapping[str, BaseChatModel] | None = None,
                 store: Engine | None = None, rate_limits: Mapping[str, RateLimit] | None = None) -> None:
        self.timeout_s = timeout_s
        self.store = store
        self.rate_limits = dict(rate_limits or {})
        self._models: dict[str, BaseChatModel] = dict(preloaded or {})
        self._engines: dict[str, Any] = {}

    def put(self, key: str, model: BaseChatModel) -> None:
        """Hand ``model`` out for ``key`` from now on (a key need not be a valid spec when it is put here)."""
        self._models[key] = model

    def get(self, spec: str) -> BaseChatModel:
        """Return the model for ``spec``, building it on first use (wrapped in a ``RateLimitedChatModel``
        when ``rate_limits`` names the spec).

        Raises:
            BackendSpecError: the spec is malformed, or it has a rate limit and the pool has no store.
        """
        if spec not in self._models:
            model = build_chat_model(spec, timeout_s=self.timeout_s, store=self.store, engines=self._engines)
            limit = self.rate_limits.get(spec)
            if limit is not None and not limit.unlimited:
                if self.store is None:
                    raise BackendSpecError(f"backend {limit_key(spec)!r} has a rate limit, which needs the store "
                                           "its workers share")
                # The timeout bounds one request; with the client's retries a call may take a few of them.
                limiter = StoreRateLimiter(self.store, limit_key(spec), limit, lease_s=self.timeout_s * 4)
                model = RateLimitedChatModel(inner=model, limiter=limiter)
            self._models[spec] = model
        return self._models[spec]
