"""Loaders for the real company data in ``../shared/realdata`` (never copied into the repository).

``companies/yc_companies_even_ids.csv`` holds real Y Combinator companies (source: github.com/corralm/
yc-scraper, MIT; see ``../shared/realdata/README.md``). Columns: company_id, company_name,
short_description, long_description, batch, status, tags (a Python-list string), location, country,
year_founded (float), num_founders, founders_names (a Python-list string), team_size (float), website,
cb_url, linkedin_url. Quoted fields span several lines.

``load_yc_companies`` parses it into ``YcCompany`` rows, ``yc_prospects`` turns those into prospects
(the first founder as the contact) and ``yc_gold`` into gold for ``evals.scoring.score_profiles``
(location, employee_count, founded_year).
"""

from __future__ import annotations

import ast
import csv
import logging
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

__all__ = [
    "YC_COLUMNS",
    "YC_GOLD_FIELDS",
    "YcCompany",
    "load_yc_companies",
    "website_host",
    "yc_gold",
    "yc_prospects",
]

logger = logging.getLogger(__name__)

#: Columns ``load_yc_companies`` needs in the CSV header.
YC_COLUMNS: tuple[str, ...] = (
    "company_id", "company_name", "short_description", "long_description", "batch", "status", "tags",
    "location", "country", "year_founded", "num_founders", "founders_names", "team_size", "website",
    "cb_url", "linkedin_url",
)

#: Profile fields that ``yc_gold`` fills.
YC_GOLD_FIELDS: tuple[str, ...] = ("location", "employee_count", "founded_year")


class YcCompany(BaseModel):
    """One row of the YC companies CSV, parsed.

    Numbers that the CSV writes as floats (``"2024.0"``) are integers here; missing numbers are None;
    ``tags`` and ``founders`` are lists parsed from their Python-list strings.
    """

    company_id: int
    name: str
    short_description: str = ""
    long_description: str = ""
    batch: str = ""
    status: str = ""
    tags: list[str] = Field(default_factory=list)
    location: str = ""
    country: str = ""
    year_founded: int | None = None
    num_founders: int | None = None
    founders: list[str] = Field(default_factory=list)
    team_size: int | None = None
    website: str = ""
    cb_url: str = ""
    linkedin_url: str = ""


def _parse_list(raw: str, *, column: str, where: str) -> list[str]:
    """Parse a Python-list string like ``"['b2b', 'fintech']"`` with ``ast.literal_eval`` (no code runs)."""
    raw = raw.strip()
    if not raw:
        return []
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"{where}: column {column!r} is not a Python list literal "
                         f"({raw[:60]!r}): {exc}") from exc
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: column {column!r} must be a list of strings, got {raw[:60]!r}")
    return [v.strip() for v in value if v.strip()]


def _parse_number(raw: str, *, column: str, where: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        number = float(raw)
    except ValueError as exc:
        raise ValueError(f"{where}: column {column!r} must be a number like '2019.0', got {raw!r}") from exc
    if number != number or not number.is_integer():  # NaN or a fraction
        raise ValueError(f"{where}: column {column!r} must be a whole number, got {raw!r}")
    return int(number)


def load_yc_companies(
    csv_path: Path,
    *,
    status: str | None = "Active",
    tag: str | None = "b2b",
    limit: int | None = None,
) -> list[YcCompany]:
    """Load YC companies from the CSV, filtered by status and tag.

    Args:
        csv_path: path of ``yc_companies_even_ids.csv`` (in ``../shared/realdata/companies/``).
        status: keep rows whose ``status`` equals this (case-insensitive); None keeps all.
        tag: keep rows whose ``tags`` contain this tag (case-insensitive); None keeps all.
        limit: keep at most this many rows (file order); None keeps all.

    Returns:
        YcCompany rows in file order (about 400 for the defaults).

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: the header lacks a column of ``YC_COLUMNS``, ``limit`` is negative, or a row has a
            malformed list or number (the message names the line and company_id).
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"YC companies CSV {path} not found; it lives in "
                                "../shared/realdata/companies/yc_companies_even_ids.csv")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 or None")
    want_status = status.casefold() if status else None
    want_tag = tag.casefold() if tag else None
    out: list[YcCompany] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in YC_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected the yc-scraper header "
                             f"{list(YC_COLUMNS)}")
        for row in reader:
            if limit is not None and len(out) >= limit:
                break
            where = f"{path.name} line {reader.line_num} (company_id {row.get('company_id')!r})"
            if want_status and (row["status"] or "").strip().casefold() != want_status:
                continue
            tags = _parse_list(row["tags"] or "", column="tags", where=where)
            if want_tag and want_tag not in (t.casefold() for t in tags):
                continue
            company_id = _parse_number(row["company_id"] or "", column="company_id", where=where)
            if company_id is None:
                raise ValueError(f"{where}: company_id is empty")
            out.append(YcCompany(
                company_id=company_id,
                name=(row["company_name"] or "").strip(),
                short_description=(row["short_description"] or "").strip(),
                long_description=(row["long_description"] or "").strip(),
                batch=(row["batch"] or "").strip(),
                status=(row["status"] or "").strip(),
                tags=tags,
                location=(row["location"] or "").strip(),
                country=(row["country"] or "").strip(),
                year_founded=_parse_number(row["year_founded"] or "", column="year_founded", where=where),
                num_founders=_parse_number(row["num_founders"] or "", column="num_founders", where=where),
                founders=_parse_list(row["founders_names"] or "", column="founders_names", where=where),
                team_size=_parse_number(row["team_size"] or "", column="team_size", where=where),
                website=(row["website"] or "").strip(),
                cb_url=(row["cb_url"] or "").strip(),
                linkedin_url=(row["linkedin_url"] or "").strip(),
            ))
    logger.info("loaded %d YC companies from %s (status=%s, tag=%s)", len(out), path, status, tag)
    return out


def website_host(website: str) -> str:
    """Host of a website URL without ``www.``, lower case (``"https://www.Yarn.so/x"`` -> ``"yarn.so"``).

    A URL without a scheme (``"yarn.so"``) is read as ``https://``. Returns ``""`` when there is no host.
    """
    website = website.strip()
    if not website:
        return ""
    if "://" not in website:
        website = f"https://{website}"
    host = (urlsplit(website).hostname or "").lower()
    return host.removeprefix("www.")


def _email_part(name: str) -> str:
    """ASCII letters, digits and hyphens of a name part, lower case (``"Müller"`` -> ``"muller"``)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9-]", "", ascii_name.lower()).strip("-")


def yc_prospects(companies: Sequence[YcCompany]) -> list[dict[str, str]]:
    """Make one prospect per company: the first founder, titled "Founder".

    The email is ``first.last@<website host without www>`` (ASCII-folded, lower case; several last-name
    words are joined without separator; ``first@host`` for a one-word name). These addresses are
    guesses for offline tests and evaluation, never for sending; middle initials are dropped. Companies
    without founders, a usable founder name or a website are skipped (logged at INFO).

    Args:
        companies: rows from ``load_yc_companies``.

    Returns:
        Dicts with the keys first_name, last_name, title, email, company, website (``ProspectInfo``
        fields), in input order.
    """
    prospects: list[dict[str, str]] = []
    for company in companies:
        host = website_host(company.website)
        if not company.founders or not host:
            logger.info("YC company %r skipped: no founder name or website", company.name)
            continue
        first, _, rest = company.founders[0].strip().partition(" ")
        last = " ".join(w for w in rest.split() if len(w.rstrip(".")) > 1)  # drop middle initials ("D.")
        first_part, last_part = _email_part(first), "".join(_email_part(p) for p in last.split())
        if not first_part:
            logger.info("YC company %r skipped: founder name %r has no ASCII letters", company.name,
                        company.founders[0])
            continue
        local = f"{first_part}.{last_part}" if last_part else first_part
        prospects.append({
            "first_name": first,
            "last_name": last,
            "title": "Founder",
            "email": f"{local}@{host}",
            "company": company.name,
            "website": company.website,
        })
    return prospects


def yc_gold(companies: Sequence[YcCompany]) -> dict[str, dict[str, str]]:
    """Gold facts for ``evals.scoring.score_profiles``: location, employee_count, founded_year.

    ``location`` is the CSV's ``location`` column as written (``"San Francisco"``, ``"London, United
    Kingdom"``), ``employee_count`` the team size and ``founded_year`` the year, as digit strings; any of
    them is ``""`` when the CSV leaves it empty. Team sizes are a snapshot (May 2024): score them with an
    ``employee_tolerance``. When two rows share a name the first is kept (logged as a warning).

    Args:
        companies: rows from ``load_yc_companies``.

    Returns:
        ``{company name: {field: value}}`` with the keys of ``YC_GOLD_FIELDS``.
    """
    gold: dict[str, dict[str, str]] = {}
    for company in companies:
        if company.name in gold:
            logger.warning("YC company name %r appears twice; keeping the first row", company.name)
            continue
        gold[company.name] = {
            "location": company.location,
            "employee_count": "" if company.team_size is None else str(company.team_size),
            "founded_year": "" if company.year_founded is None else str(company.year_founded),
        }
    return gold
