"""Secrets kept out of what is stored, printed and logged: credentials in URLs and backend specs,
authorization headers and API keys in error text, and a logging filter for the HTTP clients' log lines.

``redact`` masks by shape (a URL's userinfo, secret-named query or ``name=value`` parameters,
``Bearer``/``Basic`` credentials, well-known API key prefixes such as ``sk-``) and by value (every
secret handed to ``register_secret``, e.g. the key a remote backend was built with, so that an
upstream error echoing it verbatim is masked whatever its shape).
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from dataclasses import dataclass
from typing import overload
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

__all__ = [
    "HTTP_LOGGERS",
    "MASK",
    "MIN_SECRET_CHARS",
    "RedactingFilter",
    "UrlCredentials",
    "install_log_redaction",
    "redact",
    "register_secret",
    "split_url_credentials",
]

#: What a secret is replaced with (``http://***@host/v1`` still parses as a URL and a backend spec).
MASK = "***"

#: Top-level loggers of the HTTP stack that log request URLs (httpx logs each at INFO); openai's
#: current client uses ``httpx2``/``httpcore2``, ``tools.fetch`` uses ``httpx``.
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")

#: Registered secrets shorter than this are not replaced wherever they occur (a 3-character "key"
#: would mask ordinary words); they are still masked where their shape shows (URL userinfo, ``key=``).
MIN_SECRET_CHARS = 6

# ``scheme://userinfo@``: the userinfo runs to the last ``@`` before the host's end. A scheme starts only
# where a run of scheme characters starts (linear time on long runs such as ``a.a.a...``).
_USERINFO = re.compile(r"(?P<scheme>(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{0,31}://)[^\s/?#@]*(?:@[^\s/?#@]*)*@")
# A name containing one of these words, as a query parameter or ``name=value`` in text.
_SECRET_NAME = re.compile(r"key|token|secret|passw(?:or)?d|pwd|auth|signature|^sig$|credential|session",
                          re.IGNORECASE)
_PARAM = re.compile(r"(?P<name>(?<![\w\-.])[A-Za-z_][\w\-.]*)(?P<eq>=)(?P<value>[^&#\s'\",;)}\]]+)")
# ``Bearer``/``Basic`` and 8+ token characters that are not a plain word ("Basic authentication failed").
_AUTH_SCHEME = re.compile(r"(?P<scheme>\b(?:[Bb]earer|Basic))(?P<space>\s+)"
                          r"(?![A-Za-z][a-z]+(?![\w.~+/\-]))(?P<value>[A-Za-z0-9._~+/\-]{8,}=*)")
_AUTH_HEADER = re.compile(r"(?P<name>\b(?:authorization|x-api-key|api-key)[\"']?\s*[:=]\s*[\"']?)"
                          r"(?P<value>(?:(?:bearer|basic|token|digest)\s+)?[^\s\"',}]+)", re.IGNORECASE)
#: Well-known API key shapes: OpenAI/Anthropic ``sk-``, Hugging Face ``hf_``, Groq ``gsk_``, xAI ``xai-``,
#: GitHub ``ghp_``/``gho_``/``ghs_``/``ghu_``/``ghr_``/``github_pat_``, Google ``AIza``, AWS ``AKIA``.
_KEY_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{16,}|gsk_[A-Za-z0-9]{16,}|xai-[A-Za-z0-9]{16,}"
    r"|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,}|AIza[0-9A-Za-z_\-]{30,}|AKIA[0-9A-Z]{16})\b"
)

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()  # longest first; replaced as a whole tuple so readers need no lock


def register_secret(value: str) -> None:
    """Mask ``value`` wherever ``redact`` meets it from now on (process-wide).

    Values shorter than ``MIN_SECRET_CHARS`` are ignored (see there); registering twice is harmless.
    """
    global _secrets
    if len(value) < MIN_SECRET_CHARS:
        return
    with _lock:
        if value not in _secrets:
            _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))


def _mask_param(match: re.Match[str]) -> str:
    if not _SECRET_NAME.search(match["name"]) or match["value"] == MASK:
        return match[0]
    return f"{match['name']}{match['eq']}{MASK}"


@overload
def redact(text: str) -> str: ...
@overload
def redact(text: None) -> None: ...
def redact(text: str | None) -> str | None:
    """Return ``text`` with every secret in it replaced by ``MASK``; ``None`` stays ``None``.

    Masks registered secrets, the userinfo of URLs (``http://user:KEY@host`` -> ``http://***@host``),
    values of secret-named parameters (``?api_key=KEY``, ``access_token=KEY``), ``Bearer``/``Basic``
    credentials and ``Authorization``/``X-Api-Key`` header values, and well-known API key shapes.
    Works on any text: backend specs, URLs, exception messages, log lines, tracebacks.
    """
    if not text:
        return text
    for secret in _secrets:
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _PARAM.sub(_mask_param, text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m['scheme']}{m['space']}{MASK}", text)
    text = _AUTH_HEADER.sub(lambda m: m[0] if m["value"] == MASK else f"{m['name']}{MASK}", text)
    return _KEY_SHAPES.sub(MASK, text)


@dataclass(frozen=True)
class UrlCredentials:
    """A URL split into what may be shown and the credentials it carried.

    Attributes:
        url: the URL without userinfo and query (fit to log and to hand to an HTTP client as base URL).
        auth: ``(username, password)`` from the userinfo, percent-decoded (HTTP Basic credentials, as
            curl and httpx read a URL's userinfo), or ``None``.
        params: the query parameters, in order, decoded (to send with every request).
        secrets: the values to register with ``register_secret``: the password (the username when there
            is no password) as written and decoded, the ``Basic`` header's base64 and every value of a
            secret-named parameter.
    """

    url: str
    auth: tuple[str, str] | None = None
    params: tuple[tuple[str, str], ...] = ()
    secrets: tuple[str, ...] = ()


def split_url_credentials(url: str) -> UrlCredentials:
    """Split ``url`` into a credential-free URL, its userinfo as Basic credentials and its query.

    Raises:
        ValueError: ``url`` cannot be parsed (``urllib.parse.urlsplit``'s own error, e.g. a bad port bracket).
    """
    parts = urlsplit(url)
    secrets: list[str] = []
    auth: tuple[str, str] | None = None
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        raw_user, has_password, raw_password = userinfo.partition(":")
        auth = (unquote(raw_user), unquote(raw_password))
        secret = raw_password if has_password else raw_user
        secrets += [secret, unquote(secret), base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()]
    params = tuple(parse_qsl(parts.query, keep_blank_values=True))
    secrets += [value for name, value in params if _SECRET_NAME.search(name)]
    clean = urlunsplit((parts.scheme, netloc, parts.path, "", parts.fragment))
    return UrlCredentials(url=clean, auth=auth, params=params, secrets=tuple(dict.fromkeys(s for s in secrets if s)))


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record with ``redact`` applied to its message, traceback and stack.

    A record whose text changes gets the redacted message as ``msg`` (``args`` emptied); a traceback is
    formatted, redacted into ``exc_text`` and ``exc_info`` is dropped, so no handler formats the
    original exception again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always returns ``True`` (nothing is dropped)."""
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's to report, not the caller's
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def install_log_redaction(prefixes: tuple[str, ...] = HTTP_LOGGERS) -> None:
    """Add a ``RedactingFilter`` to the loggers named ``prefixes`` and to every existing logger below them.

    A logger's filters apply only to records logged on that very logger (not to its children's), so the
    children that exist now (``httpcore2.http11``, ``openai._base_client``, ...) get one each; call this
    after importing the libraries. Idempotent.
    """
    names = set(prefixes) | {name for name in list(logging.root.manager.loggerDict)
                             if name.split(".", 1)[0] in prefixes}
    for name in names:
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(_FILTER)
