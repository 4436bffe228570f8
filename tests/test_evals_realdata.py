"""Loaders for the real YC company data: parsing rules on small CSVs, and the real file when present."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from evals.realdata import (
    YC_COLUMNS,
    YcCompany,
    load_yc_companies,
    website_host,
    yc_gold,
    yc_prospects,
)
from evals.scoring import score_profiles


def _row(**overrides: str) -> dict[str, str]:
    row = {c: "" for c in YC_COLUMNS}
    row.update(company_id="10", company_name="Acme Robotics", short_description="Robots for warehouses",
               long_description="Line one.\n\nLine two, with a comma.", batch="W21", status="Active",
               tags="['B2B', 'robotics']", location="Austin, TX", country="US", year_founded="2020.0",
               num_founders="2", founders_names="['Jane Q. van Doe', 'Sam Roe']", team_size="12.0",
               website="https://www.acme-robotics.com/")
    row.update(overrides)
    return row


def _write(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = YC_COLUMNS) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in rows)
    return path


def test_parses_lists_numbers_and_multiline_fields(tmp_path: Path) -> None:
    path = _write(tmp_path / "yc.csv", [
        _row(),
        _row(company_id="12", company_name="Gone Inc", status="Inactive"),
        _row(company_id="14", company_name="Consumer Co", tags="['consumer']"),
        _row(company_id="16", company_name="Bare", tags="", founders_names="[]", year_founded="",
             team_size="", website="", location=""),
    ])
    [acme] = load_yc_companies(path)
    assert acme == YcCompany(
        company_id=10, name="Acme Robotics", short_description="Robots for warehouses",
        long_description="Line one.\n\nLine two, with a comma.", batch="W21", status="Active",
        tags=["B2B", "robotics"], location="Austin, TX", country="US", year_founded=2020, num_founders=2,
        founders=["Jane Q. van Doe", "Sam Roe"], team_size=12, website="https://www.acme-robotics.com/")
    everyone = load_yc_companies(path, status=None, tag=None)
    assert [c.name for c in everyone] == ["Acme Robotics", "Gone Inc", "Consumer Co", "Bare"]
    assert everyone[3].tags == [] and everyone[3].year_founded is None and everyone[3].team_size is None
    assert [c.name for c in load_yc_companies(path, status="inactive", tag=None)] == ["Gone Inc"]
    assert [c.name for c in load_yc_companies(path, status=None, tag="consumer")] == ["Consumer Co"]
    assert len(load_yc_companies(path, status=None, tag=None, limit=2)) == 2


def test_prospects_and_gold(tmp_path: Path) -> None:
    path = _write(tmp_path / "yc.csv", [
        _row(),
        _row(company_id="12", company_name="Zoë Labs", founders_names="['Zoë Müller']",
             website="zoelabs.io", year_founded="", team_size=""),
        _row(company_id="14", company_name="Solo", founders_names="['Cher']", website="https://solo.dev"),
        _row(company_id="16", company_name="No Site", website=""),
        _row(company_id="18", company_name="No Founder", founders_names="[]"),
    ])
    companies = load_yc_companies(path)
    assert yc_prospects(companies) == [
        {"first_name": "Jane", "last_name": "van Doe", "title": "Founder",
         "email": "jane.vandoe@acme-robotics.com", "company": "Acme Robotics",
         "website": "https://www.acme-robotics.com/"},
        {"first_name": "Zoë", "last_name": "Müller", "title": "Founder", "email": "zoe.muller@zoelabs.io",
         "company": "Zoë Labs", "website": "zoelabs.io"},
        {"first_name": "Cher", "last_name": "", "title": "Founder", "email": "cher@solo.dev",
         "company": "Solo", "website": "https://solo.dev"},
    ]
    gold = yc_gold(companies)
    assert gold["Acme Robotics"] == {"location": "Austin, TX", "employee_count": "12", "founded_year": "2020"}
    assert gold["Zoë Labs"] == {"location": "Austin, TX", "employee_count": "", "founded_year": ""}
    assert len(gold) == 5


def test_malformed_rows_are_named_and_never_evaluated(tmp_path: Path) -> None:
    bad_tags = _write(tmp_path / "a.csv", [_row(tags="__import__('os').system('echo hacked')")])
    with pytest.raises(ValueError, match=r"a\.csv line \d+ \(company_id '10'\): column 'tags'"):
        load_yc_companies(bad_tags)
    not_strings = _write(tmp_path / "b.csv", [_row(founders_names="[1, 2]")])
    with pytest.raises(ValueError, match="founders_names.*list of strings"):
        load_yc_companies(not_strings)
    bad_number = _write(tmp_path / "c.csv", [_row(team_size="a dozen")])
    with pytest.raises(ValueError, match="team_size"):
        load_yc_companies(bad_number)
    missing = _write(tmp_path / "d.csv", [_row()], columns=YC_COLUMNS[:-2])
    with pytest.raises(ValueError, match="missing columns.*cb_url"):
        load_yc_companies(missing)
    with pytest.raises(FileNotFoundError, match="shared/realdata"):
        load_yc_companies(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="limit"):
        load_yc_companies(bad_tags, limit=-1)


def test_website_host() -> None:
    assert website_host("https://www.Yarn.so/about") == "yarn.so"
    assert website_host("getfluently.app/") == "getfluently.app"
    assert website_host("http://app.example.com:8080") == "app.example.com"
    assert website_host("https://") == "" and website_host("") == ""


def test_real_yc_file(realdata: Path) -> None:
    csv_path = realdata / "companies" / "yc_companies_even_ids.csv"
    companies = load_yc_companies(csv_path)
    assert 350 <= len(companies) <= 450
    assert all(c.status == "Active" and "b2b" in [t.lower() for t in c.tags] for c in companies)
    assert len({c.company_id for c in companies}) == len(companies)
    assert all(c.company_id % 2 == 0 for c in companies)
    with_year = [c for c in companies if c.year_founded is not None]
    assert len(with_year) > 0.9 * len(companies)
    assert all(1950 <= c.year_founded <= 2025 for c in with_year if c.year_founded is not None)

    prospects = yc_prospects(companies)
    assert len(prospects) > 0.95 * len(companies)
    email = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)?@[a-z0-9.-]+\.[a-z]+")
    assert all(email.fullmatch(p["email"]) and p["title"] == "Founder" for p in prospects)

    gold = yc_gold(companies)
    assert all(v["employee_count"].isdigit() or v["employee_count"] == "" for v in gold.values())
    assert all(v["founded_year"].isdigit() or v["founded_year"] == "" for v in gold.values())
    scores = score_profiles(gold, gold, fields=("location", "employee_count", "founded_year"),
                            ignore_missing_gold=True)
    assert scores.micro.f1 == 1.0 and scores.micro.n_gold > 2 * len(companies)

    assert len(load_yc_companies(csv_path, limit=5)) == 5
    assert len(load_yc_companies(csv_path, status=None, tag=None)) == 2312
