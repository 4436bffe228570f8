"""Campaign inputs: a prospects CSV and an offer TOML, validated row by row.

A malformed row (missing field, invalid email, bad website URL, bytes that are not UTF-8, a value over
its length limit, a field over the csv module's 131,072-character limit) is reported with its row
number (the header is row 1) and skipped; the other rows go on. Length limits (characters) are
``PROSPECT_LIMITS`` and ``OFFER_LIMITS``: a value past them is not a name or a pitch but pasted text.
"""

from __future__ import annotations

import csv
import io
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from email_validator import EmailNotValidError, validate_email
from pydantic import ValidationError

from agents.schemas import Offer, ProspectInfo
from core.errors import UserError

__all__ = [
    "OFFER_LIMITS",
    "PROSPECT_COLUMNS",
    "PROSPECT_LIMITS",
    "NO_ROWS",
    "NO_WEBSITE_COLUMN",
    "InputError",
    "ProspectsFile",
    "RowError",
    "load_offer",
    "read_prospects_csv",
]

#: Columns of a prospects CSV; ``first_name``, ``email`` and ``company`` are required, the others optional.
PROSPECT_COLUMNS = ("first_name", "last_name", "title", "email", "company", "website")
_REQUIRED = ("first_name", "email", "company")
_OPTIONAL = tuple(c for c in PROSPECT_COLUMNS if c not in _REQUIRED)

#: Most characters per prospect field: names 100, title and company 200, e-mail 254 (RFC 5321's path
#: limit less the angle brackets, RFC 3696 erratum 1690), website 2,048 (the sitemaps protocol's URL limit).
PROSPECT_LIMITS: dict[str, int] = {
    "first_name": 100, "last_name": 100, "title": 200, "email": 254, "company": 200, "website": 2048,
}
#: Most characters per offer field: a name 100, a title, company or product 200, an e-mail 254, the
#: value proposition 600 (a few sentences), the call to action and the opt-out line 300 (one or two).
OFFER_LIMITS: dict[str, int] = {
    "sender_name": 100, "sender_title": 200, "sender_company": 200, "sender_email": 254, "product": 200,
    "value_proposition": 600, "call_to_action": 300, "opt_out_line": 300, "proof_point": 300,
}
#: ``ProspectsFile.warnings`` (each follows the file's name): a header and no rows (a demo world's empty
#: split), and no ``website`` column (said once per file).
NO_ROWS = "has a header but no prospect rows; add one prospect per row"
NO_WEBSITE_COLUMN = (
    "has no website column (it is optional): research finds each company by its name in search results only, "
    "without its own site to start from, so expect fewer facts; add a website column to research from the "
    "company's own site"
)
_UNDECODABLE = re.compile("[\udc80-\udcff]")


class InputError(UserError, ValueError):
    """A whole input file is unusable (missing, unreadable, missing columns, invalid offer)."""


@dataclass(frozen=True)
class RowError:
    """One skipped row: ``row`` is the 1-based line of the record in the file (header = 1)."""

    row: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


@dataclass
class ProspectsFile:
    """The valid prospects of a CSV with their row numbers, the rows that were skipped, and notes about
    the whole file for the user (``warnings``: e.g. ``NO_WEBSITE_COLUMN``), each to be shown once."""

    prospects: list[tuple[int, ProspectInfo]] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _check_website(value: str) -> str:
    if not value:
        return ""
    url = value if "://" in value else f"https://{value}"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"website {value!r} is not a URL ({exc})") from exc
    if parsed.scheme not in ("http", "https") or "." not in parsed.host or " " in value:
        raise ValueError(f"website {value!r} is not an http(s) URL with a domain name")
    return url


def _too_long(values: dict[str, str], limits: dict[str, int]) -> str:
    """``"<field> is N characters; the limit is M"`` for each value over its limit, joined by ``"; "``."""
    return "; ".join(f"{name} is {len(values[name]):,} characters; the limit is {limit:,}"
                     for name, limit in limits.items() if len(values.get(name) or "") > limit)


def _header(reader: csv.DictReader[str], path: Path, text: str) -> list[str]:
    """The header's column names, checked for the required columns.

    Raises:
        InputError: the file is empty, its header cannot be parsed, or it lacks a required column.
    """
    if not text.strip():
        raise InputError(f"prospects file {path} is empty; write a header ({', '.join(PROSPECT_COLUMNS)}) "
                         "and one prospect per row")
    try:
        names = list(reader.fieldnames or [])
    except csv.Error as exc:
        raise InputError(f"prospects file {path}: the header (row 1) cannot be read ({exc})") from exc
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise InputError(
            f"prospects file {path} lacks the column(s) {', '.join(missing)}; the header needs "
            f"{', '.join(_REQUIRED)} and may have {', '.join(_OPTIONAL)}"
        )
    return names


def _records(reader: csv.DictReader[str], result: ProspectsFile) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row, values)`` per record, stripped; a record the csv module refuses (a field over its
    131,072-character limit) becomes a ``RowError`` at the row where it starts and reading goes on
    with the next line. (A refused quoted field that spans several lines may leave its later lines
    to be read, and reported, as rows of their own.)"""
    end = reader.line_num
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            limit = f"{csv.field_size_limit():,}"
            reason = (f"a field is over {limit} characters (the csv module's limit); no prospect field may be "
                      f"longer than {max(PROSPECT_LIMITS.values()):,}" if "field limit" in str(exc)
                      else f"not a CSV record ({exc})")
            result.errors.append(RowError(end + 1, reason))
            end = reader.reader.line_num
            continue
        end = reader.line_num
        yield end, {k: (v or "").strip() for k, v in record.items() if k is not None}


def read_prospects_csv(path: str | Path) -> ProspectsFile:
    """Read and validate a prospects CSV with the columns ``PROSPECT_COLUMNS``.

    Returns:
        ``ProspectsFile``: valid prospects in file order, each with its row number; one ``RowError``
        per skipped row (missing required field, invalid email, bad website URL, text that is not
        valid UTF-8, a value over ``PROSPECT_LIMITS``, a field over the csv module's limit, duplicate
        email); in ``warnings``, ``NO_WEBSITE_COLUMN`` when the header has no ``website`` and
        ``NO_ROWS`` when no row follows the header.

    Raises:
        InputError: the file is missing, empty (nothing but white space), or lacks required columns.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read prospects file {path}: {exc.strerror}; check the path") from exc
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = _header(reader, path, text)
    result = ProspectsFile(warnings=[] if "website" in columns else [NO_WEBSITE_COLUMN])
    seen: set[str] = set()
    for row, values in _records(reader, result):
        if any(_UNDECODABLE.search(v) for v in values.values()):
            result.errors.append(RowError(row, "text is not valid UTF-8; re-save the file as UTF-8"))
            continue
        empty = [c for c in _REQUIRED if not values.get(c)]
        if empty:
            result.errors.append(RowError(row, f"missing {', '.join(empty)}"))
            continue
        too_long = _too_long(values, PROSPECT_LIMITS)
        if too_long:
            result.errors.append(RowError(row, f"{too_long}; shorten it"))
            continue
        try:
            email = validate_email(values["email"], check_deliverability=False).normalized
            website = _check_website(values.get("website", ""))
            prospect = ProspectInfo(
                first_name=values["first_name"],
                last_name=values.get("last_name", ""),
                title=values.get("title", ""),
                email=email,
                company=values["company"],
                website=website,
            )
        except EmailNotValidError as exc:
            result.errors.append(RowError(row, f"invalid email {values['email']!r}: {exc}"))
            continue
        except (ValueError, ValidationError) as exc:
            result.errors.append(RowError(row, str(exc)))
            continue
        if email.lower() in seen:
            result.errors.append(RowError(row, f"duplicate email {email}"))
            continue
        seen.add(email.lower())
        result.prospects.append((row, prospect))
    if not result.prospects and not result.errors:
        result.warnings.append(NO_ROWS)
    return result


def load_offer(path: str | Path) -> Offer:
    """Load an offer from a TOML file with the fields of ``agents.schemas.Offer``.

    Raises:
        InputError: the file is missing, is not valid TOML, lacks required fields, has a value over
            ``OFFER_LIMITS`` or a ``sender_email`` that is not an e-mail address.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read offer file {path}: {exc.strerror}; check the path") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"offer file {path} is not valid TOML: {exc}") from exc
    data = data.get("offer", data)
    try:
        offer = Offer.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(str(e["loc"][0]) for e in exc.errors())
        raise InputError(
            f"offer file {path} is missing or has invalid field(s): {fields}; "
            f"required: {', '.join(n for n, f in Offer.model_fields.items() if f.is_required())}"
        ) from exc
    too_long = _too_long(offer.model_dump(), OFFER_LIMITS)
    if too_long:
        raise InputError(f"offer file {path}: {too_long}; shorten it (an email quotes the offer)")
    if offer.sender_email:
        try:
            sender_email = validate_email(offer.sender_email, check_deliverability=False).normalized
        except EmailNotValidError as exc:
            raise InputError(f"offer file {path}: sender_email {offer.sender_email!r} is not an e-mail address "
                             f"({exc}); fix it or leave it out") from exc
        offer = offer.model_copy(update={"sender_email": sender_email})
    return offer
