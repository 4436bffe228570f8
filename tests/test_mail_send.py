"""Sending over SMTP against a real aiosmtpd server on loopback, counting what it received: delivery with the
store's Message-ID and List-Unsubscribe, dry run, daily cap, pacing, suppression, refusals (5xx failed and not
retried, 4xx retried later), a server that times out or drops the connection, and ``kill -9`` mid-send."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from outreach.cli import app
from outreach.sending import SendError, SendPolicy, send_campaign
from store import EngagementEvent, open_store, session_scope
from store.models import Send, Suppression
from store.sends import add_suppression
from tests.mail_fixtures import SENDER, Recorder, free_port, make_campaign, smtp  # noqa: F401
from tools.mail import OutgoingEmail, SmtpServer, build_message, unsubscribe_headers

ROOT = Path(__file__).resolve().parents[1]
FAST = SendPolicy(pace_s=0, retry_after_s=0)


def _server(port: int, timeout_s: float = 5.0) -> SmtpServer:
    return SmtpServer(host="127.0.0.1", port=port, security="none", timeout_s=timeout_s)


def _sends(engine) -> dict[int, Send]:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        return {r.email_id: r for r in s.exec(select(Send)).all()}


@pytest.fixture
def store(tmp_path):  # type: ignore[no-untyped-def]
    engine = open_store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    yield engine
    engine.dispose()


def test_delivers_each_email_once_with_the_stores_message_id_and_list_unsubscribe(store, smtp):  # noqa: F811
    recorder, port = smtp
    emails = make_campaign(store, n=3, invalid=1)
    policy_ = SendPolicy(pace_s=0, unsubscribe_url="https://ledgerline.example/u?m={message_id}")
    report = send_campaign(store, "q4", _server(port), policy_)
    assert report.counts == {"sent": 3}
    assert recorder.message_ids() == [m for _, _, m in emails]  # the store's ids, the invalid email not sent
    assert [str(m["To"]).split("<")[1].rstrip(">") for m in recorder.received] == [a for _, a, _ in emails]
    first = recorder.received[0]
    unsubscribe = str(first["List-Unsubscribe"])
    assert unsubscribe.startswith("<mailto:dana@ledgerline.example?subject=unsubscribe%20%3C")
    assert emails[0][2].strip("<>").replace("@", "%40") in unsubscribe
    assert str(first["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    raw_headers = recorder.raw[0].split(b"\r\n\r\n", 1)[0].decode("ascii")
    assert f"List-Unsubscribe: {unsubscribe}\r\n" in raw_headers and "=?" not in raw_headers  # no encoded words
    assert f"Message-ID: {emails[0][2]}\r\n" in raw_headers
    assert "A line with a dot." in first.get_content()  # dot-stuffing undone by the server
    sends = _sends(store)
    assert {r.status for r in sends.values()} == {"sent"} and all(r.code == 250 and r.sent_at for r in sends.values())
    with Session(store) as s:
        events = s.exec(select(EngagementEvent)).all()
    assert sorted((e.email_id, e.event, e.variant, e.message_id) for e in events) == sorted(
        (i, "sent", "teacher", m) for i, _, m in emails)
    again = send_campaign(store, "q4", _server(port), policy_)
    assert again.counts == {"already_sent": 3} and len(recorder.received) == 3


def test_list_unsubscribe_post_only_with_an_https_url():
    assert unsubscribe_headers("<a@b.example>", mailto="u@b.example") == {
        "List-Unsubscribe": "<mailto:u@b.example?subject=unsubscribe%20%3Ca%40b.example%3E>"}
    plain = unsubscribe_headers("<a@b.example>", mailto="u@b.example", url="http://b.example/u")
    assert "List-Unsubscribe-Post" not in plain and plain["List-Unsubscribe"].endswith(", <http://b.example/u>")
    with pytest.raises(ValueError, match="not http"):
        unsubscribe_headers("<a@b.example>", mailto="u@b.example", url="ftp://b.example")
    email = OutgoingEmail("not-an-id", "Dana", SENDER, "Ann", "ann@acme.example", "Hi", "Body")
    with pytest.raises(ValueError, match="Message-ID"):
        build_message(email)


def test_non_ascii_body_and_recipient_go_through_smtputf8(store, smtp):  # noqa: F811
    recorder, port = smtp
    make_campaign(store, n=1, recipients=["józef@café.example"])
    assert send_campaign(store, "q4", _server(port), FAST).counts == {"sent": 1}
    assert "józef@café.example" in str(recorder.received[0]["To"])


def test_dry_run_connects_to_nothing_and_writes_nothing(store, smtp, tmp_path):  # noqa: F811
    recorder, port = smtp
    make_campaign(store, n=2)
    report = send_campaign(store, "q4", None, FAST, dry_run=True)
    assert report.counts == {"would_send": 2}
    result = CliRunner().invoke(app, ["send", "--campaign", "q4", "--dry-run", "--store",
                                      f"sqlite:///{tmp_path / 'store.sqlite'}"],
                                env={"OUTREACH_MAIL__PORT": str(port), "OUTREACH_MAIL__SECURITY": "none"})
    assert result.exit_code == 0, result.output
    assert "would_send" in result.output and "dry run" in result.output
    assert recorder.received == [] and recorder.rcpts == [] and _sends(store) == {}


def test_daily_cap_per_mailbox_holds_across_runs_and_frees_after_24_hours(store, smtp):  # noqa: F811
    recorder, port = smtp
    make_campaign(store, n=3)
    now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    capped = SendPolicy(daily_cap=2, pace_s=0)
    assert send_campaign(store, "q4", _server(port), capped, clock=lambda: now).counts == {"sent": 2, "capped": 1}
    later = now + timedelta(hours=23)
    assert send_campaign(store, "q4", _server(port), capped, clock=lambda: later).counts == {
        "already_sent": 2, "capped": 1}
    next_day = now + timedelta(hours=24, minutes=1)
    assert send_campaign(store, "q4", _server(port), capped, clock=lambda: next_day).counts == {
        "already_sent": 2, "sent": 1}
    assert len(recorder.received) == 3


def test_pacing_waits_between_messages_of_one_mailbox(store, smtp):  # noqa: F811
    recorder, port = smtp
    make_campaign(store, n=3)
    clock = [datetime(2026, 12, 1, 9, 0, tzinfo=UTC)]
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # a fake clock: time moves only when the sender waits
        waits.append(seconds)
        clock[0] += timedelta(seconds=seconds)

    send_campaign(store, "q4", _server(port), SendPolicy(pace_s=20), clock=lambda: clock[0], sleep=sleep)
    assert waits == [20.0, 20.0] and len(recorder.received) == 3


def test_a_suppressed_address_is_never_emailed(store, smtp):  # noqa: F811
    recorder, port = smtp
    emails = make_campaign(store, n=3)
    with session_scope(store) as s:
        add_suppression(s, emails[1][1].upper(), "opt_out", "cli")
    report = send_campaign(store, "q4", _server(port), FAST)
    assert report.counts == {"sent": 2, "suppressed": 1}
    assert emails[1][1] not in recorder.rcpts and emails[1][0] not in _sends(store)


def test_5xx_per_recipient_is_failed_suppressed_and_never_retried(store, smtp):  # noqa: F811
    recorder, port = smtp
    emails = make_campaign(store, n=3)
    bad = emails[1][1]
    recorder.rcpt_rules[bad] = f"550 5.1.1 <{bad}>: Recipient address rejected: User unknown"
    report = send_campaign(store, "q4", _server(port), FAST)
    assert report.counts == {"sent": 2, "failed": 1}
    row = _sends(store)[emails[1][0]]
    assert (row.status, row.code) == ("failed", 550) and "User unknown" in row.answer
    with Session(store) as s:
        assert s.exec(select(Suppression.address, Suppression.reason)).all() == [(bad, "bounce")]
    recorder.rcpt_rules.clear()
    assert send_campaign(store, "q4", _server(port), FAST).counts == {"already_sent": 2, "failed_before": 1}
    assert recorder.rcpts.count(bad) == 1 and len(recorder.received) == 2


def test_4xx_is_deferred_and_retried_by_a_later_run_until_max_attempts(store, smtp):  # noqa: F811
    recorder, port = smtp
    emails = make_campaign(store, n=2)
    busy = emails[0][1]
    recorder.rcpt_rules[busy] = "450 4.2.1 Mailbox busy, try later"
    assert send_campaign(store, "q4", _server(port), FAST).counts == {"sent": 1, "deferred": 1}
    assert send_campaign(store, "q4", _server(port), SendPolicy(pace_s=0, retry_after_s=600)).counts == {
        "waiting": 1, "already_sent": 1}  # not due yet
    recorder.rcpt_rules.clear()
    assert send_campaign(store, "q4", _server(port), FAST).counts == {"sent": 1, "already_sent": 1}
    assert _sends(store)[emails[0][0]].attempts == 2 and sorted(recorder.message_ids()) == sorted(
        m for _, _, m in emails)
    # a temporary refusal that never clears gives up after max_attempts
    make_campaign(store, name="q5", n=1, recipients=["stuck@company.example"])
    recorder.rcpt_rules["stuck@company.example"] = "451 4.3.0 try again"
    twice = SendPolicy(pace_s=0, retry_after_s=0, max_attempts=2)
    assert send_campaign(store, "q5", _server(port), twice).counts == {"deferred": 1}
    last = send_campaign(store, "q5", _server(port), twice)
    assert last.counts == {"failed": 1} and last.items[0].text.startswith("gave up after 2 attempts")


def _silent_server() -> tuple[socket.socket, int, threading.Event]:
    """A TCP server on loopback that accepts connections and never says a word (no SMTP greeting)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue
        for conn in held:
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return listener, int(listener.getsockname()[1]), stop


def test_a_server_that_times_out_stops_sending_and_loses_nothing(store, tmp_path):
    emails = make_campaign(store, n=2)
    listener, port, stop = _silent_server()
    try:
        report = send_campaign(store, "q4", _server(port, timeout_s=0.3), FAST)
        url = f"sqlite:///{tmp_path / 'store.sqlite'}"
        result = CliRunner().invoke(app, ["send", "--campaign", "q4", "--store", url],
                                    env={"OUTREACH_MAIL__PORT": str(port), "OUTREACH_MAIL__HOST": "127.0.0.1",
                                         "OUTREACH_MAIL__SECURITY": "none", "OUTREACH_MAIL__TIMEOUT_S": "0.3"})
    finally:
        stop.set()
        listener.close()
    assert report.stopped is not None and "timed out" in report.stopped
    assert report.counts == {"not_reached": 2} and _sends(store) == {}  # nothing claimed, so nothing unknown
    assert result.exit_code == 1 and "timed out" in result.output and "Traceback" not in result.output
    refused_port = free_port()  # nothing listens there
    refused = send_campaign(store, "q4", _server(refused_port), FAST)
    assert refused.stopped is not None and "ConnectionRefusedError" in refused.stopped and len(emails) == 2


def test_no_answer_after_data_is_unknown_and_not_resent_without_asking(store, smtp):  # noqa: F811
    recorder, port = smtp
    emails = make_campaign(store, n=2)
    recorder.data_delay_s = 1.0
    report = send_campaign(store, "q4", _server(port, timeout_s=0.3), FAST)
    assert report.counts == {"unknown": 2}  # the server got both; the sender cannot know
    assert all(r.status == "unknown" and r.code is None for r in _sends(store).values())
    recorder.data_delay_s = 0
    assert send_campaign(store, "q4", _server(port), FAST).counts == {"unknown_before": 2}
    assert len(recorder.received) == 2
    resent = send_campaign(store, "q4", _server(port), SendPolicy(pace_s=0, resend_unknown=True))
    assert resent.counts == {"sent": 2} and len(recorder.received) == 4  # asked for: may deliver twice
    assert {r.attempts for r in _sends(store).values()} == {2} and len(emails) == 2


def test_a_dropped_connection_before_data_is_retried_and_the_rest_still_go(store, smtp):  # noqa: F811
    recorder, port = smtp
    emails = make_campaign(store, n=3)
    recorder.rcpt_rules[emails[1][1]] = "drop"
    report = send_campaign(store, "q4", _server(port), FAST)
    assert report.counts == {"sent": 2, "deferred": 1}
    assert "connection lost before DATA" in _sends(store)[emails[1][0]].answer
    recorder.rcpt_rules.clear()
    assert send_campaign(store, "q4", _server(port), FAST).counts == {"sent": 1, "already_sent": 2}
    assert sorted(recorder.message_ids()) == sorted(m for _, _, m in emails)


def test_a_refused_sender_stops_its_mailbox_without_failing_the_emails(store, smtp):  # noqa: F811
    recorder, port = smtp
    make_campaign(store, n=2, sender="blocked@ledgerline.example")

    async def refuse_mail(server, session, envelope, address, mail_options):  # type: ignore[no-untyped-def]
        return "553 5.7.1 Sender address rejected: not owned by user"

    recorder.handle_MAIL = refuse_mail  # type: ignore[attr-defined]
    report = send_campaign(store, "q4", _server(port), FAST)
    assert report.counts == {"deferred": 1, "mailbox_stopped": 1}
    assert report.items[0].code == 553 and report.items[0].text.startswith("sender refused: 5.7.1")
    assert recorder.received == [] and {r.status for r in _sends(store).values()} == {"deferred"}


def test_unknown_campaign_and_missing_sender_are_one_line_errors(store, tmp_path):
    make_campaign(store, n=1, sender="")
    with pytest.raises(SendError, match="no sender_email"):
        send_campaign(store, "q4", None, FAST, dry_run=True)
    result = CliRunner().invoke(app, ["send", "--campaign", "nope", "--dry-run", "--store",
                                      f"sqlite:///{tmp_path / 'store.sqlite'}"])
    assert result.exit_code == 2 and "no campaign 'nope'" in result.output and "q4" in result.output


def test_kill_9_mid_send_then_rerun_delivers_every_email_exactly_once(store, smtp, tmp_path):  # noqa: F811
    recorder, port = smtp
    emails = make_campaign(store, n=5)
    recorder.hold_at = 3  # the third message is received, then its answer waits
    env = {**os.environ, "OUTREACH_MAIL__HOST": "127.0.0.1", "OUTREACH_MAIL__PORT": str(port),
           "OUTREACH_MAIL__SECURITY": "none", "OUTREACH_MAIL__PACE_S": "0", "OUTREACH_CONFIG": str(tmp_path / "none")}
    command = [sys.executable, "-m", "outreach", "send", "--campaign", "q4", "--store",
               f"sqlite:///{tmp_path / 'store.sqlite'}"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert recorder.held.wait(60), process.communicate(timeout=5)[0]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    recorder.hold_at = None
    recorder.release.set()
    assert len(recorder.received) == 3
    statuses = {i: r.status for i, r in _sends(store).items()}
    assert list(statuses.values()) == ["sent", "sent", "sending"]  # the intent without an answer
    rerun = CliRunner().invoke(app, command[3:], env=env)  # the same command again (in-process: one start less)
    assert rerun.exit_code == 0, rerun.output
    assert "unknown_before" in rerun.output
    assert sorted(recorder.message_ids()) == sorted(m for _, _, m in emails)  # each exactly once
    assert len(set(recorder.message_ids())) == len(recorder.received) == 5
    final = _sends(store)
    assert [final[i].status for i, _, _ in emails] == ["sent", "sent", "sending", "sent", "sent"]


def test_received_bytes_are_a_well_formed_message(store, smtp):  # noqa: F811
    recorder, port = smtp
    make_campaign(store, n=1)
    send_campaign(store, "q4", _server(port), FAST)
    raw = recorder.received[0].as_bytes()
    again = message_from_bytes(raw, policy=policy.default)
    assert again["From"].addresses[0].addr_spec == SENDER and again["Date"] is not None


@pytest.fixture
def certificate(tmp_path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A self-signed certificate for 127.0.0.1 made with the openssl command (skips without it)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize("security", ["starttls", "tls"])
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # the implicit-TLS server is TLS
def test_starttls_or_implicit_tls_with_login(store, certificate, security):  # type: ignore[no-untyped-def]
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    from tools.mail import MailServerError

    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    def authenticate(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"dana", b"s3cret-pw")
        return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535 itself

    recorder, port = Recorder(), free_port()
    tls_kwargs = {"tls_context": server_context, "require_starttls": True} if security == "starttls" else {
        "ssl_context": server_context, "auth_require_tls": False}  # aiosmtpd only knows TLS it upgraded to
    controller = Controller(recorder, hostname="127.0.0.1", port=port, authenticator=authenticate,
                            auth_required=True, **tls_kwargs)  # type: ignore[arg-type]
    controller.start()
    try:
        make_campaign(store, n=2)
        good = SmtpServer("127.0.0.1", port, security=security, username="dana", password="s3cret-pw",  # type: ignore[arg-type]
                          timeout_s=5, ssl_context=client_context)
        bad = SmtpServer("127.0.0.1", port, security=security, username="dana", password="wrong-pw",  # type: ignore[arg-type]
                         timeout_s=5, ssl_context=client_context)
        refused = send_campaign(store, "q4", bad, FAST)
        assert refused.stopped is not None and "refused the login of 'dana'" in refused.stopped
        assert "wrong-pw" not in refused.stopped and _sends(store) == {}
        with pytest.raises(MailServerError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            from tools.mail import SmtpConnection

            SmtpConnection(SmtpServer("127.0.0.1", port, security=security, timeout_s=5)).open()  # type: ignore[arg-type]
        assert send_campaign(store, "q4", good, FAST).counts == {"sent": 2} and len(recorder.received) == 2
    finally:
        controller.stop()


def test_an_unsent_message_id_at_the_fallback_domain_is_replaced_before_the_first_send(store, smtp):  # noqa: F811
    from store import EmailRecord

    recorder, port = smtp
    (email_id, _, old), = make_campaign(store, n=1)
    fallback = old.replace("@ledgerline.example>", "@outreach.invalid>")  # written before the offer had a sender
    with session_scope(store) as s:
        record = s.get(EmailRecord, email_id)
        assert record is not None
        record.message_id = fallback
    assert send_campaign(store, "q4", None, FAST, dry_run=True).items[0].message_id == fallback  # writes nothing
    send_campaign(store, "q4", _server(port), FAST)
    with Session(store) as s:
        stored = s.get(EmailRecord, email_id)
    assert stored is not None and stored.message_id != fallback and stored.message_id.endswith("@ledgerline.example>")
    assert recorder.message_ids() == [stored.message_id] and _sends(store)[email_id].message_id == stored.message_id
