"""The one parser of the agents' prompt text: the typed task of a call recorded without one.

Traces stored before calls carried their task (``Trace.task`` NULL), and callers that send an agent's
messages without ``task=``, only have the prompt. ``task_from_messages`` reads it back into the
``core.tasks`` task it was rendered from (``agents.prompts``), so that every other room reads typed tasks
only; ``trace_task`` is the one way a reader gets a stored call's task (the stored one, else this parse).
The layout read here is the one ``agents.prompts`` renders; a change there must be followed here.

Round trip: for a task ``t``, ``task_from_messages(writer_messages(t)) == t`` (and the same for
extraction), given single-line offer texts and sentences, as the agents produce them.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pydantic import ValidationError

from agents.prompts import (
    EXTRACTION_SYSTEM_PROMPT,
    FEEDBACK_HEADER,
    FIELD_DESCRIPTIONS,
    NONE_MARK,
    NOT_GIVEN_MARK,
    UNKNOWN_MARK,
    WRITER_SYSTEM_PROMPT,
)
from agents.schemas import FACT_FIELDS
from core.tasks import (
    ExtractionTask,
    FailedCheck,
    FieldSpec,
    MergeTag,
    OfferBrief,
    Sentence,
    WritingTask,
    load_task,
)

__all__ = ["StoredCall", "task_from_messages", "trace_task"]

logger = logging.getLogger(__name__)

_SOURCE_LINE = re.compile(r"^Source (\d+):\s*(\S*)\s*$")
_SENTENCE_LINE = re.compile(r"^(S\d+):\s?(.*)$")
_FIELD_LINE = re.compile(r"^- ([a-z_][a-z0-9_]*): ?(.*)$")
_TAG_LINE = re.compile(r"^\{\{([\w.]+)\}\}:\s?(.*)$")
_TAG = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_CHECK_LINE = re.compile(r"^(\w+):\s*(.*)$", re.DOTALL)
_QUOTED = re.compile(r"'([^']+)'")
_MENTIONS = re.compile(r"the email mentions (.*?), which the prospect, offer and profile facts do not contain")
_OFFER_LABELS = {
    "Sender title:": "sender_title",
    "Product:": "product",
    "Value proposition:": "value_proposition",
    "Problems solved:": "problems_solved",
    "Proof point:": "proof_point",
    "Call to action:": "call_to_action",
    "Call to action style:": "cta_style",
    "Opt-out line:": "opt_out_line",
    "Prospect title:": "prospect_title",
}
_MARKS = {NONE_MARK, NOT_GIVEN_MARK, UNKNOWN_MARK}


class StoredCall(Protocol):
    """What ``trace_task`` reads of a stored call (``store.models.Trace``)."""

    task: dict[str, Any] | None
    messages: list[dict[str, Any]]


def _role_and_text(message: Any) -> tuple[str, str]:
    """``(role, text)`` of a langchain message or an OpenAI-format dict (text parts joined)."""
    if isinstance(message, Mapping):
        role, content = str(message.get("role") or ""), message.get("content")
    else:
        role = {"human": "user", "ai": "assistant"}.get(getattr(message, "type", ""), getattr(message, "type", ""))
        content = getattr(message, "content", "")
    if isinstance(content, list):
        content = "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    return role, str(content or "")


def _extraction(system: str, user: str) -> ExtractionTask | None:
    """The extraction task of a user message in ``EXTRACTION_USER_TEMPLATE``'s layout, or None."""
    if system.strip() != EXTRACTION_SYSTEM_PROMPT.strip() and not (
            user.startswith("Company:") and "\nSentences:\n" in f"\n{user}"):
        return None
    company = website = ""
    fields: list[FieldSpec] = []
    sentences: list[Sentence] = []
    url = ""
    section = ""
    for line in user.splitlines():
        if section != "sentences":
            if line.startswith("Company:"):
                company = line[len("Company:"):].strip()
            elif line.startswith("Website:"):
                website = line[len("Website:"):].strip()
            elif line.startswith("Fields:"):
                section = "fields"
            elif line.startswith("Sentences:"):
                section = "sentences"
            elif section == "fields" and (m := _FIELD_LINE.match(line)):
                fields.append(FieldSpec(name=m.group(1), description=m.group(2).strip()))
            continue
        if m := _SENTENCE_LINE.match(line):
            sentences.append(Sentence(id=m.group(1), text=m.group(2).strip(), source_url=url))
        elif m := _SOURCE_LINE.match(line):
            url = m.group(2)
    if not fields:  # prompts without a field list asked for every profile field
        fields = [FieldSpec(name=f, description=FIELD_DESCRIPTIONS[f]) for f in FACT_FIELDS]
    return ExtractionTask(company=company, website="" if website == UNKNOWN_MARK else website,
                          fields=tuple(fields), sentences=tuple(sentences))


def _failed_checks(detail: str) -> list[FailedCheck]:
    """The failures one feedback line (a validation error or a render/parse error message) stands for."""
    if "cannot be filled" in detail:
        head = detail.split("cannot be filled", 1)[1].split("Allowed tags", 1)[0]
        return [FailedCheck(code="unknown_merge_tag", detail=detail, subject=t) for t in _TAG.findall(head)]
    if "did not return valid JSON" in detail:
        return [FailedCheck(code="invalid_json", detail=detail)]
    m = _CHECK_LINE.match(detail)
    if m is None:
        return [FailedCheck(code="unknown", detail=detail)]
    check, message = m.group(1), m.group(2)
    codes: list[tuple[str, str]]
    if check == "merge_tags":
        codes = [("merge_tags_left", "")]
    elif check == "grounded":
        codes = [("no_fact", "")] if "mentions no company fact" in message else []
        if mentions := _MENTIONS.search(message):
            try:
                items = ast.literal_eval(f"[{mentions.group(1)}]")
            except (ValueError, SyntaxError):
                items = _QUOTED.findall(mentions.group(1))
            codes += [("ungrounded", str(item)) for item in items]
    elif check == "length":
        codes = [("too_short" if "too short" in message else "too_long", "")]
    elif check == "subject_length":
        codes = [("subject_too_short" if "too short" in message else "subject_too_long", "")]
    elif check == "spam":
        codes = [("spam", p) for p in _QUOTED.findall(message)]
    elif check == "one_cta":
        codes = [("cta_count", "")]
    elif check == "opt_out":
        codes = [("opt_out_missing", "")]
    else:
        codes = [(check, "")]
    return [FailedCheck(code=code, detail=detail, subject=subject) for code, subject in codes]


def _feedback(followups: Sequence[str]) -> list[FailedCheck]:
    """The failed checks listed by the feedback messages among ``followups`` (later user messages)."""
    failed: list[FailedCheck] = []
    for text in followups:
        lines = text.splitlines()
        if lines and lines[0].strip() == FEEDBACK_HEADER:
            details = [line[2:].strip() for line in lines[1:] if line.startswith("- ")]
        elif "cannot be filled" in text:
            details = [line.strip() for line in lines if "cannot be filled" in line]
        else:
            continue
        for detail in details:
            failed += _failed_checks(detail)
    return failed


def _writing(system: str, user: str, followups: Sequence[str]) -> WritingTask | None:
    """The writing task of a user message in ``WRITER_USER_TEMPLATE``'s layout, or None."""
    if system.strip() != WRITER_SYSTEM_PROMPT.strip() and not (
            user.startswith("Offer:") and "\nMerge tags you may use:\n" in user):
        return None
    values: dict[str, str] = {}
    tags: list[MergeTag] = []
    for line in user.splitlines():
        if m := _TAG_LINE.match(line):
            name, text = m.group(1), m.group(2).strip()
            tags.append(MergeTag(name=name, description=text, value=text if name.startswith("fact.") else ""))
            continue
        for label, key in _OFFER_LABELS.items():
            if line.startswith(label) and key not in values:
                value = line[len(label):].strip()
                values[key] = "" if value in _MARKS else value
                break
    brief = OfferBrief(
        sender_title=values.get("sender_title", ""), product=values.get("product", ""),
        value_proposition=values.get("value_proposition", ""),
        problems_solved=tuple(p.strip() for p in values.get("problems_solved", "").split(";") if p.strip()),
        proof_point=values.get("proof_point", ""), call_to_action=values.get("call_to_action", ""),
        cta_style=values.get("cta_style", ""), opt_out_line=values.get("opt_out_line", ""),
    )
    return WritingTask(offer=brief, prospect_title=values.get("prospect_title", ""), merge_tags=tuple(tags),
                       feedback=tuple(_feedback(followups)))


def task_from_messages(messages: Sequence[Any]) -> ExtractionTask | WritingTask | None:
    """The typed task an agent's prompt was rendered from, read back from its text.

    The kind is told by the system prompt (``EXTRACTION_SYSTEM_PROMPT``, ``WRITER_SYSTEM_PROMPT``) or, without
    it (a miniature trained without system prompts), by the first user message's layout. The first user
    message is the task; for the writer, later user messages in ``FEEDBACK_TEMPLATE``'s layout (or holding a
    merge-tag error) are its feedback, each line turned into ``FailedCheck`` items with the codes of
    ``agents.validation.FAILURE_CODES``; corrective retries (``RETRY_TEMPLATE``) are not feedback. An
    extraction prompt without a ``Fields:`` list asked for every profile field.

    Args:
        messages: langchain messages or OpenAI-format dicts (``Trace.messages``).

    Returns:
        The task, or None when the messages are not an agent's prompt.
    """
    pairs = [_role_and_text(m) for m in messages]
    system = next((text for role, text in pairs if role == "system"), "")
    users = [text for role, text in pairs if role == "user"]
    if not users:
        return None
    return _extraction(system, users[0]) or _writing(system, users[0], users[1:])


def trace_task(call: StoredCall) -> ExtractionTask | WritingTask | None:
    """The task of a stored call: ``call.task`` when it was stored (``core.tasks.load_task``), else read
    back from ``call.messages`` (``task_from_messages``; also when the stored task does not load, logged).

    Returns:
        The task, or None when the call was not an agent's.
    """
    if call.task:
        try:
            return load_task(call.task)
        except ValidationError as exc:
            logger.warning("a stored task does not load (%s); reading the task from the prompt instead",
                           exc.errors()[0]["msg"] if exc.errors() else exc)
    return task_from_messages(call.messages)
