"""Export formats every room shares: CSV that spreadsheets cannot run as formulas, traces as OpenAI
chat fine-tuning examples (the JSONL format TRL and OpenAI fine-tuning read: one ``{"messages": [...]}``
object per line, the last message the assistant's answer), and the emails' identity: the RFC 5322
``Message-ID`` every stored email gets when it is written, which exports carry and engagement events are
joined by."""

from __future__ import annotations

import csv
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from store.models import Trace

__all__ = [
    "FORMULA_PREFIXES",
    "MESSAGE_ID_FALLBACK_DOMAIN",
    "MESSAGE_ID_PATTERN",
    "neutralise_csv_cell",
    "new_message_id",
    "normalise_message_id",
    "trace_to_openai_example",
    "write_csv",
    "write_openai_jsonl",
]

#: Domain of a Message-ID whose campaign has no (usable) ``sender_email`` (RFC 2606 ``.invalid``).
MESSAGE_ID_FALLBACK_DOMAIN = "outreach.invalid"
#: An RFC 5322 ``msg-id`` in its common ``<id-left@id-right>`` dot-atom form (no spaces, brackets or second ``@``).
MESSAGE_ID_PATTERN = re.compile(r"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\[\]-]+>")


def new_message_id(sender_email: str) -> str:
    """A new, unique RFC 5322 ``Message-ID``: ``<32 hex digits of a random UUID4@sender-domain>``.

    Args:
        sender_email: the campaign's sender address; its domain (IDNA-encoded to ASCII) is the id's right
            part, ``MESSAGE_ID_FALLBACK_DOMAIN`` when it is empty or has no usable domain.

    Returns:
        e.g. ``"<5f0c2a...e1@widgets.example>"`` (matches ``MESSAGE_ID_PATTERN``; 122 random bits, so two
        ids collide with negligible probability, and the store's unique index refuses one that would).

    Source: RFC 5322 section 3.6.4 (the left part unique, the right part the sender's domain).
    """
    domain = sender_email.strip().rpartition("@")[2].strip().rstrip(".")
    try:
        domain = domain.encode("idna").decode("ascii").lower() if domain else ""
    except UnicodeError:
        domain = ""
    if not domain or not MESSAGE_ID_PATTERN.fullmatch(f"<x@{domain}>"):
        domain = MESSAGE_ID_FALLBACK_DOMAIN
    return f"<{uuid.uuid4().hex}@{domain}>"


def normalise_message_id(raw: str) -> str | None:
    """``raw`` as a stored Message-ID (angle brackets added when a tool exported it without them), or None when
    it is not a well-formed ``msg-id`` (``MESSAGE_ID_PATTERN``): ``"abc@x.example"`` -> ``"<abc@x.example>"``,
    ``"m1"`` -> None."""
    text = raw.strip()
    if not text:
        return None
    if not text.startswith("<"):
        text = f"<{text}>"
    return text if MESSAGE_ID_PATTERN.fullmatch(text) else None

#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV Injection":
#: ``=``, ``+``, ``-``, ``@``, tab, carriage return).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise_csv_cell(value: object) -> object:
    """``value`` with a single quote in front when it is text that starts with a ``FORMULA_PREFIXES``
    character (``"=HYPERLINK(...)"`` -> ``"'=HYPERLINK(...)"``), so Excel, LibreOffice and Google Sheets
    show it as text instead of running it; other values are returned unchanged (numbers and booleans are
    the exporter's own, never a formula).

    The rule is OWASP's (owasp.org/www-community/attacks/CSV_Injection); cells are also quoted
    (``write_csv``), which keeps a ``;`` or ``,`` inside a cell from starting a new, unneutralised one.
    """
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def write_csv(out: IO[str], fieldnames: Sequence[str], rows: Iterable[Mapping[str, Any]], *,
              lineterminator: str = "\r\n") -> int:
    """Write a header and ``rows`` as CSV to ``out``, every cell quoted and passed through
    ``neutralise_csv_cell``; the one CSV writer of the project (every CSV it writes goes through here).

    Args:
        out: A text stream opened with ``newline=""``.
        fieldnames: Column names, in order (the header is neutralised too).
        rows: One mapping per row from column name to value; missing columns are written empty.
        lineterminator: Record separator (RFC 4180's ``\r\n`` by default).

    Returns:
        The number of rows written (header not counted).

    Raises:
        ValueError: a row has a key that is not in ``fieldnames``.
    """
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator=lineterminator)
    writer.writerow([neutralise_csv_cell(name) for name in fieldnames])
    n = 0
    for row in rows:
        extra = set(row) - set(fieldnames)
        if extra:
            raise ValueError(f"CSV row has column(s) {', '.join(sorted(extra))} not in the header")
        writer.writerow([neutralise_csv_cell(row.get(name, "")) for name in fieldnames])
        n += 1
    return n


def trace_to_openai_example(trace: Trace, *, output: str | None = None) -> dict[str, Any]:
    """``{"messages": prompt + [{"role": "assistant", "content": output}]}``; ``output`` replaces the
    recorded answer (a reviewer's edit), else the trace's own output is used."""
    messages = [dict(m) for m in trace.messages]
    messages.append({"role": "assistant", "content": trace.output if output is None else output})
    return {"messages": messages}


def write_openai_jsonl(traces: Iterable[Trace], out: IO[str]) -> int:
    """Write one example per trace that has no error; returns the number written."""
    n = 0
    for trace in traces:
        if trace.error:
            continue
        out.write(json.dumps(trace_to_openai_example(trace), ensure_ascii=False) + "\n")
        n += 1
    return n
