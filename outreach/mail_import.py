"""Mail events into the store: each event read by ``tools.mailbox_events`` is joined to the email it is about
and stored as an engagement event; bounces, unsubscribe requests and complaints also suppress the address.

Join: the event's references (``In-Reply-To``, ``References``, a bounced message's own ``Message-ID``, the id in
an unsubscribe subject), in that order, against ``emails.message_id``; when none matches, the event's address
against the recipients emails were sent to (``sends.recipient``), used only when exactly one email went there.
An event that joins nothing is reported (by file and line) and not stored as an engagement event; its address is
still suppressed when it asks for that (a bounce is a bounce whoever sent the message).

A reply whose own words start with a phrase the email's offer asks for in its ``opt_out_line`` (the quoted
part: ``... just reply 'no thanks' and I won't write again`` -> ``no thanks``; case, punctuation and spacing
aside) is an opt-out: stored as a ``reply`` and an ``unsubscribe``, and the prospect's address suppressed
(``opt_out``), as the email promised.

Stored events: ``bounce`` (a permanent one, DSN status 5.x.x; a failed delivery with a 4.x.x status is stored as
a bounce but does not suppress), ``reply``, ``unsubscribe``, and a complaint as ``unsubscribe`` (the A/B
statistics' event types, ``evals.abtest.EVENT_TYPES``), with the email's Message-ID, its run's arm as the
variant, the prospect's address as recipient and the message's ``Date`` as the time. Importing the same mail
again stores nothing new (same email, event, recipient and time).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from store.engine import session_scope
from store.models import Campaign, EmailRecord, EngagementEvent, Prospect, Run, Send, SuppressionReason
from store.sends import add_suppression, normalise_address
from tools.mailbox_events import MailEvent, MailNote, MailRead

__all__ = ["MailImport", "import_mail_events", "opt_out_phrases"]

logger = logging.getLogger(__name__)

#: Engagement event stored for each kind of mail event.
STORED_AS = {"bounce": "bounce", "reply": "reply", "unsubscribe": "unsubscribe", "complaint": "unsubscribe"}
#: Suppression reason of each kind that suppresses.
SUPPRESSES = {"bounce": SuppressionReason.BOUNCE, "unsubscribe": SuppressionReason.UNSUBSCRIBE,
              "complaint": SuppressionReason.COMPLAINT}


@dataclass
class MailImport:
    """What an import did.

    Attributes:
        read: what the source gave (``tools.mailbox_events.MailRead``).
        stored: engagement events stored now, by event type.
        duplicates: events already in the store (not stored again).
        joined_by_recipient: events joined by address because no reference matched.
        opt_outs: replies that opt out in the words the offer asked for (``opt_out_line``).
        unmatched: events that join no email here, with the reason.
        suppressed: addresses put on the suppression list now: ``(address, reason, source)``.
    """

    read: MailRead
    stored: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    joined_by_recipient: int = 0
    opt_outs: int = 0
    unmatched: list[MailNote] = field(default_factory=list)
    suppressed: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Sent:
    email_id: int
    message_id: str
    recipient: str
    variant: str
    opt_out_phrases: tuple[str, ...] = ()


#: A quoted phrase: the quote marks not inside a word (the apostrophes of "isn't", "won't" are not quotes).
_QUOTED = re.compile(r"(?<!\w)[\"'\u2018\u201c]([^\"'\u2019\u201d]{2,40})[\"'\u2019\u201d](?!\w)")


def _words(text: str) -> str:
    """``text`` folded for comparison: lower case, letters and digits only, single spaces."""
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def opt_out_phrases(opt_out_line: str) -> tuple[str, ...]:
    """The phrases an offer's ``opt_out_line`` asks a prospect to reply with (its quoted parts), folded.

    ``"If this isn't relevant, just reply 'no thanks' and I won't write again."`` -> ``("no thanks",)``.
    """
    return tuple(p for p in (_words(m) for m in _QUOTED.findall(opt_out_line)) if p)


#: Words a reply may add after the opt-out phrase and still be an opt-out ("No thanks, not for us right now.").
OPT_OUT_EXTRA_WORDS = 8


def _is_opt_out(event: MailEvent, sent: _Sent) -> bool:
    """A reply whose own words are the offer's opt-out phrase, alone or with a few words after it."""
    if event.kind != "reply":
        return False
    words = _words(event.text)
    return any(words == p or (words.startswith(p + " ") and len(words.split()) <= len(p.split()) + OPT_OUT_EXTRA_WORDS)
               for p in sent.opt_out_phrases)


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def _index(session: Session) -> tuple[dict[str, _Sent], dict[str, set[int]], dict[int, _Sent]]:
    """Emails by Message-ID, email ids by the address sent to, emails by id."""
    rows = session.exec(
        select(EmailRecord, Prospect, Run, Campaign)
        .join(Run, col(Run.id) == EmailRecord.run_id)
        .join(Prospect, col(Prospect.id) == Run.prospect_id)
        .join(Campaign, col(Campaign.id) == Run.campaign_id)
    ).all()
    phrases: dict[str, tuple[str, ...]] = {}
    by_id = {}
    for email, prospect, run, campaign in rows:
        line = str((campaign.offer or {}).get("opt_out_line", ""))
        if line not in phrases:
            phrases[line] = opt_out_phrases(line)
        if email.id is not None:
            by_id[email.id] = _Sent(email.id, email.message_id or "", prospect.email, run.arm or "", phrases[line])
    by_message = {s.message_id: s for s in by_id.values() if s.message_id}
    by_recipient: dict[str, set[int]] = {}
    for email_id, recipient in session.exec(select(Send.email_id, Send.recipient)).all():
        by_recipient.setdefault(normalise_address(recipient), set()).add(email_id)
    return by_message, by_recipient, by_id


def _join(event: MailEvent, by_message: dict[str, _Sent], by_recipient: dict[str, set[int]],
          by_id: dict[int, _Sent]) -> tuple[_Sent | None, bool]:
    """The email ``event`` is about and whether it was joined by address; (None, False) when none."""
    for ref in event.refs:
        if ref in by_message:
            return by_message[ref], False
    ids = by_recipient.get(normalise_address(event.recipient), set()) if event.recipient else set()
    if len(ids) == 1:
        return by_id.get(next(iter(ids))), True
    return None, False


def _unmatched_reason(event: MailEvent, by_recipient: dict[str, set[int]]) -> str:
    refs = ", ".join(event.refs) if event.refs else "none"
    many = len(by_recipient.get(normalise_address(event.recipient), set()))
    by_address = f"{many} emails were sent to {event.recipient}" if many > 1 else \
        f"no email was sent to {event.recipient or '(no address)'}"
    return f"{event.kind}: no email in this store has the Message-ID it refers to ({refs}), and {by_address}"


def import_mail_events(engine: Engine, read: MailRead) -> MailImport:
    """Join and store ``read``'s events (module docstring), in one transaction.

    Args:
        engine: the store.
        read: from ``tools.mailbox_events.read_mail`` (or ``read_mail_path``/``read_imap``).

    Returns:
        The ``MailImport``.
    """
    result = MailImport(read=read)
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        by_message, by_recipient, by_id = _index(session)
        existing = {(r.email_id, r.event, normalise_address(r.recipient), _naive(r.occurred_at))
                    for r in session.exec(select(EngagementEvent).where(col(EngagementEvent.email_id).is_not(None)))}
        for event in read.events:
            sent, by_address = _join(event, by_message, by_recipient, by_id)
            opt_out = sent is not None and _is_opt_out(event, sent)
            reason = SuppressionReason.OPT_OUT if opt_out else SUPPRESSES.get(event.kind)
            if reason is not None and event.permanent:
                for address in {a for a in (event.recipient, sent.recipient if sent else "") if "@" in a}:
                    if add_suppression(session, address, reason, event.source):
                        result.suppressed.append((normalise_address(address), reason, event.source))
            if sent is None:
                result.unmatched.append(MailNote(event.source, _unmatched_reason(event, by_recipient)))
                continue
            result.joined_by_recipient += by_address
            result.opt_outs += opt_out
            occurred = event.occurred_at or now
            for stored_as in (STORED_AS[event.kind], *(("unsubscribe",) if opt_out else ())):
                key = (sent.email_id, stored_as, normalise_address(sent.recipient), _naive(occurred))
                if event.occurred_at is not None and key in existing:
                    result.duplicates += 1
                    continue
                existing.add(key)
                session.add(EngagementEvent(email_id=sent.email_id, message_id=sent.message_id,
                                            variant=sent.variant, event=stored_as, recipient=sent.recipient,
                                            occurred_at=occurred))
                result.stored[stored_as] += 1
    logger.info("mail import: %d events stored, %d duplicates, %d unmatched, %d addresses suppressed",
                sum(result.stored.values()), result.duplicates, len(result.unmatched), len(result.suppressed))
    return result
