"""Grounding by construction for the researcher (DESIGN.md): untrusted page text in, checked facts out.

Pipeline: ``split_sentences`` cuts each fetched document into sentences, ``is_instruction`` drops
sentences aimed at an AI (prompt injection: they are data, never followed, and can never become
evidence), ``number_sentences`` numbers the rest ``S1..Sn`` across documents under a prompt budget,
and ``ground_facts`` keeps a model's fact only when its evidence resolves to a numbered sentence (or
a verbatim quote of a fetched document) that contains the value, the source is attributed to the
prospect's company and the value has its field's shape; other facts are dropped and counted by reason.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from agents.attribution import CompanyMatcher
from agents.fact_shapes import value_problem
from agents.schemas import DROP_REASONS, FACT_FIELDS, ExtractedFact, ExtractionOutput, Fact
from tools.types import Document

__all__ = [
    "INSTRUCTION_PATTERNS",
    "MAX_FACT_VALUE_CHARS",
    "NumberedSentences",
    "Sentence",
    "check_fact",
    "contains_normalized",
    "ground_facts",
    "host_of",
    "is_instruction",
    "normalize",
    "number_sentences",
    "split_sentences",
]

logger = logging.getLogger(__name__)

#: Longest fact value kept (characters).
MAX_FACT_VALUE_CHARS = 120
#: Sentences longer than this are cut at a word boundary (the cut text is still a verbatim quote).
_MAX_SENTENCE_CHARS = 400
#: Shortest verbatim quote accepted as evidence when the model cites text instead of an id.
_MIN_QUOTE_CHARS = 8

_TRANSLATE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                            "\u2014": "-", "\u00a0": " "})
_WS = re.compile(r"\s+")
_LINE = re.compile(r"\r\n|\r|\n")
# Split after ., ! or ? (optionally followed by a closing quote/bracket) when whitespace and an
# upper-case letter, digit or opening quote follow: "2.0" and "example.com" stay whole.
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+(?=[A-Z0-9\"'\u201c\u2018(\[])"
)

#: Regexes (case-insensitive) for sentences that address an AI instead of a human reader.
INSTRUCTION_PATTERNS: tuple[str, ...] = (
    r"\b(?:ignore|forget|override|bypass)\b.{0,40}\b(?:instructions?|prompts?|directions|rules|guidelines)\b",
    r"\bdisregard\b",
    r"\bAI[- ](?:assistants?|agents?|models?|systems?|bots?|readers?|crawlers?)\b",
    r"\b(?:large )?language models?\b",
    r"\bLLMs?\b",
    r"\bchat ?bots?\b",
    r"\bsystem prompt\b",
    r"\bprompt injection\b",
    r"\byou must now\b",
    r"\byou are now\b",
    r"\bfrom now on\b",
    r"\bnew instructions?\b",
    r"\bnote to (?:the )?(?:ai|bots?|assistants?|crawlers?|scrapers?|models?|agents?)\b",
    r"\bas an ai\b",
    r"\bjailbreak",
    r"\bpretend (?:to be|you are|that you)\b",
    r"\b(?:tell|inform|remind|assure) (?:the |your |all )?(?:readers?|users?|recipients?|prospects?)\b",
    r"\b(?:in|into) (?:your|the|every) (?:email|reply|replies|answer|response|output|summary)s?\b",
    r"\b(?:respond|reply|answer) (?:only )?with\b",
    r"\byou (?:must|should|will) (?:say|write|tell|include|mention|recommend|add|insert)\b",
)
_INSTRUCTION = re.compile("|".join(f"(?:{p})" for p in INSTRUCTION_PATTERNS), re.IGNORECASE)

# Words and shapes that make a sentence likely to state one of the profile fields.
_FACT_CUE = re.compile(
    r"\d|\b(?:founded|established|since|started|based|headquarter\w*|HQ|located|offices?|employ\w*|team|"
    r"staff|people|customers?|clients?|serve[sd]?|built for|trusted|flagship|product|platform|meet|"
    r"announced|launched|raised|opened|hired|expanded|acquired|news|struggle\w*|challenge\w*|focus|"
    r"tackle|industry|company|startup|tags?|location|organization)\b",
    re.IGNORECASE,
)
_TABLE_CELL = re.compile(r"(?<!\\)\|")
_PROMPT_SOURCE = re.compile(r"^Source (\d+):\s*(\S*)\s*$")
_PROMPT_SENTENCE = re.compile(r"^(S\d+): ?(.*)$")
_SENTENCE_ID = re.compile(r"^\[?\s*S\s*(\d+)\s*\]?$", re.IGNORECASE)


def normalize(text: str) -> str:
    """Return ``text`` NFKC-normalised, case-folded, with typographic quotes/dashes made plain and
    whitespace runs collapsed to one space (the comparison form of every grounding check)."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).translate(_TRANSLATE)).strip().casefold()


def contains_normalized(haystack: str, needle: str) -> bool:
    """True when ``needle`` occurs in ``haystack`` after ``normalize`` on both (empty needle: False)."""
    n = normalize(needle)
    return bool(n) and n in normalize(haystack)


def host_of(url: str) -> str:
    """Return the lower-case host of ``url`` without a leading ``www.`` or a port ('' when none).

    A bare domain such as ``acme.example`` is accepted as well as a full URL.
    """
    if not url:
        return ""
    parts = urlsplit(url if "//" in url else f"//{url}")
    host = (parts.hostname or "").lower()
    return host[4:] if host.startswith("www.") else host


def split_sentences(text: str) -> list[str]:
    """Split page text into sentences with a fast regex splitter.

    Lines are split first (so markdown headings, list items, table rows and metadata lines such as
    ``"Organization foundingDate: 2012"`` each stay a sentence of their own; a table row longer than
    400 characters, usually a flattened page layout, is split into its cells), then each piece is split
    after sentence punctuation followed by whitespace and a capital letter or digit. Whitespace inside
    a sentence is collapsed to single spaces; empty pieces are dropped.

    Args:
        text: Document text (markdown plus metadata lines), any length.

    Returns:
        The sentences in page order.
    """
    out: list[str] = []
    for raw_line in _LINE.split(text):
        raw_line = raw_line.strip()
        if not raw_line:
            continue
        # A long markdown table row is usually a page layout flattened into cells: split its cells.
        long_row = raw_line.startswith("|") and len(raw_line) > _MAX_SENTENCE_CHARS
        cells = _TABLE_CELL.split(raw_line) if long_row else [raw_line]
        for piece in (p for cell in cells for p in _SENTENCE_END.split(cell.strip(" |"))):
            piece = _WS.sub(" ", piece).strip()
            if piece and any(ch.isalnum() for ch in piece):
                out.append(piece)
    return out


def is_instruction(sentence: str) -> bool:
    """True when ``sentence`` looks like an instruction aimed at an AI (see ``INSTRUCTION_PATTERNS``).

    Such sentences are prompt injection attempts in page text: the researcher never shows them to a
    model and never accepts them as evidence.
    """
    return _INSTRUCTION.search(sentence) is not None


@dataclass(frozen=True)
class Sentence:
    """One numbered sentence: ``sid`` like ``"S12"``, its text, and the URL of its source document."""

    sid: str
    text: str
    url: str
    source_index: int


@dataclass
class NumberedSentences:
    """The sentences shown to the extraction model, grouped by source.

    Attributes:
        sentences: Numbered sentences in prompt order (``S1..Sn``).
        sources: Source URLs in prompt order (``Source 1`` is ``sources[0]``); sources without a
            selected sentence are left out.
        dropped_instructions: Sentences dropped because they looked like instructions to an AI.
        omitted: Sentences left out to respect the prompt budget.
    """

    sentences: list[Sentence] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    dropped_instructions: int = 0
    omitted: int = 0

    def __post_init__(self) -> None:
        self._by_id = {s.sid.upper(): s for s in self.sentences}

    def get(self, sid: str) -> Sentence | None:
        """Return the sentence with id ``sid`` (``"S12"``, case-insensitive), or None."""
        return self._by_id.get(sid.strip().upper())

    def format(self) -> str:
        """Render the sentences for the prompt: ``Source k: <url>`` then ``S<i>: <text>`` lines,
        sources separated by a blank line. Returns ``"(no sentences)"`` when empty."""
        if not self.sentences:
            return "(no sentences)"
        lines: list[str] = []
        current = -1
        for s in self.sentences:
            if s.source_index != current:
                if lines:
                    lines.append("")
                current = s.source_index
                lines.append(f"Source {current}: {s.url}")
            lines.append(f"{s.sid}: {s.text}")
        return "\n".join(lines)

    @classmethod
    def parse(cls, text: str) -> NumberedSentences:
        """Read sentences back from text made by ``format`` (e.g. an extraction prompt, as traces store it).

        ``Source k: <url>`` lines set the source of the ``S<i>: <text>`` lines after them; other lines
        are ignored. The inverse of ``format`` up to whitespace at the ends of sentences.
        """
        sentences: list[Sentence] = []
        sources: list[str] = []
        source, url = 0, ""
        for line in text.splitlines():
            if m := _PROMPT_SENTENCE.match(line):
                sentences.append(Sentence(m.group(1), m.group(2).strip(), url, source))
            elif m := _PROMPT_SOURCE.match(line):
                source, url = int(m.group(1)), m.group(2)
                sources.append(url)
        return cls(sentences, sources)


def _cut(sentence: str) -> str:
    if len(sentence) <= _MAX_SENTENCE_CHARS:
        return sentence
    cut = sentence[:_MAX_SENTENCE_CHARS]
    space = cut.rfind(" ")
    return cut[:space] if space > _MAX_SENTENCE_CHARS // 2 else cut


def number_sentences(
    documents: Sequence[Document],
    *,
    own_host: str = "",
    max_sentences: int = 150,
    max_chars: int = 24_000,
) -> NumberedSentences:
    """Split, filter and number the sentences of ``documents`` for the extraction prompt.

    Duplicate sentences (navigation, footers) are kept once; instruction-like sentences are dropped
    and counted. When the budget is exceeded, sentences from ``own_host`` and sentences with fact
    cues (digits, "founded", "based in", ...) are kept first; the kept ones are then numbered in
    document order.

    Args:
        documents: Fetched documents, best source first.
        own_host: Host of the prospect's website (as ``host_of`` returns it), or '' when unknown.
        max_sentences: Most sentences in the prompt (> 0).
        max_chars: Most characters of sentence text in the prompt (> 0).

    Returns:
        The numbered sentences.

    Raises:
        ValueError: ``max_sentences`` or ``max_chars`` is not positive.
    """
    if max_sentences <= 0 or max_chars <= 0:
        raise ValueError(f"max_sentences ({max_sentences}) and max_chars ({max_chars}) must be positive")
    seen: set[str] = set()
    candidates: list[tuple[tuple[bool, bool, int, int], int, int, str, str]] = []
    dropped = 0
    for d_idx, doc in enumerate(documents):
        own = bool(own_host) and host_of(doc.url) == own_host
        for pos, raw in enumerate(split_sentences(doc.text)):
            if is_instruction(raw):
                dropped += 1
                continue
            text = _cut(raw)
            key = normalize(text)
            if key in seen:
                continue
            seen.add(key)
            cue = _FACT_CUE.search(text) is not None
            candidates.append(((not own, not cue, d_idx, pos), d_idx, pos, text, doc.url))
    chosen: list[tuple[int, int, str, str]] = []
    used = 0
    for _prio, d_idx, pos, text, url in sorted(candidates, key=lambda c: c[0]):
        if len(chosen) >= max_sentences:
            break
        if used + len(text) > max_chars:
            continue
        used += len(text)
        chosen.append((d_idx, pos, text, url))
    chosen.sort()
    sentences: list[Sentence] = []
    sources: list[str] = []
    last_doc = -1
    for d_idx, _pos, text, url in chosen:
        if d_idx != last_doc:
            sources.append(url)
            last_doc = d_idx
        sentences.append(Sentence(f"S{len(sentences) + 1}", text, url, len(sources)))
    if dropped:
        logger.info("dropped %d instruction-like sentence(s) from %d document(s)", dropped, len(documents))
    return NumberedSentences(sentences, sources, dropped, len(candidates) - len(chosen))


def _resolve(
    evidence: str, numbered: NumberedSentences, documents: Sequence[Document]
) -> tuple[str, str] | None:
    """Return (evidence text, source URL) for a sentence id or a verbatim quote, or None."""
    ev = evidence.strip()
    m = _SENTENCE_ID.match(ev)
    if m:
        s = numbered.get(f"S{m.group(1)}")
        return (s.text, s.url) if s else None
    quote = ev.strip("\"'\u201c\u201d")
    if len(quote) < _MIN_QUOTE_CHARS or is_instruction(quote):
        return None
    needle = normalize(quote)
    for doc in documents:
        if needle in normalize(doc.text):
            return quote, doc.url
    return None


def check_fact(
    ef: ExtractedFact,
    numbered: NumberedSentences,
    documents: Sequence[Document],
    matcher: CompanyMatcher,
    taken: Set[str] = frozenset(),
) -> tuple[str, str, tuple[str, str] | None]:
    """Check one model fact the way ``ground_facts`` does (its rules 1-3, in that order).

    Args:
        ef: The fact as the model gave it.
        numbered, documents, matcher: As for ``ground_facts``.
        taken: Fields that already have a kept fact.

    Returns:
        ``(reason, detail, resolved)``: ``reason`` is '' for a kept fact (``resolved`` is then its
        ``(evidence text, source URL)``) or a key of ``DROP_REASONS`` with ``detail`` saying what is wrong
        and what to do (``resolved`` None).
    """
    field_name, value = ef.field.strip(), ef.value.strip()
    if field_name not in FACT_FIELDS:
        return "ungrounded", f"unknown field; use one of {', '.join(FACT_FIELDS)}", None
    if field_name in taken:
        return "ungrounded", "that field already has a fact; keep one per field", None
    if not value or len(value) > MAX_FACT_VALUE_CHARS:
        return "ungrounded", f"the value is empty or longer than {MAX_FACT_VALUE_CHARS} characters", None
    resolved = _resolve(ef.evidence, numbered, documents)
    if resolved is None:
        last = numbered.sentences[-1].sid if numbered.sentences else "none"
        return ("ungrounded", f"the evidence must be the id of a numbered sentence (S1..{last})"
                + (" or a verbatim quote of a fetched page" if documents else ", not a quote or an unknown id"),
                None)
    sentence, url = resolved
    if not contains_normalized(sentence, value):
        return "ungrounded", f"the value does not occur in the evidence: {sentence!r}", None
    if is_instruction(sentence) or is_instruction(value):
        return "bad_value", "the evidence reads as an instruction", None
    if not matcher.attributed(url, sentence):
        return "misattributed", f"{url} is not the company's site and the sentence does not name it", None
    problem = value_problem(field_name, value, sentence, own_domain=matcher.own_domain)
    if problem:
        return "bad_value", problem, None
    return "", "", resolved


def ground_facts(
    output: ExtractionOutput,
    numbered: NumberedSentences,
    documents: Sequence[Document],
    *,
    matcher: CompanyMatcher,
) -> tuple[list[Fact], dict[str, int]]:
    """Keep the model's facts that are grounded, attributed and well-shaped; drop and count the rest.

    A fact is kept when, in this order:

    1. (else ``ungrounded``) its field is one of ``FACT_FIELDS`` and not yet taken (first wins), its
       evidence resolves (a sentence id such as ``"S12"`` of ``numbered``, or else a verbatim quote of at
       least 8 characters found in a document's text, whitespace- and case-insensitively, that does not
       look like an instruction), and its value is non-empty, at most ``MAX_FACT_VALUE_CHARS`` characters
       and occurs in the evidence;
    2. (else ``misattributed``) the source is attributed to the prospect's company: the page is on the
       company's registrable domain, or the evidence sentence names the company by name or domain
       (``agents.attribution.CompanyMatcher``); the title or heading a sentence sits under does not count;
    3. (else ``bad_value``) neither the evidence nor the value reads as an instruction, and the value has
       its field's shape (``agents.fact_shapes.value_problem``).

    Reasons for drops are logged at debug level.

    Args:
        output: The parsed model answer.
        numbered: The sentences the model was shown.
        documents: The fetched documents (for quote evidence).
        matcher: The prospect's company name and website.

    Returns:
        ``(facts, drops)``: kept facts with evidence text and source URL, and the number of dropped facts
        per reason (keys of ``agents.schemas.DROP_REASONS`` with a count above zero).
    """
    facts: list[Fact] = []
    taken: set[str] = set()
    drops: Counter[str] = Counter()
    for ef in output.facts:
        reason, detail, resolved = check_fact(ef, numbered, documents, matcher, taken)
        if reason or resolved is None:
            drops[reason or "ungrounded"] += 1
            logger.debug("dropped fact %s=%r (evidence %r) as %s: %s", ef.field, ef.value, ef.evidence, reason,
                         detail)
            continue
        taken.add(ef.field.strip())
        facts.append(Fact(field=ef.field.strip(), value=ef.value.strip(), evidence=resolved[0],
                          source_url=resolved[1]))
    return facts, {r: drops[r] for r in DROP_REASONS if drops[r]}
