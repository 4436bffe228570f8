"""Grammar-constrained decoding for the agents' answers, with grammars made from each prompt.

Both agents' prompts (``agents.prompts``) say what a valid answer may contain, and the answer's JSON
layout is fixed, so a grammar can be made per prompt and every token that would leave it masked
(logit -inf); the stop tokens are masked until the answer is complete:

* ``ExtractionGrammar`` (researcher; the prompt numbers page sentences as ``S<i>: <text>`` and lists
  fields as ``- <name>: <description>``): ``{"facts": [{"field": ..., "evidence": "S12", "value": ...},
  ...]}`` where ``field`` is a listed field not used before, ``evidence`` a sentence id the prompt has, and
  ``value`` a non-blank verbatim span of whole words of that sentence (evidence comes first so that the span can be held
  to it).
* ``EmailGrammar`` (writer; the prompt lists merge tags as ``{{tag}}: ...`` lines): ``{"subject": ...,
  "body": ...}`` with non-blank JSON strings in which braces only occur in listed merge tags, and a
  one-line subject of at most 60 characters as written.

The model still makes every choice of content: which fields to fill, which sentence to cite, where a
span starts and ends, what the email says. It no longer has to spell a name or number it has never seen,
keep JSON syntax or remember tag names, which small models do badly (issue 3: a 10M model got held-out
company names right 0% of the time). This is grammar-constrained decoding as in llama.cpp's GBNF grammars
or the ``outlines`` library, with grammars made per prompt; grounding (``agents.grounding.ground_facts``)
and email validation still check every answer afterwards.

Token texts are decoded one id at a time (``tokenizer.decode([id])``): exact for byte-level BPE
tokenizers (GPT-2 style: the bootstrapped bases, Qwen, Llama 3); for SentencePiece tokenizers, whose
single-token decode drops the leading space, the mask is approximate. A token that decodes to a partial
UTF-8 character (``\\ufffd``) is allowed where free text or a non-ASCII sentence is being written, so
accented names stay reachable.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

__all__ = [
    "AnswerGrammar",
    "EmailGrammar",
    "ExtractionGrammar",
    "Grammar",
    "GrammarProcessor",
    "cited_sentences",
    "decode_vocabulary",
    "grammar_for",
    "listed_fields",
    "listed_merge_tags",
    "run_grammar",
    "word_span",
]

_SENTENCE_LINE = re.compile(r"^(S\d+): ?(.*)$", re.MULTILINE)
_FIELD_LINE = re.compile(r"^- ([a-z_][a-z0-9_]*): ", re.MULTILINE)
_TAG_LINE = re.compile(r"^\{\{([a-z_][a-z0-9_.]*)\}\}: ", re.MULTILINE)
_FREE_FIELD = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_REPLACEMENT = "\ufffd"
_ESCAPES = frozenset('nt"\\/')

# A state: (kind, buffer, next kind, detail, used). Kinds of the extraction grammar: "lit" (buffer = the
# literal still to match, then "next kind"), "items" (after the opening bracket), "field", "id", "span"
# (buffer = text so far, detail = cited id), "after" (after a fact), "done". The email grammar adds
# "text" (detail = "subject" or "body", buffer = "x" once the string is not blank), "escape" and "tag"
# (buffer = the tag name so far, or "{" right after the first brace).
State = tuple[str, str, str, str, frozenset[str]]


def cited_sentences(prompt: str) -> dict[str, str]:
    """The numbered sentences of a rendered prompt: ``{"S12": text}`` from its ``S<i>: <text>`` lines.

    Ids are upper-cased; a repeated id keeps its first text. Returns ``{}`` for a prompt without such lines.
    """
    found: dict[str, str] = {}
    for match in _SENTENCE_LINE.finditer(prompt):
        found.setdefault(match.group(1).upper(), match.group(2).strip())
    return found


def listed_fields(prompt: str) -> tuple[str, ...]:
    """The field names a prompt lists as ``- <name>: <description>`` lines, in order (may be empty)."""
    return tuple(dict.fromkeys(m.group(1) for m in _FIELD_LINE.finditer(prompt)))


def listed_merge_tags(prompt: str) -> tuple[str, ...]:
    """The merge tags a prompt lists as ``{{tag}}: ...`` lines, in order (may be empty)."""
    return tuple(dict.fromkeys(m.group(1) for m in _TAG_LINE.finditer(prompt)))


def decode_vocabulary(tokenizer: Any) -> list[str]:
    """``tokenizer.decode([i])`` for every id of ``tokenizer`` (special tokens decode to their text)."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


class Grammar(Protocol):
    """A character-level grammar: ``start`` state, ``advance`` by one character (None: refused)."""

    def start(self) -> State:
        """The state before the answer's first character."""
        ...

    def advance(self, state: State, ch: str) -> State | None:
        """The state after character ``ch``, or None when ``ch`` leaves the grammar."""
        ...

    def partial_ok(self, state: State) -> bool:
        """Whether a token ending in a partial UTF-8 character may follow ``state``."""
        ...

    def can_stop(self, state: State) -> bool:
        """Whether the answer may end in ``state``."""
        ...


def word_span(sentence: str, span: str, *, complete: bool) -> bool:
    """Whether ``span`` occurs in ``sentence`` starting at a word start (and, when ``complete``, ending at a
    word end): values are whole words, never ``"27"`` cut from ``"2713"``."""
    at = sentence.find(span)
    while at >= 0:
        starts = at == 0 or not (span[:1].isalnum() and sentence[at - 1].isalnum())
        end = at + len(span)
        ends = end == len(sentence) or not (span[-1:].isalnum() and sentence[end].isalnum())
        if starts and (ends or not complete):
            return True
        at = sentence.find(span, at + 1)
    return False


def run_grammar(grammar: Grammar, text: str) -> State | None:
    """The state of ``grammar`` after ``text`` from its start, or None when ``text`` leaves it."""
    state: State | None = grammar.start()
    for ch in text:
        if state is None:
            return None
        state = grammar.advance(state, ch)
    return state


def _literal(state: State, ch: str, enter: Any) -> State | None:
    kind, buf, nxt, detail, used = state
    if ch != buf[0]:
        return None
    return ("lit", buf[1:], nxt, detail, used) if len(buf) > 1 else enter(nxt, detail, used)


class AnswerGrammar:
    """Shared parts of the grammars here: ``run`` over a text, and stopping only once the answer is done.

    Subclasses implement ``start``, ``advance`` and ``partial_ok`` (see ``Grammar``); calling them here raises
    ``NotImplementedError``.
    """

    def start(self) -> State:
        """The state before the answer's first character (subclasses)."""
        raise NotImplementedError

    def advance(self, state: State, ch: str) -> State | None:
        """The state after ``ch``, or None when ``ch`` leaves the grammar (subclasses)."""
        raise NotImplementedError

    def partial_ok(self, state: State) -> bool:
        """Whether a partial UTF-8 character may follow ``state`` (subclasses)."""
        raise NotImplementedError

    def run(self, text: str) -> State | None:
        """The state after ``text``, or None when ``text`` is not the beginning of an answer."""
        return run_grammar(self, text)

    def can_stop(self, state: State) -> bool:
        """True once the answer is complete."""
        return state[0] == "done"


class ExtractionGrammar(AnswerGrammar):
    """The researcher's answer for one prompt (see the module docstring).

    Args:
        sentences: ``{"S12": text}`` of the prompt (``cited_sentences``).
        fields: the field names allowed, each at most once; empty: any lower-case identifier.
    """

    def __init__(self, sentences: Mapping[str, str], fields: Collection[str] = ()) -> None:
        self.sentences = dict(sentences)
        self.fields = frozenset(fields)
        self._id_prefixes = {sid[:k] for sid in self.sentences for k in range(len(sid) + 1)}
        self._field_prefixes = {f[:k] for f in self.fields for k in range(len(f) + 1)}

    def start(self) -> State:
        """The state before the answer's first character."""
        return ("lit", '{"facts": [', "items", "", frozenset())

    def partial_ok(self, state: State) -> bool:
        """True inside a value whose sentence has non-ASCII text."""
        return state[0] == "span" and any(ord(c) > 127 for c in self.sentences[state[3]])

    @staticmethod
    def _enter(kind: str, sid: str, used: frozenset[str]) -> State:
        return (kind, "", "", sid, used)

    def _room(self, used: frozenset[str]) -> bool:
        return not self.fields or bool(self.fields - used)

    def advance(self, state: State, ch: str) -> State | None:
        """The state after ``ch``, or None when ``ch`` leaves the grammar."""
        kind, buf, _nxt, sid, used = state
        if kind == "lit":
            return _literal(state, ch, self._enter)
        if kind in ("items", "after"):
            if ch == "]":
                return ("lit", "}", "done", "", used)
            if kind == "items" and ch == "{" and self._room(used):
                return ("lit", '"field": "', "field", "", used)
            if kind == "after" and ch == "," and self._room(used):
                return ("lit", ' {"field": "', "field", "", used)
            return None
        if kind == "field":
            if ch == '"':
                ok = buf in self.fields and buf not in used if self.fields else bool(_FREE_FIELD.fullmatch(buf))
                return ("lit", ', "evidence": "', "id", "", used | {buf}) if ok else None
            grown = buf + ch
            if self.fields:
                free = any(f.startswith(grown) and f not in used for f in self.fields)
                return ("field", grown, "", "", used) if grown in self._field_prefixes and free else None
            return ("field", grown, "", "", used) if _FREE_FIELD.fullmatch(grown) else None
        if kind == "id":
            if ch == '"':
                return ("lit", ', "value": "', "span", buf, used) if buf in self.sentences else None
            grown = buf + ch
            return ("id", grown, "", "", used) if grown in self._id_prefixes else None
        if kind == "span":
            sentence = self.sentences[sid]
            if ch == '"':
                closes = bool(buf.strip()) and word_span(sentence, buf, complete=True)
                return ("lit", "}", "after", "", used) if closes else None
            grown = buf + ch
            return ("span", grown, "", sid, used) if ch != "\\" and word_span(sentence, grown, complete=False) else None
        return None  # done: only a stop token may follow


class EmailGrammar(AnswerGrammar):
    """The writer's answer for one prompt (see the module docstring).

    Args:
        tags: the merge tags listed in the prompt (``listed_merge_tags``), e.g. ``"first_name"``,
            ``"fact.location"``.
        max_subject_chars: most characters of the subject as written (tags unexpanded); the writer's
            rules ask for at most 60 (``agents.prompts.WRITER_SYSTEM_PROMPT``).
    """

    def __init__(self, tags: Collection[str], max_subject_chars: int = 60) -> None:
        self.tags = frozenset(tags)
        self.max_subject_chars = max_subject_chars
        self._prefixes = {t[:k] for t in self.tags for k in range(len(t) + 1)}

    def start(self) -> State:
        """The state before the answer's first character."""
        return ("lit", '{"subject": "', "text", "subject", frozenset())

    def partial_ok(self, state: State) -> bool:
        """True inside the subject or body text."""
        return state[0] == "text"

    @staticmethod
    def _enter(kind: str, which: str, used: frozenset[str]) -> State:
        return (kind, "", "", which, used)

    def advance(self, state: State, ch: str) -> State | None:
        """The state after ``ch``, or None when ``ch`` leaves the grammar."""
        after = self._advance(state, ch)
        if after is None or state[3] != "subject" or state[0] == "lit":
            return after
        # Inside the subject: count its characters (kept in the state's third slot) up to the limit.
        count = int(state[2] or 0) + 1
        if after[3] != "subject":
            return after  # the subject just closed
        if count > self.max_subject_chars:
            return None
        return (after[0], after[1], str(count), after[3], after[4])

    def _advance(self, state: State, ch: str) -> State | None:
        kind, buf, _nxt, which, used = state
        if kind == "lit":
            return _literal(state, ch, self._enter)
        if kind == "text":
            if ch == '"':
                if not buf:
                    return None  # a blank subject or body
                return ("lit", ', "body": "', "text", "body", used) if which == "subject" else (
                    "lit", "}", "done", "", used)
            if ch == "\\":
                return ("escape", buf, "", which, used)
            if ch == "{":
                return ("tag", "{", "", which, used)
            if ch == "}" or ord(ch) < 32:
                return None  # a lone brace, or a control character JSON must escape
            return ("text", buf or ("x" if ch.strip() else ""), "", which, used)
        if kind == "escape":
            if ch == "n" and which == "subject":
                return None  # a subject is one line
            return ("text", buf, "", which, used) if ch in _ESCAPES else None
        if kind == "tag":
            if buf == "{":
                return ("tag", "", "", which, used) if ch == "{" else None
            if buf.endswith("}"):
                return ("text", "x", "", which, used) if ch == "}" else None
            if ch == "}":
                return ("tag", buf + "}", "", which, used) if buf in self.tags else None
            grown = buf + ch
            return ("tag", grown, "", which, used) if grown in self._prefixes else None
        return None  # done: only a stop token may follow


def grammar_for(prompt: str) -> ExtractionGrammar | EmailGrammar | None:
    """The grammar of a rendered prompt's answer: extraction when it numbers sentences, email when it lists
    merge tags, else None (the answer is not constrained)."""
    sentences = cited_sentences(prompt)
    if sentences:
        return ExtractionGrammar(sentences, listed_fields(prompt))
    tags = listed_merge_tags(prompt)
    return EmailGrammar(tags) if tags else None


def _feed(grammar: Grammar, state: State, ch: str) -> State | None:
    """``grammar.advance``, except that a partial UTF-8 character (decoded as ``\ufffd``) where the grammar
    allows one leaves the state as it is: the bytes that complete it are checked once decoded."""
    if ch == _REPLACEMENT:
        return state if grammar.partial_ok(state) else None
    return grammar.advance(state, ch)


class GrammarProcessor:
    """A ``transformers`` logits processor holding each batch row's answer to its grammar.

    Made for one batched ``generate`` call. Rows without a grammar pass through unchanged.

    Args:
        tokenizer: the model's tokenizer (``decode`` is used).
        grammars: each batch row's grammar (e.g. ``grammar_for(prompt)``) or None, in batch order.
        prompt_width: the padded prompt length in tokens (generated tokens start there).
        vocabulary: ``decode_vocabulary(tokenizer)``, computed once per tokenizer and shared by batches.
        stop_token_ids: ids that end an answer (allowed only once the answer is complete).

    ``__call__(input_ids, scores)`` takes ``input_ids`` (batch, prompt_width + generated) and ``scores``
    (batch, vocab) and returns ``scores`` with the refused tokens of constrained rows set to -inf.
    """

    def __init__(self, tokenizer: Any, grammars: Sequence[Grammar | None], prompt_width: int,
                 vocabulary: Sequence[str], stop_token_ids: Collection[int]) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.grammars = list(grammars)
        stops = set(self.stop_token_ids)
        self._by_first: dict[str, list[tuple[int, str]]] = {}
        for i, text in enumerate(vocabulary):
            if text and i not in stops:
                self._by_first.setdefault(text[0], []).append((i, text))
        self._masks: dict[tuple[int, State], Any] = {}
        self._last: list[tuple[str, State | None]] = [("", g.start() if g else None) for g in self.grammars]
        self.constrained_steps = 0

    def allowed(self, row: int, state: State) -> list[int]:
        """Token ids that keep row ``row``'s answer inside its grammar from ``state`` (``__call__`` caches the
        mask made from them per row and state)."""
        grammar = self.grammars[row]
        assert grammar is not None
        ok: list[int] = list(self.stop_token_ids) if grammar.can_stop(state) else []
        for first, tokens in self._by_first.items():
            after_first = _feed(grammar, state, first)
            if after_first is None:
                continue
            for i, text in tokens:
                current: State | None = after_first
                for ch in text[1:]:
                    if current is None:
                        break
                    current = _feed(grammar, current, ch)
                if current is not None:
                    ok.append(i)
        return ok

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for row, grammar in enumerate(self.grammars):
            if grammar is None:
                continue
            text = self.tokenizer.decode(input_ids[row, self.prompt_width:].tolist(), skip_special_tokens=True)
            text = text.rstrip(_REPLACEMENT)
            seen, state = self._last[row]
            if not text.startswith(seen):
                seen, state = "", grammar.start()
            for ch in text[len(seen):]:  # usually only the new characters
                state = _feed(grammar, state, ch) if state is not None else None
            self._last[row] = (text, state)
            if state is None:
                continue  # already off the grammar (cannot happen from the first token on): leave it be
            key = (row, state)
            mask = self._masks.get(key)
            if mask is None:
                allowed = self.allowed(row, state)
                mask = torch.zeros(scores.shape[-1], device=scores.device)
                if allowed:
                    mask.fill_(float("-inf"))
                    mask[torch.tensor(allowed, device=scores.device)] = 0.0
                self._masks[key] = mask
            scores[row] = scores[row] + mask
            self.constrained_steps += 1
        return scores
