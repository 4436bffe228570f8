"""Chat models served over HTTP: any OpenAI-compatible server, Ollama and vLLM (all via langchain-openai).

Ollama and vLLM both expose the OpenAI chat-completions API (``/v1``), so one client class serves
every remote backend and token usage comes back in the standard ``usage`` field, which
langchain-openai puts on ``AIMessage.usage_metadata``.

Credentials in a base URL (``http://user:KEY@host/v1``, ``?api_key=KEY``) never reach the client as
part of its URL, where httpx would log them: the URL is stripped, the userinfo is sent as HTTP Basic
credentials and the query with every request, through the client's own httpx clients.

Every request carries its answer's grammar and explicit greedy settings (``GrammarChatOpenAI``): the agents
pass their typed task (``ainvoke(messages, task=task)``), which is turned into what the server kind understands
(``miniatures.grammar``); only the project's own server (``#outreach``) gets the task itself:

=============  ============================================================================================
server kind    the request carries
=============  ============================================================================================
``outreach``   what ``vllm`` gets, and the typed task itself in the extension field ``outreach_task``
               (``TASK_FIELD``: ``core.tasks.dump_task`` JSON, its ``kind`` ``"extraction"`` or ``"writing"``).
               The project's own server (``outreach serve``, ``miniatures.server``) answers through the
               miniature's answer format with it, as the in-process backend does: a ``sentence-tags``
               researcher or a ``writer-brief`` writer can only be served so (asked without a task, the server
               answers 400). vLLM logs the field as ignored and holds the answer to the grammar.
``vllm``       ``structured_outputs.grammar`` (the Lark grammar, llguidance dialect: vLLM's ``guidance``
               backend reads it; start vLLM with ``--structured-outputs-config.backend guidance``, or rely on
               its ``auto`` backend falling back to guidance when xgrammar cannot read the grammar) and
               ``repetition_penalty`` 1.0. The project's own server reads the same field and serves
               ``json``-format miniatures with it unchanged.
``llama.cpp``  ``grammar`` (the same Lark text, which starts ``%llguidance {}``: llama.cpp's server must be
               built with ``-DLLAMA_LLGUIDANCE=ON``; a build without it refuses the grammar rather than
               ignoring it) and ``repeat_penalty`` 1.0.
``openai``     ``response_format`` ``json_schema`` (strict; ``miniatures.grammar.json_schema``), which the
               OpenAI API, Ollama, LM Studio, vLLM and llama.cpp all accept.
``ollama``     as ``openai``.
=============  ============================================================================================

Every kind gets ``temperature`` 0 and ``top_p`` 1. The kind is ``vllm`` for ``vllm:`` specs, ``ollama`` for
``ollama:`` specs, ``openai`` for the public OpenAI API, and for ``openai:<model>@<url>`` the URL's fragment
names it: ``openai:m@http://127.0.0.1:8000/v1#outreach`` (the project's own server), ``...#llama.cpp``,
``...#vllm``, ``...#openai`` (the default without a fragment). A URL fragment is never sent to a server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from core.tasks import ExtractionTask, WritingTask, dump_task
from miniatures.grammar import answer_grammar, json_schema
from miniatures.redaction import install_log_redaction, redact, register_secret, split_url_credentials
from miniatures.specs import BackendSpec, BackendSpecError

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

__all__ = ["OLLAMA_DEFAULT_URL", "SERVER_KINDS", "TASK_FIELD", "build_remote_chat_model", "request_fields",
           "server_kind"]

#: Where ``ollama serve`` listens by default (its OpenAI-compatible API).
OLLAMA_DEFAULT_URL = "http://127.0.0.1:11434/v1"

#: What a server understands of grammars and decoding settings (see the module docstring).
SERVER_KINDS = ("openai", "vllm", "llama.cpp", "ollama", "outreach")

#: The request body's extension field that carries the typed task to the project's own server (``#outreach``):
#: ``core.tasks.dump_task`` JSON, read back there with ``core.tasks.load_task``.
TASK_FIELD = "outreach_task"


def server_kind(spec: BackendSpec) -> str:
    """The server kind of a remote spec: from its kind, or the ``#<kind>`` fragment of an ``openai:`` URL.

    Raises:
        BackendSpecError: the fragment names no known kind.
    """
    if spec.kind in ("vllm", "ollama"):
        return spec.kind
    fragment = urlsplit(spec.base_url).fragment if spec.base_url else ""
    if not fragment:
        return "openai"
    kind = fragment.lower()
    if kind not in SERVER_KINDS:
        raise BackendSpecError(f"backend {redact(spec.raw)!r}: the URL fragment #{fragment} names no server kind; "
                               f"use one of {', '.join('#' + k for k in SERVER_KINDS)}")
    return kind


def request_fields(kind: str, task: ExtractionTask | WritingTask | None,
                   extra_body: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The request fields a server of ``kind`` gets for ``task``: greedy settings and the answer's grammar.

    Args:
        kind: one of ``SERVER_KINDS``.
        task: the typed task of the call, or None (then only the decoding settings).
        extra_body: the call's own ``extra_body``, kept (its grammar, penalty and task fields are replaced).

    Returns:
        Keyword arguments for the OpenAI client's ``create``: ``top_p``, and ``extra_body`` and/or
        ``response_format``. Only ``outreach`` puts the task itself in the body (``TASK_FIELD``).
    """
    fields: dict[str, Any] = {"top_p": 1.0}
    body = dict(extra_body or {})
    if kind in ("vllm", "outreach"):
        body["repetition_penalty"] = 1.0
        if task is not None:
            body["structured_outputs"] = {"grammar": answer_grammar(task)}
            if kind == "outreach":
                body[TASK_FIELD] = dump_task(task)
    elif kind == "llama.cpp":
        body["repeat_penalty"] = 1.0
        if task is not None:
            body["grammar"] = answer_grammar(task)
    elif task is not None:
        fields["response_format"] = {"type": "json_schema", "json_schema": json_schema(task)}
    if body:
        fields["extra_body"] = body
    return fields


def _without_fragment(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(fragment="")) if parts.fragment else url


_GRAMMAR_CLIENT: type | None = None


def _grammar_client_class() -> type:
    """``GrammarChatOpenAI``, made on first use (langchain-openai is imported lazily)."""
    global _GRAMMAR_CLIENT
    if _GRAMMAR_CLIENT is not None:
        return _GRAMMAR_CLIENT
    from langchain_openai import ChatOpenAI

    class GrammarChatOpenAI(ChatOpenAI):
        """``ChatOpenAI`` that turns a call's ``task`` into its server kind's fields (``request_fields``).

        The task itself is sent to the ``outreach`` kind only. ``server_kind`` is one of ``SERVER_KINDS``.
        """

        server_kind: str = "openai"

        def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any) -> dict:
            task = kwargs.pop("task", None)
            if task is not None and not isinstance(task, ExtractionTask | WritingTask):
                raise TypeError(f"task must be a core.tasks.ExtractionTask or WritingTask, got {type(task).__name__}")
            body = {**(self.extra_body or {}), **(kwargs.pop("extra_body", None) or {})}
            kwargs.update(request_fields(self.server_kind, task, body))
            payload: dict = super()._get_request_payload(input_, stop=stop, **kwargs)
            return payload

    _GRAMMAR_CLIENT = GrammarChatOpenAI
    return GrammarChatOpenAI


def build_remote_chat_model(
    spec: BackendSpec,
    *,
    temperature: float = 0.0,
    timeout_s: float = 60.0,
    max_retries: int = 2,
    api_key_env: str = "OPENAI_API_KEY",
    max_tokens: int | None = None,
) -> BaseChatModel:
    """Build a ``ChatOpenAI`` client (``GrammarChatOpenAI``) for an ``openai:``, ``ollama:`` or ``vllm:`` spec.

    Args:
        spec: a parsed spec of kind ``openai``, ``ollama`` or ``vllm``.
        temperature: sampling temperature (0 = greedy, the default, so runs are repeatable).
        timeout_s: per-request timeout in seconds.
        max_retries: retries of failed requests by the OpenAI client (its own exponential backoff).
        api_key_env: environment variable holding the API key. A key is required for the public
            OpenAI API (no ``@base_url``); self-hosted servers get a placeholder when it is unset.
        max_tokens: cap on completion tokens per request (None: the server's default).

    Every credential the client is given (the key, a base URL's userinfo and secret-named query
    values) is registered with ``miniatures.redaction.register_secret``, and the HTTP stack's loggers
    get a ``RedactingFilter``, so an upstream error or log line that echoes one is masked. The client's
    server kind (``server_kind``) decides which grammar and decoding fields each request carries.

    Raises:
        BackendSpecError: the spec is of another kind, its base URL cannot be parsed or names an unknown
            server kind, or the OpenAI API is asked for without a key.
    """
    import openai

    if spec.kind not in ("openai", "ollama", "vllm"):
        raise BackendSpecError(f"{redact(spec.raw)!r} is not a remote backend (openai:, ollama:, vllm:)")
    kind = server_kind(spec)
    base_url = spec.base_url or (OLLAMA_DEFAULT_URL if spec.kind == "ollama" else None)
    # The client's own HTTP clients: langchain-openai otherwise shares one async client per base URL across the
    # process, bound to the first event loop that used it, so a second ``asyncio.run`` fails every request
    # ("Event loop is closed").
    options: dict[str, Any] = {}
    if base_url is not None:
        base_url = _without_fragment(base_url)
        try:
            parts = split_url_credentials(base_url)
        except ValueError as exc:
            raise BackendSpecError(f"backend {redact(spec.raw)!r}: its base URL cannot be parsed ({exc}); "
                                   "write it as http://host:port/v1") from exc
        base_url = parts.url
        for secret in parts.secrets:
            register_secret(secret)
        if parts.auth is not None or parts.params:
            options = {"auth": parts.auth, "params": list(parts.params)}
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
    client: BaseChatModel = _grammar_client_class()(
        server_kind=kind,
        model=spec.model,
        base_url=base_url,
        api_key=api_key,
        temperature=temperature,
        timeout=timeout_s,
        max_retries=max_retries,
        max_tokens=max_tokens,
        **http_clients,
    )
    return client
