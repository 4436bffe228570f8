"""Answer formats of miniatures: how a miniature is asked when not with the agent's own prompt.

``json`` (the default): the miniature gets the agent's messages and answers in the agent's JSON format.

``sentence-tags`` (researcher): the extraction prompt (``agents.prompts``: ``Company:``, ``- <field>:``
lines, then ``Source k: <url>`` and ``S<i>: <text>`` lines) is split into one short prompt per numbered
sentence::

    Company: Amberbrook Analytics
    Source: amberbrook.example
    Sentence: The company employs 6 people.

answered ``employee_count | 6`` (the field it states and the value, a span of the sentence) or ``-``.
The answers are assembled into the agent's JSON (``{"facts": [{"field", "evidence", "value"}]}``): the
first tagged sentence per field wins, in prompt order, where the company's own pages come first. The
researcher agent, its grounding check and the trace store see the same call and answer as with any
backend (tokens summed over the sentence prompts, latency of the slowest).

Why: a model of a few million parameters trained for minutes did not learn to point into a long prompt
(issue 3: with the whole prompt it cited the first sentence for every field, whether asked for JSON or
for one tag line per sentence), but telling what one short sentence states is a classification a small
model learns; the sentence prompts are also about 30x shorter, so they batch well. Training rows are made
from the teacher's answers by ``sentence_rows`` (sentences citing nothing become ``-`` examples, a share
of them kept), and ``TagGrammar`` holds each answer to ``-`` or a listed field and a span of its sentence
(``miniatures.constrained``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from miniatures.constrained import AnswerGrammar, State, listed_fields, word_span

__all__ = [
    "ANSWER_FORMATS",
    "ExtractionPrompt",
    "TagGrammar",
    "assemble_extraction",
    "parse_extraction_prompt",
    "parse_tag",
    "sentence_messages",
    "sentence_rows",
]

#: Answer formats a miniature can be trained for (recorded in its training config).
ANSWER_FORMATS = ("json", "sentence-tags")

_COMPANY = re.compile(r"^Company: (.*)$", re.MULTILINE)
_SOURCE = re.compile(r"^Source \d+: ?(\S*)\s*$")
_SENTENCE = re.compile(r"^(S\d+): ?(.*)$")
_TAG = re.compile(r"^([a-z_][a-z0-9_]*) \| (.+)$")
_MIN_PROPAGATED_CHARS = 4


@dataclass(frozen=True)
class ExtractionPrompt:
    """The parts of an extraction prompt a sentence prompt needs.

    Attributes:
        company: the prospect's company name.
        fields: the listed field names, in order.
        sentences: ``(sentence id, source URL, text)`` in prompt order.
    """

    company: str
    fields: tuple[str, ...]
    sentences: tuple[tuple[str, str, str], ...]


def parse_extraction_prompt(messages: Sequence[Mapping[str, Any]]) -> ExtractionPrompt | None:
    """Read the first user message that numbers sentences; None when no message does (not an extraction)."""
    for message in messages:
        content = str(message.get("content") or "")
        if message.get("role") != "user" or "\nS1: " not in content:
            continue
        company = _COMPANY.search(content)
        url = ""
        sentences: list[tuple[str, str, str]] = []
        for line in content.splitlines():
            if m := _SENTENCE.match(line):
                sentences.append((m.group(1), url, m.group(2).strip()))
            elif m := _SOURCE.match(line):
                url = m.group(1)
        return ExtractionPrompt(company.group(1).strip() if company else "", listed_fields(content), tuple(sentences))
    return None


def _host(url: str) -> str:
    host = (urlsplit(url if "//" in url else f"//{url}").hostname or "").lower()
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


def sentence_rows(row: Mapping[str, Any], *, negative_fraction: float, rng: random.Random) -> list[dict[str, Any]]:
    """Turn one extraction training row (teacher prompt and JSON answer) into sentence-tag rows.

    Each cited sentence is tagged with its fact's field and value; an uncited sentence that states a cited
    value word for word (values of at least 4 characters) gets the same tag, so that equal sentences do not
    teach opposite answers; the other sentences become ``-`` rows, each kept with probability
    ``negative_fraction``. A row that is not an extraction (no numbered sentences) or whose answer is not
    JSON gives no rows.

    Args:
        row: ``{"messages": [..., {"role": "assistant", "content": <JSON answer>}]}``.
        negative_fraction: share of ``-`` rows kept, in [0, 1].
        rng: the random source of that choice (seeded by the caller).

    Returns:
        Rows ``{"messages": [user, assistant]}`` in sentence order.
    """
    messages = list(row.get("messages") or [])
    prompt = parse_extraction_prompt(messages[:-1])
    if prompt is None or not messages:
        return []
    try:
        facts = json.loads(str(messages[-1].get("content") or ""))["facts"]
    except (ValueError, KeyError, TypeError):
        return []
    texts = {sid: text for sid, _url, text in prompt.sentences}
    label: dict[str, tuple[str, str]] = {}
    for fact in facts:
        if isinstance(fact, dict) and fact.get("evidence") in texts and fact.get("value"):
            label.setdefault(str(fact["evidence"]), (str(fact["field"]), str(fact["value"])))
    cited = list(label.values())
    for sid, text in texts.items():
        for field_name, value in cited:
            pattern = r"(?<!\w)" + re.escape(_norm(value)) + r"(?!\w)"
            if sid not in label and len(value) >= _MIN_PROPAGATED_CHARS and re.search(pattern, _norm(text)):
                label[sid] = (field_name, value)
    out: list[dict[str, Any]] = []
    for sid, url, text in prompt.sentences:
        if sid not in label and rng.random() >= negative_fraction:
            continue
        answer = f"{label[sid][0]} | {label[sid][1]}" if sid in label else "-"
        out.append({"messages": [*sentence_messages(prompt.company, url, text),
                                 {"role": "assistant", "content": answer}]})
    return out


class TagGrammar(AnswerGrammar):
    """One sentence's answer as a grammar: ``-``, or a listed field, `` | `` and a span of whole words of the sentence.

    Args:
        sentence: the sentence's text.
        fields: the field names allowed (empty: any lower-case identifier).
    """

    def __init__(self, sentence: str, fields: Sequence[str] = ()) -> None:
        self.sentence = sentence
        self.fields = frozenset(fields)
        self._prefixes = {f[:k] for f in self.fields for k in range(len(f) + 1)}

    def start(self) -> State:
        """The state before the answer's first character."""
        return ("field", "", "", "", frozenset())

    def partial_ok(self, state: State) -> bool:
        """True inside a value whose sentence has non-ASCII text."""
        return state[0] == "span" and any(ord(c) > 127 for c in self.sentence)

    def can_stop(self, state: State) -> bool:
        """True after ``-`` or inside a non-blank value."""
        return state[0] == "done" or (
            state[0] == "span" and bool(state[1].strip()) and word_span(self.sentence, state[1], complete=True))

    def advance(self, state: State, ch: str) -> State | None:
        """The state after ``ch``, or None when ``ch`` leaves the grammar."""
        kind, buf, _nxt, _detail, used = state
        if kind == "field":
            if not buf and ch == "-":
                return ("done", "", "", "", used)
            if ch == " " and buf and (buf in self.fields if self.fields else True):
                return ("lit", "| ", "span", "", used)
            grown = buf + ch
            ok = grown in self._prefixes if self.fields else bool(re.fullmatch(r"[a-z_][a-z0-9_]*", grown))
            return ("field", grown, "", "", used) if ok else None
        if kind == "lit":
            if ch != buf[0]:
                return None
            return ("lit", buf[1:], "span", "", used) if len(buf) > 1 else ("span", "", "", "", used)
        if kind == "span":
            grown = buf + ch
            ok = ch != "\n" and word_span(self.sentence, grown, complete=False)
            return ("span", grown, "", "", used) if ok else None
        return None
