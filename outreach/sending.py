"""Sending a campaign's valid emails over SMTP: which emails go now, and what is recorded for each.

For each valid email of the campaign, in the order they were written:

1. its ``sends`` row decides: none yet, or ``deferred`` and due again (``retry_after_s``): send; ``sent`` or
   ``failed``: never again; ``sending``/``unknown`` (an intent without an answer, e.g. after a crash or ``kill -9``
   mid-send, or a connection that broke during ``DATA``): skipped and reported, sent again only with
   ``resend_unknown`` (the server may have taken it: check the mailbox's sent folder or the server's log first);
2. a recipient on the suppression list is never emailed;
3. each sending mailbox (the offer's ``sender_email``) sends at most ``daily_cap`` messages in any 24 hours
   (messages sent, or possibly sent, by earlier runs count) and waits ``pace_s`` seconds between two messages
   (the last attempt stored, so pacing holds across runs);
4. the intent is committed (``store.sends.claim_send``), the message handed over (``tools.mail``), and the
   server's answer committed (``store.sends.record_answer``) with a ``sent`` engagement event for an accepted
   message, or the recipient suppressed as a bounce when the server says the address does not exist (5.1.x).

A 4xx answer, or a connection lost before ``DATA``, is ``deferred`` and retried by a later run, until
``max_attempts`` attempts, then ``failed``; a 5xx answer is ``failed`` at once. A dry run reads the same plan
and builds every message but connects to nothing and writes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from core.errors import UserError
from store.exports import MESSAGE_ID_FALLBACK_DOMAIN, new_message_id
from store.models import Campaign, EmailRecord, EngagementEvent, Prospect, Run, Send, SendStatus, SuppressionReason
from store.sends import (
    claim_send,
    mailbox_usage,
    normalise_address,
    record_answer,
    remint_message_id,
    suppressed,
)
from tools.mail import MailServerError, OutgoingEmail, SmtpConnection, SmtpOutcome, SmtpServer, build_message

__all__ = ["MailboxLimits", "SendError", "SendItem", "SendPolicy", "SendReport", "send_campaign"]

logger = logging.getLogger(__name__)

#: ``SendItem.status`` values besides ``SendStatus``'s, for emails not handed over in this run.
SKIPPED = {
    "would_send": "would be sent (dry run)",
    "already_sent": "sent before",
    "failed_before": "failed before (permanent refusal)",
    "unknown_before": "unknown: sent before without an answer (--resend-unknown to send again)",
    "waiting": "deferred, not due yet",
    "suppressed": "on the suppression list",
    "capped": "over the mailbox's daily cap: left for a later run",
    "limit": "over --limit: left for a later run",
    "unusable": "cannot be built into a message",
    "taken": "taken by another sender",
    "mailbox_stopped": "the server refused the sender: left for a later run",
    "not_reached": "not reached: the server could not be used (see above)",
}


class SendError(UserError):
    """A campaign cannot be sent as asked (unknown campaign, an offer without ``sender_email``)."""


@dataclass(frozen=True)
class MailboxLimits:
    """Limits of one sending mailbox (None: the policy's default)."""

    daily_cap: int | None = None
    pace_s: float | None = None


@dataclass(frozen=True)
class SendPolicy:
    """How a campaign is sent.

    Attributes:
        daily_cap: messages per sending mailbox in any 24 hours (rolling window).
        pace_s: seconds between two messages of one mailbox.
        max_attempts: attempts of one email (temporary refusals) before it is ``failed``.
        retry_after_s: seconds before a ``deferred`` email is tried again.
        resend_unknown: also send emails whose earlier attempt has no answer (may deliver them twice).
        limit: send at most this many emails now.
        unsubscribe_mailto: where unsubscribe requests are mailed (default: the sending mailbox).
        unsubscribe_url: an http(s) unsubscribe address (``{message_id}`` is replaced); https adds RFC 8058
            one-click.
        mailboxes: limits per mailbox (lower-case address), over the defaults above.
    """

    daily_cap: int = 50
    pace_s: float = 30.0
    max_attempts: int = 5
    retry_after_s: float = 300.0
    resend_unknown: bool = False
    limit: int | None = None
    unsubscribe_mailto: str = ""
    unsubscribe_url: str = ""
    mailboxes: Mapping[str, MailboxLimits] = field(default_factory=dict)

    def cap(self, mailbox: str) -> int:
        """The daily cap of ``mailbox``."""
        own = self.mailboxes.get(normalise_address(mailbox))
        return own.daily_cap if own is not None and own.daily_cap is not None else self.daily_cap

    def pace(self, mailbox: str) -> float:
        """The seconds between two messages of ``mailbox``."""
        own = self.mailboxes.get(normalise_address(mailbox))
        return own.pace_s if own is not None and own.pace_s is not None else self.pace_s


@dataclass(frozen=True)
class SendItem:
    """What happened to one email in this run: ``status`` is a ``SendStatus`` value or a key of ``SKIPPED``;
    ``code`` and ``text`` are the server's answer (or why it was skipped)."""

    email_id: int
    to: str
    message_id: str
    status: str
    code: int | None = None
    text: str = ""


@dataclass
class SendReport:
    """Every email of the campaign and what happened to it in this run (``items``), with ``counts`` by status;
    ``stopped`` says why sending stopped early (the server could not be used), None when it did not."""

    campaign: str
    dry_run: bool
    items: list[SendItem] = field(default_factory=list)
    stopped: str | None = None

    @property
    def counts(self) -> Counter[str]:
        """``{status: emails}``."""
        return Counter(i.status for i in self.items)


@dataclass(frozen=True)
class _Candidate:
    email: OutgoingEmail
    email_id: int
    variant: str
    send: Send | None


def _load(engine: Engine, campaign: str) -> list[_Candidate]:
    """The campaign's valid emails with their sends rows, oldest first.

    Raises:
        SendError: no such campaign, or its offer has no ``sender_email``.
    """
    with Session(engine) as session:
        found = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
        if found is None:
            names = sorted(session.exec(select(Campaign.name)).all())
            raise SendError(f"no campaign {campaign!r} in this store (campaigns: {', '.join(names) or 'none'}); "
                            "name one with --campaign, or the store with --store")
        offer = found.offer
        sender = str(offer.get("sender_email", "")).strip()
        if "@" not in sender:
            raise SendError(f"campaign {campaign!r}: the offer has no sender_email, so there is no mailbox to send "
                            "from; add sender_email to the offer TOML and run `outreach run` again (it resumes and "
                            "stores the offer), then send")
        rows = session.exec(
            select(EmailRecord, Prospect, Run, Send)
            .join(Run, col(Run.id) == EmailRecord.run_id)
            .join(Prospect, col(Prospect.id) == Run.prospect_id)
            .outerjoin(Send, col(Send.email_id) == EmailRecord.id)
            .where(Run.campaign_id == found.id, EmailRecord.valid == True)  # noqa: E712
            .order_by(col(EmailRecord.id))
        ).all()
    return [
        _Candidate(
            email=OutgoingEmail(
                message_id=(e.message_id or "").strip(), sender_name=str(offer.get("sender_name", "")),
                sender_email=sender, to_name=f"{p.first_name} {p.last_name}".strip(), to_email=p.email.strip(),
                subject=e.subject, body=e.body, organization=str(offer.get("sender_company", ""))),
            email_id=e.id or 0, variant=r.arm or "", send=s)
        for e, p, r, s in rows
    ]


def _status_now(c: _Candidate, policy: SendPolicy, now: datetime) -> str | None:
    """Why ``c`` is not to be sent in this run (a ``SKIPPED`` key), or None when it is."""
    s = c.send
    if s is None:
        return None
    if s.status == SendStatus.SENT:
        return "already_sent"
    if s.status == SendStatus.FAILED:
        return "failed_before"
    if s.status in (SendStatus.SENDING, SendStatus.UNKNOWN):
        return None if policy.resend_unknown else "unknown_before"
    attempted = s.attempted_at.replace(tzinfo=UTC) if s.attempted_at.tzinfo is None else s.attempted_at
    return None if attempted + timedelta(seconds=policy.retry_after_s) <= now else "waiting"


def _retryable(policy: SendPolicy) -> list[str]:
    return [SendStatus.DEFERRED, *((SendStatus.SENDING, SendStatus.UNKNOWN) if policy.resend_unknown else ())]


def send_campaign(engine: Engine, campaign: str, server: SmtpServer | None, policy: SendPolicy, *,
                  dry_run: bool = False, clock: Callable[[], datetime] | None = None,
                  sleep: Callable[[float], None] = time.sleep,
                  on_item: Callable[[SendItem], None] | None = None) -> SendReport:
    """Send the campaign's due emails (module docstring: the rules).

    Args:
        engine: the store.
        campaign: the campaign's name.
        server: the SMTP server (may be None for a dry run).
        policy: caps, pacing, retries and unsubscribe addresses.
        dry_run: build every due message, connect to nothing, write nothing.
        clock: the current time (aware UTC); default ``datetime.now(UTC)``.
        sleep: waits for pacing, in seconds (tests pass a recorder).
        on_item: called with each email's ``SendItem`` as it is decided.

    Returns:
        The ``SendReport``. When the server cannot be used (``MailServerError``) sending stops, ``stopped`` says
        why, and the emails not reached are left as they were.

    Raises:
        SendError: no such campaign, or its offer has no ``sender_email``.
        ValueError: ``server`` is None and ``dry_run`` is False.
    """
    if server is None and not dry_run:
        raise ValueError("send_campaign needs an SMTP server unless dry_run")
    now_fn = clock or (lambda: datetime.now(UTC))
    report = SendReport(campaign=campaign, dry_run=dry_run)

    def note(c: _Candidate, status: str, code: int | None = None, text: str = "") -> None:
        item = SendItem(c.email_id, c.email.to_email, c.email.message_id, status, code, text or SKIPPED.get(status, ""))
        report.items.append(item)
        if on_item is not None:
            on_item(item)

    start = now_fn()
    due, last = _plan(engine, _load(engine, campaign), policy, start, dry_run=dry_run, note=note)
    if dry_run:
        for c in due:
            note(c, "would_send")
        return report
    assert server is not None
    _deliver(engine, server, due, last, policy, report, note=note, now_fn=now_fn, sleep=sleep, on_item=on_item)
    return report


def _plan(engine: Engine, candidates: list[_Candidate], policy: SendPolicy, start: datetime, *, dry_run: bool,
          note: Callable[..., None]) -> tuple[list[_Candidate], dict[str, datetime | None]]:
    """The emails to send now, in order, and each mailbox's last attempt; every other email is ``note``d with why
    it waits (sent before, unknown, suppressed, unusable, over the cap or the limit)."""
    blocked = suppressed(engine, (c.email.to_email for c in candidates))
    due: list[_Candidate] = []
    room: dict[str, int] = {}
    last: dict[str, datetime | None] = {}
    for c in candidates:
        reason = _status_now(c, policy, start)
        if reason is not None:
            note(c, reason)
            continue
        to = normalise_address(c.email.to_email)
        if to in blocked:
            note(c, "suppressed", text=f"on the suppression list ({blocked[to]})")
            continue
        if not dry_run and c.send is None and c.email.message_id.endswith(f"@{MESSAGE_ID_FALLBACK_DOMAIN}>"):
            c = _remint(engine, c)
        try:  # built here to check it can be; built again, dated, when it goes out
            build_message(c.email, unsubscribe_mailto=policy.unsubscribe_mailto,
                          unsubscribe_url=policy.unsubscribe_url, date=start)
        except ValueError as exc:
            note(c, "unusable", text=str(exc))
            continue
        mailbox = normalise_address(c.email.sender_email)
        if mailbox not in room:
            usage = mailbox_usage(engine, mailbox, start - timedelta(days=1))
            room[mailbox], last[mailbox] = max(0, policy.cap(mailbox) - usage.handed_over), usage.last_attempt
        if room[mailbox] <= 0:
            note(c, "capped", text=f"mailbox {mailbox} reached its cap of {policy.cap(mailbox)} in 24 hours")
            continue
        if policy.limit is not None and len(due) >= policy.limit:
            note(c, "limit")
            continue
        room[mailbox] -= 1
        due.append(c)
    return due, last


def _deliver(engine: Engine, server: SmtpServer, due: list[_Candidate], last: dict[str, datetime | None],
             policy: SendPolicy, report: SendReport, *, note: Callable[..., None], now_fn: Callable[[], datetime],
             sleep: Callable[[float], None], on_item: Callable[[SendItem], None] | None) -> None:
    """Send ``due`` on one SMTP session, paced per mailbox; stop when the server cannot be used."""
    refused_senders: set[str] = set()
    with SmtpConnection(server) as smtp:
        for n, c in enumerate(due):
            mailbox = normalise_address(c.email.sender_email)
            if mailbox in refused_senders:
                note(c, "mailbox_stopped")
                continue
            try:
                smtp.open()
            except MailServerError as exc:
                report.stopped = str(exc)
                logger.warning("sending stopped: %s (%d emails not reached)", exc, len(due) - n)
                for rest in due[n:]:
                    note(rest, "not_reached")
                return
            _pace(last.get(mailbox), policy.pace(mailbox), now_fn, sleep)
            if suppressed(engine, [c.email.to_email]):  # an import may have added it since the plan
                note(c, "suppressed")
                continue
            outcome = _send_one(engine, smtp, c, policy, now_fn)
            last[mailbox] = now_fn()
            if outcome is None:
                note(c, "taken")
                continue
            item, sender_refused = outcome
            report.items.append(item)
            if on_item is not None:
                on_item(item)
            if sender_refused:
                refused_senders.add(mailbox)


def _remint(engine: Engine, c: _Candidate) -> _Candidate:
    """``c`` with a Message-ID at its sender's domain, when it was written before the offer had a ``sender_email``
    (its id is at ``MESSAGE_ID_FALLBACK_DOMAIN``, which spam filters read as forged) and has never been sent."""
    new = new_message_id(c.email.sender_email)
    if not remint_message_id(engine, c.email_id, c.email.message_id, new):
        return c
    logger.info("email %d: Message-ID %s replaced by %s before its first send", c.email_id, c.email.message_id, new)
    return replace(c, email=replace(c.email, message_id=new))


def _pace(last: datetime | None, pace_s: float, now_fn: Callable[[], datetime],
          sleep: Callable[[float], None]) -> None:
    """Wait until ``pace_s`` seconds after ``last`` (the mailbox's previous attempt)."""
    if last is None or pace_s <= 0:
        return
    wait = (last + timedelta(seconds=pace_s) - now_fn()).total_seconds()
    if wait > 0:
        sleep(wait)


def _send_one(engine: Engine, smtp: SmtpConnection, c: _Candidate, policy: SendPolicy,
              now_fn: Callable[[], datetime]) -> tuple[SendItem, bool] | None:
    """Claim, send and record one email: its item and whether the server refused the sender (``MAIL FROM``);
    None when another sender took it first."""
    now = now_fn()
    row = claim_send(engine, email_id=c.email_id, message_id=c.email.message_id, mailbox=c.email.sender_email,
                     recipient=c.email.to_email, now=now, retryable=_retryable(policy))
    if row is None or row.id is None:
        return None
    message = build_message(c.email, unsubscribe_mailto=policy.unsubscribe_mailto,
                            unsubscribe_url=policy.unsubscribe_url, date=now)
    answer = smtp.send(message)
    status = {SmtpOutcome.SENT: SendStatus.SENT, SmtpOutcome.FAILED: SendStatus.FAILED,
              SmtpOutcome.DEFERRED: SendStatus.DEFERRED, SmtpOutcome.UNKNOWN: SendStatus.UNKNOWN}[answer.outcome]
    text = answer.text
    sender_refused = answer.phase == "mail" and status in (SendStatus.FAILED, SendStatus.DEFERRED)
    if sender_refused:  # the mailbox's problem, not this email's: try it again later
        status, text = SendStatus.DEFERRED, f"sender refused: {text}"
    if status == SendStatus.DEFERRED and row.attempts >= policy.max_attempts:
        status, text = SendStatus.FAILED, f"gave up after {row.attempts} attempts: {text}"
    done = now_fn()
    event = EngagementEvent(email_id=c.email_id, message_id=c.email.message_id, variant=c.variant, event="sent",
                            recipient=c.email.to_email, occurred_at=done) if status == SendStatus.SENT else None
    suppress = (c.email.to_email, SuppressionReason.BOUNCE, f"smtp {answer.code} {text}") if answer.bad_address \
        else None
    record_answer(engine, row.id, status=status, code=answer.code, answer=text, now=done, event=event,
                  suppress=suppress)
    logger.info("email %d to %s: %s %s %s", c.email_id, c.email.to_email, status, answer.code or "", text)
    return SendItem(c.email_id, c.email.to_email, c.email.message_id, status, answer.code, text), sender_refused
