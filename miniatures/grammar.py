"""Answer grammars: from a typed task, the one grammar of its answer that every engine enforces.

The grammar is built once per task as text in the Lark dialect llguidance reads
(https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md), and the same text goes everywhere:

* in-process, ``GrammarLogitsProcessor`` turns it into token masks with llguidance (a transformers logits
  processor; each batch row its own grammar, the stop tokens allowed only once the answer is complete);
* to vLLM as ``structured_outputs.grammar`` and to llama.cpp's server as ``grammar``
  (``miniatures.remote``), and the project's own server (``miniatures.server``) enforces it;
* API teachers get ``json_schema(task)``, the JSON-schema shadow of the same answer (``response_format``).

The grammars (``answer_grammar``):

* extraction (``ExtractionTask``): ``{"facts": [{"field": F, "evidence": "S12", "value": V}, ...]}`` with the
  facts in the listed field order, each field at most once (an ordered sequence of optional items, linear in
  the number of fields), ``evidence`` one of the task's sentence ids, and ``value`` a non-blank span of whole
  words of that sentence (llguidance's ``substring_chunks`` over the sentence cut into words and single
  other characters, JSON-escaped), without leading or trailing white space;
* writing (``WritingTask``): ``{"subject": S, "body": B}``, non-blank JSON strings whose braces only occur in
  the task's merge tags (``{{first_name}}``), no ``\\u`` escapes (no brace written as ``\\u007b``), a one-line
  subject of at most ``task.subject_max_chars`` characters as written (merge tags unexpanded);
* sentence tags (``tag_grammar``): one sentence's answer in the ``sentence-tags`` format (``miniatures.formats``):
  ``-``, or a listed field, `` | `` and a non-blank span of whole words of the sentence.

Masks are computed on bytes: a token that ends inside a UTF-8 character is allowed only when some completion
of it stays in the grammar, and every character counts toward a length limit however it is split into
tokens. Special tokens (``<|im_start|>`` ...) never match grammar text, so none can appear inside a string.
The JSON layout is json.dumps' default (``", "`` and ``": "``), as the agents' training answers are written.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from core.tasks import ExtractionTask, WritingTask

if TYPE_CHECKING:
    import llguidance

__all__ = [
    "GrammarError",
    "GrammarLogitsProcessor",
    "answer_grammar",
    "email_grammar",
    "extraction_grammar",
    "json_schema",
    "llg_tokenizer",
    "matcher",
    "tag_grammar",
]

logger = logging.getLogger(__name__)

#: Most characters of a field name when the task lists no fields (any lower-case identifier).
_FREE_FIELD = r"/[a-z_][a-z0-9_]{0,39}/"
#: A span: one non-space character, or more starting and ending with one.
_NOT_PADDED = r"/\S|\S(?s:.)*\S/"
#: A word (letters and digits) or one other character: the pieces a span is cut from.
_PIECE = re.compile(r"[^\W_]+|[\W_]")


class GrammarError(ValueError):
    """A grammar text llguidance cannot compile (the message carries llguidance's reason)."""


def _lit(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _json_inner(text: str) -> str:
    """``text`` as it is written inside a JSON string (json.dumps' escapes, non-ASCII kept)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _span_terminal(text: str, *, escape: bool) -> str:
    """A Lark terminal body matching the non-blank whole-word spans of ``text`` (JSON-escaped when ``escape``)."""
    pieces = [_json_inner(p) if escape else p for p in _PIECE.findall(text)]
    return f"%regex {json.dumps({'substring_chunks': pieces}, ensure_ascii=False)} & {_NOT_PADDED}"


def extraction_grammar(task: ExtractionTask) -> str:
    """The Lark grammar of the researcher's answer to ``task`` (see the module docstring).

    Sentences without a word to cite are left out of ``evidence``; with no sentence to cite the only answer
    is ``{"facts": []}``. With no listed field, any lower-case identifier is a field (repeats possible).
    """
    lines = ["%llguidance {}", 'start: "{\\"facts\\": [" facts? "]}"']
    citable = [s for s in task.sentences if s.text.strip()]
    if not citable:
        return "\n".join(["%llguidance {}", 'start: "{\\"facts\\": []}"']) + "\n"
    names = task.field_names
    if names:
        lines.append("facts: seq0")
        last = len(names) - 1
        for i, name in enumerate(names):
            head = '{"field": "' + _json_inner(name) + '", "evidence": "'
            lines.append(f"fact{i}: {_lit(head)} cite")
            lines.append(f'seq{i}: fact{i}' + (f' (", " seq{i + 1})? | seq{i + 1}' if i < last else ""))
    else:
        lines.append('facts: fact (", " fact)*')
        lines.append('fact: "{\\"field\\": \\"" FIELD "\\", \\"evidence\\": \\"" cite')
        lines.append(f"FIELD: {_FREE_FIELD}")
    alternatives = []
    for j, sentence in enumerate(citable):
        head = _lit(f'{_json_inner(sentence.id)}", "value": "')
        alternatives.append(f'{head} V{j} "\\"}}"')
        lines.append(f"V{j}: {_span_terminal(sentence.text, escape=True)}")
    lines.append("cite: " + " | ".join(alternatives))
    return "\n".join(lines) + "\n"


def email_grammar(task: WritingTask) -> str:
    """The Lark grammar of the writer's answer to ``task`` (see the module docstring)."""
    tags = [f"{{{{{name}}}}}" for name in task.tag_names]
    text = r'/[^"\\{}\x00-\x1f]/'
    tag = "| TAG " if tags else ""
    lines = [
        "%llguidance {}",
        'start: "{\\"subject\\": \\"" SUBJECT "\\", \\"body\\": \\"" BODY "\\"}"',
        f"SUBJECT: (SCHAR {tag})+ & /(?s:.){{1,{task.subject_max_chars}}}/ & NONBLANK",
        f"BODY: (BCHAR {tag})+ & NONBLANK",
        f"SCHAR: {text} | /\\\\[\"\\\\\\/t]/",
        f"BCHAR: {text} | /\\\\[\"\\\\\\/nt]/",
        "NONBLANK: /(?s:.)*[^ ](?s:.)*/",
    ]
    if tags:
        lines.append("TAG: " + " | ".join(_lit(t) for t in tags))
    return "\n".join(lines) + "\n"


def tag_grammar(sentence: str, fields: Collection[str] = ()) -> str:
    """The Lark grammar of one sentence's ``sentence-tags`` answer: ``-`` or ``<field> | <span>``.

    Args:
        sentence: the sentence's text.
        fields: the fields allowed (empty: any lower-case identifier).
    """
    lines = ["%llguidance {}"]
    if not sentence.strip():
        lines.append('start: "-"')
        return "\n".join(lines) + "\n"
    lines.append('start: "-" | FIELD " | " VALUE')
    lines.append("FIELD: " + (" | ".join(_lit(f) for f in fields) if fields else _FREE_FIELD))
    lines.append(f"VALUE: {_span_terminal(sentence, escape=False)}")
    return "\n".join(lines) + "\n"


def answer_grammar(task: ExtractionTask | WritingTask) -> str:
    """The Lark grammar (llguidance dialect) of the answer to ``task``: extraction or email."""
    if isinstance(task, ExtractionTask):
        return extraction_grammar(task)
    return email_grammar(task)


def json_schema(task: ExtractionTask | WritingTask) -> dict[str, Any]:
    """The JSON schema of the answer to ``task``, for ``response_format`` of OpenAI-API teachers.

    The part of the grammar a JSON schema in OpenAI's strict mode can say: the layout, the listed fields
    and the sentence ids as enums, and for emails a pattern that allows braces only in the listed merge
    tags. Whole-word spans and the subject's length are not expressible there; grounding and email
    validation check them after the answer.

    Returns:
        ``{"name": ..., "strict": True, "schema": {...}}``: the ``json_schema`` member of ``response_format``.
    """
    if isinstance(task, ExtractionTask):
        field: dict[str, Any] = {"type": "string"}
        if task.field_names:
            field["enum"] = list(task.field_names)
        item = {
            "type": "object",
            "properties": {"field": field,
                           "evidence": {"type": "string", "enum": [s.id for s in task.sentences]},
                           "value": {"type": "string"}},
            "required": ["field", "evidence", "value"],
            "additionalProperties": False,
        }
        if not task.sentences:
            item = {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
        schema: dict[str, Any] = {
            "type": "object", "properties": {"facts": {"type": "array", "items": item}},
            "required": ["facts"], "additionalProperties": False,
        }
        return {"name": "extraction", "strict": True, "schema": schema}
    tags = "|".join(re.escape(name) for name in task.tag_names)
    piece = r"[^{}]" + (rf"|\{{\{{(?:{tags})\}}\}}" if tags else "")
    text = {"type": "string", "pattern": rf"^(?:{piece})*$"}
    one_line = r"[^{}\n]" + piece[len("[^{}]"):]
    subject = {**text, "pattern": rf"^(?:{one_line})*$",
               "description": f"one line, at most {task.subject_max_chars} characters"}
    schema = {"type": "object", "properties": {"subject": subject, "body": text},
              "required": ["subject", "body"], "additionalProperties": False}
    return {"name": "email", "strict": True, "schema": schema}


# ---------------------------------------------------------------------- llguidance


def llg_tokenizer(tokenizer: Any, stop_token_ids: Sequence[int] = ()) -> llguidance.LLTokenizer:
    """The llguidance view of a Hugging Face fast tokenizer, with ``stop_token_ids`` as its end tokens.

    About a second for a 150k vocabulary: build it once per tokenizer. Stop ids outside the vocabulary are
    left out (a caller may use an id no model emits to disable stopping).

    Raises:
        ValueError: the tokenizer is not a fast (Rust) tokenizer.
    """
    import llguidance.hf

    size = len(tokenizer)
    stops = sorted({int(i) for i in stop_token_ids if 0 <= int(i) < size})
    eos = stops or None
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=size, eos_token=eos)


def matcher(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """A fresh llguidance matcher of ``grammar`` (Lark text) over ``tokenizer``.

    Raises:
        GrammarError: the grammar does not compile (llguidance's message).
    """
    import llguidance

    compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
    # Not precomputing large lexemes over the whole token trie halves the compile time of an extraction grammar
    # (40 sentence spans: 34 -> 17 ms measured here) and leaves the mask time as it was.
    limits = llguidance.LLParserLimits(precompute_large_lexemes=False)
    found = llguidance.LLMatcher(tokenizer, compiled, log_level=0, limits=limits)
    if found.is_error():
        raise GrammarError(f"the answer grammar does not compile: {found.get_error()}")
    return found


class GrammarLogitsProcessor:
    """A ``transformers`` logits processor holding each batch row's answer to its own grammar (llguidance masks).

    Made for one batched ``generate`` call. Rows without a grammar pass through unchanged. At each step the
    token each constrained row chose last is consumed by its matcher, the rows' masks are filled in parallel
    (``llguidance.LLExecutor``) into one bit mask, and refused tokens get ``-inf``. A stop token is allowed
    only once the row's answer is complete; a row that has stopped is left alone (generate pads it).

    Args:
        tokenizer: ``llg_tokenizer(...)`` of the model's tokenizer (its stop tokens are the ones allowed).
        grammars: each row's Lark grammar, or its ``matcher(...)`` (reset here), or None, in batch order.
        prompt_width: the padded prompt length in tokens (generated tokens start there).
        stop_token_ids: ids that end an answer (the engine's; ids outside the vocabulary are ignored).
        executor: an ``llguidance.LLExecutor`` whose threads fill the masks of ``parallel_rows`` or more live rows
            (default: none, every mask on the calling thread: a hand-off to a pool costs more than a mask of a
            few rows, measured at tens of ms on a busy 2-core machine).
        parallel_rows: the fewest live rows given to ``executor``.

    ``__call__(input_ids, scores)`` takes ``input_ids`` (batch, prompt_width + generated) and ``scores``
    (batch, model vocabulary, which may be wider than the tokenizer's) and returns ``scores`` with the
    refused tokens of constrained rows set to -inf.

    Raises:
        GrammarError: a grammar does not compile.
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammars: Sequence[str | llguidance.LLMatcher | None],
                 prompt_width: int, stop_token_ids: Collection[int],
                 executor: llguidance.LLExecutor | None = None, parallel_rows: int = 8) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.vocab_size = int(tokenizer.vocab_size)
        self.stop_token_ids = frozenset(int(i) for i in stop_token_ids if 0 <= int(i) < self.vocab_size)
        self.matchers: list[llguidance.LLMatcher | None] = []
        for grammar in grammars:
            if isinstance(grammar, str):
                self.matchers.append(matcher(tokenizer, grammar))
            else:
                if grammar is not None:
                    grammar.reset()
                self.matchers.append(grammar)
        self.executor = executor
        self.parallel_rows = parallel_rows
        self._done = [m is None for m in self.matchers]
        self._bits: Any = None
        self.constrained_steps = 0

    def _consume(self, input_ids: Any) -> None:
        if input_ids.shape[1] <= self.prompt_width:
            return
        last = input_ids[:, -1].tolist()
        for row, m in enumerate(self.matchers):
            if m is None or self._done[row]:
                continue
            token = int(last[row])
            if token in self.stop_token_ids or token >= self.vocab_size:
                self._done[row] = True
                continue
            if not m.consume_token(token):
                logger.warning("batch row %d left its answer grammar (%s); leaving it unconstrained",
                               row, m.get_error()[:200])
                self._done[row] = True

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import numpy as np
        import torch

        self._consume(input_ids)
        live = [(m, row) for row, m in enumerate(self.matchers) if m is not None and not self._done[row]]
        if not live:
            return scores
        words = (self.vocab_size + 31) // 32
        if self._bits is None:
            self._bits = np.zeros((len(self.matchers), words), dtype=np.uint32)
        bits = self._bits
        if self.executor is not None and len(live) >= self.parallel_rows:
            self.executor.unsafe_compute_mask_ptr(live, bits.ctypes.data, words * 4, bits.shape[0])
        else:  # on the calling thread: no hand-off to a pool (slow when the CPUs are busy)
            for m, row in live:
                m.unsafe_compute_mask_ptr(bits[row].ctypes.data, words * 4)
        rows = [row for _m, row in live]
        width = min(self.vocab_size, scores.shape[-1])  # the model's rows may be fewer or more than the tokenizer's
        # Bits -> additive bias (0 allowed, -inf refused) through a 256-entry table: one gather, one add.
        bias = torch.from_numpy(_BIAS[bits[rows].view(np.uint8)].reshape(len(rows), -1)[:, :width])
        bias = bias.to(device=scores.device, dtype=scores.dtype)
        if len(rows) == scores.shape[0]:
            scores[:, :width] += bias
            scores[:, width:] = float("-inf")
        else:
            for i, row in enumerate(rows):
                scores[row, :width] += bias[i]
                scores[row, width:] = float("-inf")
        self.constrained_steps += len(rows)
        return scores


def _bias_table() -> Any:
    """``table[b]``: the 8 additive biases (0.0 allowed, -inf refused) of the bits of byte ``b``, lowest bit first."""
    import numpy as np

    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return np.where(bits == 1, 0.0, -np.inf).astype(np.float32)


class _LazyTable:
    """``_bias_table()`` made on first use (numpy is imported by the processor, not by this module)."""

    def __init__(self) -> None:
        self._table: Any = None

    def __getitem__(self, index: Any) -> Any:
        if self._table is None:
            self._table = _bias_table()
        return self._table[index]


_BIAS = _LazyTable()
