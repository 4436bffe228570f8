"""Chat templates for training: make a base's own chat template train with assistant-only loss, checked first.

TRL's ``assistant_only_loss`` needs a template whose assistant turns are wrapped in ``{% generation %}`` ...
``{% endgeneration %}`` (transformers' ``return_assistant_tokens_mask``); real instruct templates (Llama 3.x,
SmolLM2, Mistral, ...) have no such markers. ``resolve_training_template`` finds a training template for a
tokenizer, in this order, and takes the first that passes ``check_training_template``:

1. ``user``: a template the user gives (``TrainConfig.chat_template``, ``--chat-template FILE``);
2. ``native``: the base's template already has the markers;
3. ``trl``: TRL's patched copy of a template it knows exactly (``trl.chat_template_utils.get_training_chat_template``:
   Qwen2.5, Qwen3, Llama 3, Gemma 3, Phi-3 and others);
4. ``derived``: ``derive_training_template`` wraps any template: it renders the conversation with the base's own
   template (embedded as a Jinja macro) and marks, for each assistant turn, the text from the end of the
   inference prompt (the same template with ``add_generation_prompt``) to the end-of-turn token.

With ``assistant_only_loss=False`` the base's template is used as it is and the loss covers the whole sequence.

The checks (``check_training_template``) run on the tokenizer alone, before any weights are loaded or
datasets tokenized: on probe conversations and on the first training rows, the training template renders the
same text as the inference template (the miniature is asked with the base's template, ``miniatures.local``);
for every assistant turn, the inference prompt's tokens are a prefix of the training tokens; and the trained
span of each answer starts where that prompt ends and holds the end-of-turn token (else the model never learns
to stop; DESIGN.md, "Known traps"). A failure is a ``ChatTemplateError`` that names the options to use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.errors import UserError

__all__ = [
    "OPTION_HINT",
    "ChatTemplateError",
    "TrainingTemplate",
    "check_training_template",
    "derive_training_template",
    "end_of_turn_token",
    "has_generation_markers",
    "probe_conversations",
    "read_chat_template_file",
    "resolve_training_template",
    "trl_training_template",
]

logger = logging.getLogger(__name__)

#: What the user can do when no training template passes the checks (named in every ``ChatTemplateError``).
OPTION_HINT = (
    "give a training version of the base's chat template with --chat-template FILE (TrainConfig chat_template: a "
    "Jinja file that renders like the base's template, with each assistant answer and its end-of-turn token inside "
    "{% generation %} ... {% endgeneration %}), or train on the whole sequence with --set assistant_only_loss=false"
)

TemplateSource = Literal["user", "native", "trl", "derived", "full-sequence"]

_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SAFE_TOKEN = re.compile(r"^[^\"'\\{}%#\n\r]+$")
#: How many training rows ``resolve_training_template`` checks besides the probes (rendering is cheap, ~1 ms).
CHECKED_ROWS = 16

_PROBE_ANSWERS = ("Pong: the first answer.", "Pong: the second answer.")


class ChatTemplateError(UserError, ValueError):
    """A chat template that cannot train or cannot be read; the message names the option to use instead."""


@dataclass(frozen=True)
class TrainingTemplate:
    """The chat template a run trains with, and what was checked.

    Attributes:
        source: ``user``, ``native``, ``trl``, ``derived`` or ``full-sequence`` (see the module docstring).
        training: the Jinja template TRL renders training rows with (marked, except for ``full-sequence``).
        inference: the template the miniature is asked with (the base tokenizer's own).
        end_of_turn: the token that ends an assistant turn (e.g. ``<|im_end|>``, ``<|eot_id|>``,
            ``<end_of_turn>``); generation should stop on it.
        checked: conversations the checks passed on (probes and training rows).
    """

    source: TemplateSource
    training: str
    inference: str
    end_of_turn: str
    checked: int

    def to_json(self) -> dict[str, Any]:
        """``{"source", "end_of_turn", "checked_conversations"}`` for a run's metrics."""
        return {"source": self.source, "end_of_turn": self.end_of_turn, "checked_conversations": self.checked}


def has_generation_markers(template: str) -> bool:
    """Whether ``template`` has a ``{% generation %}`` tag (any whitespace-trim variant)."""
    return _MARKER.search(template) is not None


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # a template shipped as named variants: the default one is the chat one
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise ChatTemplateError(
            "the base's tokenizer has no chat template; miniatures are trained and asked with one, so use an "
            "instruct/chat base (or save the base's tokenizer with a chat_template)")
    return template


def read_chat_template_file(path: str | Path) -> str:
    """The text of a Jinja chat template file (``--chat-template FILE``).

    Raises:
        ChatTemplateError: the file is missing, empty or not valid Jinja (the message names the file).
    """
    import jinja2

    file = Path(path).expanduser()
    if not file.is_file():
        raise ChatTemplateError(f"chat template file {file} not found; give the path of a Jinja (.jinja) file")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ChatTemplateError(f"chat template file {file} is empty")
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", _generation_tag()])
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template file {file} is not valid Jinja (line {exc.lineno}: {exc.message})") \
            from None
    return text


def _generation_tag() -> type:
    """A Jinja extension that parses ``{% generation %}...{% endgeneration %}`` (as transformers does), so a
    syntax check accepts training templates."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    return GenerationTag


def probe_conversations(*, system: bool) -> list[list[dict[str, str]]]:
    """Small conversations the checks render besides the training rows: one and two answers, with or without a
    system message (``system`` mirrors ``TrainConfig.system_prompt``, as the rows are trained)."""
    head = [{"role": "system", "content": "You answer briefly."}] if system else []
    one = [*head, {"role": "user", "content": "Ping?"}, {"role": "assistant", "content": _PROBE_ANSWERS[0]}]
    two = [*one, {"role": "user", "content": "Ping again?"}, {"role": "assistant", "content": _PROBE_ANSWERS[1]}]
    return [one, two]


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], template: str, *, prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=prompt))


def _ids(tokenizer: Any, messages: Sequence[dict[str, str]], template: str, *, prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=True, return_dict=True,
                                        add_generation_prompt=prompt)
    return list(out["input_ids"])


def _added_tokens(tokenizer: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in tokenizer.get_added_vocab().items()}


def end_of_turn_token(tokenizer: Any, template: str) -> str:
    """The token that ends an assistant turn under ``template``: the first added (special) token rendered after
    an answer and before the next user message, found on a two-answer probe conversation.

    Returns:
        The token's text, e.g. ``"<|im_end|>"`` (Qwen, SmolLM2), ``"<|eot_id|>"`` (Llama 3), ``"<end_of_turn>"``
        (Gemma), ``"<|end|>"`` (Phi-3), ``"</s>"`` (Mistral).

    Raises:
        ChatTemplateError: the template fails to render the probe, changes the answer text, or ends an answer
            with no added token (so a model cannot learn to stop).
    """
    probe = probe_conversations(system=False)[1]
    try:
        text = _render(tokenizer, probe, template, prompt=False)
    except Exception as exc:  # jinja2 TemplateError, or what a template's raise_exception raises
        raise ChatTemplateError(f"the chat template fails on a plain user/assistant conversation ({exc}); "
                                f"{OPTION_HINT}") from None
    answer = text.find(_PROBE_ANSWERS[0])
    question = text.find("Ping again?", max(answer, 0))
    if answer < 0 or question < 0:
        raise ChatTemplateError(f"the chat template does not render an answer's text as it is; {OPTION_HINT}")
    between = text[answer + len(_PROBE_ANSWERS[0]):question]
    found = [(between.find(tok), -len(tok), tok) for tok in _added_tokens(tokenizer) if tok and tok in between]
    if not found:
        raise ChatTemplateError(
            f"the chat template ends an assistant turn with {between!r}, which holds no special token, so a "
            f"model cannot learn to stop; {OPTION_HINT}")
    return min(found)[2]


#: The derived training template: the base's template runs as a macro (it sees the same context: bos_token,
#: tools, strftime_now ...); each answer is marked from the end of its inference prompt to its end-of-turn token.
_DERIVED = """{%- macro outreach_inference(messages, add_generation_prompt) -%}
@@INFERENCE@@
{%- endmacro -%}
{%- set outreach_eot = "@@EOT@@" -%}
{%- set outreach_full = outreach_inference(messages, add_generation_prompt) -%}
{%- set outreach = namespace(pos=0) -%}
{%- for outreach_message in messages -%}
{%- if outreach_message['role'] == 'assistant' -%}
{%- set outreach_prompt = outreach_inference(messages[:loop.index0], true) -%}
{%- if not outreach_full.startswith(outreach_prompt) -%}
{{- raise_exception('the inference prompt of message ' ~ loop.index0 ~ ' (an answer) is not a prefix of the text') -}}
{%- endif -%}
{%- set outreach_start = outreach_prompt | length -%}
{%- set outreach_content = outreach_message['content'] if outreach_message['content'] is string else '' -%}
{%- set outreach_at = outreach_full.find(outreach_content | trim, outreach_start) if outreach_content | trim else -1 -%}
{%- set outreach_from = outreach_at + (outreach_content | trim | length) if outreach_at >= 0 else outreach_start -%}
{%- set outreach_stop = outreach_full.find(outreach_eot, outreach_from) -%}
{%- if outreach_stop < 0 -%}
{{- raise_exception('the answer in message ' ~ loop.index0 ~ ' has no end-of-turn token ' ~ outreach_eot) -}}
{%- endif -%}
{%- set outreach_end = outreach_stop + (outreach_eot | length) -%}
{{- outreach_full[outreach.pos:outreach_start] -}}
{%- generation -%}{{- outreach_full[outreach_start:outreach_end] -}}{%- endgeneration -%}
{%- set outreach.pos = outreach_end -%}
{%- endif -%}
{%- endfor -%}
{{- outreach_full[outreach.pos:] -}}"""


def derive_training_template(template: str, end_of_turn: str) -> str:
    """A training version of any chat ``template``: the same text, each answer and its end-of-turn token marked.

    The result renders the conversation once with ``template`` and, for each assistant turn, once more up to
    that turn with ``add_generation_prompt=True``: the answer's span runs from the end of that prompt (which must
    be a prefix of the conversation's text, else the template raises) to the first ``end_of_turn`` after the
    answer's text. It is quadratic in the number of turns, which is fine for chat rows of a few turns.

    Args:
        template: the base's Jinja chat template (no ``{% generation %}`` needed).
        end_of_turn: the token that ends an answer (``end_of_turn_token``).

    Raises:
        ChatTemplateError: ``end_of_turn`` holds quotes, braces, backslashes or line breaks.
    """
    if not _SAFE_TOKEN.match(end_of_turn):
        raise ChatTemplateError(f"cannot derive a training template around the end-of-turn token {end_of_turn!r}; "
                                f"{OPTION_HINT}")
    return _DERIVED.replace("@@INFERENCE@@", template).replace("@@EOT@@", end_of_turn)


def trl_training_template(tokenizer: Any) -> str | None:
    """TRL's patched training copy of ``tokenizer``'s template, or None when TRL does not know the template (or
    the installed TRL has no ``get_training_chat_template``)."""
    try:
        from trl.chat_template_utils import get_training_chat_template
    except ImportError:
        return None
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:  # "The chat template is not training-compatible ... patching is not supported"
        return None
    return patched if isinstance(patched, str) else None


def _first_difference(a: str, b: str) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"at character {at}: {a[max(0, at - 30):at + 30]!r} vs {b[max(0, at - 30):at + 30]!r}"


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start = None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _check_one(tokenizer: Any, conversation: Sequence[dict[str, str]], *, inference: str, training: str,
               end_of_turn_id: int, assistant_only_loss: bool, where: str) -> str | None:
    """The first problem of one conversation under a training template, or None when it passes."""
    try:
        train_text = _render(tokenizer, conversation, training, prompt=False)
        infer_text = _render(tokenizer, conversation, inference, prompt=False)
    except Exception as exc:
        return f"{where}: the template fails to render it ({exc})"
    if train_text != infer_text:
        return (f"{where}: the training template renders it differently from the base's template, which the "
                f"miniature is asked with ({_first_difference(train_text, infer_text)})")
    out = tokenizer.apply_chat_template(list(conversation), chat_template=training, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=assistant_only_loss)
    ids = list(out["input_ids"])
    starts: list[int] = []
    for k, message in enumerate(conversation):
        if message.get("role") != "assistant":
            continue
        prompt = _ids(tokenizer, conversation[:k], inference, prompt=True)
        if ids[:len(prompt)] != prompt:
            diverge = next((i for i, (x, y) in enumerate(zip(ids, prompt, strict=False)) if x != y), len(ids))
            return (f"{where}: the inference prompt of answer {len(starts) + 1} is not a token prefix of the "
                    f"training text (they part at token {diverge}: {tokenizer.decode(prompt[diverge:diverge + 8])!r} "
                    f"asked vs {tokenizer.decode(ids[diverge:diverge + 8])!r} trained), so the miniature would be "
                    "asked differently from how it was trained")
        starts.append(len(prompt))
    if not starts:
        return None
    if not assistant_only_loss:
        if end_of_turn_id not in ids[starts[-1]:]:
            return f"{where}: the last answer is not followed by the end-of-turn token"
        return None
    mask = list(out.get("assistant_masks") or [])
    runs = _runs(mask)
    # A span may start a little early on whitespace the prompt ends with (TRL's Qwen2.5 copy marks the newline
    # after "<|im_start|>assistant"): harmless, the model is trained to predict a token it is always given.
    if len(runs) != len(starts) or any(
        a > s or tokenizer.decode(ids[a:s]).strip() for (a, _), s in zip(runs, starts, strict=False)
    ):
        spans = ", ".join(repr(tokenizer.decode(ids[a:b])) for a, b in runs) or "nothing"
        return (f"{where}: the trained spans do not start where the answers do (tokens {[a for a, _ in runs]} "
                f"vs {starts}); trained: {spans[:300]}")
    added = set(_added_tokens(tokenizer).values())
    for n, (a, b) in enumerate(runs, start=1):
        span = ids[a:b]
        if end_of_turn_id not in span:
            return (f"{where}: the trained span of answer {n} ({tokenizer.decode(span)[-60:]!r}) lacks the "
                    "end-of-turn token, so the model would not learn to stop")
        tail = span[span.index(end_of_turn_id) + 1:]
        if any(t not in added and tokenizer.decode([t]).strip() for t in tail):
            return f"{where}: the trained span of answer {n} runs past its end-of-turn token into the next turn"
    return None


def check_training_template(
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    inference: str,
    training: str,
    end_of_turn: str,
    assistant_only_loss: bool = True,
) -> str | None:
    """Check a training template on conversations; return the first problem found (one line), or None.

    Per conversation: ``training`` and ``inference`` render the same text; for every assistant turn the tokens of
    the inference prompt (``inference`` with ``add_generation_prompt=True`` on the messages before it) are a prefix
    of the training tokens; with ``assistant_only_loss``, the assistant mask (``return_assistant_tokens_mask``) is
    one run per answer, starting where its prompt ends and holding ``end_of_turn`` (only whitespace or special
    tokens after it); without, the last answer is followed by ``end_of_turn``.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast, for the assistant masks).
        conversations: chat messages (OpenAI format, text content), each with at least one assistant turn.
        inference: the template the miniature is asked with.
        training: the template to train with.
        end_of_turn: the end-of-turn token (``end_of_turn_token``).
        assistant_only_loss: whether the loss covers only the marked answers.
    """
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if not isinstance(eot_id, int) or eot_id == tokenizer.unk_token_id:
        return f"the end-of-turn token {end_of_turn!r} is not one token of the tokenizer"
    for n, conversation in enumerate(conversations, start=1):
        problem = _check_one(tokenizer, conversation, inference=inference, training=training, end_of_turn_id=eot_id,
                             assistant_only_loss=assistant_only_loss, where=f"conversation {n}")
        if problem:
            return problem
    return None


def resolve_training_template(
    tokenizer: Any,
    rows: Sequence[Sequence[dict[str, str]]] = (),
    *,
    system: bool = True,
    assistant_only_loss: bool = True,
    user_template: str | None = None,
) -> TrainingTemplate:
    """Pick and check the template to train ``tokenizer``'s base with (the order is in the module docstring).

    Args:
        tokenizer: the base's tokenizer; only its chat template and vocabulary are used (no weights needed).
        rows: training conversations; the first ``CHECKED_ROWS`` are checked besides the probes.
        system: whether rows keep their system message (``TrainConfig.system_prompt``), so the probes do too.
        assistant_only_loss: False trains on the whole sequence with the base's template as it is.
        user_template: a training template given by the user (``read_chat_template_file``); it must render like
            the base's template, since the miniature is asked with that one.

    Returns:
        The ``TrainingTemplate``; ``tokenizer`` is not changed.

    Raises:
        ChatTemplateError: the base has no chat template, or no candidate passes the checks; the message gives
            each candidate's first problem and the options to use (``OPTION_HINT``).
    """
    inference = _template_text(tokenizer)
    end_of_turn = end_of_turn_token(tokenizer, inference)
    conversations = [*probe_conversations(system=system), *[list(r) for r in rows[:CHECKED_ROWS]]]
    candidates: list[tuple[TemplateSource, str]] = []
    if not assistant_only_loss:
        candidates.append(("full-sequence", user_template or inference))
    elif user_template is not None:
        candidates.append(("user", user_template if has_generation_markers(user_template)
                           else derive_training_template(user_template, end_of_turn)))
    else:
        if has_generation_markers(inference):
            candidates.append(("native", inference))
        patched = trl_training_template(tokenizer)
        if patched is not None and patched != inference:
            candidates.append(("trl", patched))
        candidates.append(("derived", derive_training_template(inference, end_of_turn)))
    problems: list[str] = []
    for source, training in candidates:
        problem = check_training_template(tokenizer, conversations, inference=inference, training=training,
                                          end_of_turn=end_of_turn, assistant_only_loss=assistant_only_loss)
        if problem is None:
            logger.info("training chat template: %s (end of turn %s, %d conversations checked)", source,
                        end_of_turn, len(conversations))
            return TrainingTemplate(source, training, inference, end_of_turn, len(conversations))
        logger.info("training chat template %s refused: %s", source, problem)
        problems.append(f"{source} template: {problem}")
    if not assistant_only_loss:
        raise ChatTemplateError(f"the chat template cannot train this data: {problems[0]}; give one that renders the "
                                "prompt the same way in both cases with --chat-template FILE")
    hint = OPTION_HINT
    if system:
        hint += ", or drop the system message from training and asking with --set system_prompt=false"
    raise ChatTemplateError(f"no chat template to train with assistant-only loss: {'; '.join(problems)}. To go on, "
                            f"{hint}")
