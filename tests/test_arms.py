"""A/B arms in one campaign (graphs.arms) and every email's Message-ID, through the runner, the exports and
the ``outreach run --arm`` command."""

from __future__ import annotations

import asyncio
import csv
import email
import json
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text
from sqlmodel import Session, select
from typer.testing import CliRunner

from agents.schemas import ProspectInfo
from graphs.arms import ArmPlan, ArmsError, check_campaign_arms, company_key, parse_arms, record_arms
from graphs.models import ModelPool
from graphs.runner import add_prospects, run_campaign
from outreach.cli import app
from outreach.exports import export_emails, load_emails
from store import open_store
from store.exports import MESSAGE_ID_PATTERN, new_message_id, normalise_message_id
from store.migrations import migrate
from store.models import Campaign, EmailRecord, Prospect, Run, SchemaMigration, Trace
from tests.helpers import good_draft_json, scripted, small_world
from tools import CorpusWeb

PLAN_ARGS = ["teacher=heuristic,heuristic", "mini=heuristic,openai:scripted-writer"]


def _rows(engine: Engine, model):  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        return list(s.exec(select(model)).all())


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(("values", "split", "message"), [
    (["teacher=heuristic,heuristic"], None, "at least two --arm"),
    (["teacher=heuristic", "mini=heuristic,heuristic"], None, "use NAME=RESEARCHER_SPEC,WRITER_SPEC"),
    (["teacher=heuristic,heuristic", "teacher=heuristic,heuristic"], None, "two arms have that name"),
    (["teacher=heuristic,heuristic", "mini=heuristic,gpt5"], None, "the writer backend is not valid"),
    (["teacher=heuristic,heuristic", "mini=vllm:x,heuristic"], None, "needs a base URL"),
    (["te acher=heuristic,heuristic", "mini=heuristic,heuristic"], None, "must be 1-40 letters"),
    (PLAN_ARGS, "50", "1 numbers for 2 arms"),
    (PLAN_ARGS, "50,-1", "every share must be a number > 0"),
    (PLAN_ARGS, "half,half", "one number per arm"),
])
def test_bad_arms_are_refused_with_what_to_do(values: list[str], split: str | None, message: str) -> None:
    with pytest.raises(ArmsError, match=message):
        parse_arms(values, split)


def test_split_is_normalised_and_credentials_never_stored() -> None:
    plan = parse_arms(["a=heuristic,heuristic", "b=openai:m@http://user:SECRET@h.example/v1,heuristic"], "80,20", 3)
    assert [a.weight for a in plan.arms] == [0.8, 0.2] and plan.arms[1].researcher.endswith("h.example/v1")
    assert "SECRET" not in json.dumps(plan.stored()) and "SECRET" in plan.arms[1].researcher
    assert parse_arms(PLAN_ARGS, "50,50").stored() == parse_arms(PLAN_ARGS).stored()


# ------------------------------------------------------------------------------------------------ assignment


def test_assignment_is_reproducible_by_seed_and_follows_the_split() -> None:
    keys = [company_key(f"Company {i}", f"https://c{i}.example") for i in range(4000)]
    plan = parse_arms(PLAN_ARGS, "80,20", seed=7)
    first = [plan.assign(k).name for k in keys]
    assert first == [parse_arms(PLAN_ARGS, "80,20", seed=7).assign(k).name for k in keys]  # same seed, same arms
    other = [parse_arms(PLAN_ARGS, "80,20", seed=8).assign(k).name for k in keys]
    assert sum(a != b for a, b in zip(first, other, strict=True)) > 400  # another seed reshuffles
    share = Counter(first)["teacher"] / len(keys)
    assert 0.77 < share < 0.83  # binomial sd of the share is 0.0063 at n=4000


def test_one_company_is_one_key() -> None:
    assert company_key("Acme Inc.", "https://www.acme.example/about") == company_key("ACME", "http://shop.acme.example")
    assert company_key("Acme Inc.") == company_key("acme") == "name:acme"
    assert company_key("Acme", "https://acme.example") != company_key("Acme", "https://acme-freight.example")


# ------------------------------------------------------------------------------------------------ runner


def _pool(offer) -> ModelPool:  # type: ignore[no-untyped-def]
    return ModelPool(preloaded={"openai:scripted-writer": scripted(*[good_draft_json(offer)] * 50)})


def _arm_world(tmp_path: Path, engine: Engine, n: int = 8):  # type: ignore[no-untyped-def]
    """A small world whose first company has a second prospect (a colleague), added to campaign ``ab``."""
    world, corpus, offer, prospects = small_world(tmp_path, n=n)
    first = prospects[0][1]
    colleague = ProspectInfo(first_name="Col", last_name="League", title="CFO", company=first.company,
                             email="col.league@" + first.email.split("@")[1], website=first.website)
    prospects = [*prospects, (len(prospects) + 2, colleague)]
    add_prospects(engine, "ab", offer, prospects)
    return corpus, offer, prospects


def test_each_run_uses_its_arm_and_a_company_stays_in_one_arm(tmp_path: Path, engine: Engine) -> None:
    corpus, offer, prospects = _arm_world(tmp_path, engine)
    plan = parse_arms(PLAN_ARGS, seed=11)
    record_arms(engine, "ab", plan)
    report = asyncio.run(run_campaign(engine, "ab", web=CorpusWeb(corpus), models=_pool(offer), arms=plan))
    assert report.failed == 0
    with Session(engine) as s:
        pairs = s.exec(select(Run, Prospect).join(Prospect, Prospect.id == Run.prospect_id)).all()  # type: ignore[arg-type]
        traces = s.exec(select(Trace)).all()
    by_company: dict[str, set[str]] = {}
    for run, p in pairs:
        assert run.arm == plan.assign(company_key(p.company, p.website)).name
        assert (run.researcher, run.writer) == (plan.arm(run.arm).researcher, plan.arm(run.arm).writer)
        by_company.setdefault(p.company, set()).add(run.arm)
    assert all(len(arms) == 1 for arms in by_company.values())  # the colleague shares the company's arm
    assert {r.arm for r, _ in pairs} == {"teacher", "mini"}  # seed 11 puts companies in both arms
    writer_of = {r.id: r.writer for r, _ in pairs}
    assert all(t.backend == writer_of[t.run_id] for t in traces if t.agent == "writer")
    with Session(engine) as s:
        stored = s.exec(select(Campaign).where(Campaign.name == "ab")).one().arms
    assert ArmPlan.from_stored(stored) == plan


def test_resume_keeps_every_assignment(tmp_path: Path, sqlite_engine: Engine) -> None:
    corpus, offer, prospects = _arm_world(tmp_path, sqlite_engine)
    plan = parse_arms(PLAN_ARGS, seed=5)
    record_arms(sqlite_engine, "ab", plan)
    asyncio.run(run_campaign(sqlite_engine, "ab", web=CorpusWeb(corpus), models=_pool(offer), arms=plan, limit=3))
    before = {r.id: r.arm for r in _rows(sqlite_engine, Run) if r.arm}
    assert len(before) == 3
    # A run whose arm was recorded keeps it, even where today's plan would put it elsewhere.
    with Session(sqlite_engine) as s:
        pending = next(r for r in s.exec(select(Run)).all() if not r.arm)
        p = s.get(Prospect, pending.prospect_id)
        assert p is not None
        forced = "teacher" if plan.assign(company_key(p.company, p.website)).name == "mini" else "mini"
        pending.arm = forced
        s.add(pending)
        s.commit()
        forced_id = pending.id
    # Resume without the plan: the arms stored on the campaign are used.
    asyncio.run(run_campaign(sqlite_engine, "ab", web=CorpusWeb(corpus), models=_pool(offer)))
    after = {r.id: r for r in _rows(sqlite_engine, Run)}
    assert all(after[i].arm == arm for i, arm in before.items())
    assert after[forced_id].arm == forced and after[forced_id].writer == plan.arm(forced).writer
    assert all(r.arm and r.status == "done" for r in after.values())
    # A different seed (or split, or backends) for the same campaign is refused; the same plan passes.
    check_campaign_arms(sqlite_engine, "ab", parse_arms(PLAN_ARGS, seed=5))
    with pytest.raises(ArmsError, match="started with the arms teacher=heuristic,heuristic"):
        check_campaign_arms(sqlite_engine, "ab", parse_arms(PLAN_ARGS, seed=6))
    add_prospects(sqlite_engine, "plain", offer, prospects[:1])
    with pytest.raises(ArmsError, match="already has prospects run without arms"):
        check_campaign_arms(sqlite_engine, "plain", plan)


# ------------------------------------------------------------------------------------------------ Message-ID


def test_message_ids_are_unique_rfc_5322_and_in_every_export(tmp_path: Path, sqlite_engine: Engine) -> None:
    corpus, offer, _ = _arm_world(tmp_path, sqlite_engine, n=5)
    plan = parse_arms(PLAN_ARGS, seed=11)
    record_arms(sqlite_engine, "ab", plan)
    asyncio.run(run_campaign(sqlite_engine, "ab", web=CorpusWeb(corpus), models=_pool(offer), arms=plan))
    emails = _rows(sqlite_engine, EmailRecord)
    ids = [e.message_id for e in emails]
    assert len(emails) == 6 and len(set(ids)) == 6
    domain = offer.sender_email.split("@")[1] if offer.sender_email else "outreach.invalid"
    assert all(i and MESSAGE_ID_PATTERN.fullmatch(i) and i.endswith(f"@{domain}>") for i in ids)
    arm_of = {r.id: r.arm for r in _rows(sqlite_engine, Run)}
    expected = {e.message_id: arm_of[e.run_id] for e in emails}

    exported = load_emails(sqlite_engine, "ab")
    export_emails(exported, "csv", tmp_path / "e.csv")
    export_emails(exported, "jsonl", tmp_path / "e.jsonl")
    export_emails(exported, "eml", tmp_path / "outbox")
    with (tmp_path / "e.csv").open(newline="", encoding="utf-8") as fh:
        assert {r["message_id"]: r["arm"] for r in csv.DictReader(fh)} == expected
    lines = (tmp_path / "e.jsonl").read_text(encoding="utf-8").splitlines()
    assert {(o := json.loads(line))["message_id"]: o["arm"] for line in lines} == expected
    headers = [email.message_from_bytes(p.read_bytes()) for p in sorted((tmp_path / "outbox").glob("*.eml"))]
    assert {m["Message-ID"].strip(): m["X-Outreach-Arm"] for m in headers} == expected


def test_the_store_refuses_a_repeated_message_id(sqlite_engine: Engine) -> None:
    from sqlalchemy.exc import IntegrityError

    with Session(sqlite_engine) as s:
        c = Campaign(name="c")
        s.add(c)
        s.flush()
        runs = []
        for i in range(2):
            p = Prospect(campaign_id=c.id or 0, first_name="A", email=f"a{i}@x.example", company="X")
            s.add(p)
            s.flush()
            r = Run(campaign_id=c.id or 0, prospect_id=p.id or 0)
            s.add(r)
            s.flush()
            runs.append(r)
        for r in runs:
            s.add(EmailRecord(run_id=r.id or 0, subject_template="s", body_template="b", subject="s", body="b",
                              message_id="<same@x.example>"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_new_and_normalised_message_ids() -> None:
    assert new_message_id("Sam <sam@Widgets.Example>".split("<")[1].rstrip(">")).endswith("@widgets.example>")
    assert new_message_id("").endswith("@outreach.invalid>") and new_message_id("x@bücher.de").endswith(
        "@xn--bcher-kva.de>")
    assert len({new_message_id("a@b.example") for _ in range(1000)}) == 1000
    assert normalise_message_id(" abc@x.example ") == "<abc@x.example>"
    assert normalise_message_id("<abc@x.example>") == "<abc@x.example>"
    assert [normalise_message_id(v) for v in ("m1", "<a b@c>", "<a@b@c>", "")] == [None] * 4


def test_migration_5_adds_the_columns_and_gives_old_emails_a_message_id(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'old.sqlite'}")
    with Session(engine) as s:
        c = Campaign(name="c", offer={"sender_email": "sam@widgets.example"})
        s.add(c)
        s.flush()
        p = Prospect(campaign_id=c.id or 0, first_name="A", email="a@x.example", company="X")
        s.add(p)
        s.flush()
        r = Run(campaign_id=c.id or 0, prospect_id=p.id or 0)
        s.add(r)
        s.flush()
        s.add(EmailRecord(run_id=r.id or 0, subject_template="s", body_template="b", subject="s", body="b"))
        s.commit()
    # The schema before migration 5: no runs.arm, campaigns.arms or emails.message_id.
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_emails_message_id"))
        conn.execute(text("ALTER TABLE emails DROP COLUMN message_id"))
        conn.execute(text("DROP INDEX ix_runs_arm"))
        conn.execute(text("ALTER TABLE runs DROP COLUMN arm"))
        conn.execute(text("ALTER TABLE campaigns DROP COLUMN arms"))
        conn.execute(text("DELETE FROM schema_migrations WHERE version = 5"))
    assert 5 in migrate(engine)
    columns = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in ("runs", "campaigns", "emails")}
    assert "arm" in columns["runs"] and "arms" in columns["campaigns"] and "message_id" in columns["emails"]
    (stored,) = _rows(engine, EmailRecord)
    assert stored.message_id and stored.message_id.endswith("@widgets.example>")
    assert {m.version for m in _rows(engine, SchemaMigration)} >= {1, 2, 3, 5}
    assert migrate(engine) == []
    engine.dispose()


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTREACH_CONFIG", str(tmp_path / "outreach.toml"))
    (tmp_path / "outreach.toml").write_text('store_url = "sqlite:///cli.sqlite"\ncorpus_path = "cli-corpus.sqlite"\n')
    return tmp_path


def test_cli_refuses_an_unknown_backend_before_anything_is_added(cli_env: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["world", "generate", "--out", "world", "--companies", "4", "--heldout", "0"]
                         ).exit_code == 0
    base = ["run", "world/prospects_train.csv", "--offer", "world/offer.toml", "--campaign", "ab"]
    bad = runner.invoke(app, [*base, "--arm", "teacher=heuristic,heuristic", "--arm", "mini=heuristic,gpt5"])
    assert bad.exit_code == 2 and "--arm mini: the writer backend is not valid" in bad.output
    assert not (cli_env / "cli.sqlite").exists()  # nothing was added: the store was not even created
    ok = runner.invoke(app, [*base, "--arm", "teacher=heuristic,heuristic", "--arm", "mini=heuristic,heuristic",
                             "--seed", "3"])
    assert ok.exit_code == 0, ok.output
    assert "arms teacher (50%): researcher=heuristic" in " ".join(ok.output.split())
    engine = open_store("sqlite:///cli.sqlite")
    runs = _rows(engine, Run)
    assert len(runs) == 4 and all(r.arm in ("teacher", "mini") for r in runs)
    # A rerun with another unknown backend leaves the store as it was.
    counts = (len(_rows(engine, Prospect)), len(runs), len(_rows(engine, EmailRecord)))
    again = runner.invoke(app, [*base, "--arm", "teacher=heuristic,heuristic", "--arm", "mini=nope:x,heuristic"])
    assert again.exit_code == 2 and "unknown backend spec 'nope:x'" in again.output
    other_seed = runner.invoke(app, [*base, "--arm", "teacher=heuristic,heuristic", "--arm",
                                     "mini=heuristic,heuristic", "--seed", "4"])
    assert other_seed.exit_code == 2 and "was started with the arms" in " ".join(other_seed.output.split())
    assert (len(_rows(engine, Prospect)), len(_rows(engine, Run)), len(_rows(engine, EmailRecord))) == counts
    assert {r.id: r.arm for r in _rows(engine, Run)} == {r.id: r.arm for r in runs}
    engine.dispose()
