"""Mail events: real-shaped bounces (RFC 3464 multipart/report with message/delivery-status), replies (with
In-Reply-To), unsubscribe requests (the List-Unsubscribe mailto) and complaints (RFC 5965) in an mbox and in an
.eml folder become engagement events joined to the emails' Message-IDs, suppress bounced and unsubscribed
addresses (which ``outreach send`` then skips); unreadable messages are reported by file and line."""

from __future__ import annotations

import mailbox
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from outreach.cli import app
from outreach.mail_import import import_mail_events
from outreach.sending import SendPolicy, send_campaign
from store import EngagementEvent, open_store
from store.models import Suppression
from tests.mail_fixtures import SENDER, make_campaign, smtp  # noqa: F401
from tools.mail import SmtpServer
from tools.mailbox_events import MailSourceError, _imap_target, read_mail, read_mail_path


def dsn(message_id: str, recipient: str, *, action: str = "failed", status: str = "5.1.1", own: str = "dsn1") -> str:
    """A bounce as Postfix writes it (RFC 3464): a human part, the delivery status, the returned headers."""
    return f"""From: MAILER-DAEMON@mx.ledgerline.example (Mail Delivery System)
To: {SENDER}
Subject: Undelivered Mail Returned to Sender
Date: Tue, 01 Dec 2026 10:00:00 +0000
Message-ID: <{own}@mx.ledgerline.example>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="8C1F73E0A1.1764583200/mx.ledgerline.example"

This is a MIME-encapsulated message.

--8C1F73E0A1.1764583200/mx.ledgerline.example
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<{recipient}>: host mx.company.example[192.0.2.7] said: 550 5.1.1
    <{recipient}>: Recipient address rejected: User unknown

--8C1F73E0A1.1764583200/mx.ledgerline.example
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.ledgerline.example
X-Postfix-Queue-ID: 8C1F73E0A1
Arrival-Date: Tue,  1 Dec 2026 09:59:58 +0000 (UTC)

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.company.example
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected:
    User unknown

--8C1F73E0A1.1764583200/mx.ledgerline.example
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

From: Dana Whitfield <{SENDER}>
To: <{recipient}>
Subject: Hello
Message-ID: {message_id}
Date: Tue, 01 Dec 2026 09:59:50 +0000

--8C1F73E0A1.1764583200/mx.ledgerline.example--
"""


def reply(message_id: str, sender: str, *, own: str = "r1", subject: str = "Re: Hello P1",
          extra: str = "") -> str:
    return f"""From: P1 Doe <{sender}>
To: Dana Whitfield <{SENDER}>
Subject: {subject}
Date: Wed, 02 Dec 2026 08:15:00 -0500
Message-ID: <{own}@mail.company1.example>
In-Reply-To: {message_id}
References: {message_id}
{extra}MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Sounds good, Thursday works.

On Tue, Dec 1, 2026, Dana Whitfield wrote:
> Hi P1,
"""


def unsubscribe(message_id: str, sender: str) -> str:
    """What a mail client sends for the List-Unsubscribe mailto: no In-Reply-To, the id in the subject."""
    return f"""From: {sender}
To: {SENDER}
Subject: unsubscribe {message_id}
Date: Thu, 03 Dec 2026 12:00:00 +0000
Message-ID: <u1@mail.company2.example>

"""


def complaint(message_id: str, recipient: str) -> str:
    return f"""From: feedback@fbl.mailbox.example
To: abuse@ledgerline.example
Subject: complaint about message from 198.51.100.7
Date: Fri, 04 Dec 2026 12:00:00 +0000
Message-ID: <arf1@fbl.mailbox.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="part"

--part
Content-Type: text/plain

This is an email abuse report.
--part
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Rcpt-To: {recipient}

--part
Content-Type: text/rfc822-headers

From: {SENDER}
To: {recipient}
Message-ID: {message_id}

--part--
"""


OUT_OF_OFFICE_EXTRA = "Auto-Submitted: auto-replied\n"
NO_HEADERS = "this line is not a header, and neither is the rest\n\x00\x01 binary junk\n"


@pytest.fixture
def store(tmp_path):  # type: ignore[no-untyped-def]
    engine = open_store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    yield engine
    engine.dispose()


def _messages(emails) -> list[str]:  # type: ignore[no-untyped-def]
    (id0, to0, m0), (id1, to1, m1), (id2, to2, m2), (id3, to3, m3) = emails
    return [
        dsn(m0, to0),                                                         # bounce of email 0
        reply(m1, to1),                                                       # reply to email 1
        unsubscribe(m2, to2),                                                 # unsubscribe of email 2
        reply(m3, to3, own="ooo1", subject="Out of office", extra=OUT_OF_OFFICE_EXTRA),  # ignored
        dsn(m3, to3, action="delayed", status="4.4.7", own="dsn2"),           # a delay: ignored
        reply("<nobody@elsewhere.example>", "x@y.example", own="r9"),         # joins nothing
        reply("garbage-without-an-at", to3, own="r8").replace("References: garbage-without-an-at\n", ""),
        NO_HEADERS,
        reply(m1, to1),                                                       # the same reply again
    ]


def _mbox(path: Path, messages: list[str]) -> list[int]:
    """Write ``messages`` to an mbox; return the line of each one's ``From `` separator."""
    box = mailbox.mbox(path)
    for text in messages:
        box.add(mailbox.mboxMessage(text.encode("utf-8")))
    box.close()
    return [n for n, line in enumerate(path.read_bytes().splitlines(), start=1) if line.startswith(b"From ")]


def _stored(engine) -> list[tuple[int | None, str, str, str]]:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        rows = s.exec(select(EngagementEvent).order_by(EngagementEvent.id)).all()  # type: ignore[arg-type]
    return [(r.email_id, r.event, r.recipient, r.variant) for r in rows]


def test_mbox_bounce_reply_and_unsubscribe_become_joined_events_and_suppressions(store, tmp_path):
    emails = make_campaign(store, n=4, arm="mini")
    lines = _mbox(tmp_path / "inbox.mbox", _messages(emails))
    read = read_mail_path(tmp_path / "inbox.mbox")
    assert read.messages == 9 and [e.kind for e in read.events] == ["bounce", "reply", "unsubscribe", "reply"]
    bounce = read.events[0]
    assert bounce.refs == (emails[0][2],) and bounce.recipient == emails[0][1] and bounce.status == "5.1.1"
    assert "User unknown" in bounce.detail and bounce.source == f"{tmp_path / 'inbox.mbox'}:{lines[0]}"
    problems = {n.source: n.reason for n in read.problems}
    at = {i: f"{tmp_path / 'inbox.mbox'}:{lines[i]}" for i in (6, 7)}
    assert set(problems) == {at[6], at[7]}
    assert "In-Reply-To 'garbage-without-an-at' is not a Message-ID" in problems[at[6]]
    assert "no mail headers" in problems[at[7]]
    ignored = [n.reason for n in read.ignored]
    assert any("Auto-Submitted: auto-replied" in r for r in ignored)
    assert any("no failed recipient (actions: delayed)" in r for r in ignored)
    assert any(r.startswith("duplicate of ") and f":{lines[1]}" in r for r in ignored)

    result = import_mail_events(store, read)
    assert dict(result.stored) == {"bounce": 1, "reply": 1, "unsubscribe": 1}
    assert _stored(store) == [(emails[0][0], "bounce", emails[0][1], "mini"),
                              (emails[1][0], "reply", emails[1][1], "mini"),
                              (emails[2][0], "unsubscribe", emails[2][1], "mini")]
    assert len(result.unmatched) == 1 and "<nobody@elsewhere.example>" in result.unmatched[0].reason
    with Session(store) as s:
        assert sorted(s.exec(select(Suppression.address, Suppression.reason)).all()) == sorted(
            [(emails[0][1], "bounce"), (emails[2][1], "unsubscribe")])
    again = import_mail_events(store, read_mail_path(tmp_path / "inbox.mbox"))
    assert sum(again.stored.values()) == 0 and again.duplicates == 3 and again.suppressed == []


def test_eml_folder_reads_the_same_and_a_reimport_stores_nothing_new(store, tmp_path):
    emails = make_campaign(store, n=4)
    folder = tmp_path / "eml"
    folder.mkdir()
    for i, text in enumerate(_messages(emails)):
        (folder / f"{i:02d}.eml").write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    read = read_mail(str(folder))
    assert [e.kind for e in read.events] == ["bounce", "reply", "unsubscribe", "reply"]
    assert {n.source for n in read.problems} == {str(folder / "06.eml"), str(folder / "07.eml")}
    first = import_mail_events(store, read)
    assert dict(first.stored) == {"bounce": 1, "reply": 1, "unsubscribe": 1}
    _mbox(tmp_path / "same.mbox", _messages(emails))
    assert sum(import_mail_events(store, read_mail_path(tmp_path / "same.mbox")).stored.values()) == 0


def test_a_reply_in_the_offers_opt_out_words_opts_out_and_others_do_not(store, tmp_path):
    emails = make_campaign(store, n=3)
    (tmp_path / "r").mkdir()
    bodies = ["No thanks, not for us right now.", "no thanks needed: Thursday at 10 works, and bring the pricing "
              "sheet for the whole team please", "Sounds good, Thursday works."]
    for i, ((_, to, message_id), body) in enumerate(zip(emails, bodies, strict=True)):
        text = reply(message_id, to, own=f"o{i}").replace("Sounds good, Thursday works.", body)
        (tmp_path / "r" / f"{i}.eml").write_text(text)
    result = import_mail_events(store, read_mail_path(tmp_path / "r"))
    assert result.opt_outs == 1 and dict(result.stored) == {"reply": 3, "unsubscribe": 1}
    assert result.suppressed == [(emails[0][1], "opt_out", str(tmp_path / "r" / "0.eml"))]


def test_a_complaint_suppresses_and_counts_as_unsubscribe(store, tmp_path):
    emails = make_campaign(store, n=1)
    (tmp_path / "arf").mkdir()
    (tmp_path / "arf" / "1.eml").write_text(complaint(emails[0][2], emails[0][1]))
    result = import_mail_events(store, read_mail_path(tmp_path / "arf"))
    assert dict(result.stored) == {"unsubscribe": 1} and result.suppressed[0][:2] == (emails[0][1], "complaint")


def test_bounced_and_unsubscribed_addresses_are_not_emailed_by_a_later_campaign(store, smtp, tmp_path):  # noqa: F811
    recorder, port = smtp
    server = SmtpServer("127.0.0.1", port, security="none", timeout_s=5)
    emails = make_campaign(store, n=4)
    assert send_campaign(store, "q4", server, SendPolicy(pace_s=0)).counts == {"sent": 4}
    # a bounce whose returned headers are missing still joins: by the one email sent to that address
    no_headers = dsn("<x@y.example>", emails[3][1], own="dsn3").replace("Message-ID: <x@y.example>\n", "")
    _mbox(tmp_path / "in.mbox", [dsn(emails[0][2], emails[0][1]), unsubscribe(emails[2][2], emails[2][1]), no_headers])
    result = CliRunner().invoke(app, ["events", "import-mail", str(tmp_path / "in.mbox"), "--store",
                                      f"sqlite:///{tmp_path / 'store.sqlite'}"])
    assert result.exit_code == 0, result.output
    assert "stored 2 bounce, 1 unsubscribe" in result.output and "3 addresses suppressed now" in result.output
    again = [a for _, a, _ in emails]
    make_campaign(store, name="q5", n=4, recipients=again)
    report = send_campaign(store, "q5", server, SendPolicy(pace_s=0))
    assert report.counts == {"sent": 1, "suppressed": 3}
    assert [str(m["To"]) for m in recorder.received[4:]] == [f"P1 Doe <{emails[1][1]}>"]


def test_cli_reports_unreadable_messages_by_file_and_line_and_a_missing_source_in_one_line(store, tmp_path):
    emails = make_campaign(store, n=4)
    lines = _mbox(tmp_path / "inbox.mbox", _messages(emails))
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    result = CliRunner().invoke(app, ["events", "import-mail", str(tmp_path / "inbox.mbox"), "--store", url])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert f"inbox.mbox:{lines[7]}: skipped: no mail headers" in " ".join(result.output.split())
    missing = CliRunner().invoke(app, ["events", "import-mail", str(tmp_path / "nope.mbox"), "--store", url])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output


def test_imap_urls_name_user_host_and_mailbox_and_never_hold_a_password():
    assert _imap_target("imaps://dana%40x@imap.example/Bounces") == (True, "imap.example", 993, "dana@x", "Bounces")
    assert _imap_target("imap://dana@127.0.0.1:1143") == (False, "127.0.0.1", 1143, "dana", "INBOX")
    with pytest.raises(MailSourceError, match="holds a password"):
        _imap_target("imaps://dana:secret@imap.example/INBOX")
    with pytest.raises(MailSourceError, match="not imap://"):
        _imap_target("pop3://dana@mail.example")
