"""Typed tasks: what an agent asks a model to do, as data every room can read.

An agent builds a task, renders its prompt from it, and passes the task along with the messages
(``model.ainvoke(messages, task=task)``) so that backends build the answer grammar from it and the
trace recorder stores it. Other rooms (the heuristic teacher, answer formats, review, datasets) read
the task, never the prompt text. It imports nothing of the project.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "SUBJECT_MAX_CHARS",
    "ExtractionTask",
    "FailedCheck",
    "FieldSpec",
    "MergeTag",
    "OfferBrief",
    "Sentence",
    "Task",
    "WritingTask",
    "dump_task",
    "load_task",
]

#: The longest subject line the writer may give, in characters as written (merge tags unexpanded).
SUBJECT_MAX_CHARS = 60


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FieldSpec(_Frozen):
    """One profile field the researcher is asked to fill: ``name`` (``[a-z_][a-z0-9_]*``) and its description."""

    name: str
    description: str


class Sentence(_Frozen):
    """One numbered sentence of a fetched page: ``id`` as cited (``"S12"``), its text and the page's URL."""

    id: str
    text: str
    source_url: str


class ExtractionTask(_Frozen):
    """The researcher's task: fill ``fields`` about ``company`` from ``sentences`` only.

    Attributes:
        company: the prospect's company name as given.
        website: the company's website URL as given.
        fields: the fields to fill, in prompt order.
        sentences: the numbered sentences, in prompt order; ids are unique.
    """

    kind: Literal["extraction"] = "extraction"
    company: str
    website: str
    fields: tuple[FieldSpec, ...]
    sentences: tuple[Sentence, ...]

    @property
    def field_names(self) -> tuple[str, ...]:
        """The listed field names, in order."""
        return tuple(f.name for f in self.fields)

    def sentence(self, sentence_id: str) -> Sentence | None:
        """The sentence with this id, or None when the task has none."""
        return next((s for s in self.sentences if s.id == sentence_id), None)


class MergeTag(_Frozen):
    """A merge tag the writer may use: ``name`` as written inside braces (``first_name``, ``fact.location``).

    ``description`` says what a name tag holds; for a fact tag it is the fact's value as it will be
    rendered (``value`` holds the same for fact tags, empty for name tags).
    """

    name: str
    description: str
    value: str = ""

    @property
    def is_fact(self) -> bool:
        """True for ``fact.<field>`` tags."""
        return self.name.startswith("fact.")


class OfferBrief(_Frozen):
    """The parts of the offer the writer is shown (``agents.schemas.Offer`` without the sender's identity)."""

    sender_title: str
    product: str
    value_proposition: str
    problems_solved: tuple[str, ...] = ()
    proof_point: str = ""
    call_to_action: str
    cta_style: str = ""
    opt_out_line: str


class FailedCheck(_Frozen):
    """One validation check an email failed, as data: ``code`` is stable (``"unknown_merge_tag"``,
    ``"too_long"`` ...), ``detail`` is the human wording, ``subject`` what it is about (a tag, a field,
    a word), empty when nothing in particular."""

    code: str
    detail: str
    subject: str = ""


class WritingTask(_Frozen):
    """The writer's task: one email for a prospect with ``title``, written with ``merge_tags`` only.

    Attributes:
        offer: what is offered.
        prospect_title: the prospect's job title ("" when unknown).
        merge_tags: the tags the answer may use, names first, then facts; braces in the answer may only
            hold these.
        subject_max_chars: the subject's length limit in characters as written.
        min_words / max_words: the word band from the greeting to the call to action.
        feedback: the checks an earlier answer failed (empty on a first attempt).
    """

    kind: Literal["writing"] = "writing"
    offer: OfferBrief
    prospect_title: str = ""
    merge_tags: tuple[MergeTag, ...]
    subject_max_chars: int = SUBJECT_MAX_CHARS
    min_words: int = 50
    max_words: int = 90
    feedback: tuple[FailedCheck, ...] = ()

    @property
    def tag_names(self) -> tuple[str, ...]:
        """The allowed merge tag names, in order."""
        return tuple(t.name for t in self.merge_tags)

    @property
    def fact_tags(self) -> tuple[MergeTag, ...]:
        """The ``fact.<field>`` tags offered (empty when no fact was verified)."""
        return tuple(t for t in self.merge_tags if t.is_fact)


#: Any task, told apart by ``kind``.
Task = Annotated[ExtractionTask | WritingTask, Field(discriminator="kind")]
_TASK: TypeAdapter[ExtractionTask | WritingTask] = TypeAdapter(Task)


def dump_task(task: ExtractionTask | WritingTask) -> dict[str, object]:
    """The task as JSON-ready data (what a trace stores)."""
    return task.model_dump(mode="json")


def load_task(data: object) -> ExtractionTask | WritingTask:
    """Read a task stored by ``dump_task``.

    Raises:
        pydantic.ValidationError: the data is not a task of a known kind.
    """
    return _TASK.validate_python(data)
