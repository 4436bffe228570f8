"""The review queue: a human approves, edits or rejects what the agents produced, and curation reads it.

A **queue item** is one run's researcher output (kind ``"profile"``) or writer output (kind ``"email"``),
keyed by the trace behind it: the run's LAST researcher or writer trace without an error (a replay's runs are
items like any other: ``outreach replay`` makes a campaign of them). A review is one new
``store.models.Review`` row with the trace id and the item's ``email_id`` or ``profile_id``; the latest row of
a trace decides and earlier rows stay as history. ``finetune.datasets.build_sft_dataset`` reads the same rows:
``rejected`` keeps a trace out of training, ``edited`` makes ``Review.edited_output`` the training target, so
an edit is stored in the agent's OUTPUT FORMAT (the writer's ``EmailDraft`` JSON with merge tags, the
researcher's ``ExtractionOutput`` JSON citing sentence ids).

Edits are checked before anything is written, with the agents' own functions:

* writer: the text parses as ``EmailDraft`` (``agents.parsing.parse_model_output``), renders with the
  run's prospect, profile and offer (``agents.writer.render``: an unknown merge tag is an error naming it)
  and uses only the merge tags the trace's task offered the writer (``core.tasks.WritingTask.merge_tags``);
* researcher: the text parses as ``ExtractionOutput`` and every fact survives ``agents.grounding.ground_facts``
  against the numbered sentences of the trace's own task, with no documents: the evidence must be a
  sentence id of that task whose sentence contains the value.

A trace's task is ``agents.legacy_tasks.trace_task``: the stored one, or read back from the prompt of a
trace recorded before tasks were stored.

Terminal and web front ends (``outreach review``) share ``editable_text`` / ``output_from_editable``: an
email is edited as a ``Subject: ...`` line, a blank line and the body (merge tags included); a profile as
pretty-printed ``ExtractionOutput`` JSON.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Engine, func
from sqlmodel import col, select

from agents.attribution import CompanyMatcher
from agents.errors import MergeTagError
from agents.legacy_tasks import trace_task
from agents.parsing import OutputParseError, parse_model_output
from agents.schemas import DROP_REASONS, EmailDraft, ExtractionOutput, Fact, Offer, Profile, ProspectInfo
from agents.writer import render, used_merge_tags
from core.errors import UserError
from core.tasks import ExtractionTask, WritingTask
from finetune.datasets import (
    REVIEW_STATUSES,
    by_ids,
    check_extraction_answer,
    extraction_json,
    latest_reviews,
)
from store import session_scope
from store.models import (
    Campaign,
    EmailRecord,
    FactRecord,
    ProfileRecord,
    Prospect,
    Review,
    Run,
    RunStatus,
    Trace,
)

__all__ = [
    "AGENT_KINDS",
    "REVIEW_ACTIONS",
    "ItemEmail",
    "ItemFact",
    "ItemProfile",
    "ItemReview",
    "ReviewCounts",
    "ReviewInputError",
    "ReviewItem",
    "ReviewNotFoundError",
    "apply_review",
    "editable_text",
    "load_item",
    "output_from_editable",
    "queue_trace_ids",
    "review_counts",
    "review_queue",
    "validate_edit",
]

logger = logging.getLogger(__name__)

ItemKind = Literal["email", "profile"]

#: The agents whose outputs are reviewed, and the kind of item each produces.
AGENT_KINDS: dict[str, ItemKind] = {"researcher": "profile", "writer": "email"}
#: Accepted action words and the ``Review.status`` each writes.
REVIEW_ACTIONS: dict[str, str] = {
    "approve": "approved", "approved": "approved",
    "edit": "edited", "edited": "edited",
    "reject": "rejected", "rejected": "rejected",
}
_HINT = "Run `outreach review` to list what is left to review"
_SUBJECT_LINE = re.compile(r"^subject:[ \t]?(.*)$", re.IGNORECASE)


class ReviewNotFoundError(UserError, LookupError):
    """The trace does not exist (any more), or it is not a queue item (an errored or superseded call).

    Attributes:
        trace_id: the id asked for.
    """

    def __init__(self, trace_id: int, reason: str = "does not exist") -> None:
        self.trace_id = trace_id
        super().__init__(f"trace {trace_id} {reason}, so it cannot be reviewed; nothing was written. {_HINT}")


class ReviewInputError(UserError, ValueError):
    """A review action or an edit is not acceptable; the message says what is wrong and nothing was written."""


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class ItemFact:
    """One grounded fact of a profile: ``evidence`` is a verbatim quote of the page at ``source_url``."""

    field: str
    value: str
    evidence: str
    source_url: str


@dataclass(frozen=True)
class ItemProfile:
    """The researcher's stored profile for a run (``ProfileRecord`` and its facts, in id order)."""

    id: int
    company: str
    website: str
    facts: list[ItemFact]
    sources: list[str]
    dropped_facts: int
    drop_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def drops_text(self) -> str:
        """The drops in words, by reason: ``"3 fact(s) dropped (misattributed 2, ungrounded 1)"``;
        drops stored before reasons were recorded show as ``reason not recorded``."""
        counts = {r: self.drop_reasons.get(r, 0) for r in DROP_REASONS}
        counts.update({r: n for r, n in self.drop_reasons.items() if r not in counts})
        unrecorded = self.dropped_facts - sum(counts.values())
        parts = [f"{r.replace('_', ' ')} {n}" for r, n in counts.items() if n > 0]
        parts += [f"reason not recorded {unrecorded}"] if unrecorded > 0 else []
        return f"{self.dropped_facts} fact(s) dropped" + (f" ({', '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class ItemEmail:
    """The writer's stored email for a run: templates with merge tags, the rendered text and its checks.

    Attributes:
        checks: check name -> passed (``agents.validation.CHECKS``).
        errors: one message per failed check.
    """

    id: int
    subject_template: str
    body_template: str
    subject: str
    body: str
    checks: dict[str, bool]
    errors: list[str]
    valid: bool


@dataclass(frozen=True)
class ItemReview:
    """The latest review of an item; ``status`` is approved, edited or rejected."""

    id: int
    status: str
    edited_output: str | None
    reviewer: str
    note: str
    created_at: datetime | None


@dataclass
class ReviewItem:
    """One thing to review: a run's profile (researcher) or email (writer) and the trace behind it.

    Attributes:
        kind: ``"profile"`` (researcher) or ``"email"`` (writer).
        trace_id: the id of the item (the run's last error-free trace of the agent).
        run_id, campaign, agent, backend: where it comes from (``backend`` is the trace's backend spec).
        run_status, run_error: the run's ``RunStatus`` and failure reason, if any.
        prospect: who the run was about.
        email: the run's stored email (also shown for profile items, as context), or None.
        profile: the run's stored profile (also shown for email items: the facts behind its tags), or None.
        output: the trace's raw output (the agent's JSON answer).
        failed: the run failed or its email did not pass validation.
        review: the latest review, or None when not reviewed yet.
    """

    kind: ItemKind
    trace_id: int
    run_id: int
    campaign: str
    agent: str
    backend: str
    run_status: str
    run_error: str | None
    prospect: ProspectInfo
    email: ItemEmail | None
    profile: ItemProfile | None
    output: str
    failed: bool
    review: ItemReview | None = None

    @property
    def status(self) -> str | None:
        """The latest review status, or None when unreviewed."""
        return self.review.status if self.review is not None else None


@dataclass
class ReviewCounts:
    """How much of the (filtered) queue is reviewed.

    Attributes:
        total: items matching the filters, reviewed or not.
        reviewed: items with a review (``approved + edited + rejected``).
        approved, edited, rejected: items by latest review status.
        left: items not reviewed yet (``total - reviewed``).
        failed: items whose run failed or whose email failed validation.
        by_agent: the same figures per agent (``{"writer": {"total": ..., ...}}``).
    """

    total: int = 0
    reviewed: int = 0
    approved: int = 0
    edited: int = 0
    rejected: int = 0
    left: int = 0
    failed: int = 0
    by_agent: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        """The overall figures as a dict (without ``by_agent``)."""
        return {"total": self.total, "reviewed": self.reviewed, "approved": self.approved, "edited": self.edited,
                "rejected": self.rejected, "left": self.left, "failed": self.failed}


@dataclass(frozen=True)
class _Key:
    trace_id: int
    run_id: int
    agent: str
    backend: str
    campaign: str
    failed: bool


# --------------------------------------------------------------------------- finding items


def _check_agent(agent: str | None) -> None:
    if agent is not None and agent not in AGENT_KINDS:
        raise ReviewInputError(f"agent {agent!r} has no review queue; use one of {sorted(AGENT_KINDS)}")


def _keys(session: Any, *, agent: str | None = None, campaign: str | None = None, backend: str | None = None,
          run_id: int | None = None) -> list[_Key]:
    """Queue items (lightweight) in trace id order, filtered; only id-sized columns are read."""
    _check_agent(agent)
    agents = [agent] if agent is not None else list(AGENT_KINDS)
    query = (select(Trace.id, Trace.run_id, Trace.agent, Trace.backend)
             .where(col(Trace.run_id).is_not(None),
                    func.coalesce(Trace.error, "") == "", col(Trace.agent).in_(agents))
             .order_by(col(Trace.id)))
    if run_id is not None:
        query = query.where(Trace.run_id == run_id)
    last: dict[tuple[int, str], tuple[int, str]] = {}
    for tid, rid, agent_name, backend_name in session.exec(query).all():
        last[(int(rid), agent_name)] = (int(tid), backend_name)  # ascending id: the last call wins
    runs = by_ids(session, Run, [rid for rid, _ in last])
    names = {c.id: c.name for c in by_ids(session, Campaign, {r.campaign_id for r in runs.values()}).values()}
    valid: dict[int, bool] = {}
    wanted = sorted(runs)
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        for rid, ok in session.exec(select(EmailRecord.run_id, EmailRecord.valid)
                                    .where(col(EmailRecord.run_id).in_(chunk))).all():
            valid[int(rid)] = bool(ok)
    keys: list[_Key] = []
    for (rid, agent_name), (tid, backend_name) in last.items():
        run = runs.get(rid)
        if run is None:
            continue
        name = names.get(run.campaign_id, "")
        if (campaign is not None and name != campaign) or (backend is not None and backend_name != backend):
            continue
        failed = run.status == RunStatus.FAILED or valid.get(rid) is False
        keys.append(_Key(tid, rid, agent_name, backend_name, name, failed))
    keys.sort(key=lambda k: k.trace_id)
    return keys


def _status(review: Review | None) -> str | None:
    """The latest review's status when it is a known one (unknown statuses count as unreviewed, as in datasets)."""
    if review is None:
        return None
    status = review.status.strip().lower()
    return status if status in REVIEW_STATUSES else None


def _ordered(keys: list[_Key], reviews: Mapping[int, Review], *, unreviewed_only: bool, failed_first: bool,
             limit: int | None) -> list[_Key]:
    if limit is not None and limit < 0:
        raise ReviewInputError(f"limit must be >= 0 or None, got {limit}")
    if unreviewed_only:
        keys = [k for k in keys if _status(reviews.get(k.trace_id)) is None]
    if failed_first:
        keys = sorted(keys, key=lambda k: (not k.failed, k.trace_id))
    return keys if limit is None else keys[:limit]


def _facts_by_profile(session: Any, profile_ids: Iterable[int]) -> dict[int, list[ItemFact]]:
    out: dict[int, list[ItemFact]] = {}
    wanted = sorted(set(profile_ids))
    for start in range(0, len(wanted), 500):
        query = (select(FactRecord).where(col(FactRecord.profile_id).in_(wanted[start:start + 500]))
                 .order_by(col(FactRecord.id)))
        for f in session.exec(query).all():
            out.setdefault(f.profile_id, []).append(ItemFact(f.field, f.value, f.evidence, f.source_url))
    return out


def _rows_by_run(session: Any, model: type[EmailRecord] | type[ProfileRecord],
                 run_ids: Sequence[int]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    wanted = sorted(set(run_ids))
    for start in range(0, len(wanted), 500):
        for row in session.exec(select(model).where(col(model.run_id).in_(wanted[start:start + 500]))).all():
            out[row.run_id] = row
    return out


def _item_review(review: Review | None) -> ItemReview | None:
    status = _status(review)
    if review is None or status is None or review.id is None:
        return None
    return ItemReview(review.id, status, review.edited_output, review.reviewer, review.note, review.created_at)


def _load_items(session: Any, keys: Sequence[_Key], reviews: Mapping[int, Review]) -> list[ReviewItem]:
    """Full items for ``keys`` (same order), loaded in batches."""
    if not keys:
        return []
    run_ids = [k.run_id for k in keys]
    traces = by_ids(session, Trace, [k.trace_id for k in keys])
    runs = by_ids(session, Run, run_ids)
    prospects = by_ids(session, Prospect, [r.prospect_id for r in runs.values()])
    emails = _rows_by_run(session, EmailRecord, run_ids)
    profiles = _rows_by_run(session, ProfileRecord, run_ids)
    facts = _facts_by_profile(session, [p.id for p in profiles.values()])
    items: list[ReviewItem] = []
    for key in keys:
        run = runs[key.run_id]
        p = prospects.get(run.prospect_id)
        prospect = ProspectInfo(first_name=p.first_name, last_name=p.last_name, title=p.title, email=p.email,
                                company=p.company, website=p.website) if p is not None else ProspectInfo(
            first_name="", email="", company="")
        e = emails.get(key.run_id)
        email = None
        if e is not None:
            checks = e.checks if isinstance(e.checks, dict) else {}
            email = ItemEmail(e.id, e.subject_template, e.body_template, e.subject, e.body,
                              {str(k): bool(v) for k, v in dict(checks.get("checks") or {}).items()},
                              [str(x) for x in checks.get("errors") or []], bool(e.valid))
        pr = profiles.get(key.run_id)
        profile = None
        if pr is not None:
            profile = ItemProfile(pr.id, pr.company, pr.website, facts.get(pr.id, []), list(pr.sources or []),
                                  pr.dropped_facts, dict(pr.drop_reasons or {}))
        items.append(ReviewItem(
            kind=AGENT_KINDS[key.agent], trace_id=key.trace_id, run_id=key.run_id, campaign=key.campaign,
            agent=key.agent, backend=key.backend, run_status=run.status, run_error=run.error, prospect=prospect,
            email=email, profile=profile, output=traces[key.trace_id].output, failed=key.failed,
            review=_item_review(reviews.get(key.trace_id)),
        ))
    return items


def review_queue(
    engine: Engine,
    *,
    agent: str | None = None,
    campaign: str | None = None,
    backend: str | None = None,
    unreviewed_only: bool = True,
    failed_first: bool = True,
    limit: int | None = None,
) -> list[ReviewItem]:
    """The items to review, in queue order.

    Args:
        engine: the store.
        agent: ``researcher`` or ``writer`` only; ``None``: both.
        campaign: items of this campaign (by name) only.
        backend: items whose trace ran on this backend spec only (e.g. ``heuristic``, ``openai:gpt-4.1``).
        unreviewed_only: leave out items that already have a review.
        failed_first: items of failed runs or invalid emails first; otherwise (and within each group) by trace id.
        limit: at most this many items (``None``: all).

    Returns:
        ``ReviewItem`` list.

    Raises:
        ReviewInputError: ``agent`` is not a reviewed agent, or ``limit`` is negative.
    """
    with session_scope(engine) as session:
        keys = _keys(session, agent=agent, campaign=campaign, backend=backend)
        reviews = latest_reviews(session, [k.trace_id for k in keys])
        chosen = _ordered(keys, reviews, unreviewed_only=unreviewed_only, failed_first=failed_first, limit=limit)
        return _load_items(session, chosen, reviews)


def queue_trace_ids(
    engine: Engine,
    *,
    agent: str | None = None,
    campaign: str | None = None,
    backend: str | None = None,
    unreviewed_only: bool = True,
    failed_first: bool = True,
) -> list[int]:
    """The trace ids of ``review_queue``'s items, in the same order, without loading the items (cheap).

    Raises:
        ReviewInputError: ``agent`` is not a reviewed agent.
    """
    with session_scope(engine) as session:
        keys = _keys(session, agent=agent, campaign=campaign, backend=backend)
        reviews = latest_reviews(session, [k.trace_id for k in keys])
        return [k.trace_id for k in _ordered(keys, reviews, unreviewed_only=unreviewed_only,
                                             failed_first=failed_first, limit=None)]


def review_counts(
    engine: Engine,
    *,
    agent: str | None = None,
    campaign: str | None = None,
    backend: str | None = None,
) -> ReviewCounts:
    """Count reviewed and remaining items among those matching the filters (see ``review_queue``).

    Raises:
        ReviewInputError: ``agent`` is not a reviewed agent.
    """
    with session_scope(engine) as session:
        keys = _keys(session, agent=agent, campaign=campaign, backend=backend)
        reviews = latest_reviews(session, [k.trace_id for k in keys])
    per: dict[str, Counter[str]] = {}
    for key in keys:
        status = _status(reviews.get(key.trace_id))
        for bucket in (per.setdefault("", Counter()), per.setdefault(key.agent, Counter())):
            bucket["total"] += 1
            bucket["failed"] += key.failed
            if status is None:
                bucket["left"] += 1
            else:
                bucket["reviewed"] += 1
                bucket[status] += 1
    names = ("total", "reviewed", "approved", "edited", "rejected", "left", "failed")
    overall = per.pop("", Counter())
    return ReviewCounts(**{n: overall[n] for n in names},
                        by_agent={a: {n: c[n] for n in names} for a, c in sorted(per.items())})


def _key_for(session: Any, trace_id: int) -> _Key:
    if isinstance(trace_id, bool) or not isinstance(trace_id, int):
        raise ReviewInputError(f"trace id must be an integer, got {trace_id!r}")
    trace = session.get(Trace, trace_id)
    if trace is None:
        raise ReviewNotFoundError(trace_id)
    if trace.agent not in AGENT_KINDS:
        raise ReviewNotFoundError(trace_id, f"is a {trace.agent!r} call, not a researcher or writer output")
    if trace.error:
        raise ReviewNotFoundError(trace_id, "is a model call that failed")
    if trace.run_id is None:
        raise ReviewNotFoundError(trace_id, "belongs to no campaign run (a loose call)")
    for key in _keys(session, agent=trace.agent, run_id=trace.run_id):
        if key.trace_id == trace_id:
            return key
    raise ReviewNotFoundError(trace_id, "was superseded by a later call of the same run (review that one)")


def load_item(engine: Engine, trace_id: int) -> ReviewItem:
    """One queue item by its trace id, reviewed or not.

    Raises:
        ReviewNotFoundError: no such trace, or it is not a queue item.
    """
    with session_scope(engine) as session:
        key = _key_for(session, trace_id)
        return _load_items(session, [key], latest_reviews(session, [trace_id]))[0]


# --------------------------------------------------------------------------- edits


def _check_extraction(text: str, trace: Trace, prospect: ProspectInfo) -> str:
    try:
        check = check_extraction_answer(text, trace_task(trace), CompanyMatcher(prospect.company, prospect.website))
    except OutputParseError as exc:
        raise ReviewInputError(f'the edited profile is not researcher output JSON '
                               f'{{"facts": [{{"field", "value", "evidence": "S12"}}]}}: {exc}') from exc
    if check.drops:
        facts = check.output.facts
        raise ReviewInputError("the edited profile has facts that are not grounded in the trace's sentences, "
                               "not about the prospect's company or not of their field's shape: "
                               + "; ".join(f"fact {i + 1} ({facts[i].field}={facts[i].value!r}, evidence "
                                           f"{facts[i].evidence!r}): {detail}" for i, _reason, detail in check.drops))
    return check.kept_json()  # every fact: keys in the order the reviewer wrote them, like the agent's answers


def _run_context(session: Any, run_id: int) -> tuple[ProspectInfo, Profile, Offer]:
    run = session.get(Run, run_id)
    prospect_row = session.get(Prospect, run.prospect_id) if run is not None else None
    campaign = session.get(Campaign, run.campaign_id) if run is not None else None
    if run is None or prospect_row is None or campaign is None:
        raise ReviewInputError(f"run {run_id} lacks its prospect or campaign in the store; the email cannot be "
                               "rendered, so the edit cannot be checked")
    prospect = ProspectInfo(first_name=prospect_row.first_name, last_name=prospect_row.last_name,
                            title=prospect_row.title, email=prospect_row.email, company=prospect_row.company,
                            website=prospect_row.website)
    try:
        offer = Offer.model_validate(campaign.offer)
    except ValueError as exc:
        raise ReviewInputError(f"campaign {campaign.name!r} has an offer that cannot be read ({exc}); "
                               "fix it by running the campaign again with a valid offer TOML") from exc
    record = session.exec(select(ProfileRecord).where(ProfileRecord.run_id == run_id)).first()
    if record is None:
        return prospect, Profile(company=prospect.company, website=prospect.website), offer
    facts = [Fact(field=f.field, value=f.value, evidence=f.evidence, source_url=f.source_url)
             for f in _facts_by_profile(session, [record.id]).get(record.id, [])]
    return prospect, Profile(company=record.company, website=record.website, facts=facts,
                             dropped_facts=record.dropped_facts, sources=list(record.sources or [])), offer


def _check_email(text: str, session: Any, run_id: int, task: ExtractionTask | WritingTask | None) -> str:
    try:
        draft = parse_model_output(text, EmailDraft)
    except OutputParseError as exc:
        raise ReviewInputError(f'the edited email is not writer output JSON {{"subject": ..., "body": ...}}: '
                               f"{exc}") from exc
    if not draft.subject.strip() or not draft.body.strip():
        raise ReviewInputError("the edited email needs a non-empty subject and body")
    prospect, profile, offer = _run_context(session, run_id)
    try:
        render(draft, prospect, profile, offer)
    except MergeTagError as exc:
        raise ReviewInputError(str(exc)) from exc
    if isinstance(task, WritingTask):
        offered = set(task.tag_names)
        extra = [t for t in used_merge_tags(f"{draft.subject}\n{draft.body}") if t not in offered]
        if extra:
            raise ReviewInputError(
                f"the edited email uses merge tags the writer was not offered for this prospect: "
                f"{', '.join('{{' + t + '}}' for t in extra)}; use only "
                f"{', '.join('{{' + t + '}}' for t in task.tag_names)}")
    return json.dumps(draft.model_dump(), ensure_ascii=False)


def _validated_edit(session: Any, key: _Key, edited_output: str | None) -> str:
    if edited_output is None or not edited_output.strip():
        raise ReviewInputError("an edit needs the edited output (the agent's JSON answer); it is empty")
    trace = session.get(Trace, key.trace_id)
    if AGENT_KINDS[key.agent] == "email":
        return _check_email(edited_output, session, key.run_id, trace_task(trace) if trace is not None else None)
    prospect, _profile, _offer = _run_context(session, key.run_id)
    return _check_extraction(edited_output, trace, prospect)


def validate_edit(engine: Engine, trace_id: int, edited_output: str) -> str:
    """Check an edit of a queue item without writing anything (what ``apply_review`` checks).

    Args:
        engine: the store.
        trace_id: the item's trace id.
        edited_output: the edited agent output (JSON in the agent's output format; prose or code fences around
            it are tolerated, as for model answers).

    Returns:
        The edit as canonical JSON in the agent's output format (what would be stored).

    Raises:
        ReviewNotFoundError: no such trace, or it is not a queue item.
        ReviewInputError: the edit does not parse, uses an unknown merge tag, or cites evidence that is not a
            sentence of the trace's prompt containing the value.
    """
    with session_scope(engine) as session:
        return _validated_edit(session, _key_for(session, trace_id), edited_output)


def apply_review(
    engine: Engine,
    trace_id: int,
    action: str,
    *,
    edited_output: str | None = None,
    reviewer: str = "",
    note: str = "",
) -> Review:
    """Approve, edit or reject a queue item: writes ONE new ``Review`` row (the latest review decides).

    Args:
        engine: the store.
        trace_id: the item's trace id (``ReviewItem.trace_id``).
        action: ``approve``, ``edit`` or ``reject`` (or the statuses ``approved``, ``edited``, ``rejected``).
        edited_output: for ``edit`` only: the corrected output in the agent's format (writer: ``EmailDraft`` JSON
            with merge tags; researcher: ``ExtractionOutput`` JSON citing sentence ids); see
            ``output_from_editable`` to get it from the editable text.
        reviewer: who reviewed (free text).
        note: why (free text).

    Returns:
        The stored ``Review`` (with its id), carrying ``trace_id`` and the run's ``email_id`` (writer) or
        ``profile_id`` (researcher); ``edited_output`` is the canonical JSON of the edit.

    Raises:
        ReviewInputError: unknown action, ``edited_output`` given without ``edit`` or missing with it, or an
            edit that fails its checks (see ``validate_edit``). Nothing is written.
        ReviewNotFoundError: the trace does not exist or is not a queue item. Nothing is written.
    """
    status = REVIEW_ACTIONS.get(str(action).strip().lower())
    if status is None:
        raise ReviewInputError(f"unknown review action {action!r}; use approve, edit or reject")
    if status != "edited" and edited_output is not None:
        raise ReviewInputError(f"{action!r} takes no edited output; use the edit action to change the output")
    with session_scope(engine) as session:
        key = _key_for(session, trace_id)
        output = _validated_edit(session, key, edited_output) if status == "edited" else None
        model = EmailRecord if AGENT_KINDS[key.agent] == "email" else ProfileRecord
        record_id = session.exec(select(model.id).where(model.run_id == key.run_id)).first()
        review = Review(trace_id=trace_id, status=status, edited_output=output, reviewer=reviewer.strip(),
                        note=note.strip(),
                        email_id=record_id if model is EmailRecord else None,
                        profile_id=record_id if model is ProfileRecord else None)
        session.add(review)
        session.flush()
        logger.info("trace %d (%s, run %d) reviewed %s by %r", trace_id, key.agent, key.run_id, status, reviewer)
        return review


# --------------------------------------------------------------------------- editable text


def _current_output(item: ReviewItem) -> str:
    if item.review is not None and item.review.status == "edited" and item.review.edited_output:
        return item.review.edited_output
    return item.output


def editable_text(item: ReviewItem) -> str:
    """The text a reviewer edits for ``item`` (the latest edit if there is one, else the trace's output).

    Email: ``Subject: <subject template>``, a blank line, then the body template (merge tags kept). Profile:
    the researcher output as ``{"facts": [...]}`` JSON with one fact per line. Output that does not parse
    is given raw (email: falls back to the stored templates), so the reviewer can repair it.
    """
    text = _current_output(item)
    if item.kind == "email":
        try:
            draft = parse_model_output(text, EmailDraft)
            subject, body = draft.subject, draft.body
        except OutputParseError:
            if item.email is None:
                return text
            subject, body = item.email.subject_template, item.email.body_template
        return f"Subject: {subject}\n\n{body.rstrip()}\n"
    try:
        facts = json.loads(extraction_json(parse_model_output(text, ExtractionOutput), text))["facts"]
    except OutputParseError:
        return text
    lines = ",\n".join("  " + json.dumps(f, ensure_ascii=False) for f in facts)
    return '{"facts": [\n' + lines + "\n]}\n" if facts else '{"facts": []}\n'


def output_from_editable(kind: str, text: str) -> str:
    """Turn edited text (see ``editable_text``) back into the agent's output format, as JSON.

    Line ends are normalised (browsers send CRLF). An email's text starts with a ``Subject:`` line, then the
    body after the first blank line; text that already is a JSON object is taken as the agent's JSON. A profile's
    text is the researcher's JSON. Only the shape is checked here; ``apply_review`` checks the content.

    Args:
        kind: ``"email"`` or ``"profile"`` (``ReviewItem.kind``).
        text: the edited text.

    Returns:
        JSON in the agent's output format.

    Raises:
        ReviewInputError: unknown kind, empty text, or an email without a ``Subject:`` line.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if kind not in ("email", "profile"):
        raise ReviewInputError(f"unknown item kind {kind!r}; use email or profile")
    if not text.strip():
        raise ReviewInputError("the edited text is empty")
    if kind == "profile" or text.lstrip().startswith("{"):
        return text.strip()
    lines = text.strip("\n").split("\n")
    m = _SUBJECT_LINE.match(lines[0].strip())
    if m is None:
        raise ReviewInputError("the edited email must start with a 'Subject: ...' line, then a blank line, then "
                               f"the body; the first line is {lines[0][:80]!r}")
    body = "\n".join(lines[1:]).strip("\n").rstrip()
    return json.dumps({"subject": m.group(1).strip(), "body": body}, ensure_ascii=False)
