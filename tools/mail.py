"""Outgoing mail: one email as an RFC 5322 message, and one SMTP connection that hands messages over and says
what the server answered. No store, no model: which emails to send and what to record is ``outreach.sending``.

The message carries the store's ``Message-ID`` (so replies and bounces join back to it), ``List-Unsubscribe``
(RFC 2369: a ``mailto:`` whose subject names the Message-ID, plus an https URL when one is configured) and, with
an https URL, ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058). The connection speaks SMTP with
the standard library's ``smtplib`` (implicit TLS, STARTTLS or plain; AUTH when a user is given) and drives the
transaction phase by phase (``MAIL``, ``RCPT``, ``DATA``), so every outcome is one of ``SmtpOutcome``:

========  ===========================================================================================
sent      the server accepted the message (2xx after ``DATA``)
failed    a permanent refusal (5xx) of the recipient or the message
deferred  a temporary refusal (4xx), or the connection was lost before ``DATA``: nothing was handed over
unknown   the connection broke or timed out during ``DATA``: the server may have taken the message
========  ===========================================================================================
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from types import TracebackType
from typing import Literal
from urllib.parse import quote

from core.errors import UserError
from store.exports import MESSAGE_ID_PATTERN

__all__ = [
    "MailServerError",
    "OutgoingEmail",
    "SmtpAnswer",
    "SmtpConnection",
    "SmtpOutcome",
    "SmtpServer",
    "build_message",
    "unsubscribe_headers",
]

logger = logging.getLogger(__name__)

Security = Literal["starttls", "tls", "none"]

#: Enhanced status codes (RFC 3463) of a refusal that means the address itself is bad: a hard bounce.
_BAD_ADDRESS = re.compile(r"\b5\.1\.(1|2|3|6|10)\b")


class SmtpOutcome:
    """What became of one message handed to ``SmtpConnection.send`` (module docstring)."""

    SENT = "sent"
    FAILED = "failed"
    DEFERRED = "deferred"
    UNKNOWN = "unknown"


class MailServerError(UserError):
    """The SMTP server cannot be used at all (unreachable, timed out, TLS or login refused): the message names the
    server and what to check. Nothing was handed over on the connection that failed."""


@dataclass(frozen=True)
class SmtpServer:
    """Where and how to submit mail.

    Attributes:
        host: the submission server's name or address.
        port: 587 for STARTTLS submission (RFC 6409), 465 for implicit TLS (RFC 8314), 25 plain.
        security: ``starttls`` (upgrade after ``EHLO``; refused if the server does not offer it), ``tls``
            (TLS from the first byte) or ``none`` (plain text: loopback and tests only).
        username: AUTH user; empty: no login.
        password: AUTH password (never logged or shown).
        timeout_s: seconds each network operation may wait (connect, every reply).
        ssl_context: certificate checks for TLS; default ``ssl.create_default_context()`` (system CAs).
    """

    host: str
    port: int
    security: Security = "starttls"
    username: str = ""
    password: str = field(default="", repr=False)
    timeout_s: float = 30.0
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    def label(self) -> str:
        """``host:port (security)``, without credentials, for messages."""
        return f"{self.host}:{self.port} ({self.security})"


@dataclass(frozen=True)
class OutgoingEmail:
    """One email to send.

    Attributes:
        message_id: the RFC 5322 ``Message-ID`` with its angle brackets (``<left@right>``), from the store.
        sender_name, sender_email: ``From``.
        to_name, to_email: ``To``.
        subject, body: plain text (the body is sent as ``text/plain; charset=utf-8``).
        organization: the ``Organization`` header, left out when empty.
    """

    message_id: str
    sender_name: str
    sender_email: str
    to_name: str
    to_email: str
    subject: str
    body: str
    organization: str = ""


@dataclass(frozen=True)
class SmtpAnswer:
    """The server's answer to one message.

    Attributes:
        outcome: one of ``SmtpOutcome``.
        code: the SMTP reply code (e.g. 250, 450, 550), None when no reply came (connection lost, timeout).
        text: the reply text, or what went wrong on the connection.
        phase: the command the answer came to: ``mail``, ``rcpt``, ``data`` or ``connect``.
    """

    outcome: str
    code: int | None
    text: str
    phase: str

    @property
    def bad_address(self) -> bool:
        """A permanent refusal whose enhanced status (RFC 3463 ``5.1.x``) says the recipient address is bad."""
        return self.outcome == SmtpOutcome.FAILED and self.phase in ("rcpt", "data") and bool(
            _BAD_ADDRESS.search(self.text))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _address(name: str, address: str) -> Address:
    username, _, domain = address.strip().rpartition("@")
    return Address(display_name=_one_line(name), username=username, domain=domain)


def unsubscribe_headers(message_id: str, *, mailto: str, url: str = "") -> dict[str, str]:
    """The ``List-Unsubscribe`` header (and ``List-Unsubscribe-Post`` for an https URL) of one message.

    Args:
        message_id: the message's ``Message-ID`` (``<left@right>``); it goes into the mailto subject
            (``unsubscribe <left@right>``, percent-encoded, so a request joins back without ``In-Reply-To``) and
            replaces ``{message_id}`` in ``url`` (percent-encoded, brackets dropped).
        mailto: the address unsubscribe requests are mailed to (usually the sender's own mailbox).
        url: an http(s) address that unsubscribes in one request; empty: mailto only.

    Returns:
        ``{"List-Unsubscribe": "<mailto:...>, <https://...>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}``
        (the second only for an https URL, as RFC 8058 section 3.1 requires; that RFC also asks for a DKIM signature
        covering both headers, which the submission server or mail provider adds).

    Raises:
        ValueError: ``mailto`` is not an address, or ``url`` is not http(s).

    Sources: RFC 2369 section 3.2; RFC 8058 sections 3.1-3.2.
    """
    if "@" not in mailto or any(c in mailto for c in "<>, \t\r\n"):
        raise ValueError(f"unsubscribe address {mailto!r} is not an email address; set mail.unsubscribe_mailto")
    subject = quote(f"unsubscribe {message_id}", safe="")
    entries = [f"<mailto:{quote(mailto.strip(), safe='@')}?subject={subject}>"]
    post = False
    if url:
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"unsubscribe URL {url!r} is not http(s); set mail.unsubscribe_url to an https:// address")
        token = quote(message_id.strip().strip("<>"), safe="")
        entries.append(f"<{url.replace('{message_id}', token)}>")
        post = url.startswith("https://")
    headers = {"List-Unsubscribe": ", ".join(entries)}
    if post:
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return headers


def build_message(email: OutgoingEmail, *, unsubscribe_mailto: str = "", unsubscribe_url: str = "",
                  date: datetime | None = None) -> EmailMessage:
    """``email`` as an RFC 5322 message ready for SMTP.

    Headers: ``From``, ``To``, ``Subject``, ``Date`` (``date``, default now: when it enters the mail system, RFC
    5322 section 3.6.1), ``Message-ID`` (the store's, unchanged), ``Organization`` (when given) and the
    unsubscribe headers (``unsubscribe_headers``; ``unsubscribe_mailto`` defaults to the sender's address).
    Policy ``policy.SMTP`` (CRLF), or ``policy.SMTPUTF8`` when an address is not ASCII (RFC 6531), with lines of
    up to 998 characters (RFC 5322 section 2.1.1), so URLs in headers are never encoded.

    Raises:
        ValueError: the Message-ID is not ``<left@right>``, an address has no ``@``, or an unsubscribe setting
            is unusable (``unsubscribe_headers``).
    """
    if not MESSAGE_ID_PATTERN.fullmatch(email.message_id.strip()):
        raise ValueError(f"Message-ID {email.message_id!r} is not <left@right>; the store's emails.message_id "
                         "is set when an email is written")
    for role, address in (("sender", email.sender_email), ("recipient", email.to_email)):
        if "@" not in address:
            raise ValueError(f"{role} address {address!r} has no @")
    ascii_only = email.sender_email.isascii() and email.to_email.isascii()
    # Lines up to RFC 5322's hard limit of 998: at the default 78 the email package writes a long header without
    # spaces (the List-Unsubscribe URLs) as RFC 2047 encoded words, which no mail client reads as URLs.
    message = EmailMessage(policy=(policy.SMTP if ascii_only else policy.SMTPUTF8).clone(max_line_length=998))
    message["From"] = _address(email.sender_name, email.sender_email)
    message["To"] = _address(email.to_name, email.to_email)
    message["Subject"] = _one_line(email.subject)
    message["Date"] = format_datetime((date or datetime.now(UTC)).astimezone(UTC))
    message["Message-ID"] = email.message_id.strip()
    if email.organization.strip():
        message["Organization"] = _one_line(email.organization)
    for name, value in unsubscribe_headers(email.message_id.strip(), mailto=unsubscribe_mailto or email.sender_email,
                                           url=unsubscribe_url).items():
        message[name] = value
    # 8-bit text goes quoted-printable, so no server needs 8BITMIME (RFC 6152) for a non-ASCII body.
    message.set_content(email.body, cte=None if email.body.isascii() else "quoted-printable")
    return message


def _text(reply: bytes | str) -> str:
    return _one_line(reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply)


def _refusal(code: int, reply: bytes | str, phase: str) -> SmtpAnswer:
    outcome = SmtpOutcome.DEFERRED if 400 <= code < 500 else SmtpOutcome.FAILED
    return SmtpAnswer(outcome, code, _text(reply), phase)


class SmtpConnection:
    """One SMTP session with ``server``, opened on first use and reopened after a lost connection.

    Use as a context manager (``with SmtpConnection(server) as smtp: answer = smtp.send(message)``); ``send``
    never raises for a per-message outcome, only ``MailServerError`` when the server cannot be used at all.
    """

    def __init__(self, server: SmtpServer) -> None:
        self.server = server
        self._smtp: smtplib.SMTP | None = None

    def __enter__(self) -> SmtpConnection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        """Connect, upgrade to TLS as configured, and log in (a no-op when already open).

        Raises:
            MailServerError: the server does not answer, times out, offers no STARTTLS, fails the TLS handshake or
                refuses the login (the message names the server, never the password).
        """
        if self._smtp is not None:
            return
        s = self.server
        context = s.ssl_context or ssl.create_default_context()
        smtp: smtplib.SMTP | None = None
        try:
            if s.security == "tls":
                smtp = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_s, context=context)
            else:
                smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout_s)
            smtp.ehlo()
            if s.security == "starttls":
                if not smtp.has_extn("starttls"):
                    raise MailServerError(f"SMTP server {s.label()} does not offer STARTTLS; set mail.security to "
                                          "tls (port 465) or check mail.host and mail.port")
                smtp.starttls(context=context)
                smtp.ehlo()
            if s.username:
                smtp.login(s.username, s.password)
        except MailServerError:
            _quit(smtp)
            raise
        except smtplib.SMTPNotSupportedError:
            _quit(smtp)
            raise MailServerError(f"SMTP server {s.label()} offers no AUTH on this connection, and a user is set; "
                                  "check mail.security (many servers offer AUTH only after STARTTLS) or leave "
                                  "$OUTREACH_MAIL__USERNAME empty") from None
        except smtplib.SMTPAuthenticationError as exc:
            _quit(smtp)
            raise MailServerError(f"SMTP server {s.label()} refused the login of {s.username!r} ({exc.smtp_code} "
                                  f"{_text(exc.smtp_error)}); check $OUTREACH_MAIL__USERNAME and "
                                  "$OUTREACH_MAIL__PASSWORD") from None
        except (smtplib.SMTPException, OSError) as exc:
            _quit(smtp)
            what = "timed out" if isinstance(exc, TimeoutError) else \
                f"failed ({type(exc).__name__}{': ' + _one_line(str(exc)) if str(exc) else ''})"
            raise MailServerError(f"SMTP server {s.label()} {what}; check mail.host, mail.port, mail.security and "
                                  "that the server is up, then run the command again") from None
        self._smtp = smtp
        logger.debug("connected to %s", s.label())

    def close(self) -> None:
        """Say ``QUIT`` (when the connection is still up) and forget the session."""
        _quit(self._smtp)
        self._smtp = None

    def send(self, message: EmailMessage) -> SmtpAnswer:
        """Hand ``message`` over: ``MAIL FROM`` its ``From``, ``RCPT TO`` its ``To``, then ``DATA``.

        Returns:
            The ``SmtpAnswer`` (``SmtpOutcome``: module docstring). After a refusal the transaction is reset
            (``RSET``); after a lost connection the session is closed and the next call reconnects.

        Raises:
            MailServerError: (re)connecting failed (``open``); nothing of this message was handed over.
        """
        self.open()
        smtp = self._smtp
        assert smtp is not None
        sender = message["From"].addresses[0].addr_spec
        recipient = message["To"].addresses[0].addr_spec
        utf8 = not (sender.isascii() and recipient.isascii())
        mail_options: list[str] = []
        if utf8:
            if not smtp.has_extn("smtputf8"):
                return SmtpAnswer(SmtpOutcome.FAILED, None, "an address is not ASCII and the server does not offer "
                                  "SMTPUTF8 (RFC 6531)", "mail")
            mail_options = ["SMTPUTF8", "BODY=8BITMIME"]
        try:
            code, reply = smtp.mail(sender, mail_options)
            if code != 250:
                self._reset()
                return _refusal(code, reply, "mail")
            code, reply = smtp.rcpt(recipient)
            if code not in (250, 251):
                self._reset()
                return _refusal(code, reply, "rcpt")
        except (smtplib.SMTPException, OSError) as exc:  # nothing handed over yet: safe to try again later
            self._lost()
            return SmtpAnswer(SmtpOutcome.DEFERRED, None, f"connection lost before DATA ({_describe(exc)})", "rcpt")
        try:
            code, reply = smtp.data(message.as_bytes())
        except smtplib.SMTPDataError as exc:  # a definite refusal of DATA or of the message
            self._reset()
            return _refusal(exc.smtp_code, exc.smtp_error, "data")
        except (smtplib.SMTPException, OSError) as exc:
            self._lost()
            return SmtpAnswer(SmtpOutcome.UNKNOWN, None, f"no answer to the message ({_describe(exc)}); the server "
                              "may have taken it", "data")
        return SmtpAnswer(SmtpOutcome.SENT, code, _text(reply), "data")

    def _reset(self) -> None:
        try:
            assert self._smtp is not None
            self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._lost()

    def _lost(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.close()
            except OSError:
                pass
        self._smtp = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__ + (f": {_one_line(str(exc))}" if str(exc) else "")


def _quit(smtp: smtplib.SMTP | None) -> None:
    if smtp is None:
        return
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        try:
            smtp.close()
        except OSError:
            pass
