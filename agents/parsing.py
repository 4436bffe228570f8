"""Parsing of model answers into the agents' pydantic output formats, with one corrective retry.

Models (teachers and miniatures alike) wrap JSON in code fences or prose; ``extract_json_object``
finds the first JSON object in the text, and ``parse_model_output`` validates it with pydantic.
``ainvoke_structured`` calls a chat model with the agent's typed task (``task=`` of every call, which
backends read to constrain the answer and the trace recorder stores), and when the answer cannot be
parsed it calls the model once more with its answer and the error appended, then gives up with
``ModelOutputError``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from agents.errors import ModelOutputError
from agents.prompts import RETRY_TEMPLATE
from core.tasks import ExtractionTask, WritingTask

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import BaseMessage
    from langchain_core.runnables import RunnableConfig

__all__ = ["OutputParseError", "ainvoke_structured", "extract_json_object", "parse_model_output"]

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()


class OutputParseError(ValueError):
    """A model answer holds no JSON object, or the object does not fit the schema.

    The message is written for the model (it is sent back to it in the retry).
    """


def extract_json_object(text: str) -> dict[str, Any]:
    """Return the first JSON object in ``text``.

    Code fences (```` ```json ... ``` ````) are searched first, then the whole text; in each, every
    ``{`` is tried in turn with ``json.JSONDecoder.raw_decode`` so that prose before or after the
    object is ignored.

    Args:
        text: A model answer.

    Returns:
        The decoded object.

    Raises:
        OutputParseError: no complete JSON object was found.
    """
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    first_error = ""
    for chunk in candidates:
        start = chunk.find("{")
        while start != -1:
            try:
                obj, _end = _DECODER.raw_decode(chunk, start)
            except json.JSONDecodeError as exc:
                first_error = first_error or f"{exc.msg} at character {exc.pos}"
            else:
                if isinstance(obj, dict):
                    return obj
            start = chunk.find("{", start + 1)
    detail = f" (first JSON error: {first_error})" if first_error else ""
    raise OutputParseError(f"the answer contains no complete JSON object{detail}")


def parse_model_output(text: str, schema: type[T]) -> T:
    """Parse a model answer into ``schema``.

    Args:
        text: A model answer (may hold code fences or prose around the JSON object).
        schema: The pydantic model the JSON object must validate against.

    Returns:
        The validated model instance.

    Raises:
        OutputParseError: no JSON object, or the object fails validation (the message lists the
            offending fields).
    """
    obj = extract_json_object(text)
    try:
        return schema.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise OutputParseError(f"the JSON object does not match the required format: {problems}") from exc


async def ainvoke_structured(
    model: BaseChatModel,
    messages: Sequence[BaseMessage],
    schema: type[T],
    *,
    agent: str,
    config: RunnableConfig | None = None,
    task: ExtractionTask | WritingTask | None = None,
) -> T:
    """Call ``model`` and parse its answer into ``schema``, retrying once on a bad answer.

    On a parse or validation failure the model is called once more with the conversation extended
    by its answer (as an AI message) and a user message (``RETRY_TEMPLATE``) saying what was wrong.
    ``config`` and ``task`` are forwarded to every call (``model.ainvoke(messages, config=config,
    task=task)``), so trace callbacks see both calls and their task, and backends build the answer's
    constraints from the task; with ``task=None`` no ``task`` keyword is sent.

    Args:
        model: Any langchain-core chat model (a project model reads ``task`` from its ``_agenerate`` kwargs).
        messages: The prompt (system message first), rendered from ``task``.
        schema: The pydantic output format.
        agent: Agent name for errors and logs (``"researcher"``, ``"writer"``).
        config: Run config of the calling graph node.
        task: The typed task the messages were rendered from.

    Returns:
        The parsed answer.

    Raises:
        ModelOutputError: the second answer could not be parsed either.
    """
    from langchain_core.messages import AIMessage, HumanMessage

    convo = list(messages)
    extra: dict[str, Any] = {} if task is None else {"task": task}
    answer = await model.ainvoke(convo, config=config, **extra)
    raw = answer.text
    try:
        return parse_model_output(raw, schema)
    except OutputParseError as exc:
        logger.info("%s model answer could not be parsed (%s); retrying once", agent, exc)
        error = str(exc)
    convo += [AIMessage(content=raw), HumanMessage(content=RETRY_TEMPLATE.format(error=error))]
    answer = await model.ainvoke(convo, config=config, **extra)
    raw = answer.text
    try:
        return parse_model_output(raw, schema)
    except OutputParseError as exc:
        raise ModelOutputError(agent, str(exc), raw) from exc
