"""Bookkeeping of sending: the ``sends`` row of each email (intent, then the server's answer) and the
``suppressions`` list of addresses that are never emailed.

Idempotency rests on two rules: an email's intent is written (and committed) before its message goes to the
server, and an intent is taken only by one sender (a new row, unique per email, or a conditional update of a
retryable row, so two senders never take the same email). An intent that never got its answer stays
``sending`` and is read as ``unknown``: it is not sent again unless asked (``outreach send --resend-unknown``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from store.engine import session_scope
from store.models import EmailRecord, EngagementEvent, Send, SendStatus, Suppression, SuppressionReason

__all__ = [
    "HANDED_OVER",
    "MailboxUsage",
    "add_suppression",
    "claim_send",
    "mailbox_usage",
    "normalise_address",
    "record_answer",
    "remint_message_id",
    "suppressed",
]

logger = logging.getLogger(__name__)

#: Statuses of a message the server took or may have taken: they count towards a mailbox's daily cap.
HANDED_OVER = (SendStatus.SENT, SendStatus.UNKNOWN, SendStatus.SENDING)


def normalise_address(address: str) -> str:
    """An address as the suppression list and the cap compare it: stripped, lower case."""
    return address.strip().lower()


def _utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime (a naive one is taken to be UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def suppressed(engine: Engine, addresses: Iterable[str]) -> dict[str, str]:
    """Which of ``addresses`` are on the suppression list: ``{normalised address: reason}``."""
    wanted = {normalise_address(a) for a in addresses}
    if not wanted:
        return {}
    with Session(engine) as session:
        rows = session.exec(select(Suppression).where(col(Suppression.address).in_(wanted))).all()
    return {r.address: r.reason for r in rows}


def add_suppression(session: Session, address: str, reason: str, source: str) -> bool:
    """Put ``address`` on the suppression list unless it is there already (the first reason and source stay).

    Args:
        session: the caller's transaction (committed by the caller).
        address: an email address (normalised here).
        reason: one of ``SuppressionReason.ALL``.
        source: where it came from, e.g. ``"bounces.mbox:12"`` or ``"cli"``.

    Returns:
        True when the address was added now.

    Raises:
        ValueError: ``reason`` is not one of ``SuppressionReason.ALL``, or ``address`` has no ``@``.
    """
    if reason not in SuppressionReason.ALL:
        raise ValueError(f"suppression reason {reason!r}: use one of {', '.join(SuppressionReason.ALL)}")
    key = normalise_address(address)
    if "@" not in key:
        raise ValueError(f"{address!r} is not an email address")
    if session.exec(select(Suppression).where(Suppression.address == key)).first() is not None:
        return False
    pending = {o.address for o in session.new if isinstance(o, Suppression)}
    if key in pending:
        return False
    session.add(Suppression(address=key, reason=reason, source=source))
    return True


@dataclass(frozen=True)
class MailboxUsage:
    """What a sending mailbox has done recently.

    Attributes:
        handed_over: messages sent, or possibly sent (``HANDED_OVER``), whose last attempt is since the
            window's start.
        last_attempt: the latest attempt of any status (UTC), None when it has never sent.
    """

    handed_over: int
    last_attempt: datetime | None


def mailbox_usage(engine: Engine, mailbox: str, since: datetime) -> MailboxUsage:
    """``MailboxUsage`` of ``mailbox`` (normalised) since ``since`` (aware or UTC-naive)."""
    key = normalise_address(mailbox)
    with Session(engine) as session:
        count = session.exec(select(func.count()).select_from(Send).where(
            Send.mailbox == key, col(Send.status).in_(HANDED_OVER), col(Send.attempted_at) >= _utc(since))).one()
        last = session.exec(select(func.max(Send.attempted_at)).where(Send.mailbox == key)).one()
    return MailboxUsage(handed_over=int(count), last_attempt=_utc(last) if last is not None else None)


def claim_send(engine: Engine, *, email_id: int, message_id: str, mailbox: str, recipient: str, now: datetime,
               retryable: Iterable[str]) -> Send | None:
    """Record the intent to send ``email_id`` now (status ``sending``), committed before anything is sent.

    A new email gets a new row; an email whose row has a status in ``retryable`` (e.g. ``deferred``) is taken
    by a conditional update, so only one sender can take it. Attempts are counted.

    Args:
        engine: the store.
        email_id, message_id, mailbox, recipient: the row's fields (addresses normalised here).
        now: the attempt's time (UTC).
        retryable: statuses that may be taken again.

    Returns:
        The ``Send`` row (status ``sending``), or None when the email is not to be sent now: someone else took it,
        or its status is not retryable.
    """
    moment = _utc(now)
    try:
        with session_scope(engine) as session:
            row = Send(email_id=email_id, message_id=message_id, mailbox=normalise_address(mailbox),
                       recipient=normalise_address(recipient), status=SendStatus.SENDING, attempts=1,
                       attempted_at=moment)
            session.add(row)
        return row
    except IntegrityError:
        pass  # the email has a row: take it only if its status is retryable
    statuses = list(retryable)
    if not statuses:
        return None
    with session_scope(engine) as session:
        taken = session.execute(
            update(Send).where(col(Send.email_id) == email_id, col(Send.status).in_(statuses))
            .values(status=SendStatus.SENDING, attempts=col(Send.attempts) + 1, attempted_at=moment,
                    message_id=message_id, mailbox=normalise_address(mailbox),
                    recipient=normalise_address(recipient)))
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return None
    with Session(engine) as session:
        return session.exec(select(Send).where(Send.email_id == email_id)).one()


def record_answer(engine: Engine, send_id: int, *, status: str, code: int | None, answer: str, now: datetime,
                  event: EngagementEvent | None = None, suppress: tuple[str, str, str] | None = None) -> None:
    """Store the server's answer to one claimed send, in one transaction with what follows from it.

    Args:
        engine: the store.
        send_id: the row ``claim_send`` returned.
        status: a ``SendStatus`` (not ``sending``).
        code, answer: the SMTP reply code (None: no reply) and text.
        now: when the answer came (UTC); also ``sent_at`` when ``status`` is ``sent``.
        event: an engagement event to store with it (``sent`` for an accepted message).
        suppress: ``(address, reason, source)`` to put on the suppression list (a recipient the server says
            does not exist).
    """
    with session_scope(engine) as session:
        row = session.get(Send, send_id)
        if row is None:
            raise ValueError(f"send {send_id} is not in the store")
        row.status, row.code, row.answer = status, code, answer
        if status == SendStatus.SENT:
            row.sent_at = _utc(now)
        session.add(row)
        if event is not None:
            session.add(event)
        if suppress is not None:
            add_suppression(session, *suppress)


def remint_message_id(engine: Engine, email_id: int, old: str, new: str) -> bool:
    """Give a never-sent email a new Message-ID (e.g. one at the sender's domain instead of the fallback domain
    it got when the offer had no ``sender_email``). Conditional: only while its id is still ``old`` and it has no
    ``sends`` row, so an id that went out is never changed.

    Returns:
        True when the id was changed.
    """
    with session_scope(engine) as session:
        if session.exec(select(Send.id).where(Send.email_id == email_id)).first() is not None:
            return False
        changed = session.execute(update(EmailRecord).where(col(EmailRecord.id) == email_id,
                                                            col(EmailRecord.message_id) == old).values(message_id=new))
        return bool(changed.rowcount == 1)  # type: ignore[attr-defined]
