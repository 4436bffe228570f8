"""Answer grammars: from a typed task, the one grammar of its answer that every engine enforces.

The grammar is built once per task as text in the Lark dialect llguidance reads
(https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md), and the same text goes everywhere:

* in-process, ``GrammarLogitsProcessor`` turns it into token masks with llguidance (a transformers logits
  processor; each batch row its own grammar, the stop tokens allowed only once the answer is complete); a greedy
  decoding loop can check each row's top token first and mask only the rows that refuse it (``mask_rows_greedy``:
  the same choices, without a mask on the steps where the model already follows its grammar);
* to vLLM as ``structured_outputs.grammar`` and to llama.cpp's server as ``grammar``
  (``miniatures.remote``), and the project's own server (``miniatures.server``) enforces it;
* API teachers get ``json_schema(task)``, the JSON-schema shadow of the same answer (``response_format``).

The grammars (``answer_grammar``):

* extraction (``ExtractionTask``): ``{"facts": [{"field": F, "evidence": "S12", "value": V}, ...]}`` with the
  facts in the listed field order, each field at most once (an ordered sequence of optional items, linear in
  the number of fields), ``evidence`` one of the task's sentence ids, and ``value`` a non-blank span of whole
  words of that sentence (the sentence cut into words and single other characters, JSON-escaped; a chain of
  optional terminals, ``_span_terminals``), without leading or trailing white space;
* writing (``WritingTask``): ``{"subject": S, "body": B}``, non-blank JSON strings whose braces only occur in
  the task's merge tags (``{{first_name}}``), no ``\\u`` escapes (no brace written as ``\\u007b``), a one-line
  subject of at most ``task.subject_max_chars`` characters as written (merge tags unexpanded); rules that only
  refuse, never force (``email_grammar``): the product's tag at most once in the body, no product,
  sender-company or first-name tag in the subject (the product's name typed out is left to validation and the
  rubric);
* writing with the rules of craft (``craft_email_grammar``, ``answer_grammar(task, craft=True)``, opt-in:
  in-process writer miniatures trained with ``email_grammar="craft"``): the same JSON, plus the structure the
  teacher's emails always have and the rubric checks: a plain greeting, an opener not in the first person, a fact,
  the product once, the proof point, the call to action once, the opt-out line at the end, a 2-to-5-word subject
  without the product or first name, and the word band up to the call to action (rules indexed by words still to
  write);
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
import os
import re
import threading
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from core.tasks import ExtractionTask, WritingTask

if TYPE_CHECKING:
    import llguidance

__all__ = [
    "GrammarError",
    "GrammarLogitsProcessor",
    "CRAFT_BAND_MARGIN",
    "CRAFT_NAME_WORDS",
    "CRAFT_TAIL_CHUNKS",
    "EMAIL_GRAMMARS",
    "TEXT_SLICES",
    "answer_grammar",
    "craft_email_grammar",
    "email_grammar",
    "extraction_grammar",
    "json_schema",
    "llg_tokenizer",
    "mask_rows_greedy",
    "matcher",
    "shared_executor",
    "tag_grammar",
]

logger = logging.getLogger(__name__)

#: The email grammars a writer miniature can be held to in-process: ``format`` (``email_grammar``) or ``craft``
#: (``craft_email_grammar``); chosen at training time (``finetune.config.TrainConfig.email_grammar``).
EMAIL_GRAMMARS = ("format", "craft")

#: Most characters of a field name when the task lists no fields (any lower-case identifier).
_FREE_FIELD = r"/[a-z_][a-z0-9_]{0,39}/"
#: A word (letters and digits) or one other character: the pieces a span is cut from.
_PIECE = re.compile(r"[^\W_]+|[\W_]")
#: White space as llguidance's regular expressions read ``\s`` (Unicode White_Space): a span neither starts nor
#: ends with a piece written as one of these.
_WHITE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                   + "".join(map(chr, range(0x2000, 0x200B))))


class GrammarError(ValueError):
    """A grammar text llguidance cannot compile (the message carries llguidance's reason)."""


def _lit(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _json_inner(text: str) -> str:
    """``text`` as it is written inside a JSON string (json.dumps' escapes, non-ASCII kept)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _span_terminals(name: str, text: str, *, escape: bool) -> list[str]:
    """Lark terminal lines: ``name`` matches the non-blank whole-word spans of ``text`` (JSON-escaped when ``escape``).

    ``text`` is cut into words (letters and digits) and single other characters; a span is a run of those pieces,
    as written, that starts and ends with a piece that is not white space (``_WHITE``). Each such piece with the
    white space written before it is a unit ``u_k``; ``name`` is any unit without its white space followed by
    ``name_{k+1}``, the units after it in order, each optional once the one before is there
    (``name_k: (u_k name_{k+1})?``): linear in the pieces, and no intersection of automata, which llguidance
    would otherwise have to build state by state while masking (measured against ``substring_chunks`` intersected
    with a not-padded regex, ``benchmarks/grammar_speed.py``: masks 1.4x to 2.2x less CPU on a 40-sentence
    extraction answer and a sentence-tags answer at 4096 and 150k tokens).

    Raises:
        GrammarError: ``text`` has no piece that is not white space (callers leave such sentences out).
    """
    units: list[tuple[str, str]] = []  # (white space before, the piece), as written
    lead = ""
    for piece in _PIECE.findall(text):
        written = _json_inner(piece) if escape else piece
        if written in _WHITE:
            lead += written
        else:
            units.append((lead, written))
            lead = ""
    if not units:
        raise GrammarError(f"no word to cite in {text!r}; leave blank sentences out of the grammar")
    last = len(units) - 1
    lines = [f"{name}_{k}: ({_lit(''.join(units[k]))}" + (f" {name}_{k + 1})?" if k < last else ")?")
             for k in range(last, 0, -1)]
    lines.append(f"{name}: " + " | ".join(_lit(piece) + (f" {name}_{k + 1}" if k < last else "")
                                          for k, (_lead, piece) in enumerate(units)))
    return lines


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
        lines += _span_terminals(f"V{j}", sentence.text, escape=True)
    lines.append("cite: " + " | ".join(alternatives))
    return "\n".join(lines) + "\n"


def email_grammar(task: WritingTask, offer_tags: Sequence[str] = ()) -> str:
    """The Lark grammar of the writer's answer to ``task`` (see the module docstring).

    ``offer_tags`` are more tag names the body may hold (the ``writer-brief`` format's ``{{cta}}``, ``{{proof}}``,
    ``{{opt_out}}``, ``miniatures.formats.OFFER_TAGS``).

    Besides the format, it refuses (never forces) what no email of the heuristic teacher has and the rubric
    (``evals.rubric``) fails: a second ``{{product}}`` in the body (``product_once``) and the tags ``{{product}}``,
    ``{{sender_company}}`` and ``{{first_name}}`` in the subject (``subject_form``). The lexemes are written in
    the shapes llguidance's slicer takes (``TEXT_SLICES``: a plain repeat of text characters, ``& ~(/ */)`` for
    "not blank"), so a new lexer state inside free text does not walk the whole vocabulary: the product tag at
    most once is ``CHUNK* ("{{product}}" CHUNK*)?`` and a subject is either plain text or text with a tag. The
    product's name typed out is left to validation and the rubric: refusing it (``& ~(ANY name ANY)``) has no
    sliceable form and cost 0.20-0.24 ms per token and row at a 150k vocabulary against 0.03-0.08 without it
    (``benchmarks/grammar_speed.py``). Rules that the call to action, proof point or opt-out line appear at most
    once are left out: with the others they made llguidance's lexer give up ("too many expressions
    constructed") on the heuristic teacher's own emails.
    """
    extra = [f"{{{{{name}}}}}" for name in dict.fromkeys(offer_tags) if name not in task.tag_names]
    tags = [*(f"{{{{{name}}}}}" for name in task.tag_names), *extra]
    subject_tags = [f"{{{{{name}}}}}" for name in task.tag_names if name not in _SUBJECT_BANNED]
    others = [t for t in tags if t != "{{product}}"]
    chunk = "(BCHAR | TAGX)" if others else "BCHAR"
    text_class = r'/[^"\\{}\x00-\x1f]/'
    n = task.subject_max_chars
    if "{{product}}" in tags:
        body = f'BODY: ({chunk}* ("{{{{product}}}}" {chunk}*)?) & ~(/ */)'
    else:
        body = f"BODY: {chunk}+ & ~(/ */)"
    lines = [
        "%llguidance {}",
        'start: "{\\"subject\\": \\"" subject "\\", \\"body\\": \\"" BODY "\\"}"',
        "subject: SUBJP" + (" | SUBJT" if subject_tags else ""),
        f"SUBJP: SCHAR{{1,{n}}} & ~(/ */)",
        body,
        f"SCHAR: {text_class} | /\\\\[\"\\\\\\/t]/",
        f"BCHAR: {text_class} | /\\\\[\"\\\\\\/nt]/",
    ]
    if subject_tags:
        lines.append(f"SUBJT: ((SCHAR | STAG)* STAG (SCHAR | STAG)*) & /(?s:.){{1,{n}}}/")
        lines.append("STAG: " + " | ".join(_lit(t) for t in subject_tags))
    if others:
        lines.append("TAGX: " + " | ".join(_lit(t) for t in others))
    return "\n".join(lines) + "\n"

#: Words a name tag is counted as in the craft grammar's word band when the task does not show its value
#: (as the heuristic teacher assumes: company names of two words); fact tags count their value's words, the
#: product its name's, the title the prospect's title's.
CRAFT_NAME_WORDS = {"first_name": 1, "last_name": 1, "company": 2, "title": 2, "sender_name": 2, "sender_company": 2}
#: Words the craft grammar keeps inside each end of the task's word band, for names longer than assumed.
CRAFT_BAND_MARGIN = 3
#: Most white-space separated chunks between the call to action and the opt-out line (sign-off, signature).
CRAFT_TAIL_CHUNKS = 24
#: Words that may not start the first sentence after the greeting (the rubric's ``opener`` check).
_FIRST_PERSON = "i i'm i've i'd i'll me my mine myself we we're we've we'd we'll our ours us".split()
#: Name tags a subject may not use: no product pitch, no first name (the rubric's ``subject_form``).
_SUBJECT_BANNED = frozenset({"product", "sender_company", "first_name"})
_GREETINGS = ("Hi", "Hello", "Hey")


def _tag_words(task: WritingTask) -> dict[str, int]:
    """Each merge tag's word count in the rendered email (at least 1; see ``CRAFT_NAME_WORDS``)."""
    out: dict[str, int] = {}
    for tag in task.merge_tags:
        if tag.is_fact:
            n = len(tag.value.split())
        elif tag.name == "product":
            n = len(task.offer.product.split())
        elif tag.name == "title":
            n = len(task.prospect_title.split()) or CRAFT_NAME_WORDS["title"]
        else:
            n = CRAFT_NAME_WORDS.get(tag.name, 1)
        out[tag.name] = max(1, n)
    return out


def _chunk_terminal(name: str, tags: Sequence[str], ending: str = "[,.;:?!)]") -> str:
    """A terminal: one white-space free chunk holding exactly one of ``tags``, with at most an opening bracket or
    single quote before it and ``'s`` and two of ``ending`` after it (``{{company}}'s``, ``{{fact.location}}.``): a tag
    glued to letters would render as one word ("x.Tallyfold"), which the rubric counts as no name and
    validation reads as a domain."""
    return f"{name}: /[(']?/ ({' | '.join(_lit(t) for t in tags)}) /(?:'s)?{ending}{{0,2}}/"


def _by_weight(names: Sequence[str], weights: dict[str, int]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(weights[name], []).append(f"{{{{{name}}}}}")
    return dict(sorted(groups.items()))


def craft_email_grammar(task: WritingTask) -> str:
    """The Lark grammar of an email that keeps the writer's rules of craft, besides ``email_grammar``'s format.

    The structural rules every email of the heuristic teacher follows and the writer prompt asks for
    (``agents.prompts.WRITER_SYSTEM_PROMPT``; each is a check of ``evals.rubric``), built from ``task``:

    * subject: 2 to 5 words, at most ``task.subject_max_chars`` characters, no ``!``, no four capitals in a
      row, none of the tags ``{{product}}``, ``{{sender_company}}``, ``{{first_name}}``;
    * body: a greeting (``Hi``/``Hello``/``Hey`` and ``{{first_name}},`` when that tag is listed) and a blank
      line; a first word that is not first person (I, we, our ...); then, in this order, at least one listed
      fact tag (when the task lists any), ``{{product}}`` exactly once (when listed), the offer's proof point
      word for word (when it has one; its first letter in either case); the call to action word for word,
      exactly once, ending the head; a tail of at most ``CRAFT_TAIL_CHUNKS`` chunks (sign-off, signature;
      no ``{{product}}``, not the call to action's first word as written there, which the head does not use
      either) ending with the opt-out line word for word;
    * word band: from the greeting to the end of the call to action, ``task.min_words`` to ``task.max_words``
      words narrowed by ``CRAFT_BAND_MARGIN`` at each end, a tag counted as its value's words
      (``CRAFT_NAME_WORDS`` for names the task does not show).

    The model still writes every free word; the grammar only fixes the offer's own texts (call to action,
    opt-out line, proof point) and refuses answers that break a rule. Inside the body, words are runs of
    characters without white space, braces, backslashes or double quotes (no JSON escape but ``\\n`` and
    ``\\t`` as white space); each chunk holds at most one tag. The band is counted by rules indexed by the
    words still to write (about ``3 * max_words`` small rules: a grammar of ~30k characters that compiles in
    tens of ms). A rendered name longer than assumed can still move the rubric's count, and a product name
    typed out in words is not counted.

    Raises:
        GrammarError: the offer's texts leave no room for a body in the band (the message says which).
    """
    names = task.tag_names
    weights = _tag_words(task)
    offer = task.offer
    cta, opt_out, proof = offer.call_to_action.strip(), offer.opt_out_line.strip(), offer.proof_point.strip()
    lines = [
        "%llguidance {}",
        'start: "{\\"subject\\": \\"" SUBJECT "\\", \\"body\\": \\"" body "\\"}"',
        r'PLAIN: /[^"\\{}\s\x00-\x1f]/',
        r'SPLAIN: /[^"\\{}\s\x00-\x1f!]/',
        r"SP: /(?:[^\S\x00-\x1f]|\\[nt])+/",
        # A word: no letter, '.' or '@' and letter run together ("pressing.Thanks" reads as a domain).
        r"W: PLAIN+ & ~(/(?s:.)*[^\W\d_][.@][^\W\d_](?s:.)*/)",
    ]
    # Subject: chunks separated by one space, 2 to 5 words (tags weighted), within the character limit.
    subject_groups = _by_weight([n for n in names if n not in _SUBJECT_BANNED], weights)
    one = subject_groups.pop(1, [])
    lines.append("SW1: (SPLAIN+ & ~(/(?s:.)*[A-Z]{4}(?s:.)*/))"
                 + (f" | SPLAIN* ({' | '.join(_lit(t) for t in one)}) SPLAIN*" if one else ""))
    for w, tags in subject_groups.items():
        lines.append(_chunk_terminal(f"SW{w}", tags, "[,.;:?)]"))
    subject_weights = [1, *subject_groups]
    for n in range(1, 6):
        parts = [f"SW{w}" if w == n else f'SW{w} " " SS{n - w}' for w in subject_weights if w <= n]
        lines.append(f"SS{n}: " + " | ".join(parts))
    lines.append(f"SUBJECT: (SS2 | SS3 | SS4 | SS5) & /(?s:.){{1,{task.subject_max_chars}}}/")
    # Body chunks: plain words (weight 1; never the first word of the call to action as it is written there,
    # which only the call to action itself writes), name-tag chunks (CN<w>), fact-tag chunks (CF<w>), the product (CP).
    cta_word = re.sub(r"[^\w'-].*", "", cta.split()[0]) if cta else ""
    lines.append("WH: W" + (f" & ~({_lit(cta_word)} /(?:[^\\w'-](?s:.)*)?/)" if cta_word else ""))
    chunks: dict[str, tuple[str, int]] = {"WH": ("N", 1)}
    facts = _by_weight([n for n in names if n.startswith("fact.")], weights)
    for kind, groups in (("N", _by_weight([n for n in names if not n.startswith("fact.") and n != "product"],
                                          weights)), ("F", facts)):
        for w, tags in groups.items():
            lines.append(_chunk_terminal(f"C{kind}{w}", tags))
            chunks[f"C{kind}{w}"] = (kind, w)
    # The stages the head passes in order: a fact, the product, the proof point (each when there is one).
    stages: list[tuple[str, str, int]] = []
    if facts:
        stages.append(("fact", "", min(facts)))
    if "product" in names:
        lines.append(_chunk_terminal("CP", ["{{product}}"]))
        stages.append(("product", "CP", weights["product"]))
    if proof:
        text = _json_inner(proof)
        first = f"({_lit(text[0].lower())} | {_lit(text[0].upper())})" if text[0].isalpha() else _lit(text[0])
        lines.append(f"PROOF: {first} {_lit(text[1:])}")
        stages.append(("proof", "PROOF", len(proof.split())))
    final = len(stages)

    def need(stage: int) -> int:
        return sum(w for _kind, _term, w in stages[stage:])

    greeting_words = 2 if "first_name" in names else 1
    fixed = greeting_words + len(cta.split())
    low = task.min_words + CRAFT_BAND_MARGIN - fixed
    high = task.max_words - CRAFT_BAND_MARGIN - fixed
    if high < max(low, need(0), 1):
        raise GrammarError(f"the call to action, greeting and proof point leave no room for a body of "
                           f"{task.min_words} to {task.max_words} words; shorten the offer's texts")
    todo: list[tuple[int, int]] = []

    def rest(stage: int, words: int) -> str | None:
        """The rule for the rest of the head: '' when it is complete, None when it cannot be."""
        if words < need(stage):
            return None
        if stage == final and words == 0:
            return ""
        todo.append((stage, words))
        return f"h{stage}_{words}"

    def alternatives(stage: int, words: int, *, first: bool = False) -> list[str]:
        out = []
        for term, (kind, w) in chunks.items():
            advance = stage < final and stages[stage][0] == "fact" and kind == "F"
            follow = rest(stage + 1 if advance else stage, words - w)
            if follow is not None:
                out.append(f"{'WFIRST' if first and term == 'WH' else term} SP {follow}".rstrip())
        if stage < final and stages[stage][1]:
            _kind, term, w = stages[stage]
            follow = rest(stage + 1, words - w)
            if follow is not None:
                out.append(f"{term} SP {follow}".rstrip())
        return out

    first_person = "|".join(re.escape(w) for w in _FIRST_PERSON)
    lines.append(f"WFIRST: WH & ~(/[^\\w'-]*(?i:{first_person})(?:[^\\w'-](?s:.)*)?/)")
    starts = range(max(low, need(0), 1), high + 1)
    lines.append("head: " + " | ".join(f"f_{n}" for n in starts))
    lines += [f"f_{n}: " + " | ".join(alternatives(0, n, first=True)) for n in starts]
    done: set[tuple[int, int]] = set()
    while todo:
        stage, words = todo.pop()
        if (stage, words) not in done:
            done.add((stage, words))
            lines.append(f"h{stage}_{words}: " + " | ".join(alternatives(stage, words)))
    greetings = [f"{g} {{{{first_name}}}}," if "first_name" in names else f"{g}," for g in _GREETINGS]
    lines.append("GREETING: " + " | ".join(_lit(g) for g in greetings))
    lines.append("tchunk: " + " | ".join(chunks))
    ending = f" {_lit(_json_inner(opt_out))}" if opt_out else ""
    lines.append(f"tail: SP (tchunk SP){{0,{CRAFT_TAIL_CHUNKS}}}{ending}" if opt_out
                 else f"tail: (SP tchunk){{0,{CRAFT_TAIL_CHUNKS}}}")
    lines.append(f'body: GREETING "\\\\n\\\\n" head {_lit(_json_inner(cta))} tail')
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
    lines += _span_terminals("VALUE", sentence, escape=False)
    return "\n".join(lines) + "\n"


def answer_grammar(task: ExtractionTask | WritingTask, *, craft: bool = False) -> str:
    """The Lark grammar (llguidance dialect) of the answer to ``task``: extraction or email.

    Args:
        task: the typed task.
        craft: for a writing task, also hold the email to the rules of craft (``craft_email_grammar``).

    Raises:
        GrammarError: with ``craft``, the offer's texts leave no room for a body in the word band.
    """
    if isinstance(task, ExtractionTask):
        return extraction_grammar(task)
    return craft_email_grammar(task) if craft else email_grammar(task)


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


#: The slices of ``llg_tokenizer``: runs of the JSON-string text characters the email grammars' free text is made
#: of (``[^"\\{}\x00-\x1f]``: no quote, backslash, brace or control character), up to 10, up to 30, any number.
#: llguidance splits the vocabulary into the tokens of each slice (the first that matches a token takes it) and
#: the rest; on a new lexer state whose lexeme provably allows every string of a slice (llguidance checks a
#: lexeme of the form ``C*``, ``C{0,n}`` with n at least the slice's bound, or such a form ``& ~X`` with X of
#: bounded length) it ORs in that slice's whole mask and walks only the other tokens' trie; any other state walks
#: the whole trie, as without slices. Masks are the same either way
#: (https://github.com/guidance-ai/llguidance/blob/main/docs/optimizations.md, "Slicer optimization").
#: llguidance's default slices allow braces, which no lexeme here allows freely, so they never applied. Measured
#: at a 150k vocabulary: a body lexeme ``(BCHAR | TAG)+ & ~(/ */)`` takes one trie walk per answer with these
#: slices instead of one per new lexer state (2 ms each here); a lexeme intersected with another regular
#: expression (``& NONBLANK``, a length limit, ``~(ANY X ANY)``) is never sliced.
TEXT_SLICES = (r'[^"\\{}\x00-\x1f]{1,10}', r'[^"\\{}\x00-\x1f]{1,30}', r'[^"\\{}\x00-\x1f]+')


def llg_tokenizer(tokenizer: Any, stop_token_ids: Sequence[int] = (),
                  slices: Sequence[str] | None = TEXT_SLICES) -> llguidance.LLTokenizer:
    """The llguidance view of a Hugging Face fast tokenizer, with ``stop_token_ids`` as its end tokens.

    About a second for a 150k vocabulary: build it once per tokenizer. Stop ids outside the vocabulary are
    left out (a caller may use an id no model emits to disable stopping).

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        stop_token_ids: the ids that end an answer.
        slices: llguidance's slicer regexes (``TEXT_SLICES``, the default; None: llguidance's own defaults;
            empty: none). They change how fast masks are computed, never the masks.

    Raises:
        ValueError: the tokenizer is not a fast (Rust) tokenizer.
    """
    import llguidance.hf

    size = len(tokenizer)
    stops = sorted({int(i) for i in stop_token_ids if 0 <= int(i) < size})
    eos = stops or None
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=size, eos_token=eos,
                                        slices=None if slices is None else list(slices))


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


#: -inf as the bits of a float32 (0xFF800000 read as a signed 32-bit integer): a refused token's additive bias.
_NEG_INF_BITS = -8388608
#: A row whose bit mask has at most max(8, words / _SPARSE_WORDS) of its 32-token words non-zero (a few allowed
#: tokens: fixed JSON text, a span's next word) is filled with -inf and gets its allowed scores back; one with at
#: most that many words not all ones (a few refused tokens: free text) gets -inf at its refused tokens alone.
#: Measured at a 150k vocabulary, every step of the benchmark's three answers is one of the two.
_SPARSE_WORDS = 32
#: Vocabularies of fewer 32-token words (32k tokens) are masked by a bias in every row.
_SPARSE_FROM_WORDS = 1024
#: The fewest CPUs on which a processor fills its rows' masks on the shared executor by default.
_POOL_FROM_CPUS = 4

#: ``parallel_rows`` that no batch reaches: every mask on the calling thread.
_NEVER = 1 << 30

_shared: list[llguidance.LLExecutor] = []
_shared_lock = threading.Lock()


def shared_executor() -> llguidance.LLExecutor:
    """The process-wide ``llguidance.LLExecutor`` (llguidance's default threads: 80% of the CPUs, at most 32).

    Made on first use; every processor without an executor of its own fills its batch's masks with it.
    """
    import llguidance

    with _shared_lock:
        if not _shared:
            _shared.append(llguidance.LLExecutor())
        return _shared[0]


class GrammarLogitsProcessor:
    """A ``transformers`` logits processor holding each batch row's answer to its own grammar (llguidance masks).

    Made for one batched ``generate`` call (``__call__``), or kept by a decoding loop whose rows come and go
    (``mask_rows``: the caller consumes each row's tokens and hands the live matchers of the step's rows). Rows
    without a grammar pass through unchanged. At each step the
    token each constrained row chose last is consumed by its matcher and the live rows' masks are filled into
    one bit mask (int32 words of 32 tokens, bit ``i % 32`` of word ``i // 32`` set when token ``i`` is
    allowed): with 4 CPUs or more by one ``llguidance.numpy.fill_next_token_bitmask_par`` call, the rows in
    parallel in native code, else row by row on the calling thread (see ``parallel_rows``). The
    mask is then applied in place, without a float row per step: a row with few allowed tokens is filled
    with -inf and its allowed scores put back, a row with few refused tokens gets -inf at those alone, and
    any other row gets an additive bias (0 allowed, -inf refused) unpacked from the bits into an int32
    scratch buffer made once per processor (the bits of -inf written as int32 and read as float32). Scores
    wider than the tokenizer (a model vocabulary padded to a multiple of 64) are -inf past it. A stop token
    is allowed only once the row's answer is complete; a row that has stopped is left alone (generate pads
    it).

    Args:
        tokenizer: ``llg_tokenizer(...)`` of the model's tokenizer (its stop tokens are the ones allowed).
        grammars: each row's Lark grammar, or its ``matcher(...)`` (reset here), or None, in batch order.
        prompt_width: the padded prompt length in tokens (generated tokens start there).
        stop_token_ids: ids that end an answer (the engine's; ids outside the vocabulary are ignored).
        executor: the ``llguidance.LLExecutor`` whose threads fill the masks of ``parallel_rows`` or more
            live rows in one call (default: ``shared_executor()``).
        parallel_rows: the fewest live rows handed to the executor; fewer are done on the calling thread
            (default: 2 with 4 CPUs or more; below, every mask on the calling thread: measured on a busy
            2-core machine, a hand-off cost 1 to 4 ms per step, more than the masks of 8 rows).
        sparse_limit: the most 32-token words that are not all zeros (not all ones) in a row masked through
            its allowed (refused) tokens alone (default: ``max(8, words // 32)`` from a 32k vocabulary, -1
            below; -1: every row by a bias).

    ``__call__(input_ids, scores)`` takes ``input_ids`` (batch, prompt_width + generated) and ``scores``
    (batch, model vocabulary, which may be wider or narrower than the tokenizer's; any float dtype, any
    device) and returns ``scores``, changed in place, with the refused tokens of constrained rows at -inf.

    Raises:
        GrammarError: a grammar does not compile.
        ValueError: (at call) ``scores`` has another number of rows than ``grammars``.
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammars: Sequence[str | llguidance.LLMatcher | None],
                 prompt_width: int, stop_token_ids: Collection[int],
                 executor: llguidance.LLExecutor | None = None, parallel_rows: int | None = None,
                 sparse_limit: int | None = None) -> None:
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
        if parallel_rows is None:  # on 2 CPUs the hand-off to the pool costs more than it saves (measured)
            parallel_rows = 2 if (os.cpu_count() or 1) >= _POOL_FROM_CPUS else _NEVER
        self.parallel_rows = max(1, parallel_rows)
        self.sparse_limit = sparse_limit
        self._done = [m is None for m in self.matchers]
        self._bits: Any = None  # numpy int32 (batch, words): the rows' bit masks
        self._scratch: Any = None  # int32 scratch for unpacked biases (numpy on the host, torch on a device)
        self._shifts: Any = None  # torch int32 (32,): 0..31
        self.constrained_steps = 0

    def _pool(self) -> llguidance.LLExecutor:
        return self.executor if self.executor is not None else shared_executor()

    def _consume(self, input_ids: Any) -> None:
        if input_ids.shape[1] <= self.prompt_width:
            return
        last = input_ids[:, -1].tolist()
        pending: list[tuple[llguidance.LLMatcher, int, int]] = []
        for row, m in enumerate(self.matchers):
            if m is None or self._done[row]:
                continue
            token = int(last[row])
            if token in self.stop_token_ids or not 0 <= token < self.vocab_size:
                self._done[row] = True
                continue
            pending.append((m, token, row))
        for m, token, row in pending:  # microseconds each: a hand-off to the pool would cost more
            if not m.consume_token(token):
                logger.warning("batch row %d left its answer grammar (%s); leaving it unconstrained",
                               row, m.get_error()[:200])
                self._done[row] = True

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if scores.shape[0] != len(self.matchers):
            raise ValueError(f"scores have {scores.shape[0]} rows but the processor holds {len(self.matchers)} "
                             "grammars; give one grammar (or None) per batch row")
        self._consume(input_ids)
        live = [(m, row) for row, m in enumerate(self.matchers) if m is not None and not self._done[row]]
        return self._mask(live, len(self.matchers), scores)

    def mask_rows(self, scores: Any, matchers: Sequence[llguidance.LLMatcher | None]) -> Any:
        """Hold each row of ``scores`` to its matcher's next-token mask, in place; returns ``scores``.

        For a decoding loop that consumes each row's tokens itself (``matcher.consume_token``) and whose batch
        changes from step to step: ``matchers`` are this step's rows in batch order, None for a free row or one
        whose answer left its grammar. The masks are the ones ``__call__`` applies (same fill, same application).

        Args:
            scores: (rows, model vocabulary) float logits, any dtype and device.
            matchers: one entry per row of ``scores``.

        Raises:
            ValueError: ``scores`` has another number of rows than ``matchers``.
        """
        if scores.shape[0] != len(matchers):
            raise ValueError(f"scores have {scores.shape[0]} rows but {len(matchers)} matchers were given; give one "
                             "matcher (or None) per batch row")
        live = [(m, row) for row, m in enumerate(matchers) if m is not None]
        return self._mask(live, len(matchers), scores)

    def fill_drafts(self, matchers: Sequence[llguidance.LLMatcher | None],
                    drafts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
        """Fill the masks of every position of a speculative step and cut each row's drafts at the first refused one.

        For a decoding loop verifying draft tokens (``miniatures.local._Batch.step``): row ``i`` feeds its last
        token and ``drafts[i]``, and position ``j`` of it needs the mask after the row's first ``j`` drafts. Each
        constrained row's matcher fills position 0's mask, consumes draft 0 if that mask allows it (else the drafts
        end there), fills position 1's mask, and so on; then it is rolled back (``LLMatcher.rollback``) to where it
        was, so the caller consumes the tokens verification keeps. The masks are llguidance's own, one
        ``fill_next_token_bitmask`` per position. Call ``apply_drafts`` on the scores of the positions next.

        Args:
            matchers: each row's matcher, None for a free row (its drafts are kept whole).
            drafts: each row's draft tokens.

        Returns:
            ``(kept, constrained)``: each row's drafts up to the first one its grammar refuses; and the flat indices
            of the constrained positions, in the layout ``apply_drafts`` takes: row by row, positions 0 to
            ``len(kept[i])`` of each row.
        """
        import llguidance.numpy as llg_numpy

        kept = [list(d) for d in drafts]
        if len(matchers) != len(drafts):
            raise ValueError(f"fill_drafts got {len(matchers)} matchers for {len(drafts)} rows of drafts")
        total = sum(len(d) + 1 for d in kept)
        self._bits = llg_numpy.allocate_token_bitmask(total, self.vocab_size)
        if self._scratch is not None and self._scratch.shape[0] < total:
            self._scratch = None
        bits = self._bits
        constrained: list[int] = []
        at = 0
        for m, row_drafts in zip(matchers, kept, strict=True):
            if m is None:
                at += len(row_drafts) + 1
                continue
            consumed = 0
            for j in range(len(row_drafts) + 1):
                llg_numpy.fill_next_token_bitmask(m, bits, at + j)
                constrained.append(at + j)
                if j == len(row_drafts):
                    break
                token = row_drafts[j]
                if not (0 <= token < self.vocab_size and (int(bits[at + j, token >> 5]) >> (token & 31)) & 1):
                    del row_drafts[j:]  # refused: the drafts end before it
                    break
                if token in self.stop_token_ids:  # an allowed stop ends the answer: nothing after it
                    del row_drafts[j + 1:]
                    break
                if not m.consume_token(token):
                    del row_drafts[j:]
                    break
                consumed += 1
                if m.is_stopped():  # complete: the answer ends at this draft (``LocalEngine._advance``)
                    del row_drafts[j + 1:]
                    break
            if consumed:
                m.rollback(consumed)
            at += len(row_drafts) + 1
        self._bits = bits[:at]  # the rows' positions once cut (each row was filled at its final place)
        self.constrained_steps += len(constrained)
        return kept, constrained

    def apply_drafts(self, scores: Any, constrained: Sequence[int]) -> Any:
        """Apply the masks ``fill_drafts`` filled to ``scores`` (positions in its flat layout, model vocabulary), in
        place; ``constrained`` is its second result. Returns ``scores``."""
        if constrained:
            if scores.shape[0] != self._bits.shape[0]:
                raise ValueError(f"scores have {scores.shape[0]} positions but fill_drafts filled "
                                 f"{self._bits.shape[0]}; give every position of every row, row by row")
            self._apply(list(constrained), scores)
        return scores

    def _mask(self, live: list[tuple[llguidance.LLMatcher, int]], rows: int, scores: Any) -> Any:
        """Fill the masks of the ``live`` (matcher, row) pairs of a ``rows``-row batch and apply them to ``scores``."""
        import llguidance.numpy as llg_numpy

        if not live:
            return scores
        if self._bits is None or self._bits.shape[0] != rows:
            self._bits = llg_numpy.allocate_token_bitmask(rows, self.vocab_size)
            if self._scratch is not None and self._scratch.shape[0] < rows:
                self._scratch = None
        if len(live) >= self.parallel_rows:
            llg_numpy.fill_next_token_bitmask_par(self._pool(), live, self._bits)
        else:  # on the calling thread: a hand-off to the pool gains nothing for one row
            for m, row in live:
                llg_numpy.fill_next_token_bitmask(m, self._bits, row)
        self._apply([row for _m, row in live], scores)
        self.constrained_steps += len(live)
        return scores

    def _apply(self, rows: list[int], scores: Any) -> None:
        """Set the refused tokens of ``rows`` to -inf in ``scores`` (batch, vocabulary), in place.

        Float32 scores on the CPU are changed through a numpy view of them: numpy runs on the calling thread,
        while torch spreads a vocabulary-wide operation over its intra-op threads, whose hand-offs cost
        milliseconds when the CPUs are shared (measured: a 150k-token row's ``fill_`` 0.07 ms median, 5 ms
        mean with 2 torch threads on a busy 2-core machine).
        """
        import numpy as np
        import torch

        bits = self._bits
        width = min(self.vocab_size, int(scores.shape[-1]))
        limit = self.sparse_limit
        if limit is None:  # below 32k tokens one bias for all rows costs less than the sparse paths' steps
            limit = max(8, bits.shape[1] // _SPARSE_WORDS) if bits.shape[1] >= _SPARSE_FROM_WORDS else -1
        host = scores.device.type == "cpu" and scores.dtype == torch.float32
        table = scores.detach().numpy() if host else scores
        if limit < 0:
            (self._dense_host if host else self._dense_device)(rows, table, width)
            return
        live = bits if len(rows) == bits.shape[0] else bits[rows]
        numbers = np.asarray(rows)
        per_row = bits.shape[1]
        some = np.flatnonzero(live)  # one scan: the words with an allowed token, flat
        few_allowed = np.bincount(some // per_row, minlength=len(rows)) <= limit
        if few_allowed.any():  # fill those rows with -inf, put their allowed scores back
            words = some[few_allowed[some // per_row]]
            at = _set_bits(live.reshape(-1)[words], words, per_row, numbers, width, host, scores.device)
            kept = table[at]
            for row in numbers[few_allowed].tolist():  # a plain slice: a memset, not an indexed write
                table[row] = float("-inf")
            table[at] = kept
        few_refused = np.zeros(len(rows), dtype=bool)
        if not few_allowed.all():
            others = np.flatnonzero(~few_allowed)
            refused = ~live[others]  # the other rows' complements: set bits are refused tokens
            words = np.flatnonzero(refused)
            few = np.bincount(words // per_row, minlength=len(others)) <= limit
            few_refused[others[few]] = True
            if few.any():  # -inf at their refused tokens alone (and past the tokenizer's width)
                words = words[few[words // per_row]]
                at = _set_bits(refused.reshape(-1)[words], words, per_row, numbers[others], width, host,
                               scores.device)
                table[at] = float("-inf")
                for row in numbers[others[few]].tolist():
                    table[row, width:] = float("-inf")
        dense = numbers[~few_allowed & ~few_refused].tolist()
        if dense:
            (self._dense_host if host else self._dense_device)(dense, table, width)

    def _dense_host(self, rows: list[int], table: Any, width: int) -> None:
        """Add the bias (0 allowed, -inf refused) of ``rows`` to ``table`` (a numpy view of float32 scores)."""
        import numpy as np

        bits = self._bits
        if self._scratch is None or not isinstance(self._scratch, np.ndarray):
            self._scratch = np.empty((bits.shape[0], bits.shape[1] * 32), dtype=np.int32)
        every = len(rows) == bits.shape[0]
        refused = (~bits if every else ~bits[rows]).astype("<i4", copy=False)  # little-endian: bit i of byte i // 8
        work = self._scratch[: len(rows)]
        np.copyto(work, np.unpackbits(refused.view(np.uint8), axis=-1, bitorder="little"))
        np.multiply(work, _NEG_INF_BITS, out=work)  # 0 -> 0.0, 1 -> the bits of -inf
        bias = work[:, :width].view(np.float32)
        if every:
            table[:, :width] += bias
            table[:, width:] = -np.inf
        else:
            for i, row in enumerate(rows):
                table[row, :width] += bias[i]
                table[row, width:] = -np.inf

    def _dense_device(self, rows: list[int], scores: Any, width: int) -> None:
        """Add the bias (0 allowed, -inf refused) of ``rows`` to ``scores`` (any float dtype, any device)."""
        import torch

        bits = self._bits
        scratch = self._scratch
        if not isinstance(scratch, torch.Tensor) or scratch.device != scores.device:
            self._scratch = torch.empty((bits.shape[0], bits.shape[1], 32), dtype=torch.int32, device=scores.device)
            self._shifts = torch.arange(32, dtype=torch.int32, device=scores.device)
        every = len(rows) == bits.shape[0]
        refused = torch.from_numpy(~bits if every else ~bits[rows]).to(scores.device)  # (rows, words), small
        work = self._scratch[: len(rows)]
        torch.bitwise_right_shift(refused.unsqueeze(-1), self._shifts, out=work)
        work.bitwise_and_(1).mul_(_NEG_INF_BITS)  # 0 -> 0.0, 1 -> the bits of -inf
        bias = work.view(len(rows), -1)[:, :width].view(torch.float32)
        if every:
            scores[:, :width] += bias
            scores[:, width:] = float("-inf")
        else:
            for i, row in enumerate(rows):
                scores[row, :width] += bias[i]
                scores[row, width:] = float("-inf")


def _set_bits(values: Any, words: Any, per_row: int, rows: Any, width: int, host: bool,
              device: Any) -> tuple[Any, Any]:
    """The (batch row, token id) pairs, token ids below ``width``, of the set bits of some 32-token mask words.

    Args:
        values: int32 (n,): the words.
        words: int64 (n,): their flat indices in a (len(rows), per_row) array of masks.
        per_row: words per mask.
        rows: int64: the batch row of each mask of that array.
        width: the first token id left out.
        host: return numpy arrays (True) or torch tensors on ``device``.
        device: the torch device of the tensors returned.

    Returns:
        (rows, ids): two int64 arrays of the same length, to index a (batch, vocabulary) array with.
    """
    import numpy as np

    lanes = np.arange(32, dtype=np.int32)
    set_bits = ((values[:, None] >> lanes) & 1).astype(bool)  # (n, 32)
    ids = ((words % per_row)[:, None] * 32 + lanes)[set_bits]
    at = np.broadcast_to(rows[words // per_row][:, None], set_bits.shape)[set_bits]
    keep = ids < width
    at, ids = at[keep], ids[keep]
    if host:
        return at, ids
    import torch

    return torch.from_numpy(at).to(device), torch.from_numpy(ids).to(device)


def mask_rows_greedy(processor: GrammarLogitsProcessor, scores: Any,
                     matchers: Sequence[llguidance.LLMatcher | None], top: Sequence[int] | None = None) -> Any:
    """Greedy decoding's grammar step: check each row's top-scoring token first, mask only the rows it is refused in.

    For a decoding loop that picks ``scores.argmax(-1)`` and consumes each row's token itself (as for
    ``GrammarLogitsProcessor.mask_rows``). A row whose top token (the first of the highest scores, as ``argmax``
    picks it) its matcher accepts (``LLMatcher.validate_tokens``; never a stop token, whose row is masked) is left
    as it is: the masked row's argmax would be the same token. Only the other rows get the masks ``mask_rows``
    applies, so the argmax of every row equals the one of fully masked scores, while a step where the model
    already follows its grammar costs a validation (microseconds) instead of a mask (measured at a 150k vocabulary
    on the craft email grammar, ``benchmarks/grammar_speed.py``: about 0.02 ms per token and row against 0.7 to
    1 ms for its masks, whose every new word walks the token trie). llama.cpp's sampler takes the same order
    (``common_sampler_sample``: the sampled token is checked against the grammar, which is applied to all
    candidates only when it refuses it; https://github.com/ggml-org/llama.cpp/blob/master/common/sampling.cpp).
    Scores of accepted rows are not masked: use it only where the next token is the argmax (greedy decoding),
    never before sampling or a top-k/top-p warper.

    Args:
        processor: the ``GrammarLogitsProcessor`` whose masks the refused rows get (its tokenizer's matchers).
        scores: (rows, model vocabulary) float logits, any dtype and device; changed in place.
        matchers: one entry per row of ``scores``: the row's matcher, or None for a free row.
        top: each row's ``scores.argmax(-1)`` when the caller has it already (its own greedy pick: at a 150k
            vocabulary an argmax costs about as much as the validation saves); None: computed here.

    Returns:
        ``scores``, with the refused tokens of the rows whose top token was refused at -inf.

    Raises:
        ValueError: ``scores`` has another number of rows than ``matchers``.
    """
    if scores.shape[0] != len(matchers) or (top is not None and len(top) != len(matchers)):
        raise ValueError(f"scores have {scores.shape[0]} rows but {len(matchers)} matchers were given"
                         + ("" if top is None else f" and {len(top)} top tokens") + "; give one matcher (or None) "
                         "and one top token per batch row")
    import torch

    live = [(row, m) for row, m in enumerate(matchers) if m is not None]
    if not live:
        return scores
    rows = [row for row, _m in live]
    # Every row's argmax, no copy of the selected rows; numpy on the calling thread for CPU float32 (see _apply).
    if top is not None:
        every_top = [int(t) for t in top]
    elif scores.device.type == "cpu" and scores.dtype == torch.float32:
        every_top = scores.detach().numpy().argmax(axis=-1).tolist()
    else:
        every_top = scores.argmax(dim=-1).tolist()
    top = [every_top[row] for row in rows]
    refused: list[llguidance.LLMatcher | None] = [None] * len(matchers)
    any_refused = False
    for (row, m), token in zip(live, top, strict=True):
        # A stop token goes through the mask (llguidance allows its end tokens there once the answer is complete).
        fits = (token < processor.vocab_size and token not in processor.stop_token_ids
                and m.validate_tokens([token]) == 1)
        if not fits:
            refused[row] = m
            any_refused = True
    if any_refused:
        processor.mask_rows(scores, refused)
    return scores
