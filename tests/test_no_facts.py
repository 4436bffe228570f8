"""No fact, no fake personalisation: a prospect whose research keeps no verified fact ends ``no_facts``
with no email (or, when the campaign opts in, a non-personalised one, labelled so in exports), and the
dropped facts' reasons reach the store, the campaign summary and the eval report.

Research is replaced by a fake that returns hand-made profiles (``drop_reasons`` set directly), so these
tests hold whatever grounding decides; one test runs the real researcher on a page that states nothing.
"""

from __future__ import annotations

import asyncio
import csv
import email
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import tomli_w
from sqlalchemy import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

import graphs.campaign
from agents.schemas import EmailDraft, Fact, Offer, Profile, ProspectInfo, RenderedEmail, ResearchResult
from agents.validation import validate_email
from evals.campaigns import campaign_summary, collect_rows
from evals.report import render_html
from evals.runner import EvalConfig, EvalSet, run_eval
from graphs.models import ModelPool
from graphs.runner import add_prospects, run_campaign
from outreach.exports import export_emails, load_emails
from store.models import EmailRecord, ProfileRecord, Run, RunStatus, Trace
from tests.helpers import scripted
from tools.types import Document, SearchHit

OFFER = Offer(sender_name="Dana Whitfield", sender_title="Account Executive", sender_company="Ledgerline",
              product="Ledgerline", value_proposition="cuts month-end close time by automating reconciliation",
              call_to_action="Would a 20-minute call next week be useful?")

ACME = ProspectInfo(first_name="Ana", last_name="Ruiz", title="CFO", email="ana@acme-robotics.example",
                    company="Acme Robotics", website="https://acme-robotics.example")
ZYX = ProspectInfo(first_name="Zed", last_name="Quorn", title="CTO", email="zed@zyxqv.example",
                   company="Zyxqv", website="https://zyxqv.example")
ACME_FACT = Fact(field="location", value="Austin, Texas", evidence="Acme Robotics is based in Austin, Texas.",
                 source_url="https://acme-robotics.example/about")
#: What the fake researcher finds per company: facts kept and drops by reason.
PROFILES: dict[str, Profile] = {
    "Acme Robotics": Profile(company="Acme Robotics", website=ACME.website, facts=[ACME_FACT], dropped_facts=1,
                             drop_reasons={"ungrounded": 1}, sources=[ACME_FACT.source_url]),
    "Zyxqv": Profile(company="Zyxqv", website=ZYX.website, dropped_facts=3,
                     drop_reasons={"misattributed": 2, "bad_value": 1},
                     sources=["https://zyxqv.example/", "https://news.example/roundup"]),
}


@pytest.fixture
def fake_research(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the campaign graph's research step by one returning ``PROFILES``; returns the companies
    researched, in call order."""
    calls: list[str] = []

    async def research(prospect: ProspectInfo, **_: object) -> ResearchResult:
        calls.append(prospect.company)
        return ResearchResult(profile=PROFILES[prospect.company].model_copy(deep=True),
                              queries=[prospect.company], fetch_errors=["fetch https://zyxqv.example/team: 404"]
                              if prospect.company == "Zyxqv" else [])

    monkeypatch.setattr(graphs.campaign, "research", research)
    return calls


def _rows(engine: Engine, model):  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        return list(s.exec(select(model)).all())


def _run(engine: Engine, **kwargs: object):  # type: ignore[no-untyped-def]
    return asyncio.run(run_campaign(engine, "c", web=None, **kwargs))  # type: ignore[arg-type]


def test_no_fact_prospect_ends_no_facts_with_no_email(sqlite_engine: Engine, fake_research: list[str]) -> None:
    add_prospects(sqlite_engine, "c", OFFER, [(2, ACME), (3, ZYX)])
    report = _run(sqlite_engine, concurrency=1)
    assert (report.total, report.done, report.no_facts, report.failed) == (2, 1, 1, 0)
    (without,) = report.without_facts
    assert without[0] == ZYX.email
    assert "no verified fact" in without[1] and "misattributed 2, bad_value 1" in without[1] and "404" in without[1]
    runs = {r.prospect_id: r for r in _rows(sqlite_engine, Run)}
    assert [runs[1].status, runs[2].status] == [RunStatus.DONE, RunStatus.NO_FACTS]
    assert runs[2].error == without[1]
    # no email and no writer call for the prospect without facts
    emails = _rows(sqlite_engine, EmailRecord)
    assert [e.run_id for e in emails] == [runs[1].id] and emails[0].valid and emails[0].personalised
    assert {t.run_id for t in _rows(sqlite_engine, Trace) if t.agent == "writer"} == {runs[1].id}
    # drop reasons are persisted per profile, and summed in the summary
    reasons = {p.company: p.drop_reasons for p in _rows(sqlite_engine, ProfileRecord)}
    assert reasons == {"Acme Robotics": {"ungrounded": 1}, "Zyxqv": {"misattributed": 2, "bad_value": 1}}
    summary = campaign_summary(sqlite_engine, "c")
    assert (summary.done, summary.no_facts, summary.failed, summary.valid_emails, summary.unpersonalised_emails) \
        == (1, 1, 0, 1, 0)
    assert summary.dropped_facts == 4
    assert summary.drop_reasons == {"ungrounded": 1, "misattributed": 2, "bad_value": 1}
    rows, _ = collect_rows(sqlite_engine, "c")
    zyx = rows[ZYX.email].profile
    assert zyx is not None and zyx.drop_reasons["misattributed"] == 2


def test_no_facts_runs_are_finished_on_resume_and_rerun_only_when_asked(
    sqlite_engine: Engine, fake_research: list[str]
) -> None:
    add_prospects(sqlite_engine, "c", OFFER, [(2, ACME), (3, ZYX)])
    _run(sqlite_engine)
    again = _run(sqlite_engine, retry_failed=True)
    assert (again.total, again.skipped) == (0, 2)  # done and no_facts are both finished
    assert sorted(fake_research) == ["Acme Robotics", "Zyxqv"]
    retried = _run(sqlite_engine, retry_no_facts=True)
    assert (retried.total, retried.no_facts, retried.skipped) == (1, 1, 1)
    assert fake_research[-1] == "Zyxqv"
    (run,) = [r for r in _rows(sqlite_engine, Run) if r.status == RunStatus.NO_FACTS]
    assert run.attempts == 2 and len(_rows(sqlite_engine, ProfileRecord)) == 2  # replaced, not duplicated


def test_opted_in_campaign_writes_a_labelled_non_personalised_email(
    sqlite_engine: Engine, fake_research: list[str], tmp_path: Path
) -> None:
    add_prospects(sqlite_engine, "c", OFFER, [(2, ACME), (3, ZYX)])
    report = _run(sqlite_engine, unpersonalised_emails=True, concurrency=1)
    assert (report.done, report.no_facts, report.failed) == (1, 1, 0)
    by_run = {e.run_id: e for e in _rows(sqlite_engine, EmailRecord)}
    runs = {r.prospect_id: r for r in _rows(sqlite_engine, Run)}
    plain = by_run[runs[2].id]
    assert plain.valid and not plain.personalised and "{{fact." not in plain.body_template
    assert runs[2].status == RunStatus.NO_FACTS and by_run[runs[1].id].personalised
    summary = campaign_summary(sqlite_engine, "c")
    assert (summary.valid_emails, summary.unpersonalised_emails, summary.no_facts) == (2, 1, 1)

    exported = {e.to_email: e for e in load_emails(sqlite_engine, "c")}
    assert (exported[ACME.email].personalised, exported[ZYX.email].personalised) == (True, False)
    export_emails(list(exported.values()), "csv", tmp_path / "e.csv")
    with (tmp_path / "e.csv").open(encoding="utf-8") as fh:
        assert {r["to_email"]: r["personalised"] for r in csv.DictReader(fh)} == {ACME.email: "True",
                                                                                    ZYX.email: "False"}
    export_emails(list(exported.values()), "jsonl", tmp_path / "e.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["to_email"]: r["personalised"] for r in lines} == {ACME.email: True, ZYX.email: False}
    export_emails(list(exported.values()), "eml", tmp_path / "outbox")
    headers = {}
    for path in (tmp_path / "outbox").glob("*.eml"):
        message = email.message_from_bytes(path.read_bytes())
        headers[message["To"]] = message["X-Outreach-Personalised"]
    assert sorted(headers.values()) == ["no", "yes"] and headers[f"Zed Quorn <{ZYX.email}>"] == "no"


def test_opted_in_email_that_fails_validation_still_fails(sqlite_engine: Engine, fake_research: list[str]) -> None:
    # a writer that uses a fact tag the empty profile cannot fill, on both attempts
    bad = json.dumps({"subject": "Hi", "body": "Hi {{first_name}}, saw {{fact.location}}."})
    pool = ModelPool(preloaded={"openai:bad": scripted(bad, bad)})
    add_prospects(sqlite_engine, "c", OFFER, [(3, ZYX)])
    report = _run(sqlite_engine, writer="openai:bad", models=pool, unpersonalised_emails=True)
    assert (report.no_facts, report.failed) == (0, 1)
    assert "{{fact.location}}" in report.failures[0][1] and "cannot be filled" in report.failures[0][1]
    assert _rows(sqlite_engine, Run)[0].status == RunStatus.FAILED


def test_validation_asks_for_a_fact_unless_the_email_is_non_personalised() -> None:
    profile = Profile(company=ZYX.company, website=ZYX.website)
    body = ("Hi Zed,\n\nI wanted to reach out with a short note about Ledgerline. " * 6
            + f"\n\n{OFFER.call_to_action}\n\nBest,\nDana\n\n{OFFER.opt_out_line}")
    draft = EmailDraft(subject="A quick idea", body=body)
    rendered = RenderedEmail(subject=draft.subject, body=draft.body)
    assert not validate_email(draft, rendered, ZYX, profile, OFFER).checks["grounded"]
    result = validate_email(draft, rendered, ZYX, profile, OFFER, require_fact=False)
    assert result.ok, result.errors
    # the opt-in relaxes the fact tag only: a link from nowhere still fails
    phish = draft.body.replace("short note", "short note at https://evil.example/login")
    phished = validate_email(EmailDraft(subject=draft.subject, body=phish),
                             RenderedEmail(subject=draft.subject, body=phish), ZYX, profile, OFFER,
                             require_fact=False)
    assert not phished.checks["grounded"]


class _OnePageWeb:
    """A web holding one page per URL; every search returns every page."""

    def __init__(self, pages: Mapping[str, str]) -> None:
        self.pages = dict(pages)

    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        return [SearchHit(url=u, title="Home", rank=i) for i, u in enumerate(self.pages, 1)][:max_results]

    async def fetch(self, url: str) -> Document:
        return Document(url=url, title="Home", text=self.pages[url])


def test_real_researcher_on_a_page_stating_nothing_keeps_its_trace(sqlite_engine: Engine) -> None:
    web = _OnePageWeb({"https://zyxqv.example/": "Welcome to our website. We are glad you are here. "
                                                "Thank you for visiting us today."})
    add_prospects(sqlite_engine, "c", OFFER, [(3, ZYX)])
    report = asyncio.run(run_campaign(sqlite_engine, "c", web=web))
    assert (report.no_facts, report.failed, report.done) == (1, 0, 0)
    traces = _rows(sqlite_engine, Trace)
    assert [t.agent for t in traces] == ["researcher"]  # a valid example of "nothing found"; no writer call
    assert _rows(sqlite_engine, EmailRecord) == []


def test_eval_reports_no_facts_and_drops_by_reason(sqlite_engine: Engine, fake_research: list[str]) -> None:
    eval_set = EvalSet(name="two", offer=OFFER, prospects=[(2, ZYX), (3, ACME)],
                       gold={"Acme Robotics": {"location": "Austin, Texas"}, "Zyxqv": {}},
                       gold_fields=("location",))
    # the probe's only prospect ends no_facts: a working backend, not a failed configuration
    result = asyncio.run(run_eval(sqlite_engine, eval_set, [EvalConfig(name="teacher")], web=None,  # type: ignore[arg-type]
                                  probe=1))
    (config,) = result.configs
    assert config.status == "ok", config.error
    assert (config.done, config.no_facts, config.failed_runs) == (1, 1, 0)
    assert config.research is not None and config.email is not None
    assert config.research.drop_reasons == {"ungrounded": 1, "misattributed": 2, "bad_value": 1}
    assert (config.research.dropped_facts, config.email.written, config.email.unpersonalised) == (4, 1, 0)
    saved = json.loads(result.model_dump_json())  # what report.json holds
    assert saved["configs"][0]["research"]["drop_reasons"]["misattributed"] == 2
    assert saved["configs"][0]["no_facts"] == 1
    html = render_html(result, plots={})
    assert "dropped: misattributed" in html and '<td class="drop-misattributed">2</td>' in html
    assert "<th>no facts</th>" in html


def test_cli_run_counts_no_facts_and_opts_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from outreach.cli import app
    from tools import Corpus

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTREACH_CONFIG", str(tmp_path / "outreach.toml"))
    (tmp_path / "outreach.toml").write_text('store_url = "sqlite:///cli.sqlite"\ncorpus_path = "corpus.sqlite"\n')
    corpus = Corpus(tmp_path / "corpus.sqlite")
    corpus.add(Document(url="https://zyxqv.example/", title="Zyxqv",
                        text="Welcome to our website. We are glad you are here. Thank you for visiting."))
    corpus.close()
    (tmp_path / "p.csv").write_text("first_name,last_name,title,email,company,website\n"
                                    f"Zed,Quorn,CTO,{ZYX.email},Zyxqv,{ZYX.website}\n")
    (tmp_path / "offer.toml").write_text(tomli_w.dumps(OFFER.model_dump(exclude_none=True)))
    runner = CliRunner()
    run = ["run", "p.csv", "--offer", "offer.toml", "--campaign", "t"]
    result = runner.invoke(app, run, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "no verified fact now" in result.output and f"no verified fact for {ZYX.email}" in result.output
    assert "misattributed" in result.output and "facts dropped (ungrounded)" not in result.output
    assert runner.invoke(app, ["emails", "export", "--out", "none.csv"]).exit_code == 0
    assert len((tmp_path / "none.csv").read_text().splitlines()) == 1  # header only: no email

    result = runner.invoke(app, [*run, "--unpersonalised-emails"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "already finished before" in result.output
    assert runner.invoke(app, ["emails", "export", "--out", "still-none.csv"]).exit_code == 0
    assert len((tmp_path / "still-none.csv").read_text().splitlines()) == 1  # finished runs are not redone

    result = runner.invoke(app, [*run, "--unpersonalised-emails", "--retry-no-facts"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["emails", "export", "--out", "e.csv"]).exit_code == 0
    with (tmp_path / "e.csv").open(encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["to_email"], row["personalised"], row["valid"]) == (ZYX.email, "False", "True")
