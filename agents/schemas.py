"""Pydantic models the agents exchange: inputs (prospect, offer), model output formats
(``ExtractionOutput``, ``EmailDraft``) and results (``Profile``, ``RenderedEmail``, ``ValidationResult``).

Output formats are shaped for grounding by construction (DESIGN.md): the researcher model cites
numbered source sentences (``"S12"``) instead of copying quotes, and its ``value`` must be a span
of the cited sentence; the writer model writes merge tags (``{{first_name}}``, ``{{company}}``,
``{{fact.<field>}}``) instead of copying names and numbers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from core.tasks import FailedCheck

__all__ = [
    "DROP_REASONS",
    "FACT_FIELDS",
    "MAX_PROBLEMS",
    "MAX_PROBLEM_CHARS",
    "MAX_PROOF_POINT_CHARS",
    "EmailDraft",
    "ExtractedFact",
    "ExtractionOutput",
    "Fact",
    "Offer",
    "Profile",
    "ProspectInfo",
    "RenderedEmail",
    "ResearchResult",
    "ValidationResult",
]

#: The profile fields the researcher extracts, in prompt order.
FACT_FIELDS: tuple[str, ...] = (
    "industry",
    "product",
    "customer_segment",
    "location",
    "employee_count",
    "founded_year",
    "recent_event",
    "pain_point",
)


#: Most problems an offer may list (``Offer.problems_solved``), and the longest one, in characters.
MAX_PROBLEMS = 12
MAX_PROBLEM_CHARS = 120
#: Longest proof point (``Offer.proof_point``), in characters.
MAX_PROOF_POINT_CHARS = 300

#: Why grounding drops a model's fact (``Profile.drop_reasons`` keys), in report order:
#: ``ungrounded`` (unknown or repeated field, evidence not found, value not in the evidence),
#: ``misattributed`` (the source is not attributed to the prospect's company) and ``bad_value``
#: (the value does not have its field's shape, e.g. a founded year that is not a plausible year).
DROP_REASONS: tuple[str, ...] = ("ungrounded", "misattributed", "bad_value")


class ProspectInfo(BaseModel):
    """One person at one company."""

    first_name: str
    last_name: str = ""
    title: str = ""
    email: str
    company: str
    website: str = ""


class Offer(BaseModel):
    """What the campaign sells and how it asks (loaded from an offer TOML file)."""

    sender_name: str
    sender_title: str = ""
    sender_company: str
    #: The sender's e-mail address (the ``From`` of exported ``.eml`` files); optional.
    sender_email: str = ""
    product: str
    value_proposition: str
    call_to_action: str
    opt_out_line: str = "If this isn't relevant, just reply 'no thanks' and I won't write again."
    #: The problems the product solves, each a short noun or gerund phrase ("manual pipeline research",
    #: "finding the accounts that are ready to buy"); the writer connects a prospect's pain point or news
    #: to one of them (``agents.prose.relevant_problem``). Optional: without it the value proposition is used.
    problems_solved: list[str] = Field(default_factory=list)
    #: One customer result the email may cite ("Northwind's SDRs booked 30% more meetings in a quarter");
    #: optional. Numbers in it are allowed in emails because they come from the offer.
    proof_point: str = ""
    #: How the call to action asks: ``interest`` (whether the topic is worth a conversation), ``meeting``
    #: (a short call), ``resource`` (something to send, e.g. a two-minute video); "" when not said. It tells
    #: the writer how to lead up to the call to action, which is still copied word for word.
    cta_style: Literal["", "interest", "meeting", "resource"] = ""

    @field_validator("sender_name", "sender_company", "product", "value_proposition", "call_to_action",
                     "opt_out_line")
    @classmethod
    def _not_blank(cls, value: str, info: ValidationInfo) -> str:
        """Required offer texts must say something (an email quotes them)."""
        if not value.strip():
            raise ValueError(f"{info.field_name} is empty; write the text the email should use")
        return value

    @field_validator("proof_point")
    @classmethod
    def _proof_point(cls, value: str) -> str:
        value = " ".join(value.split())
        if len(value) > MAX_PROOF_POINT_CHARS:
            raise ValueError(f"proof_point is {len(value)} characters; keep it to one sentence of at most "
                             f"{MAX_PROOF_POINT_CHARS} characters")
        return value

    @field_validator("problems_solved")
    @classmethod
    def _problems(cls, value: list[str]) -> list[str]:
        items = [" ".join(p.split()) for p in value]
        items = [p for p in items if p]
        if len(items) > MAX_PROBLEMS:
            raise ValueError(f"problems_solved has {len(items)} items; list at most {MAX_PROBLEMS}")
        for item in items:
            if len(item) > MAX_PROBLEM_CHARS or ";" in item:
                raise ValueError(f"problems_solved item {item[:60]!r} is too long or holds ';': give one short "
                                 f"phrase per item, at most {MAX_PROBLEM_CHARS} characters")
        return items


class Fact(BaseModel):
    """A grounded fact: ``evidence`` is a verbatim quote of the page at ``source_url``, and
    ``value`` occurs in ``evidence`` (case- and whitespace-insensitively)."""

    field: str
    value: str
    evidence: str
    source_url: str


class Profile(BaseModel):
    """The researcher's output: grounded facts, how many model facts were dropped and why, pages read.

    ``dropped_facts`` is the total of ``drop_reasons`` (reason -> count, keys from ``DROP_REASONS``).
    """

    company: str
    website: str = ""
    facts: list[Fact] = Field(default_factory=list)
    dropped_facts: int = 0
    drop_reasons: dict[str, int] = Field(default_factory=dict)
    sources: list[str] = Field(default_factory=list)

    def fact(self, field: str) -> Fact | None:
        """Return the first fact for ``field``, or None."""
        return next((f for f in self.facts if f.field == field), None)


class ExtractedFact(BaseModel):
    """One fact as the model returns it: ``evidence`` is a sentence id like ``"S12"`` (or a quote).

    Evidence comes before value (in this order in the JSON schema and the prompt): the model cites the
    sentence first and then copies the span, which the answer grammar (``miniatures.grammar``) then holds to
    that sentence.
    """

    field: str
    evidence: str
    value: str


class ExtractionOutput(BaseModel):
    """The researcher model's JSON answer: ``{"facts": [{"field", "evidence", "value"}, ...]}``."""

    facts: list[ExtractedFact] = Field(default_factory=list)


class ResearchResult(BaseModel):
    """What ``agents.researcher.research`` returns."""

    profile: Profile
    queries: list[str] = Field(default_factory=list)
    fetch_errors: list[str] = Field(default_factory=list)


class EmailDraft(BaseModel):
    """The writer model's JSON answer: subject and body with merge tags."""

    subject: str
    body: str


class RenderedEmail(BaseModel):
    """An email with every merge tag filled in."""

    subject: str
    body: str


class ValidationResult(BaseModel):
    """Named checks (True = passed), a human-readable reason for each failure, and the failures as data.

    ``failed`` holds one ``core.tasks.FailedCheck`` per thing to fix (a stable ``code`` from
    ``agents.validation.FAILURE_CODES``, the ``errors`` line it belongs to as ``detail``, and what it is
    about as ``subject``: one per spam phrase, unknown merge tag or unsourced mention); it is what the
    writer's next task carries as feedback.
    """

    checks: dict[str, bool] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list)
    failed: list[FailedCheck] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(self.checks.values())
