"""Email exports: CSV, JSONL, or one ``.eml`` file per email (RFC 5322, via ``email.message``).

Every format says whether an email is personalised: a ``personalised`` CSV column and JSONL field
(``false`` for an email written without any company fact, which a campaign writes only when it opts in
with the ``unpersonalised_emails`` setting) and an ``X-Outreach-Personalised: yes|no`` header.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session, select

from store.models import Campaign, EmailRecord, Prospect, Run

__all__ = ["EXPORT_FORMATS", "ExportedEmail", "export_emails", "load_emails"]

EXPORT_FORMATS = ("csv", "jsonl", "eml")


@dataclass(frozen=True)
class ExportedEmail:
    """One email with its recipient and sender, ready to hand to a sending tool.

    ``personalised`` is False for an email written without any verified company fact.
    """

    email_id: int
    campaign: str
    to_name: str
    to_email: str
    company: str
    sender: str
    subject: str
    body: str
    valid: bool
    personalised: bool = True


def load_emails(engine: Engine, campaign: str | None = None, *, include_invalid: bool = False) -> list[ExportedEmail]:
    """Emails in the store (of one campaign when named), valid ones only unless ``include_invalid``."""
    with Session(engine) as session:
        query = (
            select(EmailRecord, Prospect, Campaign)
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
            company=p.company, sender=f"{c.offer.get('sender_name', '')} ({c.offer.get('sender_company', '')})",
            subject=e.subject, body=e.body, valid=e.valid, personalised=e.personalised,
        )
        for e, p, c in rows
    ]


def export_emails(emails: list[ExportedEmail], fmt: str, out: Path) -> int:
    """Write ``emails`` as ``fmt`` (csv or jsonl: ``out`` is a file; eml: ``out`` is a folder).

    Raises:
        ValueError: unknown format.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown email export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "eml":
        out.mkdir(parents=True, exist_ok=True)
        for e in emails:
            message = EmailMessage()
            message["To"] = f"{e.to_name} <{e.to_email}>"
            message["From"] = e.sender
            message["Subject"] = e.subject
            message["X-Outreach-Campaign"] = e.campaign
            message["X-Outreach-Personalised"] = "yes" if e.personalised else "no"
            message.set_content(e.body)
            (out / f"{e.email_id:06d}.eml").write_bytes(bytes(message))
        return len(emails)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            for e in emails:
                fh.write(json.dumps(asdict(e), ensure_ascii=False) + "\n")
        else:
            writer = csv.DictWriter(fh, fieldnames=list(ExportedEmail.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(asdict(e) for e in emails)
    return len(emails)
