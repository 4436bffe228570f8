"""Trace recording by callback: every model call and tool call of one run, buffered until the run
is saved, so results and traces are committed in one transaction (a run killed half-way leaves
nothing behind and is redone whole on resume: nothing duplicated, nothing lost).

Agents are not changed to be traced (DESIGN.md): the recorder is passed in the run config's
``callbacks`` and learns the agent from the LangGraph node that made the call, and the call's typed task
(``core.tasks``, passed as ``model.ainvoke(..., task=task)``) from the call's invocation parameters;
it stores the task with the trace (``Trace.task``, ``core.tasks.dump_task`` JSON).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, convert_to_openai_messages
from langchain_core.outputs import LLMResult
from pydantic import ValidationError

from core.tasks import ExtractionTask, WritingTask, dump_task, load_task
from miniatures.pricing import DEFAULT_PRICES, Price, call_cost_usd
from miniatures.redaction import redact
from store.models import ToolCall, Trace
from tools.types import Document, SearchHit, Web

__all__ = ["NODE_AGENTS", "RecordingWeb", "TraceRecorder", "call_task"]

logger = logging.getLogger(__name__)

#: Which agent a graph node's model calls belong to.
NODE_AGENTS = {"research": "researcher", "write": "writer"}


def call_task(invocation_params: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None = None
              ) -> dict[str, Any] | None:
    """The typed task of a chat-model call as ``Trace.task`` stores it (``core.tasks.dump_task``), or None.

    The task is the call's ``task`` keyword (``invocation_params["task"]``, which langchain-core fills with
    the call's keyword arguments), else ``metadata["task"]``; a task object or its JSON is accepted.
    Anything else is logged and not stored.
    """
    for source in (invocation_params or {}, metadata or {}):
        task = source.get("task")
        if task is None:
            continue
        if isinstance(task, ExtractionTask | WritingTask):
            return dump_task(task)
        try:
            return dump_task(load_task(task))
        except ValidationError as exc:
            logger.warning("a model call's task is not a core.tasks task (%s); the trace stores none",
                           exc.errors()[0]["msg"] if exc.errors() else exc)
            return None
    return None


class TraceRecorder(BaseCallbackHandler):
    """Collects ``Trace`` rows (one per chat-model call) and ``ToolCall`` rows for one run.

    Args:
        backends: backend spec per agent, e.g. ``{"researcher": "heuristic", "writer": "openai:gpt-4.1-mini"}``;
            traces store them, and model errors, with credentials masked (``miniatures.redaction.redact``).
        prices: price table for ``Trace.cost_usd`` (US dollars per million tokens).

    Token counts come from ``AIMessage.usage_metadata`` as the backend reports them; latency is
    wall-clock milliseconds from the start callback to the end callback.
    """

    run_inline = True  # called in the event loop's thread, no executor hop per event
    raise_error = False

    def __init__(self, backends: Mapping[str, str], prices: Mapping[str, Price] = DEFAULT_PRICES) -> None:
        self.backends = {agent: redact(spec) for agent, spec in backends.items()}
        self.prices = prices
        self.traces: list[Trace] = []
        self.tool_calls: list[ToolCall] = []
        self._open: dict[UUID, tuple[float, Trace]] = {}

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        metadata = metadata or {}
        node = str(metadata.get("langgraph_node", ""))
        agent = str(metadata.get("agent") or NODE_AGENTS.get(node, node or "unknown"))
        trace = Trace(
            agent=agent,
            step=str(metadata.get("step") or node),
            backend=self.backends.get(agent, "unknown"),
            messages=convert_to_openai_messages(messages[0]) if messages else [],  # type: ignore[arg-type]
            task=call_task(kwargs.get("invocation_params"), metadata),
        )
        self._open[run_id] = (time.perf_counter(), trace)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        started, trace = self._open.pop(run_id, (None, None))
        if trace is None or started is None:
            return
        trace.latency_ms = (time.perf_counter() - started) * 1000.0
        generation = response.generations[0][0] if response.generations and response.generations[0] else None
        if generation is not None:
            trace.output = generation.text
            usage = getattr(getattr(generation, "message", None), "usage_metadata", None) or {}
            trace.input_tokens = int(usage.get("input_tokens", 0))
            trace.output_tokens = int(usage.get("output_tokens", 0))
        trace.cost_usd = call_cost_usd(trace.backend, trace.input_tokens, trace.output_tokens, self.prices)
        self.traces.append(trace)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        started, trace = self._open.pop(run_id, (None, None))
        if trace is None or started is None:
            return
        trace.latency_ms = (time.perf_counter() - started) * 1000.0
        trace.error = redact(f"{type(error).__name__}: {error}")
        self.traces.append(trace)

    def record_tool(self, tool: str, input: dict[str, Any], output: dict[str, Any], latency_ms: float,
                    error: str | None = None) -> None:
        """Buffer one tool call (``latency_ms`` in milliseconds)."""
        self.tool_calls.append(ToolCall(tool=tool, input=input, output=output, latency_ms=latency_ms, error=error))


class RecordingWeb:
    """Wraps a ``tools.types.Web`` so that every search and fetch is recorded as a ``ToolCall``."""

    def __init__(self, web: Web, recorder: TraceRecorder) -> None:
        self.web = web
        self.recorder = recorder

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        """Search through the wrapped web; see ``tools.types.Web.search``."""
        started = time.perf_counter()
        try:
            hits = await self.web.search(query, max_results=max_results)
        except Exception as exc:
            self._record("search", {"query": query}, {}, started, exc)
            raise
        # Titles and snippets too: ranking reads them (a third-party hit must name the company), and a
        # replay must rank what the original run ranked.
        self._record("search", {"query": query}, {
            "urls": [h.url for h in hits],
            "hits": [{"url": h.url, "title": h.title, "snippet": h.snippet} for h in hits],
        }, started)
        return hits

    async def fetch(self, url: str) -> Document:
        """Fetch through the wrapped web; see ``tools.types.Web.fetch``."""
        started = time.perf_counter()
        try:
            doc = await self.web.fetch(url)
        except Exception as exc:
            self._record("fetch", {"url": url}, {}, started, exc)
            raise
        self._record("fetch", {"url": url}, {"status": doc.status_code, "chars": len(doc.text)}, started)
        return doc

    def _record(self, tool: str, input: dict[str, Any], output: dict[str, Any], started: float,
                exc: Exception | None = None) -> None:
        error = f"{type(exc).__name__}: {exc}" if exc else None
        self.recorder.record_tool(tool, input, output, (time.perf_counter() - started) * 1000.0, error)
