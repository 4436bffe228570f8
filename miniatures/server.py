"""An OpenAI-compatible HTTP server over registered miniatures (FastAPI + uvicorn), the CPU twin of vLLM.

Endpoints (the subset of the OpenAI API that the campaign's ``openai:<model>@<base_url>`` backend uses):

- ``POST /v1/chat/completions``: non-streaming, and ``"stream": true`` as server-sent events
  (``data: {chat.completion.chunk}`` lines ending with ``data: [DONE]``, as OpenAI and vLLM send them);
- ``GET /v1/models``: every served miniature as ``<name>@<version>`` and its plain ``<name>`` alias (the
  highest served version of that name), each with ``"parent"`` (its base model) and ``"root"`` (its adapter
  folder), the way vLLM lists ``--lora-modules``, and in ``"metadata"`` its ``answer_format`` and the ``task``
  kind a request must carry for it (``"extraction"``, ``"writing"``, or null: none needed; see "Typed tasks");
- ``GET /health``: 200 when the server is up (no API key needed, like vLLM's).

The request's ``model`` picks the miniature. A pinned version can also be asked for as ``<name>:<version>``,
because a backend spec ``openai:<model>@<base_url>`` splits at the first ``@``
(``openai:writer:2@http://127.0.0.1:8000/v1``).

Generation goes through ``miniatures.local.LocalEngine``: LoRA miniatures on one base share one engine (one
copy of the base weights, adapters switched per request in mixed-adapter batches), so concurrent requests are
batched by the engine's dynamic batcher (``max_batch_size`` requests, ``batch_window_ms`` wait window).
Decoding is the request's: ``temperature`` 0 or absent is greedy (whatever the miniature's own default), a
``temperature > 0`` samples with ``top_p``, ``min_p`` and ``seed`` per row (``miniatures.sampling``; without a seed, one
from the prompt, so the same request gets the same answer); ``repetition_penalty`` other than 1 is refused
with a 400 rather than silently ignored. ``stop`` cuts the answer at the first stop string, as the in-process
backend does.

Constrained answers, as vLLM takes them: ``structured_outputs`` ``{"grammar": <Lark>}`` (the llguidance dialect
``miniatures.grammar`` writes), ``{"json": <schema>}`` or ``{"choice": [...]}``, or ``response_format``
``{"type": "json_schema", "json_schema": {"schema": ...}}`` / ``{"type": "json_object"}``; the answer is held to
it by the engine's llguidance token masks. A grammar that does not compile is a 400 (``param`` names the field).

Typed tasks (this server's extension, sent by ``openai:<name>@<url>#outreach`` backends, ``miniatures.remote``):
``outreach_task`` in the body holds the agent's typed task as ``core.tasks.dump_task`` JSON (``"kind":
"extraction"`` or ``"writing"``), read with ``core.tasks.load_task``; one that does not load is a 400 with
``param: "outreach_task"`` and ``code: "invalid_task"`` naming what is wrong. With a task the miniature answers
through its answer format exactly as the in-process ``miniature:<name>`` backend does with the same task
(``LocalMiniatureChatModel.answer``): a ``sentence-tags`` researcher answers one short prompt per numbered
sentence and the extraction JSON is assembled, a ``writer-brief`` writer gets the brief rendered from the
writing task and its offer tags written out, a ``json`` miniature the messages under its task's grammar. The
task decides the grammar then: a ``structured_outputs.grammar`` equal to the task's own answer grammar
(``miniatures.grammar.answer_grammar``, what ``#outreach`` clients send alongside, so that vLLM behind such a URL
still holds the answer to it) is redundant; any other constraint given with a task is a 400. A miniature whose
format builds its prompts from the task (``sentence-tags``, ``writer-brief``) asked without one, or with a task
of the other kind, gets a 400 (``param: "outreach_task"``, ``code: "task_required"`` or ``"invalid_task"``) that
names the format and the fix, never an answer to a prompt it was not trained on. Requests without a task
(``vllm:`` specs, ``#vllm``, plain OpenAI clients) are served as before by ``json``-format miniatures.

Streaming: the engine generates whole answers in batches, so a stream sends the ``role`` chunk at once, then,
when the answer is ready, its text in word-sized chunks, the final chunk with ``finish_reason`` and, with
``stream_options.include_usage``, a usage chunk. Time to first content token therefore equals the whole
generation time; streaming exists for clients that only speak streaming. (transformers'
``TextIteratorStreamer`` would stream token by token but only for one request per ``generate`` call,
giving up batching.) A client that disconnects while its request waits is dropped: its queued request is
cancelled before it reaches the model, and the others are not held up.

With ``repair_json`` on (the default), an answer goes through ``miniatures.local.repair_json`` exactly as the
in-process ``miniature:<name>`` backend does, so that a campaign against the server gives the same outputs
as the in-process backend (vLLM does no such repair).

Errors are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``: 400 invalid body (bad JSON,
JSON nested deeper than Python's recursion limit, a missing or ill-typed field, unsupported options such as
``n > 1`` or ``tools``), a ``max_tokens`` (or ``max_completion_tokens``) over ``max_tokens_cap`` (``param``
names the field; refused, not clamped, as OpenAI refuses a ``max_tokens`` over a model's limit, so a client never
mistakes a cut answer for the model's own end) or a prompt longer than ``max_prompt_tokens`` or the model's
context (``code: "context_length_exceeded"``, as OpenAI), 400 a ``Host`` header this server does not answer for
(``code: "host_not_allowed"``), 401 missing or wrong API key (``Authorization: Bearer <key>``), 404 unknown
model (``code: "model_not_found"``) or route, 413 a request body over ``max_body_bytes``, 415 a body that is not
``Content-Type: application/json``, 500 (``type: "server_error"``) a bug.

Guards, so that a keyless server on loopback cannot be driven from a web page the user visits:

- the ``Host`` header must be ``host[:port]`` (RFC 9110 section 7.2 over RFC 3986 section 3.2.2: no userinfo,
  IPv6 in brackets) naming a loopback name (``localhost``, ``127.0.0.1``, ``::1``), the address the connection
  arrived at, or one of ``allowed_hosts`` (``"*"``: any): a DNS-rebinding page's own host name is refused;
- ``POST`` bodies must be ``application/json``: a cross-site "simple" POST (``text/plain``, a form) is refused
  with 415 before anything runs, and a browser sends ``application/json`` cross-site only after a CORS
  preflight, which this server never grants;
- no OpenAPI schema or docs pages are served (``/openapi.json``, ``/docs`` are 404).

JSON parsing, validation and the count of the prompt's tokens (chat template and tokenizer) run in a worker thread
(``asyncio.to_thread``), so a multi-megabyte prompt does not stall ``/health`` or other requests; only a prompt
that fits the limit reaches the engine (which tokenises it again, on the loop, in time bounded by the context). A
long request holds the requests batched with or queued behind it for as long as it generates (the engine decodes
a batch to its longest request), so ``max_tokens_cap`` bounds that wait. A client that disconnects, while its body
is uploading, while it waits for its answer or during its stream, is logged as one info line, without a traceback.

The server binds to 127.0.0.1 by default and refuses to start on any other address without an API key.

Heavy imports (fastapi, uvicorn, torch) happen inside functions: importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import UserError
from core.tasks import ExtractionTask, WritingTask, load_task
from miniatures.formats import WRITER_BRIEF
from miniatures.grammar import GrammarError, answer_grammar
from miniatures.local import BASE_ADAPTER, Generation, LocalEngine, LocalMiniatureChatModel, repair_json
from miniatures.registry import get_miniature, list_miniatures
from miniatures.remote import TASK_FIELD
from miniatures.sampling import RowSampling, prompt_seed
from miniatures.specs import parse_backend_spec

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy import Engine

    from store.models import MiniatureRecord

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_TOKENS_CAP",
    "DEFAULT_PORT",
    "LOOPBACK_NAMES",
    "InsecureBindError",
    "RunningServer",
    "ChatCompletionRequest",
    "ServedModel",
    "TASK_FORMATS",
    "check_bind",
    "create_app",
    "is_loopback",
    "load_served_models",
    "parse_host",
    "run_server",
    "select_records",
    "serve_in_thread",
]

logger = logging.getLogger(__name__)

#: Default bind address: loopback only.
DEFAULT_HOST = "127.0.0.1"
#: Default port (vLLM's).
DEFAULT_PORT = 8000
#: Default cap on a request body, bytes.
DEFAULT_MAX_BODY_BYTES = 4_000_000
#: Default cap on a request's ``max_tokens``: the default ``max_new_tokens`` of served engines, the longest an
#: agent's answer is configured for.
DEFAULT_MAX_TOKENS_CAP = 512
#: Host names a loopback server always answers for.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Answer formats whose prompts are built from the typed task (``miniatures.formats``), and the task kind each
#: needs in ``outreach_task``.
TASK_FORMATS = {"sentence-tags": "extraction", WRITER_BRIEF: "writing"}

_ROLES = {"system", "user", "assistant", "developer"}
_WORDS = re.compile(r"\s*\S+\s*|\s+")
# RFC 9110 section 7.2: Host = uri-host [ ":" port ]; RFC 3986 section 3.2.2: host = IP-literal / IPv4address /
# reg-name (IPv4address is a reg-name too), reg-name = *( unreserved / pct-encoded / sub-delims ), port = *DIGIT.
_HOST = re.compile(r"(?:\[(?P<literal>[0-9A-Fa-f:.]+)\]|(?P<name>(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+))"
                   r"(?::(?P<port>[0-9]*))?")


class InsecureBindError(UserError, ValueError):
    """The server was asked to listen on a non-loopback address without an API key."""


def parse_host(value: str) -> tuple[str, int | None]:
    """Parse an HTTP ``Host`` header strictly: ``host[:port]`` (RFC 9110 section 7.2, RFC 3986 section 3.2.2).

    A userinfo part (``evil.example@127.0.0.1``), a path, spaces, an IPv6 address without brackets, an IPvFuture
    literal or a port over 65535 make it invalid; a URL parser would instead read the host after the ``@``.

    Args:
        value: the header's value, e.g. ``"127.0.0.1:8000"``, ``"[::1]:8000"``, ``"localhost"``.

    Returns:
        ``(host, port)``: the host lower-cased (an IPv6 address without its brackets), and the port, or None when
        the header gives none.

    Raises:
        ValueError: ``value`` is not ``host[:port]``.
    """
    match = _HOST.fullmatch(value)
    if match is None:
        raise ValueError(f"Host header {value!r} is not host[:port]")
    host = match["name"] or match["literal"]
    if match["literal"] is not None:
        try:
            host = str(ipaddress.IPv6Address(match["literal"]))
        except ValueError as exc:
            raise ValueError(f"Host header {value!r} has no IPv6 address in its brackets") from exc
    port = int(match["port"]) if match["port"] else None
    if port is not None and port > 65535:
        raise ValueError(f"Host header {value!r} has a port over 65535")
    return host.lower(), port


# ---------------------------------------------------------------------- what is served


@dataclass(frozen=True)
class ServedModel:
    """One miniature the server answers for.

    Attributes:
        name: the miniature's registered name (the alias clients may use for the latest served version).
        version: its registered version.
        engine: the ``LocalEngine`` that runs it (shared by LoRA miniatures on the same base).
        adapter: its adapter name on ``engine``, or ``BASE_ADAPTER`` for a fully fine-tuned miniature,
            which runs as its engine's base model.
        parent: the base model it was trained from (``"parent"`` in ``/v1/models``).
        root: its adapter (or fine-tuned model) folder (``"root"`` in ``/v1/models``).
        created: registration time, Unix seconds.
        chat: its chat model, which answers in the miniature's answer format (``miniatures.formats``);
            None: the engine answers the messages as they are.
    """

    name: str
    version: int
    engine: LocalEngine
    adapter: str
    parent: str
    root: str
    created: int = 0
    chat: LocalMiniatureChatModel | None = None

    @property
    def id(self) -> str:
        """``<name>@<version>``, the model id clients see."""
        return f"{self.name}@{self.version}"


def _parse_selector(selector: str) -> tuple[str, int | None]:
    """``name``, ``name@3`` or ``name:3`` -> ``(name, version or None)``; raises ``ValueError``."""
    text = selector.strip()
    for sep in ("@", ":"):
        name, found, tail = text.partition(sep)
        if found:
            if not name or not tail.isdigit() or int(tail) < 1:
                raise ValueError(f"miniature {selector!r} is not <name>, <name>@<version> or <name>:<version>")
            return name, int(tail)
    if not text:
        raise ValueError("an empty miniature name was given; name a registered miniature")
    return text, None


def select_records(store: Engine, selectors: Sequence[str] = ()) -> list[MiniatureRecord]:
    """The registry records to serve: the named ones, or the latest version of every registered name.

    Args:
        store: the store holding the registry.
        selectors: ``name`` (latest version), ``name@version`` or ``name:version``; empty for all names.

    Returns:
        Records ordered by name then version, without duplicates.

    Raises:
        ValueError: a selector is malformed, or nothing is registered when no selector is given.
        MiniatureNotFoundError: a named miniature is not registered.
    """
    if selectors:
        found = [get_miniature(store, *_parse_selector(s)) for s in selectors]
    else:
        latest: dict[str, MiniatureRecord] = {}
        for record in list_miniatures(store):
            if record.name not in latest or record.version > latest[record.name].version:
                latest[record.name] = record
        found = list(latest.values())
        if not found:
            raise ValueError(
                "no miniature is registered in this store; distil one with `outreach finetune train`, "
                "or point --store at the store that holds them"
            )
    unique = {(r.name, r.version): r for r in found}
    return [unique[key] for key in sorted(unique)]


def load_served_models(
    store: Engine,
    selectors: Sequence[str] = (),
    *,
    engines: dict[str, LocalEngine] | None = None,
    device: str | None = None,
    dtype: Any = None,
    max_new_tokens: int = 512,
    num_threads: int | None = None,
) -> list[ServedModel]:
    """Load registered miniatures into local engines, ready for ``create_app``.

    LoRA miniatures on the same base share one engine (``miniatures.local.build_miniature_chat_model``);
    a fully fine-tuned one gets an engine of its own.

    Args:
        store: the store holding the registry.
        selectors: what to serve (see ``select_records``); empty: the latest version of every name.
        engines: engines already loaded (by base model or model folder); new ones are added to it.
        device: device of new engines (``None``: CUDA when available, else CPU).
        dtype: dtype of new engines (``None``: bfloat16 on CUDA, float32 on CPU).
        max_new_tokens: default cap on generated tokens when a request gives no ``max_tokens``.
        num_threads: torch CPU threads (see ``LocalEngine``).

    Returns:
        One ``ServedModel`` per record, ordered by name then version.

    Raises:
        ValueError: a malformed selector, or an empty registry.
        MiniatureNotFoundError: a named miniature is not registered.
        miniatures.local.AdapterPathError: a registered adapter folder is gone.
    """
    from miniatures.local import build_miniature_chat_model

    pool = engines if engines is not None else {}
    served: list[ServedModel] = []
    for record in select_records(store, selectors):
        chat = build_miniature_chat_model(
            parse_backend_spec(f"miniature:{record.name}@{record.version}"), store, engines=pool, device=device,
            dtype=dtype, max_new_tokens=max_new_tokens, num_threads=num_threads,
        )
        created = int(record.created_at.timestamp()) if getattr(record, "created_at", None) else 0
        served.append(ServedModel(
            name=record.name, version=record.version, engine=chat.engine, adapter=chat.adapter,
            parent=record.base_model, root=record.adapter_path, created=created, chat=chat,
        ))
    logger.info("loaded %d miniature(s) on %d engine(s)", len(served), len({id(m.engine) for m in served}))
    return served


# ---------------------------------------------------------------------- request schema


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[_ContentPart] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _StructuredOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grammar: str | None = Field(None, min_length=1)
    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    choice: list[str] | None = Field(None, min_length=1)


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (OpenAI's fields, vLLM's ``structured_outputs`` and this server's
    ``outreach_task``, the typed task; unknown extra fields are ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)  # vLLM's extra sampling parameter of the same name
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0)
    structured_outputs: _StructuredOutputs | None = None
    response_format: _ResponseFormat | None = None
    outreach_task: Any = None  # ``TASK_FIELD``: checked by ``request_task``, so its errors name the field


def request_grammar(request: ChatCompletionRequest) -> tuple[str | None, str | None]:
    """The Lark grammar a request asks its answer to follow, and the field it came from (``(None, None)``: free).

    Raises:
        _APIError: 400 for two constraints at once, or a ``response_format`` type other than ``text``,
            ``json_object`` and ``json_schema``.
    """
    found: list[tuple[str, str]] = []
    so = request.structured_outputs
    if so is not None:
        if so.grammar is not None:
            found.append((so.grammar, "structured_outputs.grammar"))
        if so.json_schema is not None:
            schema = so.json_schema if isinstance(so.json_schema, str) else json.dumps(so.json_schema)
            found.append((f"start: %json {schema}\n", "structured_outputs.json"))
        if so.choice is not None:
            found.append(("start: " + " | ".join(json.dumps(c) for c in so.choice) + "\n", "structured_outputs.choice"))
    rf = request.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append(('start: %json {"type": "object"}\n', "response_format"))
        elif rf.type == "json_schema" and rf.json_schema is not None and "schema" in rf.json_schema:
            found.append((f"start: %json {json.dumps(rf.json_schema['schema'])}\n", "response_format"))
        else:
            raise _APIError(400, f"response_format type {rf.type!r} is not supported; use text, json_object or "
                                 "json_schema with a schema", param="response_format")
    if len(found) > 1:
        raise _APIError(400, f"the request gives {len(found)} answer constraints ({', '.join(f for _g, f in found)}); "
                             "give one", param=found[1][1])
    return found[0] if found else (None, None)


_KIND_ARTICLE = {"extraction": "an extraction", "writing": "a writing"}
_JSON_TYPES = {str: "a string", list: "an array", bool: "a boolean", int: "a number", float: "a number"}


def request_task(request: ChatCompletionRequest) -> ExtractionTask | WritingTask | None:
    """The typed task a request carries in ``outreach_task`` (``core.tasks.dump_task`` JSON), or None (absent or null).

    Raises:
        _APIError: 400 (``param: "outreach_task"``, ``code: "invalid_task"``) for a value that is not a JSON object,
            or an object that is not a task of a known kind; the message names the first wrong part.
    """
    data = request.outreach_task
    if data is None:
        return None
    if not isinstance(data, dict):
        raise _APIError(400, f"{TASK_FIELD} must be a JSON object, the typed task as core.tasks.dump_task writes it, "
                             f"not {_JSON_TYPES.get(type(data), 'that')}; send the task with an "
                             "openai:<name>@<url>#outreach backend", param=TASK_FIELD, code="invalid_task")
    try:
        return load_task(data)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        loc = ".".join(str(part) for part in first.get("loc", ()))
        where = f"{TASK_FIELD}.{loc}" if loc else TASK_FIELD
        raise _APIError(400, f"{TASK_FIELD} is not a typed task: {where}: {first.get('msg', 'invalid')}; send an "
                             "extraction or writing task as core.tasks.dump_task writes it", param=TASK_FIELD,
                        code="invalid_task") from exc
    except RecursionError as exc:
        raise _APIError(400, f"{TASK_FIELD} is nested too deeply to be a typed task; send core.tasks.dump_task JSON",
                        param=TASK_FIELD, code="invalid_task") from exc


def _answer_format(model: ServedModel) -> str:
    return model.chat.answer_format if model.chat is not None else "json"


def check_task(model: ServedModel, task: ExtractionTask | WritingTask | None, base_url: str) -> None:
    """Refuse a request whose miniature's answer format needs a typed task it does not carry (``TASK_FORMATS``).

    Args:
        model: the requested miniature.
        task: the request's task (``request_task``).
        base_url: this server's ``/v1`` URL as the client reached it, for the fix the message names.

    Raises:
        _APIError: 400 ``code: "task_required"`` for no task, ``"invalid_task"`` for a task of the other kind.
    """
    answer_format = _answer_format(model)
    needed = TASK_FORMATS.get(answer_format)
    if needed is None or (task is not None and task.kind == needed):
        return
    backend = f"openai:{model.name}@{base_url}#outreach"
    if task is None:
        raise _APIError(400, f"miniature {model.id} answers in the '{answer_format}' format, whose prompts are built "
                             f"from the agent's typed {needed} task, and this request carries none ({TASK_FIELD}); "
                             f"send the task: use the backend {backend}", param=TASK_FIELD, code="task_required")
    agent = {"extraction": "researcher", "writing": "writer"}[task.kind]
    raise _APIError(400, f"miniature {model.id} answers in the '{answer_format}' format, which needs "
                         f"{_KIND_ARTICLE[needed]} task; {TASK_FIELD} is {_KIND_ARTICLE[task.kind]} task (the "
                         f"{agent}'s): send it to a {agent} miniature", param=TASK_FIELD, code="invalid_task")


# ---------------------------------------------------------------------- errors


class _APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_error(exc: ValidationError) -> _APIError:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return _APIError(400, f"invalid request body: {loc or 'body'}: {first.get('msg', 'invalid')}",
                     param=loc or None, code="invalid_value")


# ---------------------------------------------------------------------- the app


@dataclass(frozen=True)
class _Asked:
    """A checked request: the miniature, its messages, its ``max_tokens``, the request's own grammar (None: the
    task's or free) and its typed task."""

    model: ServedModel
    chat: list[dict[str, str]]
    max_new: int | None
    grammar: str | None
    task: ExtractionTask | WritingTask | None


def _chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """OpenAI messages -> ``[{"role", "content"}]`` as ``LocalMiniatureChatModel`` builds them (text only)."""
    chat: list[dict[str, str]] = []
    for i, message in enumerate(request.messages):
        if message.role not in _ROLES:
            raise _APIError(400, f"messages[{i}].role {message.role!r} is not supported; use system, user or "
                                 "assistant (tool messages and function calls are not supported by miniatures)",
                            param=f"messages.{i}.role")
        content = message.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise _APIError(400, f"messages[{i}] has a non-text content part; miniatures read text only",
                                param=f"messages.{i}.content")
            content = "".join(p.text or "" for p in content)
        chat.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
    return chat


def _check_options(request: ChatCompletionRequest, max_tokens_cap: int | None) -> None:
    if request.n not in (None, 1):
        raise _APIError(400, f"n={request.n}: this server gives one answer per request; send n=1", param="n")
    if request.tools or request.functions:
        raise _APIError(400, "tools and function calling are not supported by this server; send plain messages",
                        param="tools")
    if request.logprobs:
        raise _APIError(400, "logprobs are not supported by this server", param="logprobs")
    if request.repetition_penalty not in (None, 1.0):
        raise _APIError(400, f"repetition_penalty {request.repetition_penalty}: miniatures are served with plain "
                             "greedy decoding; send 1.0 (or leave it out)", param="repetition_penalty")
    stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stops) > 4:
        raise _APIError(400, f"stop has {len(stops)} strings; give at most 4", param="stop")
    if max_tokens_cap is None:
        return
    for name in ("max_tokens", "max_completion_tokens"):
        asked = getattr(request, name)
        if asked is not None and asked > max_tokens_cap:
            raise _APIError(400, f"{name} is too large: {asked}. This server makes at most {max_tokens_cap} "
                                 f"completion tokens per request (its --max-tokens-cap); ask for {max_tokens_cap} "
                                 "or fewer", param=name, code="invalid_value")


def _cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def _usage(generation: Generation) -> dict[str, int]:
    return {"prompt_tokens": generation.input_tokens, "completion_tokens": generation.output_tokens,
            "total_tokens": generation.input_tokens + generation.output_tokens}


def _parse_body(raw: bytes) -> ChatCompletionRequest:
    """A request body -> ``ChatCompletionRequest`` (blocking: run it off the event loop).

    Raises:
        _APIError: 400 for bytes that are not JSON, JSON nested too deeply to parse, or an invalid request.
    """
    try:
        payload = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _APIError(400, f"request body is not valid JSON ({exc}); send a JSON object",
                        code="invalid_json") from exc
    except RecursionError as exc:
        raise _APIError(400, "request body is JSON nested too deeply to parse; send a chat-completions object "
                             "(messages are a flat list)", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise _APIError(400, "request body must be a JSON object with 'model' and 'messages'", code="invalid_value")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    except RecursionError as exc:
        raise _APIError(400, "request body is nested too deeply to validate; send a chat-completions object",
                        code="invalid_value") from exc


def _host_refusal(scope: dict[str, Any], allowed_hosts: frozenset[str]) -> str | None:
    """Why this request's ``Host`` header is refused, or None when the server answers for it.

    Accepted: a loopback name, the address the connection arrived at (``scope["server"]``), a name in
    ``allowed_hosts``, anything when ``allowed_hosts`` holds ``"*"``; always exactly one header, ``host[:port]``.
    """
    values = [value.decode("latin-1") for key, value in scope.get("headers", ()) if key == b"host"]
    server = scope.get("server") or ("127.0.0.1", DEFAULT_PORT)
    own = f"{server[0]}:{server[1]}" if ":" not in str(server[0]) else f"[{server[0]}]:{server[1]}"
    if len(values) != 1:
        return f"a request needs exactly one Host header, this one has {len(values)}; send Host: {own}"
    try:
        host, _port = parse_host(values[0])
    except ValueError as exc:
        return f"{exc}; send Host: {own}"
    if "*" in allowed_hosts or host in allowed_hosts or host in LOOPBACK_NAMES or host == str(server[0]).lower():
        return None
    return (f"this server does not answer for host {host!r} (a page on another site may be trying to reach it); "
            f"connect to http://{own}, or start the server with --allowed-host {host}")


class _HostGuard:
    """ASGI middleware that answers 400 (OpenAI-style) to a ``Host`` header the server does not answer for."""

    def __init__(self, app: Any, allowed_hosts: frozenset[str], stats: dict[str, int]) -> None:
        from starlette.responses import JSONResponse

        self.app = app
        self.allowed_hosts = allowed_hosts
        self.stats = stats
        self._response = JSONResponse

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        refusal = _host_refusal(scope, self.allowed_hosts) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        self.stats["errors"] += 1
        logger.warning("refused a request: %s", refusal)
        error = _APIError(400, refusal, code="host_not_allowed")
        await self._response(error.body(), status_code=400)(scope, receive, send)


def create_app(
    models: Sequence[ServedModel],
    *,
    api_key: str | None = None,
    max_prompt_tokens: int | None = None,
    max_tokens_cap: int | None = DEFAULT_MAX_TOKENS_CAP,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch_size: int | None = None,
    batch_window_ms: float | None = None,
    repair_json_output: bool = True,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """Build the FastAPI app that serves ``models`` over the OpenAI chat-completions API.

    Args:
        models: what to serve (``load_served_models``); ids ``<name>@<version>`` must be unique.
        api_key: when set, every ``/v1`` request must send ``Authorization: Bearer <api_key>`` (else 401).
        max_prompt_tokens: longest accepted prompt, in tokens of the chat-templated prompt; ``None``: the
            model's context length only. Longer prompts get a 400 ``context_length_exceeded``.
        max_tokens_cap: most completion tokens one request may ask for (``max_tokens`` or
            ``max_completion_tokens``; more gets a 400 ``param: "max_tokens"``); it bounds how long one request
            holds the others. ``None``: no cap but the model's context (only for trusted clients).
        max_body_bytes: largest accepted request body, bytes (413 above it).
        max_batch_size: when given, set on every engine: most requests in one ``generate`` call.
        batch_window_ms: when given, set on every engine: how long the batcher waits for more requests, ms.
        repair_json_output: pass answers through ``repair_json`` as the in-process backend does.
        allowed_hosts: host names accepted in the ``Host`` header besides the loopback names and the address a
            connection arrives at (e.g. the machine's DNS name for a server bound to ``0.0.0.0``); ``"*"``
            accepts any.

    Returns:
        A ``fastapi.FastAPI`` app; ``app.state.api_key`` holds the key (``run_server`` reads it).

    Raises:
        ValueError: no models, duplicate ids, a bad size, a malformed allowed host, or an engine whose default
            ``max_new_tokens`` is over ``max_tokens_cap``.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    if not models:
        raise ValueError("no miniatures to serve; register one with `outreach finetune train`")
    for name, value in (("max_prompt_tokens", max_prompt_tokens), ("max_tokens_cap", max_tokens_cap),
                        ("max_body_bytes", max_body_bytes), ("max_batch_size", max_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if batch_window_ms is not None and batch_window_ms < 0:
        raise ValueError(f"batch_window_ms must be >= 0, got {batch_window_ms}")
    try:
        hosts = frozenset(name if name == "*" else parse_host(name.strip())[0] for name in allowed_hosts)
    except ValueError as exc:
        raise ValueError(f"an allowed host is malformed: {exc}; give a host name or address (--allowed-host)") from exc
    by_id: dict[str, ServedModel] = {}
    for model in models:
        if model.id in by_id:
            raise ValueError(f"miniature {model.id} is given twice; serve each version once")
        by_id[model.id] = model
    aliases: dict[str, ServedModel] = {}
    for model in models:
        if model.name not in aliases or model.version > aliases[model.name].version:
            aliases[model.name] = model
    for engine in {id(m.engine): m.engine for m in models}.values():
        if max_tokens_cap is not None and engine.max_new_tokens > max_tokens_cap:
            raise ValueError(f"the default of {engine.max_new_tokens} new tokens (--max-new-tokens) is over the cap "
                             f"of {max_tokens_cap} (--max-tokens-cap); lower the one or raise the other")
        if max_batch_size is not None:
            engine.max_batch_size = max_batch_size
        if batch_window_ms is not None:
            engine.batch_window_ms = batch_window_ms

    app = FastAPI(title="outreach miniatures (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api_key = api_key
    app.state.models = by_id
    app.state.stats = {"requests": 0, "errors": 0, "disconnects": 0}
    app.add_middleware(_HostGuard, allowed_hosts=hosts, stats=app.state.stats)

    def resolve(name: str) -> ServedModel:
        if name in by_id:
            return by_id[name]
        if name in aliases:
            return aliases[name]
        head, sep, tail = name.partition(":")
        if sep and f"{head}@{tail}" in by_id:
            return by_id[f"{head}@{tail}"]
        served = ", ".join(sorted([*by_id, *aliases]))
        raise _APIError(404, f"The model {name!r} does not exist on this server (served: {served}); "
                             "list them with GET /v1/models", param="model", code="model_not_found")

    def error_response(error: _APIError) -> JSONResponse:
        app.state.stats["errors"] += 1
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(_APIError)
    async def _on_api_error(request: Request, exc: _APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(_APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        code=code))

    @app.exception_handler(Exception)
    async def _on_bug(request: Request, exc: Exception) -> JSONResponse:  # logged with its traceback by Starlette
        return error_response(_APIError(500, f"the server failed on this request ({type(exc).__name__}); see the "
                                             "server's log", type_="server_error"))

    def authenticate(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not header
                       else "incorrect API key provided")
            raise _APIError(401, message, code="invalid_api_key")

    def gone(when: str) -> Response:
        app.state.stats["disconnects"] += 1
        logger.info("a client went away %s; its request was dropped", when)
        return Response(status_code=499)  # nginx's "client closed request"; uvicorn sends nothing to a closed peer

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def list_models(request: Request) -> JSONResponse:
        authenticate(request)
        data = [_model_card(served_id, model) for served_id, model in sorted(by_id.items())]
        data += [_model_card(alias, model) for alias, model in sorted(aliases.items())]
        return JSONResponse({"object": "list", "data": data})

    async def read_body(request: Request) -> ChatCompletionRequest:
        content_type = request.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise _APIError(415, f"Content-Type {content_type or '(none)'!r} is not accepted; send the body as JSON "
                                 "with 'Content-Type: application/json'", code="unsupported_media_type")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise _APIError(413, f"request body of {declared} bytes is over the limit of {max_body_bytes} bytes; "
                                 "send a shorter prompt", code="request_too_large")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise _APIError(413, f"request body is over the limit of {max_body_bytes} bytes; send a shorter "
                                     "prompt", code="request_too_large")
            chunks.append(chunk)
        return await asyncio.to_thread(_parse_body, b"".join(chunks))

    def prepare(body: ChatCompletionRequest, base_url: str) -> _Asked:
        """Check the request, its task and grammar, and count its prompt's tokens (blocking: the chat template, the
        tokenizer, compiling the grammar). ``base_url``: this server's ``/v1`` URL, for the fixes errors name."""
        _check_options(body, max_tokens_cap)
        model = resolve(body.model)
        task = request_task(body)
        check_task(model, task, base_url)
        grammar, field = request_grammar(body)
        if task is not None and grammar is not None:
            if field != "structured_outputs.grammar" or grammar != answer_grammar(task):
                raise _APIError(400, f"the request gives {TASK_FIELD} and {field}, which is not the task's own answer "
                                     f"grammar; with a task the miniature holds its answer to the task's grammar, so "
                                     f"leave {field} out", param=field, code="invalid_grammar")
            grammar = None  # the task's own: the miniature builds it from the task, as in-process
        if grammar is not None:
            try:
                model.engine.matcher(grammar)
            except GrammarError as exc:
                raise _APIError(400, f"{field} does not compile: {exc}", param=field, code="invalid_grammar") from exc
        chat = _chat_messages(body)
        prompts = model.chat.prompts(chat, task) if model.chat is not None else [chat]
        n_prompt = max(len(model.engine.prompt_ids(p)) for p in prompts)
        limit = max_prompt_tokens or model.engine.context_length or None
        if model.engine.context_length:
            limit = min(limit or model.engine.context_length, model.engine.context_length - 1)
        if limit is not None and n_prompt > limit:
            if task is None or _answer_format(model) not in TASK_FORMATS:
                raise _APIError(400, f"This model's maximum prompt length is {limit} tokens; your messages make "
                                     f"{n_prompt} tokens. Shorten the messages.", param="messages",
                                code="context_length_exceeded")
            raise _APIError(400, f"This model's maximum prompt length is {limit} tokens; the longest prompt built "
                                 f"from {TASK_FIELD} makes {n_prompt} tokens. Shorten the task's texts.",
                            param=TASK_FIELD, code="context_length_exceeded")
        return _Asked(model, chat, body.max_completion_tokens or body.max_tokens, grammar, task)

    async def generate(asked: _Asked, body: ChatCompletionRequest) -> Generation:
        # The request's own decoding: temperature 0 or absent is greedy (whatever the model's default), a
        # temperature > 0 samples with top_p, min_p and the request's seed (else one from the prompt, so repeatable).
        model, chat, max_new, grammar, task = asked.model, asked.chat, asked.max_new, asked.grammar, asked.task
        temperature, top_p, min_p = body.temperature or 0.0, body.top_p or 1.0, body.min_p or 0.0
        try:
            if model.chat is not None:
                return await model.chat.answer(chat, max_new_tokens=max_new, task=task, grammar=grammar,
                                               temperature=temperature, top_p=top_p, seed=body.seed, min_p=min_p)
            if task is not None and model.engine.constrained:
                grammar = answer_grammar(task)
            sampling = None
            if temperature > 0:
                seed = body.seed if body.seed is not None else prompt_seed(json.dumps(chat, ensure_ascii=False))
                sampling = RowSampling(temperature=temperature, top_p=top_p, seed=seed, min_p=min_p)
            return await model.engine.generate(model.adapter, chat, max_new_tokens=max_new, grammar=grammar,
                                               sampling=sampling)
        except GrammarError as exc:  # a task's grammar that does not compile (the request's own was checked)
            raise _APIError(400, f"the answer grammar of {TASK_FIELD} does not compile: {exc}", param=TASK_FIELD,
                            code="invalid_grammar") from exc
        except ValueError as exc:
            raise _APIError(400, str(exc), param="messages") from exc

    def finish_text(generation: Generation, stop: str | list[str] | None) -> tuple[str, str]:
        text, stopped = _cut_at_stop(generation.text, stop)
        if repair_json_output and "{" in text:
            text = repair_json(text)
        return text, ("stop" if stopped else generation.finish_reason)

    async def chat_completions(request: Request) -> Any:
        app.state.stats["requests"] += 1
        authenticate(request)
        try:
            body = await read_body(request)
        except ClientDisconnect:
            return gone("while sending its request")
        asked = await asyncio.to_thread(prepare, body, f"{str(request.base_url).rstrip('/')}/v1")
        model = asked.model
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not body.stream:
            generation = await _unless_disconnected(request, generate(asked, body))
            if generation is None:
                return gone("before its answer")
            text, finish = finish_text(generation, body.stop)
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": model.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": _usage(generation), "system_fingerprint": None,
            })
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            payload: dict[str, Any] = {
                "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model.id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            try:
                generation = await generate(asked, body)
            except _APIError as exc:  # after the 200 header: report in the stream, as vLLM does
                app.state.stats["errors"] += 1
                yield f"data: {json.dumps(exc.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            except asyncio.CancelledError:
                app.state.stats["disconnects"] += 1
                logger.info("a client went away during its stream %s; its request was dropped", completion_id)
                raise
            text, finish = finish_text(generation, body.stop)
            for piece in _WORDS.findall(text):
                yield chunk({"content": piece})
            yield chunk({}, finish)
            if include_usage:
                usage = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                         "model": model.id, "choices": [], "usage": _usage(generation)}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # Plain Starlette routes (the handler gets the request as is): the body is read and validated here, so that
    # its size is capped while it streams in and every error has the OpenAI shape.
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


async def _unless_disconnected(request: Any, work: Coroutine[Any, Any, Generation]) -> Generation | None:
    """Await ``work``; None when the client disconnects first (``work`` is cancelled: its queued request never
    reaches the model)."""
    task: asyncio.Task[Generation] = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task in done else None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def _model_card(model_id: str, model: ServedModel) -> dict[str, Any]:
    return {
        "id": model_id, "object": "model", "created": model.created, "owned_by": "outreach",
        "root": model.root, "parent": model.parent, "max_model_len": model.engine.context_length or None,
        "permission": [],
        "metadata": {"name": model.name, "version": model.version,
                     "method": "full" if model.adapter == BASE_ADAPTER else "lora",
                     "answer_format": _answer_format(model), "task": TASK_FORMATS.get(_answer_format(model))},
    }


# ---------------------------------------------------------------------- running it


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for anything else, ``0.0.0.0``
    included."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key.

    Raises:
        InsecureBindError: ``host`` is not a loopback address and ``api_key`` is empty.
    """
    if not is_loopback(host) and not api_key:
        raise InsecureBindError(
            f"refusing to serve miniatures on {host!r} without an API key: anyone who can reach it could use the "
            "models; pass --api-key (or set OUTREACH_SERVE_API_KEY), or bind to 127.0.0.1"
        )


def _uvicorn_server(app: FastAPI, host: str, port: int, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    return uvicorn.Server(config)


def run_server(app: FastAPI, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted (blocking; Ctrl-C stops it).

    Raises:
        InsecureBindError: ``host`` is not loopback and the app has no API key (``create_app(api_key=...)``).
        OSError: the port is taken.
    """
    check_bind(host, getattr(app.state, "api_key", None))
    logger.info("serving %d miniature(s) on http://%s:%d/v1", len(app.state.models), host, port)
    _uvicorn_server(app, host, port, log_level).run()


@dataclass
class RunningServer:
    """A server started by ``serve_in_thread``.

    Attributes:
        host: the bound address.
        port: the bound port (the free one picked when 0 was asked for).
        server: the ``uvicorn.Server``.
        thread: the thread running it.
        app: the ASGI app it serves.
    """

    host: str
    port: int
    server: Any
    thread: threading.Thread
    app: Any = None

    @property
    def base_url(self) -> str:
        """``http://<host>:<port>/v1``, the base URL an ``openai:<model>@<base_url>`` spec takes."""
        return f"http://{self.host}:{self.port}/v1"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for the thread, at most ``timeout_s`` seconds."""
        self.server.should_exit = True
        self.thread.join(timeout_s)


@contextmanager
def serve_in_thread(app: FastAPI, *, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning",
                    start_timeout_s: float = 30.0) -> Iterator[RunningServer]:
    """Run ``app`` with uvicorn in a background thread for the duration of a ``with`` block.

    Port 0 picks a free port (the socket is bound here, before uvicorn starts, so there is no race).

    Yields:
        ``RunningServer`` with the bound ``port`` and ``base_url``.

    Raises:
        InsecureBindError: ``host`` is not loopback and the app has no API key.
        TimeoutError: uvicorn did not start within ``start_timeout_s`` seconds.
    """
    check_bind(host, getattr(app.state, "api_key", None))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = _uvicorn_server(app, host, sock.getsockname()[1], log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="miniature-server")
    thread.start()
    running = RunningServer(host=host, port=sock.getsockname()[1], server=server, thread=thread, app=app)
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            running.stop(1.0)
            sock.close()
            raise TimeoutError(f"the miniature server did not start on {host}:{running.port}")
        time.sleep(0.01)
    try:
        yield running
    finally:
        running.stop()
        sock.close()
