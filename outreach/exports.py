"""Email exports: CSV, JSONL, or one ``.eml`` file per email (RFC 5322, via ``email.message``).

Every format says whether an email is personalised: a ``personalised`` CSV column and JSONL field
(``false`` for an email written without any company fact, which a campaign writes only when it opts in
with the ``unpersonalised_emails`` setting) and an ``X-Outreach-Personalised: yes|no`` header.

Every format carries the email's identity and A/B arm: the ``Message-ID`` stored when the email was written
(``message_id`` column and field, the ``.eml`` file's ``Message-ID`` header; engagement events are joined to
emails by it, ``evals.abtest``) and the run's arm (``arm`` column and field, ``X-Outreach-Arm`` header; empty
in a campaign without arms, ``graphs.arms``).

CSV cells that a spreadsheet would run as a formula are neutralised (``store.exports.write_csv``).
An ``.eml`` file's ``From`` is the offer's ``sender_name`` and ``sender_email``; an offer without
``sender_email`` gets the placeholder ``MISSING_SENDER_ADDRESS`` (a reserved ``.invalid`` domain, so a
sending tool refuses it rather than sending from a made-up address) and a logged warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session, select

from store.exports import write_csv
from store.models import Campaign, EmailRecord, Prospect, Run

__all__ = ["EXPORT_FORMATS", "MISSING_SENDER_ADDRESS", "ExportedEmail", "export_emails", "load_emails", "to_message"]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("csv", "jsonl", "eml")

#: ``From`` address of an ``.eml`` file whose campaign offer has no ``sender_email`` (RFC 2606 ``.invalid``).
MISSING_SENDER_ADDRESS = "sender-email-missing@outreach.invalid"


@dataclass(frozen=True)
class ExportedEmail:
    """One email with its recipient and sender, ready to hand to a sending tool.

    ``personalised`` is False for an email written without any verified company fact; ``sender_email``
    is ``""`` when the campaign's offer has none; ``written_at`` is when the email was stored
    (ISO 8601, UTC); ``message_id`` is its stored RFC 5322 ``Message-ID`` (``<id@sender-domain>``) and ``arm``
    its run's A/B arm (``""`` without arms).
    """

    email_id: int
    campaign: str
    to_name: str
    to_email: str
    company: str
    sender_name: str
    sender_company: str
    sender_email: str
    subject: str
    body: str
    valid: bool
    personalised: bool = True
    written_at: str = ""
    message_id: str = ""
    arm: str = ""


def load_emails(engine: Engine, campaign: str | None = None, *, include_invalid: bool = False) -> list[ExportedEmail]:
    """Emails in the store (of one campaign when named), valid ones only unless ``include_invalid``."""
    with Session(engine) as session:
        query = (
            select(EmailRecord, Prospect, Campaign, Run)
            .join(Run, Run.id == EmailRecord.run_id)  # type: ignore[arg-type]
            .join(Prospect, Prospect.id == Run.prospect_id)  # type: ignore[arg-type]
            .join(Campaign, Campaign.id == Run.campaign_id)  # type: ignore[arg-type]
            .order_by(EmailRecord.id)  # type: ignore[arg-type]
        )
        if campaign:
            query = query.where(Campaign.name == campaign)
        if not include_invalid:
            query = query.where(EmailRecord.valid == True)  # noqa: E712
        rows = session.exec(query).all()
    return [
        ExportedEmail(
            email_id=e.id or 0, campaign=c.name, to_name=f"{p.first_name} {p.last_name}".strip(), to_email=p.email,
            company=p.company, sender_name=c.offer.get("sender_name", ""),
            sender_company=c.offer.get("sender_company", ""), sender_email=c.offer.get("sender_email", ""),
            subject=e.subject, body=e.body, valid=e.valid, personalised=e.personalised,
            written_at=_as_utc(e.created_at).isoformat(), message_id=e.message_id or "", arm=r.arm,
        )
        for e, p, c, r in rows
    ]


def _as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime (SQLite gives back the stored UTC time without its zone)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace (line breaks included) as one space: a header value."""
    return " ".join(text.split())


def _address(name: str, address: str) -> Address:
    """``Name <user@domain>``; built from its parts, which (unlike ``addr_spec``) allows a non-ASCII
    local part, as ``email_validator`` does."""
    username, _, domain = address.rpartition("@")
    return Address(display_name=_one_line(name), username=username, domain=domain)


def to_message(e: ExportedEmail) -> EmailMessage:
    """``e`` as an RFC 5322 message: ``From`` (sender's name and address, ``MISSING_SENDER_ADDRESS``
    without one), ``To``, ``Subject``, ``Date`` (when the email was written), ``Message-ID`` (the stored one;
    a new one at the sender's domain for an email stored without), ``Organization`` (the sender's company) and
    the ``X-Outreach-*`` headers (``X-Outreach-Arm`` when the email belongs to an A/B arm); with
    ``policy.SMTP`` (CRLF line ends), or ``policy.SMTPUTF8`` when an address is not ASCII (RFC 6531).
    """
    sender_address = e.sender_email.strip() or MISSING_SENDER_ADDRESS
    # RFC 6531: an address with non-ASCII characters needs SMTPUTF8 (UTF-8 headers, no encoded words).
    ascii_only = sender_address.isascii() and e.to_email.isascii()
    message = EmailMessage(policy=policy.SMTP if ascii_only else policy.SMTPUTF8)
    message["From"] = _address(e.sender_name, sender_address)
    message["To"] = _address(e.to_name, e.to_email)
    message["Subject"] = _one_line(e.subject)
    written = datetime.fromisoformat(e.written_at) if e.written_at else datetime.now(UTC)
    message["Date"] = format_datetime(_as_utc(written))
    message["Message-ID"] = e.message_id or make_msgid(idstring=f"outreach.{e.email_id}",
                                                       domain=sender_address.rsplit("@", 1)[1])
    if e.sender_company.strip():
        message["Organization"] = _one_line(e.sender_company)
    message["X-Outreach-Campaign"] = _one_line(e.campaign)
    message["X-Outreach-Personalised"] = "yes" if e.personalised else "no"
    if e.arm:
        message["X-Outreach-Arm"] = _one_line(e.arm)
    message.set_content(e.body)
    return message


def _warn_missing_senders(emails: list[ExportedEmail]) -> None:
    campaigns = sorted({e.campaign for e in emails if not e.sender_email.strip()})
    if campaigns:
        logger.warning(
            "the offer of campaign(s) %s has no sender_email: the .eml files say From %s; add sender_email to "
            "the offer TOML and run the campaign again (it resumes and stores the new offer), then export again",
            ", ".join(campaigns), MISSING_SENDER_ADDRESS,
        )


def export_emails(emails: list[ExportedEmail], fmt: str, out: Path) -> int:
    """Write ``emails`` as ``fmt`` (csv or jsonl: ``out`` is a file; eml: ``out`` is a folder of
    ``<email_id>.eml`` files, CRLF line ends as SMTP sends them).

    Raises:
        ValueError: unknown format.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown email export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "eml":
        _warn_missing_senders(emails)
        out.mkdir(parents=True, exist_ok=True)
        for e in emails:
            (out / f"{e.email_id:06d}.eml").write_bytes(bytes(to_message(e)))
        return len(emails)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            for e in emails:
                fh.write(json.dumps(asdict(e), ensure_ascii=False) + "\n")
            return len(emails)
        return write_csv(fh, [f.name for f in fields(ExportedEmail)], (asdict(e) for e in emails))
