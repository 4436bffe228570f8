"""Answer formats of miniatures: how a miniature is asked when not with the agent's own prompt.

``json`` (the default): the miniature gets the agent's messages and answers in the agent's JSON format.

``sentence-tags`` (researcher): the extraction task (``core.tasks.ExtractionTask``: company, listed fields,
numbered sentences with their pages) is split into one short prompt per numbered sentence::

    Company: Amberbrook Analytics
    Source: amberbrook.example
    Sentence: The company employs 6 people.

answered ``employee_count | 6`` (the field it states and the value, a span of the sentence) or ``-``.
The answers are assembled into the agent's JSON (``{"facts": [{"field", "evidence", "value"}]}``): the
first tagged sentence per field wins, in task order, where the company's own pages come first. The
researcher agent, its grounding check and the trace store see the same call and answer as with any
backend (tokens summed over the sentence prompts, latency of the slowest). Everything here reads the
typed task, never the agent's prompt text.

Why: a model of a few million parameters trained for minutes did not learn to point into a long prompt
(issue 3: with the whole prompt it cited the first sentence for every field, whether asked for JSON or
for one tag line per sentence), but telling what one short sentence states is a classification a small
model learns; the sentence prompts are also about 30x shorter, so they batch well. Training rows are made
from the teacher's answers by ``sentence_rows`` (sentences citing nothing become ``-`` examples, a share
of them kept); ``miniatures.grammar.tag_grammar`` holds each answer to ``-`` or a listed field and a span
of its sentence.

``writer-brief`` (writer): the writing task (``core.tasks.WritingTask``) is asked as one short user message of
what changes per prospect and per offer, under short labels, without the rules (the examples teach them)::

    Title: Head of Growth
    Offer: Tallyfold Signals spots the accounts that are ready to buy, so ...
    Solves: finding the accounts that are ready to buy; hitting pipeline targets after raising a round
    Proof: yes
    Ask: meeting
    Tags: first_name last_name company title sender_name sender_company product
    fact.recent_event: expanded into the Netherlands
    fact.location: Omaha, Nebraska

answered in the agent's JSON, where the offer's texts that an email copies word for word are written as offer
tags (``OFFER_TAGS``): ``{{cta}}`` for the call to action, ``{{proof}}`` for the proof point, ``{{opt_out}}``
for the opt-out line. ``expand_offer_tags`` writes the texts back before the answer leaves the backend, so the
agent, its validation and the trace store see the agent's JSON. Why: the demo's 1.7M-parameter writer asked
with the agent's prompt (about 590 tokens without its system message) dropped or garbled the proof point and
the product; the brief is about 4x shorter (fewer tokens to train on and to prefill) and the model never
copies the offer's sentences. Training rows are made from each row's task and the teacher's answer by
``brief_row``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from core.tasks import ExtractionTask, WritingTask, load_task

__all__ = [
    "ANSWER_FORMATS",
    "OFFER_TAGS",
    "WRITER_BRIEF",
    "assemble_extraction",
    "brief_answer",
    "brief_messages",
    "brief_row",
    "expand_offer_tags",
    "offer_tag_values",
    "parse_tag",
    "row_task",
    "sentence_messages",
    "sentence_rows",
]

logger = logging.getLogger(__name__)

#: The writer's compact answer format (see the module docstring).
WRITER_BRIEF = "writer-brief"
#: Answer formats a miniature can be trained for (recorded in its training config).
ANSWER_FORMATS = ("json", "sentence-tags", WRITER_BRIEF)
#: The offer tags of ``writer-brief`` answers and the ``core.tasks.OfferBrief`` field each stands for.
OFFER_TAGS = {"cta": "call_to_action", "proof": "proof_point", "opt_out": "opt_out_line"}

_TAG = re.compile(r"^([a-z_][a-z0-9_]*) \| (.+)$")
_MIN_PROPAGATED_CHARS = 4


def row_task(row: Mapping[str, Any]) -> ExtractionTask | None:
    """The extraction task a training row carries (``row["task"]``, ``core.tasks.dump_task`` JSON, as
    ``finetune.datasets`` writes it), or None when it carries none, another kind, or one that does not load."""
    task = _stored_task(row)
    return task if isinstance(task, ExtractionTask) else None


def _stored_task(row: Mapping[str, Any]) -> ExtractionTask | WritingTask | None:
    """The task a training row carries (``row["task"]``), or None when it carries none or one that does not load
    (logged)."""
    data = row.get("task")
    if not data:
        return None
    try:
        return load_task(data)
    except ValidationError as exc:
        logger.warning("a training row's task does not load: %s", exc.errors()[0]["msg"] if exc.errors() else exc)
        return None


def _host(url: str) -> str:
    """The lower-case host of ``url`` without ``www.`` ('' when it has none or does not parse)."""
    try:
        host = (urlsplit(url if "//" in url else f"//{url}").hostname or "").lower()
    except ValueError:
        return ""
    return host[4:] if host.startswith("www.") else host


def sentence_messages(company: str, url: str, text: str) -> list[dict[str, str]]:
    """The chat for one sentence: a single user message ``Company: ..\\nSource: <host>\\nSentence: <text>``."""
    return [{"role": "user", "content": f"Company: {company}\nSource: {_host(url)}\nSentence: {text}"}]


def parse_tag(text: str) -> tuple[str, str] | None:
    """``(field, value)`` of an answer ``<field> | <value>``; None for ``-`` or anything else."""
    match = _TAG.match(text.strip())
    return (match.group(1), match.group(2).strip()) if match else None


def assemble_extraction(sentence_ids: Sequence[str], answers: Sequence[str], fields: Sequence[str] = ()) -> str:
    """The agent's JSON answer from per-sentence answers: the first sentence tagged with a field wins.

    Args:
        sentence_ids: the ids (``"S3"``) of the sentences, in prompt order.
        answers: each sentence's answer (``"location | Cork, Ireland"`` or ``"-"``).
        fields: the fields the prompt asked for; tags of other fields are dropped (empty: keep all).

    Returns:
        ``{"facts": [{"field": ..., "evidence": ..., "value": ...}, ...]}`` as JSON text.
    """
    facts: list[dict[str, str]] = []
    taken: set[str] = set()
    for sid, answer in zip(sentence_ids, answers, strict=True):
        tag = parse_tag(answer)
        if tag is None or tag[0] in taken or (fields and tag[0] not in fields):
            continue
        taken.add(tag[0])
        facts.append({"field": tag[0], "evidence": sid, "value": tag[1]})
    return json.dumps({"facts": facts})


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def sentence_rows(row: Mapping[str, Any], *, negative_fraction: float, rng: random.Random,
                  task: ExtractionTask | None = None) -> list[dict[str, Any]]:
    """Turn one extraction training row (teacher prompt and JSON answer) into sentence-tag rows.

    The sentences, the company and the listed fields come from the row's typed task (``task``, else the
    task the row carries, ``row_task``). Each cited sentence is tagged with its fact's field and value
    (facts of listed fields only). A value belongs to the company its cited sentence is about, the
    prospect: another sentence that states the value word for word (values of at least 4 characters) gets
    the same tag only when it is a sentence of the prospect's own site (the task's website host), so that
    equal sentences do not teach opposite answers; one of another page may be about another company (a
    directory or news round-up listing several in the same city) and becomes no row at all, neither the
    label nor ``-``. The other sentences become ``-`` rows, each kept with probability
    ``negative_fraction``. A row without an extraction task with sentences, or whose answer is not JSON,
    gives no rows.

    Args:
        row: ``{"messages": [..., {"role": "assistant", "content": <JSON answer>}], "task": {...}}``.
        negative_fraction: share of ``-`` rows kept, in [0, 1].
        rng: the random source of that choice (seeded by the caller).
        task: the row's extraction task when the caller has it (a row of an old dataset without one: read
            it with ``agents.legacy_tasks.task_from_messages``).

    Returns:
        Rows ``{"messages": [user, assistant]}`` in sentence order.
    """
    task = task if task is not None else row_task(row)
    messages = list(row.get("messages") or [])
    if task is None or not task.sentences or not messages:
        return []
    try:
        facts = json.loads(str(messages[-1].get("content") or ""))["facts"]
    except (ValueError, KeyError, TypeError):
        return []
    if not isinstance(facts, list):
        return []
    texts = {s.id: s.text for s in task.sentences}
    fields = set(task.field_names)
    label: dict[str, tuple[str, str]] = {}
    for fact in facts:
        if (isinstance(fact, dict) and fact.get("evidence") in texts and fact.get("value")
                and str(fact.get("field")) in fields):
            label.setdefault(str(fact["evidence"]), (str(fact["field"]), str(fact["value"])))
    cited = list(label.values())
    own = _host(task.website)
    unsure: set[str] = set()
    for s in task.sentences:
        if s.id in label:
            continue
        for field_name, value in cited:
            pattern = r"(?<!\w)" + re.escape(_norm(value)) + r"(?!\w)"
            if len(value) >= _MIN_PROPAGATED_CHARS and re.search(pattern, _norm(s.text)):
                if own and _host(s.source_url) == own:
                    label[s.id] = (field_name, value)
                else:
                    unsure.add(s.id)
                break
    out: list[dict[str, Any]] = []
    for s in task.sentences:
        if s.id in unsure or (s.id not in label and rng.random() >= negative_fraction):
            continue
        answer = f"{label[s.id][0]} | {label[s.id][1]}" if s.id in label else "-"
        out.append({"messages": [*sentence_messages(task.company, s.source_url, s.text),
                                 {"role": "assistant", "content": answer}]})
    return out


def offer_tag_values(task: WritingTask) -> dict[str, str]:
    """The offer tags of ``task`` (``OFFER_TAGS``) with a non-blank text, mapped to the text (stripped)."""
    values = {tag: str(getattr(task.offer, name)).strip() for tag, name in OFFER_TAGS.items()}
    return {tag: text for tag, text in values.items() if text}


def brief_messages(task: WritingTask) -> list[dict[str, str]]:
    """The ``writer-brief`` chat of ``task``: one user message (module docstring).

    Lines: ``Title`` (``-`` when unknown), ``Offer`` (the value proposition), ``Solves`` (the problems solved,
    ``"; "``-joined; left out when none), ``Proof`` (``yes``/``no``: whether ``{{proof}}`` may be used), ``Ask``
    (the call-to-action style; left out when not given), ``Tags`` (the name tags, space-separated), one
    ``fact.<field>: <value>`` line per fact tag, and ``Fix: <detail>`` per failed check of an
    earlier answer (``task.feedback``).
    """
    offer = task.offer
    lines = [f"Title: {task.prospect_title.strip() or '-'}", f"Offer: {offer.value_proposition.strip()}"]
    if offer.problems_solved:
        lines.append("Solves: " + "; ".join(p.strip() for p in offer.problems_solved))
    lines.append(f"Proof: {'yes' if offer.proof_point.strip() else 'no'}")
    if offer.cta_style.strip():
        lines.append(f"Ask: {offer.cta_style.strip()}")
    lines.append("Tags: " + " ".join(t.name for t in task.merge_tags if not t.is_fact))
    lines += [f"{t.name}: {t.value or t.description}" for t in task.fact_tags]
    lines += [f"Fix: {d}" for d in dict.fromkeys(c.detail.strip() for c in task.feedback if c.detail.strip())]
    return [{"role": "user", "content": "\n".join(lines)}]


def brief_answer(answer: str, task: WritingTask) -> str | None:
    """A teacher's email answer (the agent's JSON) as a ``writer-brief`` answer: each offer text written out
    word for word (``offer_tag_values``) becomes its offer tag, longest text first. None when ``answer`` is
    not the agent's JSON (an object with string ``subject`` and ``body``)."""
    try:
        data = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("subject", "body")):
        return None
    values = sorted(offer_tag_values(task).items(), key=lambda kv: -len(kv[1]))
    out = dict(data)
    for key in ("subject", "body"):
        text = str(data[key])
        for tag, value in values:
            text = text.replace(value, f"{{{{{tag}}}}}")
        out[key] = text
    return json.dumps(out, ensure_ascii=False)


def expand_offer_tags(text: str, task: WritingTask) -> str:
    """A ``writer-brief`` answer as the agent's JSON: each offer tag (``{{cta}}`` ...) replaced by its text,
    JSON-escaped (the answer is JSON text, possibly cut short; an offer tag whose text is blank is left, and
    validation then reports it as an unknown merge tag)."""
    for tag, value in offer_tag_values(task).items():
        text = text.replace(f"{{{{{tag}}}}}", json.dumps(value, ensure_ascii=False)[1:-1])
    return text


def brief_row(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """One writer training row (the agent's prompt and the teacher's JSON answer, ``row["task"]`` its writing
    task) as a ``writer-brief`` row ``{"messages": [user, assistant], "task": ...}``; None when the row carries
    no writing task or its answer is not the agent's JSON."""
    messages = list(row.get("messages") or [])
    if not messages or messages[-1].get("role") != "assistant":
        return None
    task = _stored_task(row)
    if not isinstance(task, WritingTask):
        return None
    answer = brief_answer(str(messages[-1].get("content") or ""), task)
    if answer is None:
        return None
    return {"messages": [*brief_messages(task), {"role": "assistant", "content": answer}], "task": row["task"]}
