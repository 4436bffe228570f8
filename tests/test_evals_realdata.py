"""The real YC company data: loaders and parsing rules on small CSVs, the measurement behind
``outreach realdata companies`` (attribution counted from the store, end to end on a tiny corpus and on
a few dozen real rows when ``../shared/realdata`` is present)."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import re
from pathlib import Path

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from agents.schemas import Offer
from evals.realdata import (
    YC_COLUMNS,
    YC_RENDERINGS,
    YcCompany,
    YcFigures,
    import_yc_corpus,
    load_yc_companies,
    measure_yc_companies,
    website_host,
    yc_figures,
    yc_gold,
    yc_prospects,
)
from evals.scoring import count_range, score_profiles, value_matches
from store import open_store, session_scope
from store.models import Campaign, EmailRecord, FactRecord, ProfileRecord, Prospect, Run, RunStatus
from tools import Corpus

OFFER = Offer(sender_name="Dana Whitfield", sender_title="Account Executive", sender_company="Ledgerline",
              product="Ledgerline", value_proposition="cuts month-end close time by automating reconciliation",
              call_to_action="Would a 20-minute call next week be useful?")


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


def test_employee_counts_keep_their_qualifiers() -> None:
    assert count_range("120") == count_range("about 120 people") == (120, 120)
    assert count_range("11-50") == count_range("between 11 and 50") == count_range("11 to 50 employees") == (11, 50)
    assert count_range("less than 10") == count_range("under 10") == count_range("<10") == (0, 9)
    assert count_range("up to 10") == (0, 10)
    assert count_range("over 2,000") == count_range("more than 2000") == (2001, math.inf)
    assert count_range("2,000+") == count_range("at least 2000") == (2000, math.inf)
    assert count_range("discover 10") == (10, 10)  # "over" inside a word qualifies nothing
    assert count_range("a handful") is None
    # The row's team size must be consistent with what the fact states ("less than 10" is not 10).
    assert value_matches("employee_count", "less than 10", "7")
    assert not value_matches("employee_count", "less than 10", "10")
    assert value_matches("employee_count", "11-50", "30") and not value_matches("employee_count", "11-50", "60")
    assert value_matches("employee_count", "over 2,000", "2312")
    assert not value_matches("employee_count", "over 2,000", "1500", employee_tolerance=0.25)
    # The tolerance is how far outside the stated range the row may lie, as a fraction of the row's count.
    assert value_matches("employee_count", "11-50", "60", employee_tolerance=0.25)
    assert value_matches("employee_count", "8", "10", employee_tolerance=0.25)
    assert not value_matches("employee_count", "7", "10", employee_tolerance=0.25)


def _store_run(engine: Engine, campaign_id: int, company: YcCompany, facts: list[tuple[str, str, str]],
               body: str | None, *, valid: bool = True, drops: dict[str, int] | None = None) -> None:
    """One finished run of ``company``'s prospect: its profile (``(field, value, source_url)`` facts) and email."""
    [info] = yc_prospects([company])
    with session_scope(engine) as session:
        prospect = Prospect(campaign_id=campaign_id, **info)  # type: ignore[arg-type]
        session.add(prospect)
        session.flush()
        run = Run(campaign_id=campaign_id, prospect_id=prospect.id,  # type: ignore[arg-type]
                  status=RunStatus.DONE if facts else RunStatus.NO_FACTS)
        session.add(run)
        session.flush()
        drops = drops or {}
        profile = ProfileRecord(run_id=run.id, company=company.name, website=company.website,  # type: ignore[arg-type]
                                dropped_facts=sum(drops.values()), drop_reasons=drops)
        session.add(profile)
        session.flush()
        for field, value, url in facts:
            session.add(FactRecord(profile_id=profile.id, field=field, value=value,  # type: ignore[arg-type]
                                   evidence=f"{company.name} {value}.", source_url=url))
        if body is not None:
            session.add(EmailRecord(run_id=run.id, subject_template="Hello {{company}}",  # type: ignore[arg-type]
                                    body_template=body, subject="Hello", body="...", valid=valid))


def test_figures_count_facts_from_another_companys_page_and_the_emails_using_them(sqlite_engine: Engine) -> None:
    with session_scope(sqlite_engine) as session:
        campaign = Campaign(name="yc", offer=OFFER.model_dump())
        session.add(campaign)
        session.flush()
        cid = campaign.id
    assert cid is not None
    acme, beta, gamma, delta, eps, atlas, atlas2 = (
        YcCompany(company_id=i, name=name, website=site, founders=[founder], location=loc, team_size=size,
                  year_founded=year)
        for i, (name, site, founder, loc, size, year) in enumerate([
            ("Acme", "https://www.acme.io", "Ann Lee", "San Francisco", 30, 2020),
            ("Beta", "beta.dev", "Bo Ruiz", "Barcelona, Spain", 4, None),
            ("Gamma", "gamma.com", "Gil Ma", "", 12, 2019),
            ("Delta", "delta.ai", "Di Do", "Austin", None, None),
            ("Eps", "eps.ai", "Ed Po", "Oslo", 3, 2021),
            ("Atlas", "atlas.so", "Al Tas", "Paris", None, None),  # two YC companies are called Atlas
            ("Atlas", "atlas.build", "Ty Las", "Lagos", None, None),
        ]))
    # Acme: own site (a subdomain counts as its own), used in the email: fine.
    _store_run(sqlite_engine, cid, acme, [("location", "San Francisco", "https://blog.acme.io/about"),
                                          ("employee_count", "11-50", "https://acme.io")],
               "We saw {{company}} is in {{fact.location}}.")
    # Beta: a location from Acme's page, used in its valid email: the failure the target counts.
    _store_run(sqlite_engine, cid, beta, [("location", "San Francisco", "https://acme.io/")],
               "Teams in {{ fact.location }} like {{company}}.", drops={"misattributed": 2})
    # Gamma: a founding year from another page that its email does not use; an invalid email does not count.
    _store_run(sqlite_engine, cid, gamma, [("founded_year", "2019", "https://news.example/roundup"),
                                           ("industry", "logistics", "https://gamma.com")],
               "{{company}} works in {{fact.industry}}.")
    _store_run(sqlite_engine, cid, delta, [("location", "Austin", "https://acme.io/")], "{{fact.location}}",
               valid=False)
    _store_run(sqlite_engine, cid, eps, [], None, drops={"ungrounded": 1})
    _store_run(sqlite_engine, cid, atlas, [("location", "Paris", "https://atlas.so")], None)
    _store_run(sqlite_engine, cid, atlas2, [("location", "Lagos", "https://atlas.build")], None)

    figures = yc_figures(sqlite_engine, "yc", [acme, beta, gamma, delta, eps, atlas, atlas2])

    assert (figures.prospects, figures.done, figures.no_facts, figures.failed) == (7, 6, 1, 0)
    assert figures.facts_kept == 8 and figures.dropped_facts == 3
    assert figures.drop_reasons == {"ungrounded": 1, "misattributed": 2, "bad_value": 0}
    assert figures.foreign_facts == 3 and figures.valid_emails == 3 and figures.emails_using_foreign_facts == 1
    assert [(f.company, f.field, f.in_valid_email) for f in figures.foreign_examples] == [
        ("Beta", "location", True), ("Gamma", "founded_year", False), ("Delta", "location", False)]
    assert figures.targets_met["no_email_uses_foreign_fact"] is False
    loc, staff, year = (figures.scores.per_field[f] for f in ("location", "employee_count", "founded_year"))
    # Beta's borrowed San Francisco is wrong for Barcelona; each Atlas is scored against its own row.
    assert (loc.tp, loc.n_pred, loc.n_gold) == (4, 5, 6)
    assert (staff.tp, staff.n_pred, staff.n_gold) == (1, 1, 4)  # "11-50" holds Acme's 30
    assert (year.tp, year.n_pred, year.n_gold) == (1, 1, 3)
    assert figures.targets_met["precision"] is False  # 6 of 7
    with pytest.raises(KeyError, match="nope"):
        yc_figures(sqlite_engine, "nope", [acme])


def _tiny_csv(tmp_path: Path) -> Path:
    return _write(tmp_path / "yc.csv", [
        _row(company_id="2", company_name="Acme Robotics", website="https://acme-robotics.com",
             short_description="Warehouse robots",
             long_description=("Acme Robotics is based in San Francisco, CA. "
                               "We build warehouse robots, unlike Beta Labs."),
             location="San Francisco", founders_names="['Ann Lee']"),
        _row(company_id="4", company_name="Beta Labs", website="https://betalabs.io", location="Barcelona, Spain",
             short_description="Invoicing software",
             long_description="Beta Labs builds invoicing software for accountants.", founders_names="['Bo Ruiz']"),
        _row(company_id="6", company_name="Gone Co", status="Inactive", website="https://gone.example"),
    ])


def test_measure_keeps_another_rows_location_from_the_prospect(tmp_path: Path) -> None:
    csv_path = _tiny_csv(tmp_path)
    engine = open_store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    corpus = Corpus(tmp_path / "corpus.sqlite")
    figures = asyncio.run(measure_yc_companies(csv_path, engine=engine, corpus=corpus, rendering="prose",
                                               offer=OFFER, campaign="yc-prose"))

    assert isinstance(figures, YcFigures) and figures.rendering == "prose"
    assert figures.corpus_documents == 2 == len(corpus)  # the Active rows only
    assert figures.prospects == 2 and figures.failed == 0
    assert corpus.search('"Beta Labs"')  # Acme's page names Beta Labs, so Beta's research can read it
    # "Based in San Francisco" is Acme's: Beta's research drops it as misattributed, Acme keeps it.
    assert figures.drop_reasons["misattributed"] >= 1
    assert figures.foreign_facts == 0 and figures.emails_using_foreign_facts == 0
    location = figures.scores.per_field["location"]
    assert (location.tp, location.n_pred, location.n_gold) == (1, 1, 2)
    assert not any(m.company.startswith("Beta Labs <") and m.predicted for m in figures.scores.mismatches)
    with pytest.raises(ValueError, match="already holds 2 documents"):
        asyncio.run(measure_yc_companies(csv_path, engine=engine, corpus=corpus, rendering="prose", offer=OFFER,
                                         campaign="other"))
    with pytest.raises(ValueError, match="already in the store"):
        asyncio.run(measure_yc_companies(csv_path, engine=engine, corpus=Corpus(tmp_path / "c2.sqlite"),
                                         rendering="prose", offer=OFFER, campaign="yc-prose"))
    with pytest.raises(ValueError, match="rendering 'html'"):
        import_yc_corpus(csv_path, Corpus(":memory:"), "html")


def test_realdata_companies_command(tmp_path: Path) -> None:
    from outreach.cli import app

    csv_path = _tiny_csv(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "directory-store.sqlite").write_text("stale", encoding="utf-8")  # replaced, never resumed
    result = CliRunner().invoke(app, ["realdata", "companies", "--csv", str(csv_path), "--out", str(out),
                                      "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "valid emails" in result.output and "prose" in result.output and "load average" in result.output
    saved = {r: json.loads((out / f"{r}.json").read_text(encoding="utf-8")) for r in YC_RENDERINGS}
    assert all(fig["prospects"] == 1 and fig["corpus_documents"] == 2 for fig in saved.values())
    assert saved["directory"]["scores"]["micro"]["tp"] == 3  # the labelled fields of Acme's own row
    bad = CliRunner().invoke(app, ["realdata", "companies", "--csv", str(csv_path), "--rendering", "html"])
    assert bad.exit_code == 2 and "--rendering 'html'" in bad.output


def test_real_rows_measured_in_both_renderings(realdata: Path, tmp_path: Path) -> None:
    source = realdata / "companies" / "yc_companies_even_ids.csv"
    with source.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if r["status"] == "Active"][:24]
    subset = tmp_path / "subset.csv"
    with subset.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for rendering in YC_RENDERINGS:
        folder = tmp_path / rendering
        figures = asyncio.run(measure_yc_companies(
            subset, engine=open_store(f"sqlite:///{folder / 'store.sqlite'}"), corpus=Corpus(folder / "corpus.sqlite"),
            rendering=rendering, offer=OFFER, campaign=f"yc-{rendering}", limit=20))
        assert figures.corpus_documents == len(rows) and figures.prospects == 20 and figures.failed == 0
        assert figures.scores.micro.n_gold > 40
        assert figures.foreign_facts <= figures.facts_kept
        assert figures.emails_using_foreign_facts == 0
        assert figures.valid_emails <= figures.done
        if rendering == "directory":  # the labelled fields are on each company's own page
            assert figures.scores.micro.precision >= 0.95 and figures.scores.micro.recall >= 0.9
            assert figures.foreign_facts == 0 and figures.valid_emails >= 18


@pytest.mark.slow
def test_realdata_companies_runs_a_miniature_registered_in_the_named_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rendering's campaign has its own new store; a `miniature:` writer comes from `--store`'s registry."""
    pytest.importorskip("peft")
    from sqlmodel import Session, select

    from miniatures.registry import register_miniature
    from outreach.cli import app
    from store.models import Trace
    from tests.miniature_fixtures import build_adapter, build_tiny_base

    base = build_tiny_base(tmp_path / "base", context=4096)
    adapter = build_adapter(base, tmp_path / "adapter", seed=1)
    registry = open_store(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    register_miniature(registry, name="tiny-writer", agent="writer", base_model=str(base), adapter_path=str(adapter),
                       training_config={}, dataset_hash="h", metrics={})
    registry.dispose()
    monkeypatch.setenv("OUTREACH_WRITER", "miniature:tiny-writer")
    csv_path, out = _tiny_csv(tmp_path), tmp_path / "out"
    args = ["realdata", "companies", "--csv", str(csv_path), "--out", str(out), "--limit", "1",
            "--rendering", "directory"]

    unnamed = CliRunner().invoke(app, [*args, "--store", f"sqlite:///{tmp_path / 'other.sqlite'}"])
    assert unnamed.exit_code == 2 and "Nothing was run" in unnamed.output
    assert not (out / "directory.json").exists()

    result = CliRunner().invoke(app, [*args, "--store", f"sqlite:///{tmp_path / 'registry.sqlite'}"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "directory.json").read_text(encoding="utf-8"))["prospects"] == 1
    measured = open_store(f"sqlite:///{out / 'directory-store.sqlite'}")
    with Session(measured) as session:
        backends = {(t.agent, t.backend) for t in session.exec(select(Trace)).all()}
    measured.dispose()
    assert ("writer", "miniature:tiny-writer") in backends and ("researcher", "heuristic") in backends
