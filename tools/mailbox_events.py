"""Mail that comes back, read as engagement events: bounces (delivery status notifications), replies,
unsubscribe requests and spam complaints, from an ``.mbox`` file, a folder of ``.eml`` files, a Maildir, or an
IMAP mailbox. Parsing only: joining events to stored emails and recording them is ``outreach.mail_import``.

How a message is read (``events_from_message``):

* ``multipart/report; report-type=delivery-status`` (a DSN, RFC 3464): one ``bounce`` per recipient block whose
  ``Action`` is ``failed`` (``delayed``, ``delivered``, ``relayed``, ``expanded`` are not bounces), referring to
  the returned message's ``Message-ID`` (its ``message/rfc822`` or ``text/rfc822-headers`` part) and to the
  DSN's own ``In-Reply-To``/``References``;
* ``multipart/report; report-type=feedback-report`` (an ARF spam complaint, RFC 5965): one ``complaint``;
* any other automatic message (``Auto-Submitted`` other than ``no``, RFC 3834; ``Precedence: bulk|junk|
  auto_reply``; ``X-Autoreply``): ignored (out-of-office answers are not replies);
* a subject that starts with ``unsubscribe`` (after ``Re:``/``Fwd:``; what the ``List-Unsubscribe`` mailto of
  ``tools.mail`` writes, with the Message-ID in it): ``unsubscribe``;
* a message with ``In-Reply-To`` or ``References``: ``reply``;
* anything else is ignored, with the reason.

A message that cannot be read (no headers, a broken MIME structure, a report without its status part, a
reference that is not a ``<left@right>`` Message-ID) is a ``MailNote`` in ``problems`` naming its file and line
(mbox) or file, never a traceback; the same message seen twice (same ``Message-ID``) is read once.
"""

from __future__ import annotations

import email
import email.errors
import imaplib
import logging
import mailbox
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message
from email.utils import getaddresses, parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from core.errors import UserError
from store.exports import MESSAGE_ID_PATTERN

__all__ = [
    "EVENT_KINDS",
    "MailEvent",
    "MailNote",
    "MailRead",
    "MailSourceError",
    "events_from_message",
    "read_imap",
    "read_mail",
    "read_mail_path",
]

logger = logging.getLogger(__name__)

#: What a message from the mail server can say about a sent email.
EVENT_KINDS = ("bounce", "reply", "unsubscribe", "complaint")

#: Characters of a reply's own text kept (``MailEvent.text``).
TEXT_CHARS = 2000

_REF = re.compile(r"<[^<>]*>")
_QUOTE_INTRO = re.compile(r"^\s*(on\b.*\bwrote:|-+\s*original message\s*-+|from:\s)", re.IGNORECASE)
_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|antw)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_STRUCTURE_DEFECTS = (email.errors.NoBoundaryInMultipartDefect, email.errors.StartBoundaryNotFoundDefect,
                      email.errors.MultipartInvariantViolationDefect)


class MailSourceError(UserError):
    """A mail source cannot be read at all (missing path, unreachable or refusing IMAP server): names it and
    what to do."""


@dataclass(frozen=True)
class MailEvent:
    """One thing a message says about a sent email.

    Attributes:
        kind: one of ``EVENT_KINDS``.
        refs: the Message-IDs (``<left@right>``) it refers to, the most direct first (the bounced message's own
            id, or ``In-Reply-To``), then ``References`` newest first; may be empty (join by ``recipient``).
        recipient: the address concerned: a bounce's ``Final-Recipient``, a complaint's original recipient, a
            reply's or request's ``From``.
        occurred_at: the message's ``Date`` (aware UTC), None when it has none that parses.
        source: where it was read: ``path:line`` (mbox), ``path`` (``.eml``, Maildir) or
            ``imap://host/MAILBOX;UID=n``.
        own_id: the message's own ``Message-ID`` ("" when it has none).
        status: a bounce's DSN ``Status`` (e.g. ``5.1.1``); "" otherwise.
        detail: a bounce's ``Diagnostic-Code``, or the message's subject.
        text: a reply's own words: its plain-text body without the quoted message (lines from the first ``>``
            or ``On ... wrote:`` on), at most ``TEXT_CHARS`` characters; "" for other kinds.
    """

    kind: str
    refs: tuple[str, ...]
    recipient: str
    occurred_at: datetime | None
    source: str
    own_id: str = ""
    status: str = ""
    detail: str = ""
    text: str = ""

    @property
    def permanent(self) -> bool:
        """A bounce whose status class is 5 (permanent failure, RFC 3463); other kinds: True."""
        return self.kind != "bounce" or not self.status.startswith("4")


@dataclass(frozen=True)
class MailNote:
    """A message not turned into events, and why: ``source`` as in ``MailEvent``."""

    source: str
    reason: str


@dataclass
class MailRead:
    """What one source gave: ``messages`` read, their ``events``, ``problems`` (unreadable messages) and
    ``ignored`` ones (automatic replies, delays, unrelated mail, duplicates)."""

    messages: int = 0
    events: list[MailEvent] = field(default_factory=list)
    problems: list[MailNote] = field(default_factory=list)
    ignored: list[MailNote] = field(default_factory=list)


class _Malformed(ValueError):
    """A message that cannot be read as what it claims to be."""


def _header(message: Message, name: str) -> str:
    value = message.get(name)
    return " ".join(str(value).split()) if value is not None else ""


def _refs(text: str, name: str) -> list[str]:
    """The Message-IDs in a header's value, in order.

    Raises:
        _Malformed: the header has a value but no well-formed ``<left@right>`` id.
    """
    if not text:
        return []
    found = [r for r in _REF.findall(text) if MESSAGE_ID_PATTERN.fullmatch(r)]
    if not found:
        bare = text.strip()
        if MESSAGE_ID_PATTERN.fullmatch(f"<{bare}>"):
            return [f"<{bare}>"]
        raise _Malformed(f"{name} {text[:80]!r} is not a Message-ID (<left@right>)")
    return found


def _date(message: Message) -> datetime | None:
    raw = _header(message, "Date")
    if not raw:
        return None
    try:
        moment = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _from_address(message: Message) -> str:
    addresses = [a for _, a in getaddresses([_header(message, "From")]) if "@" in a]
    return addresses[0].lower() if addresses else ""


def _thread_refs(message: Message) -> list[str]:
    """``In-Reply-To`` then ``References`` newest first (RFC 5322 section 3.6.4)."""
    in_reply_to = _refs(_header(message, "In-Reply-To"), "In-Reply-To")
    references = list(reversed(_refs(_header(message, "References"), "References")))
    return list(dict.fromkeys(in_reply_to + references))


def _returned_message_id(report: Message) -> list[str]:
    """The ``Message-ID`` of the message a report returns (its ``message/rfc822`` or headers part)."""
    for part in report.iter_parts() if isinstance(report, EmailMessage) else []:
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            inner = inner[0] if isinstance(inner, list) and inner else inner
            if isinstance(inner, Message):
                return _refs(_header(inner, "Message-ID"), "the returned message's Message-ID")
        if ctype in ("text/rfc822-headers", "message/global-headers"):
            headers = email.message_from_string(str(part.get_payload(decode=False)), policy=policy.default)
            return _refs(_header(headers, "Message-ID"), "the returned message's Message-ID")
    return []


def _address_field(value: str) -> str:
    """``rfc822; user@host`` (RFC 3464 address type and address) -> ``user@host``."""
    return value.split(";", 1)[1].strip().strip("<>").lower() if ";" in value else value.strip().strip("<>").lower()


def _dsn_events(report: EmailMessage, source: str, own_id: str) -> tuple[list[MailEvent], str | None]:
    status_part = next((p for p in report.iter_parts() if p.get_content_type() in
                        ("message/delivery-status", "message/global-delivery-status")), None)
    if status_part is None:
        raise _Malformed("a delivery status notification without its message/delivery-status part (RFC 3464)")
    blocks = status_part.get_payload()
    if not isinstance(blocks, list) or len(blocks) < 2:
        raise _Malformed("a delivery status notification without per-recipient fields (RFC 3464 section 2.3)")
    refs = list(dict.fromkeys(_returned_message_id(report) + _thread_refs(report)))
    when, events, actions = _date(report), [], []
    for block in blocks[1:]:
        if not isinstance(block, Message):
            raise _Malformed("a delivery status notification whose status part is not header fields (RFC 3464)")
        action = _header(block, "Action").lower()
        recipient = _address_field(_header(block, "Final-Recipient") or _header(block, "Original-Recipient"))
        if not action or not recipient:
            raise _Malformed("a recipient block without Action or Final-Recipient (RFC 3464 section 2.3)")
        actions.append(action)
        if action == "failed":
            diagnostic = _header(block, "Diagnostic-Code")
            events.append(MailEvent("bounce", tuple(refs), recipient, when, source, own_id,
                                    status=_header(block, "Status"),
                                    detail=diagnostic.split(";", 1)[-1].strip()))  # "smtp; 550 ..." -> "550 ..."
    if not events:
        return [], f"a delivery status notification with no failed recipient (actions: {', '.join(actions)})"
    return events, None


def _complaint_events(report: EmailMessage, source: str, own_id: str) -> list[MailEvent]:
    feedback = next((p for p in report.iter_parts() if p.get_content_type() == "message/feedback-report"), None)
    if feedback is None:
        raise _Malformed("a feedback report without its message/feedback-report part (RFC 5965)")
    fields = feedback.get_payload()
    first = fields[0] if isinstance(fields, list) and fields else None
    recipient = _address_field(_header(first, "Original-Rcpt-To")) if isinstance(first, Message) else ""
    if not recipient:
        for part in report.iter_parts():
            inner = part.get_payload() if part.get_content_type() == "message/rfc822" else None
            inner = inner[0] if isinstance(inner, list) and inner else inner
            if isinstance(inner, Message):
                recipient = next((a.lower() for _, a in getaddresses([_header(inner, "To")]) if "@" in a), "")
    refs = list(dict.fromkeys(_returned_message_id(report) + _thread_refs(report)))
    return [MailEvent("complaint", tuple(refs), recipient, _date(report), source, own_id,
                      detail=_header(report, "Subject"))]


def _own_text(message: EmailMessage) -> str:
    """The plain-text body's lines before the quoted message (``MailEvent.text``)."""
    try:
        part = message.get_body(preferencelist=("plain",))
        body = part.get_content() if part is not None else ""
    except (KeyError, LookupError, ValueError):  # an unknown charset or a broken part: no text
        return ""
    lines = []
    for line in str(body).splitlines():
        if line.lstrip().startswith(">") or _QUOTE_INTRO.match(line):
            break
        lines.append(line)
    return "\n".join(lines).strip()[:TEXT_CHARS]


def _automatic(message: Message) -> str | None:
    auto = _header(message, "Auto-Submitted").lower()
    if auto and auto != "no":
        return f"an automatic message (Auto-Submitted: {auto}, RFC 3834), not a reply"
    if _header(message, "Precedence").lower() in ("bulk", "junk", "auto_reply", "list"):
        return f"an automatic message (Precedence: {_header(message, 'Precedence').lower()}), not a reply"
    if message.get("X-Autoreply") is not None or message.get("X-Autorespond") is not None:
        return "an automatic message (X-Autoreply), not a reply"
    return None


def events_from_message(message: EmailMessage, source: str) -> tuple[list[MailEvent], str | None]:
    """What one message says (module docstring: the rules).

    Args:
        message: parsed with ``policy.default``.
        source: where it was read, for the events and errors.

    Returns:
        ``(events, ignored)``: the events, and when there are none, why the message was ignored.

    Raises:
        ValueError: the message cannot be read (no headers, broken MIME, a report without its status part,
            a reference that is not a Message-ID); the message says what is wrong.
    """
    if not message.keys():
        raise _Malformed("no mail headers (is this an email?)")
    broken = [d for d in message.defects if isinstance(d, _STRUCTURE_DEFECTS)]
    if broken:
        raise _Malformed(f"broken MIME structure ({type(broken[0]).__name__})")
    own_ids = _REF.findall(_header(message, "Message-ID"))
    own_id = own_ids[0] if own_ids else ""
    ctype = message.get_content_type()
    report_type = str(message.get_param("report-type", "") or "").lower() if ctype == "multipart/report" else ""
    if report_type == "delivery-status":
        return _dsn_events(message, source, own_id)
    if report_type == "feedback-report":
        return _complaint_events(message, source, own_id), None
    automatic = _automatic(message)
    if automatic is not None:
        return [], automatic
    subject = _header(message, "Subject")
    bare_subject = _REPLY_PREFIX.sub("", subject).strip()
    sender = _from_address(message)
    if bare_subject.lower().startswith("unsubscribe"):
        refs = [r for r in _REF.findall(bare_subject) if MESSAGE_ID_PATTERN.fullmatch(r)] + _thread_refs(message)
        return [MailEvent("unsubscribe", tuple(dict.fromkeys(refs)), sender, _date(message), source, own_id,
                          detail=subject)], None
    refs = _thread_refs(message)
    if refs:
        return [MailEvent("reply", tuple(refs), sender, _date(message), source, own_id, detail=subject,
                          text=_own_text(message))], None
    return [], "neither a delivery status notification nor a reply (no In-Reply-To or References)"


def _parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _read_one(data: bytes, source: str, result: MailRead, seen: dict[str, str]) -> None:
    """Add what one raw message says to ``result`` (``seen``: own Message-ID -> where it was first read)."""
    result.messages += 1
    try:
        message = _parse(data)
        events, ignored = events_from_message(message, source)
    except Exception as exc:  # noqa: BLE001 - any parser failure is this message's problem, not the import's
        result.problems.append(MailNote(source, str(exc) if isinstance(exc, ValueError) else
                                        f"cannot be parsed ({type(exc).__name__}: {exc})"))
        return
    own_id = events[0].own_id if events else ""
    if own_id and own_id in seen:
        result.ignored.append(MailNote(source, f"duplicate of {seen[own_id]} (same Message-ID {own_id})"))
        return
    if own_id:
        seen[own_id] = source
    result.events.extend(events)
    if ignored is not None:
        result.ignored.append(MailNote(source, ignored))


def _mbox_lines(path: Path) -> list[int]:
    """1-based line of each message's ``From `` separator, in file order (the rule ``mailbox.mbox`` uses)."""
    lines = []
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            if line.startswith(b"From "):
                lines.append(number)
    return lines


def _read_mbox(path: Path, result: MailRead, seen: dict[str, str]) -> None:
    lines = _mbox_lines(path)
    box = mailbox.mbox(path, create=False)
    try:
        for index, key in enumerate(box.iterkeys()):
            where = f"{path}:{lines[index]}" if index < len(lines) else f"{path} (message {index + 1})"
            _read_one(box.get_bytes(key), where, result, seen)
    finally:
        box.close()


def _files(folder: Path) -> Iterator[Path]:
    if all((folder / sub).is_dir() for sub in ("cur", "new", "tmp")):  # a Maildir
        for sub in ("cur", "new"):
            yield from sorted(p for p in (folder / sub).iterdir() if p.is_file() and not p.name.startswith("."))
        return
    yield from sorted(p for p in folder.rglob("*.eml") if p.is_file())


def read_mail_path(path: Path) -> MailRead:
    """Read an ``.mbox`` file (any file that is not a folder), a folder of ``.eml`` files (searched recursively),
    a Maildir (``cur/``, ``new/``, ``tmp/``) or a folder of ``.mbox`` files.

    Raises:
        MailSourceError: ``path`` does not exist, or is a folder without mail.
    """
    if not path.exists():
        raise MailSourceError(f"mail source {path} does not exist; give an .mbox file, a folder of .eml files, a "
                              "Maildir or imap://user@host/MAILBOX")
    result, seen = MailRead(), dict[str, str]()
    if path.is_file():
        _read_mbox(path, result, seen)
        return result
    files = list(_files(path))
    boxes = sorted(p for p in path.glob("*.mbox") if p.is_file())
    if not files and not boxes:
        raise MailSourceError(f"mail source {path} is a folder without .eml or .mbox files and is not a Maildir")
    for box in boxes:
        _read_mbox(box, result, seen)
    for file in files:
        _read_one(file.read_bytes(), str(file), result, seen)
    return result


def _imap_target(url: str) -> tuple[bool, str, int, str, str]:
    """``imap[s]://user@host[:port]/MAILBOX`` -> (TLS from the start, host, port, user, mailbox).

    Raises:
        MailSourceError: not such a URL, or no user or host in it.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("imap", "imaps") or not parts.hostname or not parts.username:
        raise MailSourceError(f"{url!r} is not imap://user@host[:port]/MAILBOX or imaps://...; the password comes "
                              "from $OUTREACH_MAIL__IMAP_PASSWORD, never from the URL")
    if parts.password:
        raise MailSourceError("the IMAP URL holds a password: leave it out and set $OUTREACH_MAIL__IMAP_PASSWORD")
    implicit = parts.scheme == "imaps"
    return (implicit, parts.hostname, parts.port or (993 if implicit else 143), unquote(parts.username),
            unquote(parts.path.lstrip("/")) or "INBOX")


def read_imap(url: str, password: str, *, timeout_s: float = 30.0, ssl_context: ssl.SSLContext | None = None,
              allow_plain: bool = False) -> MailRead:
    """Read every message of an IMAP mailbox (read-only: nothing is marked seen, moved or deleted).

    ``imaps://`` is TLS from the first byte (port 993); ``imap://`` upgrades with STARTTLS (port 143) and is refused
    when the server does not offer it, unless ``allow_plain`` (loopback and tests). The messages are parsed with
    ``events_from_message``, each with source ``imap://host/MAILBOX;UID=n`` (RFC 5092). A thin layer over
    ``imaplib``: it is not tested against a server here (no IMAP server package is at hand).

    Raises:
        MailSourceError: the URL is unusable, or the server cannot be reached, refuses TLS, the login or the mailbox.
    """
    implicit, host, port, user, box = _imap_target(url)
    context = ssl_context or ssl.create_default_context()
    label = f"imap{'s' if implicit else ''}://{host}:{port}/{box}"
    result, seen = MailRead(), dict[str, str]()
    try:
        client = (imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=timeout_s) if implicit
                  else imaplib.IMAP4(host, port, timeout=timeout_s))
    except OSError as exc:
        raise MailSourceError(f"IMAP server {label} does not answer ({type(exc).__name__}: {exc}); check the URL "
                              "and that the server is up") from None
    try:
        if not implicit:
            if "STARTTLS" in client.capabilities:
                client.starttls(context)
            elif not allow_plain:
                raise MailSourceError(f"IMAP server {label} offers no STARTTLS; use imaps:// (port 993)")
        client.login(user, password)
        status, _ = client.select(f'"{box}"', readonly=True)
        if status != "OK":
            raise MailSourceError(f"IMAP server {label} has no mailbox {box!r}")
        status, data = client.uid("SEARCH", "ALL")
        for uid in (data[0] or b"").split() if status == "OK" else []:
            number = uid.decode() if isinstance(uid, bytes) else str(uid)
            status, parts = client.uid("FETCH", number, "(BODY.PEEK[])")
            raw = next((p[1] for p in parts if isinstance(p, tuple)), None) if status == "OK" else None
            source = f"imap://{host}/{box};UID={number}"
            if raw is None:
                result.problems.append(MailNote(source, "the server sent no message body"))
                continue
            _read_one(raw, source, result, seen)
    except imaplib.IMAP4.error as exc:
        raise MailSourceError(f"IMAP server {label} refused: {exc}; check the user, $OUTREACH_MAIL__IMAP_PASSWORD "
                              "and the mailbox name") from None
    except OSError as exc:
        raise MailSourceError(f"IMAP server {label}: connection failed ({type(exc).__name__}: {exc})") from None
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            pass
    return result


def read_mail(source: str, *, imap_password: str = "", timeout_s: float = 30.0) -> MailRead:
    """Read ``source``: an ``imap://``/``imaps://`` URL (``read_imap``) or a path (``read_mail_path``).

    Raises:
        MailSourceError: as ``read_imap`` or ``read_mail_path``.
    """
    if source.startswith(("imap://", "imaps://")):
        return read_imap(source, imap_password, timeout_s=timeout_s)
    return read_mail_path(Path(source))
