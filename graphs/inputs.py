"""Campaign inputs: a prospects CSV and an offer TOML, validated row by row.

A malformed row (missing field, invalid email, bad website URL, bytes that are not UTF-8) is
reported with its row number (the header is row 1) and skipped; the other rows go on.
"""

from __future__ import annotations

import csv
import io
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from email_validator import EmailNotValidError, validate_email
from pydantic import ValidationError

from agents.schemas import Offer, ProspectInfo

__all__ = ["PROSPECT_COLUMNS", "InputError", "ProspectsFile", "RowError", "load_offer", "read_prospects_csv"]

#: Required columns of a prospects CSV (``last_name``, ``title`` and ``website`` may be empty).
PROSPECT_COLUMNS = ("first_name", "last_name", "title", "email", "company", "website")
_REQUIRED = ("first_name", "email", "company")
_UNDECODABLE = re.compile("[\udc80-\udcff]")


class InputError(ValueError):
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
    """The valid prospects of a CSV with their row numbers, and the rows that were skipped."""

    prospects: list[tuple[int, ProspectInfo]] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


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


def read_prospects_csv(path: str | Path) -> ProspectsFile:
    """Read and validate a prospects CSV with the columns ``PROSPECT_COLUMNS``.

    Returns:
        ``ProspectsFile``: valid prospects in file order, each with its row number, and one
        ``RowError`` per skipped row (missing required field, invalid email, bad website URL, text
        that is not valid UTF-8, duplicate email).

    Raises:
        InputError: the file is missing, empty, or lacks required columns.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read prospects file {path}: {exc.strerror}; check the path") from exc
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(
            f"prospects file {path} lacks the column(s) {', '.join(missing)}; "
            f"expected a header with {', '.join(PROSPECT_COLUMNS)}"
        )
    result = ProspectsFile()
    seen: set[str] = set()
    for record in reader:
        row = reader.line_num
        values = {k: (v or "").strip() for k, v in record.items() if k is not None}
        if any(_UNDECODABLE.search(v) for v in values.values()):
            result.errors.append(RowError(row, "text is not valid UTF-8; re-save the file as UTF-8"))
            continue
        empty = [c for c in _REQUIRED if not values.get(c)]
        if empty:
            result.errors.append(RowError(row, f"missing {', '.join(empty)}"))
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
    return result


def load_offer(path: str | Path) -> Offer:
    """Load an offer from a TOML file with the fields of ``agents.schemas.Offer``.

    Raises:
        InputError: the file is missing, is not valid TOML, or lacks required fields.
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
        return Offer.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(str(e["loc"][0]) for e in exc.errors())
        raise InputError(
            f"offer file {path} is missing or has invalid field(s): {fields}; "
            f"required: {', '.join(n for n, f in Offer.model_fields.items() if f.is_required())}"
        ) from exc
