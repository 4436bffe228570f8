"""SQLModel tables: the product's memory.

One row per model call (``Trace``) and per tool call (``ToolCall``), modelled on ``simonw/llm``'s
SQLite log, plus the campaign side (campaigns, prospects, runs, profiles, facts, emails), the
curation side (reviews, miniatures) and engagement events. JSON columns hold lists and dicts
(messages in OpenAI chat format: ``[{"role": "system"|"user"|"assistant", "content": str}]``).

Times are timezone-aware UTC datetimes; latencies are milliseconds; costs are US dollars.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

__all__ = [
    "Campaign",
    "EmailRecord",
    "EngagementEvent",
    "FactRecord",
    "MiniatureRecord",
    "ProfileRecord",
    "Prospect",
    "RateLimitLock",
    "RateLimitSlot",
    "Review",
    "Run",
    "RunStatus",
    "SchemaMigration",
    "Send",
    "SendStatus",
    "Suppression",
    "SuppressionReason",
    "ToolCall",
    "Trace",
    "WebSnapshot",
]


def utcnow() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


# Column defaults for JSON lists and objects. Plain functions rather than ``list``/``dict``: pydantic inspects a
# default factory's signature on every model construction, and ``inspect.signature(list)`` costs ~0.7 ms.
def _new_list() -> list[Any]:
    return []


def _new_dict() -> dict[str, Any]:
    return {}


class RunStatus:
    """Allowed values of ``Run.status``."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    #: Research found no verified fact; no email unless the campaign opts in to non-personalised ones.
    NO_FACTS = "no_facts"


class SchemaMigration(SQLModel, table=True):
    """One applied migration (see ``store.migrations``)."""

    __tablename__ = "schema_migrations"
    version: int = Field(primary_key=True)
    name: str
    applied_at: datetime = Field(default_factory=utcnow)


class Campaign(SQLModel, table=True):
    """A named set of prospects plus an offer (sender, product, value proposition, call to action)."""

    __tablename__ = "campaigns"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    offer: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    #: A/B arms (``graphs.arms``): ``{"seed": int, "arms": [{"name", "researcher", "writer", "weight"}]}``
    #: with redacted backend specs; ``{}`` for a campaign without arms.
    arms: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class Prospect(SQLModel, table=True):
    """One person at one company, as imported from a prospects CSV (``row_number`` is 1-based, header = 1)."""

    __tablename__ = "prospects"
    __table_args__ = (UniqueConstraint("campaign_id", "email", name="uq_prospect_campaign_email"),)
    id: int | None = Field(default=None, primary_key=True)
    campaign_id: int = Field(foreign_key="campaigns.id", index=True)
    row_number: int = 0
    first_name: str
    last_name: str = ""
    title: str = ""
    email: str
    company: str
    website: str = ""
    split: str = ""


class Run(SQLModel, table=True):
    """One pass of the campaign graph over one prospect; ``status`` is one of ``RunStatus``.

    ``replay_of_id`` is the run this one replays (``outreach replay``), None for an original run.
    ``lease_owner``, ``lease_expires_at`` and ``claim_id`` are the worker's claim (``store.claims``):
    ``claim_id`` counts claims and is the fencing token a run's final write must still match.
    """

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("campaign_id", "prospect_id", name="uq_run_campaign_prospect"),
                      Index("ix_runs_claim", "campaign_id", "status", "id"))
    id: int | None = Field(default=None, primary_key=True)
    campaign_id: int = Field(foreign_key="campaigns.id", index=True)
    prospect_id: int = Field(foreign_key="prospects.id", index=True)
    status: str = Field(default=RunStatus.PENDING, index=True)
    error: str | None = Field(default=None, sa_column=Column(Text))
    attempts: int = 0
    researcher: str = ""
    writer: str = ""
    replay_of_id: int | None = Field(default=None, foreign_key="runs.id")
    #: The A/B arm this run belongs to (``graphs.arms``; ``""`` in a campaign without arms); never changes once set.
    arm: str = Field(default="", index=True)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: The worker that claimed the run last (``store.claims.new_worker_id``), kept after it finishes.
    lease_owner: str | None = None
    #: When the claim's lease ends unless renewed (UTC); None once the run is finished or released.
    lease_expires_at: datetime | None = None
    claim_id: int = 0


class ProfileRecord(SQLModel, table=True):
    """The researcher's output for one run: grounded facts plus counts of what was dropped."""

    __tablename__ = "profiles"
    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", unique=True)
    company: str
    website: str = ""
    dropped_facts: int = 0
    #: Dropped facts by reason (``agents.schemas.DROP_REASONS``: ungrounded, misattributed, bad_value).
    drop_reasons: dict[str, int] = Field(default_factory=_new_dict, sa_column=Column(JSON, nullable=False))
    sources: list[str] = Field(default_factory=_new_list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class FactRecord(SQLModel, table=True):
    """One fact: ``value`` plus verbatim ``evidence`` quoted from ``source_url``."""

    __tablename__ = "facts"
    id: int | None = Field(default=None, primary_key=True)
    profile_id: int = Field(foreign_key="profiles.id", index=True)
    field: str = Field(index=True)
    value: str = Field(sa_column=Column(Text, nullable=False))
    evidence: str = Field(sa_column=Column(Text, nullable=False))
    source_url: str


class EmailRecord(SQLModel, table=True):
    """The writer's output: merge-tag templates, the rendered subject and body, and validation checks."""

    __tablename__ = "emails"
    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", unique=True)
    subject_template: str = Field(sa_column=Column(Text, nullable=False))
    body_template: str = Field(sa_column=Column(Text, nullable=False))
    subject: str = Field(sa_column=Column(Text, nullable=False))
    body: str = Field(sa_column=Column(Text, nullable=False))
    checks: dict[str, Any] = Field(default_factory=_new_dict, sa_column=Column(JSON, nullable=False))
    valid: bool = True
    #: False for an email written without any verified fact (the campaign opted in to such emails).
    personalised: bool = True
    #: RFC 5322 ``Message-ID`` (``<unique@sender-domain>``), set when the email is written; unique in the store.
    message_id: str | None = Field(default=None, unique=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)


class Trace(SQLModel, table=True):
    """One recorded model call.

    ``messages`` is the prompt in OpenAI chat format; ``output`` the raw text returned; tokens are
    counts reported by the backend (or estimated by it, which the backend documents); ``latency_ms``
    is wall-clock milliseconds; ``cost_usd`` comes from the settings' price table. ``task`` is the call's
    typed task (``core.tasks.dump_task`` JSON), NULL for calls recorded before tasks were stored (read
    them with ``agents.legacy_tasks.trace_task``).
    """

    __tablename__ = "traces"
    id: int | None = Field(default=None, primary_key=True)
    run_id: int | None = Field(default=None, foreign_key="runs.id", index=True)
    agent: str = Field(index=True)
    step: str = ""
    backend: str = Field(index=True)
    messages: list[dict[str, Any]] = Field(default_factory=_new_list, sa_column=Column(JSON, nullable=False))
    output: str = Field(default="", sa_column=Column(Text, nullable=False))
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    error: str | None = Field(default=None, sa_column=Column(Text))
    replay_of_id: int | None = Field(default=None, foreign_key="traces.id")
    task: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)


class ToolCall(SQLModel, table=True):
    """One tool call (search, fetch) made during a run; ``trace_id`` links it to a model call if any."""

    __tablename__ = "tool_calls"
    id: int | None = Field(default=None, primary_key=True)
    run_id: int | None = Field(default=None, foreign_key="runs.id", index=True)
    trace_id: int | None = Field(default=None, foreign_key="traces.id")
    tool: str
    input: dict[str, Any] = Field(default_factory=_new_dict, sa_column=Column(JSON, nullable=False))
    output: dict[str, Any] = Field(default_factory=_new_dict, sa_column=Column(JSON, nullable=False))
    latency_ms: float = 0.0
    error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


class Review(SQLModel, table=True):
    """A human label on a trace, email or profile: ``status`` is approved, edited or rejected."""

    __tablename__ = "reviews"
    id: int | None = Field(default=None, primary_key=True)
    trace_id: int | None = Field(default=None, foreign_key="traces.id", index=True)
    email_id: int | None = Field(default=None, foreign_key="emails.id")
    profile_id: int | None = Field(default=None, foreign_key="profiles.id")
    status: str
    edited_output: str | None = Field(default=None, sa_column=Column(Text))
    reviewer: str = ""
    note: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class MiniatureRecord(SQLModel, table=True):
    """A registered miniature: base model plus adapter (or fully fine-tuned weights) for one agent."""

    __tablename__ = "miniatures"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_miniature_name_version"),)
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    agent: str
    version: int = 1
    base_model: str
    adapter_path: str
    method: str = "lora"
    training_config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    dataset_hash: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    parent_id: int | None = Field(default=None, foreign_key="miniatures.id")
    created_at: datetime = Field(default_factory=utcnow)


class EngagementEvent(SQLModel, table=True):
    """One engagement event from an email-sending tool: sent, delivered, open, click, reply, bounce, unsubscribe."""

    __tablename__ = "engagement_events"
    id: int | None = Field(default=None, primary_key=True)
    email_id: int | None = Field(default=None, foreign_key="emails.id", index=True)
    message_id: str = ""
    variant: str = ""
    event: str = Field(index=True)
    recipient: str = ""
    occurred_at: datetime = Field(default_factory=utcnow)


class SendStatus:
    """Allowed values of ``Send.status`` (see ``outreach.sending``).

    ``sending`` is the intent, written before the message goes to the SMTP server; the server's answer replaces
    it. A ``sending`` row that stays (the sender crashed) is read as ``unknown``: the server may have taken it.
    """

    SENDING = "sending"
    SENT = "sent"
    #: The server refused for good (5xx), or a temporary refusal (4xx) came back ``max_attempts`` times.
    FAILED = "failed"
    #: A temporary refusal (4xx) or a connection lost before the message was handed over: retried later.
    DEFERRED = "deferred"
    #: The connection broke or timed out after the message was handed over: it may have been delivered.
    UNKNOWN = "unknown"


class Send(SQLModel, table=True):
    """One email's delivery over SMTP: the intent, the attempts, and the server's last answer (one row per email).

    ``mailbox`` is the sending address (lower case), ``recipient`` the address sent to; ``code`` and ``answer``
    are the SMTP reply code and text (RFC 5321 section 4.2); times are UTC.
    """

    __tablename__ = "sends"
    id: int | None = Field(default=None, primary_key=True)
    email_id: int = Field(foreign_key="emails.id", unique=True)
    message_id: str = Field(index=True)
    mailbox: str = Field(index=True)
    recipient: str = ""
    status: str = Field(default=SendStatus.SENDING, index=True)
    attempts: int = 0
    code: int | None = None
    answer: str = Field(default="", sa_column=Column(Text, nullable=False))
    attempted_at: datetime = Field(default_factory=utcnow, index=True)
    sent_at: datetime | None = None


class SuppressionReason:
    """Allowed values of ``Suppression.reason``."""

    OPT_OUT = "opt_out"
    BOUNCE = "bounce"
    UNSUBSCRIBE = "unsubscribe"
    COMPLAINT = "complaint"
    ALL = (OPT_OUT, BOUNCE, UNSUBSCRIBE, COMPLAINT)


class Suppression(SQLModel, table=True):
    """An address that is never emailed (lower case); ``source`` says where it came from (a file and line, ``cli``)."""

    __tablename__ = "suppressions"
    id: int | None = Field(default=None, primary_key=True)
    address: str = Field(unique=True)
    reason: str
    source: str = Field(default="", sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class WebSnapshot(SQLModel, table=True):
    """One fetched page as it was: URL, time, HTTP status, content type and HTML."""

    __tablename__ = "web_snapshots"
    id: int | None = Field(default=None, primary_key=True)
    url: str = Field(index=True)
    final_url: str = ""
    status_code: int = 0
    content_type: str = ""
    html: str = Field(default="", sa_column=Column(Text, nullable=False))
    fetched_at: datetime = Field(default_factory=utcnow)


class RateLimitLock(SQLModel, table=True):
    """One row per rate-limited backend: the row every worker's limiter updates first, so that taking a
    request slot of that backend is one serialised transaction (``graphs.ratelimit``)."""

    __tablename__ = "rate_limit_locks"
    backend: str = Field(primary_key=True, max_length=300)
    taken: int = 0


class RateLimitSlot(SQLModel, table=True):
    """One request to a rate-limited backend, taken by some worker (``graphs.ratelimit``).

    Times are seconds since the epoch (the database's clock on PostgreSQL). A slot counts as in flight
    while ``released_at`` is None and ``expires_at`` lies ahead (a dead worker's slot frees itself), and
    against the requests-per-window budget until a window after it ended (``released_at``, else
    ``expires_at``): its request reached the server at some moment before it was released.
    """

    __tablename__ = "rate_limit_slots"
    id: int | None = Field(default=None, primary_key=True)
    backend: str = Field(index=True, max_length=300)
    started_at: float = Field(index=True)
    expires_at: float
    released_at: float | None = None
