"""Chat models served over HTTP: any OpenAI-compatible server, Ollama and vLLM (all via langchain-openai).

Ollama and vLLM both expose the OpenAI chat-completions API (``/v1``), so one client class serves
every remote backend and token usage comes back in the standard ``usage`` field, which
langchain-openai puts on ``AIMessage.usage_metadata``.

Credentials in a base URL (``http://user:KEY@host/v1``, ``?api_key=KEY``) never reach the client as
part of its URL, where httpx would log them: the URL is stripped, the userinfo is sent as HTTP Basic
credentials and the query with every request, through the client's own httpx clients.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from miniatures.redaction import install_log_redaction, redact, register_secret, split_url_credentials
from miniatures.specs import BackendSpec, BackendSpecError

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

__all__ = ["OLLAMA_DEFAULT_URL", "build_remote_chat_model"]

#: Where ``ollama serve`` listens by default (its OpenAI-compatible API).
OLLAMA_DEFAULT_URL = "http://127.0.0.1:11434/v1"


def build_remote_chat_model(
    spec: BackendSpec,
    *,
    temperature: float = 0.0,
    timeout_s: float = 60.0,
    max_retries: int = 2,
    api_key_env: str = "OPENAI_API_KEY",
) -> BaseChatModel:
    """Build a ``ChatOpenAI`` client for an ``openai:``, ``ollama:`` or ``vllm:`` spec.

    Args:
        spec: a parsed spec of kind ``openai``, ``ollama`` or ``vllm``.
        temperature: sampling temperature (0 = greedy, the default, so runs are repeatable).
        timeout_s: per-request timeout in seconds.
        max_retries: retries of failed requests by the OpenAI client (its own exponential backoff).
        api_key_env: environment variable holding the API key. A key is required for the public
            OpenAI API (no ``@base_url``); self-hosted servers get a placeholder when it is unset.

    Every credential the client is given (the key, a base URL's userinfo and secret-named query
    values) is registered with ``miniatures.redaction.register_secret``, and the HTTP stack's loggers
    get a ``RedactingFilter``, so an upstream error or log line that echoes one is masked.

    Raises:
        BackendSpecError: the spec is of another kind, its base URL cannot be parsed, or the OpenAI
            API is asked for without a key.
    """
    import openai
    from langchain_openai import ChatOpenAI

    if spec.kind not in ("openai", "ollama", "vllm"):
        raise BackendSpecError(f"{redact(spec.raw)!r} is not a remote backend (openai:, ollama:, vllm:)")
    base_url = spec.base_url or (OLLAMA_DEFAULT_URL if spec.kind == "ollama" else None)
    http_clients: dict[str, Any] = {}
    if base_url is not None:
        try:
            parts = split_url_credentials(base_url)
        except ValueError as exc:
            raise BackendSpecError(f"backend {redact(spec.raw)!r}: its base URL cannot be parsed ({exc}); "
                                   "write it as http://host:port/v1") from exc
        base_url = parts.url
        for secret in parts.secrets:
            register_secret(secret)
        if parts.auth is not None or parts.params:
            options: dict[str, Any] = {"auth": parts.auth, "params": list(parts.params)}
            http_clients = {"http_client": openai.DefaultHttpxClient(**options),
                            "http_async_client": openai.DefaultAsyncHttpxClient(**options)}
    api_key = os.environ.get(api_key_env)
    if api_key:
        register_secret(api_key)
    elif base_url is None:
        raise BackendSpecError(
            f"backend {redact(spec.raw)!r} calls the OpenAI API but ${api_key_env} is not set; export it, "
            "or point the spec at a self-hosted server: openai:<model>@http://127.0.0.1:8000/v1"
        )
    else:
        api_key = "not-needed"
    install_log_redaction()
    return ChatOpenAI(
        model=spec.model,
        base_url=base_url,
        api_key=api_key,  # type: ignore[arg-type]
        temperature=temperature,
        timeout=timeout_s,
        max_retries=max_retries,
        **http_clients,
    )
