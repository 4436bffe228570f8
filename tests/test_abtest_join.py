"""Engagement events joined to the store's emails by Message-ID or by recipient and campaign (no variant column),
events that cannot be joined reported by line, and the A/B section of a campaign with arms."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from sqlalchemy import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from evals.abtest import ab_section, ab_sections, import_events, load_events, read_events, sample_size
from graphs.arms import parse_arms, record_arms
from graphs.runner import add_prospects, run_campaign
from outreach.cli_eval import abtest_app
from store import open_store
from store.models import EmailRecord, EngagementEvent, Prospect, Run
from tests.helpers import small_world
from tools import CorpusWeb


@pytest.fixture(scope="module")
def _ab_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str, str]]]:
    """A store file with campaign ``ab`` (arms teacher and mini, 6 companies, every email written) and a campaign
    ``plain`` without arms to the same recipients, made once; and ``(message_id, recipient, arm)`` of the ``ab``
    emails in id order."""
    tmp_path = tmp_path_factory.mktemp("ab")
    engine = open_store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    _, corpus, offer, prospects = small_world(tmp_path, n=6)
    plan = parse_arms(["teacher=heuristic,heuristic", "mini=heuristic,heuristic"], seed=11)
    for name, arms in (("ab", plan), ("plain", None)):
        add_prospects(engine, name, offer, prospects)
        if arms is not None:
            record_arms(engine, name, arms)
        asyncio.run(run_campaign(engine, name, web=CorpusWeb(corpus), arms=arms))
    with Session(engine) as s:
        rows = s.exec(select(EmailRecord, Prospect.email, Run.arm).join(Run, Run.id == EmailRecord.run_id)  # type: ignore[arg-type]
                      .join(Prospect, Prospect.id == Run.prospect_id).where(Run.arm != "")  # type: ignore[arg-type]
                      .order_by(EmailRecord.id)).all()  # type: ignore[arg-type]
    emails = [(e.message_id or "", to, arm) for e, to, arm in rows]
    assert len(emails) == 6 and {a for _, _, a in emails} == {"teacher", "mini"}
    engine.dispose()
    corpus.close()
    return tmp_path / "store.sqlite", emails


@pytest.fixture
def ab_store(_ab_template, tmp_path: Path) -> Iterator[tuple[Engine, list[tuple[str, str, str]]]]:  # type: ignore[no-untyped-def]
    """A copy of the template store (tests import events into it)."""
    template, emails = _ab_template
    shutil.copy(template, tmp_path / "store.sqlite")
    engine = open_store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    yield engine, emails
    engine.dispose()


def test_events_join_by_message_id_or_recipient_and_campaign(ab_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, emails = ab_store
    (m0, r0, a0), (m1, r1, a1), (m2, r2, a2), (m3, r3, a3), (m4, r4, a4), (_, r5, a5) = emails
    path = tmp_path / "events.csv"
    lines = [
        "message_id,recipient,campaign,event,timestamp",           # 1
        f"{m0},,,sent,2026-03-01T09:00:00Z",                        # 2 by Message-ID
        f"{m0.strip('<>')},,,open,2026-03-01T10:00:00Z",             # 3 by Message-ID without brackets
        f",{r1},ab,sent,2026-03-01T09:00:00Z",                      # 4 by recipient and campaign
        f",{r1.upper()},ab,reply,2026-03-02T09:00:00Z",             # 5 the address in another case
        f",{r2},,sent,2026-03-01T09:00:00Z",                        # 6 recipient in two campaigns: ambiguous
        "not-a-message-id,,,open,2026-03-01T09:00:00Z",             # 7 malformed Message-ID, nothing to join by
        "<unknown@widgets.example>,,,open,2026-03-01T09:00:00Z",    # 8 well-formed, not in the store
        f"{m3},{r3},,sent,2026-03-01T09:00:00Z",                    # 9
        f"{m3},{r4},,open,2026-03-01T10:00:00Z",                    # 10 the same Message-ID for another recipient
        f"{m0},,,open,2026-03-01T10:00:00Z",                        # 11 repeats line 3
        f"{m4},someone@else.example,,sent,2026-03-01T09:00:00Z",    # 12 Message-ID of another recipient's email
        f",{r5},plain,sent,2026-03-01T09:00:00Z",                   # 13 campaign without arms, no variant
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parsed = read_events(path, engine)
    errors = dict(parsed.errors)
    assert sorted(errors) == [6, 7, 8, 10, 11, 12, 13], parsed.errors
    assert "has 2 emails in campaign(s) ab, plain" in errors[6]
    assert "malformed Message-ID 'not-a-message-id'" in errors[7] and "no variant" in errors[7]
    assert "<unknown@widgets.example> is not an email of this store" in errors[8]
    assert f"duplicated Message-ID {m3}: line 9" in errors[10]
    assert "repeats line 3" in errors[11]
    assert "is email" in errors[12] and "not to someone@else.example" in errors[12]
    assert "belongs to no A/B arm" in errors[13]
    got = [(e.line, e.variant, e.campaign, e.message_id) for e in parsed.events]
    assert got == [(2, a0, "ab", m0), (3, a0, "ab", m0), (4, a1, "ab", m1), (5, a1, "ab", m1), (9, a3, "ab", m3)]
    assert parsed.joined == 5
    # The recipient in a named campaign joins; the same address without a campaign is ambiguous.
    (tmp_path / "r.csv").write_text(f"recipient,event\n{r2},sent\n", encoding="utf-8")
    assert [e.variant for e in read_events(tmp_path / "r.csv", engine, campaign="ab").events] == [a2]
    # Stored events keep their email and arm; the A/B section reads them back.
    imported = import_events(engine, path)
    assert imported.stored == 5
    stored = load_events(engine, campaign="ab")
    assert {(e.email_id is not None, e.variant) for e in stored} == {(True, a0), (True, a1), (True, a3)}
    with Session(engine) as s:
        assert all(r.email_id for r in s.exec(select(EngagementEvent)).all())


def test_a_variant_column_still_labels_events_the_store_does_not_know(ab_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, emails = ab_store
    path = tmp_path / "events.csv"
    path.write_text(f"message_id,variant,event\nm1,A,sent\nm2,B,sent\n{emails[0][0]},wrong,sent\n", encoding="utf-8")
    parsed = read_events(path, engine)
    assert [(e.variant, e.campaign) for e in parsed.events] == [("A", ""), ("B", ""), (emails[0][2], "ab")]
    assert parsed.warnings == [(4, f"variant 'wrong' in the file, arm {emails[0][2]!r} in the store: the store's "
                                   "is used")]


def test_ab_section_has_rates_with_intervals_tests_and_the_sends_still_needed(ab_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, emails = ab_store
    before = ab_section(engine, "ab")
    assert before.events == 0 and not before.rates and "no engagement events" in before.notes[0]
    reply_plan = next(p for p in before.plans if p.metric == "reply")
    assert reply_plan.baseline_from == "reference" and reply_plan.more_per_arm == sample_size(0.0171, 0.2).n_per_variant
    lines = ["message_id,event"]
    for i, (mid, _, _) in enumerate(emails):
        lines += [f"{mid},delivered"] + ([f"{mid},open"] if i % 2 == 0 else []) + ([f"{mid},reply"] if i < 2 else [])
    (tmp_path / "e.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import_events(engine, tmp_path / "e.csv")
    (section,) = ab_sections(engine)
    assert section.campaign == "ab" and section.control == "teacher" and section.events == len(lines) - 1
    assert {a.name: a.emails for a in section.arms} == {
        arm: sum(a == arm for _, _, a in emails) for arm in ("teacher", "mini")}
    for arm, per in section.rates.items():
        r = per["open"]
        assert 0.0 <= r.ci_low <= r.rate <= r.ci_high <= 1.0 and r.n == sum(a == arm for _, _, a in emails)
    assert {c.metric for c in section.comparisons} >= {"open", "reply"}
    assert all(c.b == "mini" for c in section.comparisons)
    open_plan = next(p for p in section.plans if p.metric == "open")
    assert open_plan.baseline_from == "control" and not open_plan.conclusive
    assert open_plan.more_per_arm == open_plan.n_per_arm - open_plan.have_per_arm > 0
    assert not math.isnan(open_plan.p_value_fisher)
    dumped = section.model_dump(mode="json")
    assert dumped["rates"]["teacher"]["open"]["ci_high"] >= dumped["rates"]["teacher"]["open"]["rate"]
    with pytest.raises(KeyError, match="has no A/B arms"):
        ab_section(engine, "plain")


def test_cli_report_joins_without_a_variant_column(ab_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, emails = ab_store
    store = str(engine.url)
    path = tmp_path / "events.csv"
    path.write_text("message_id,event\n" + "".join(f"{m},delivered\n{m},open\n" for m, _, _ in emails)
                    + "garbage,open\n", encoding="utf-8")
    app = typer.Typer()
    app.add_typer(abtest_app, name="abtest")
    result = CliRunner().invoke(app, ["abtest", "report", str(path), "--store", store], terminal_width=220)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"{path}:14: skipped: no variant (column 'variant') and cannot be joined: malformed Message-ID" in said
    assert "12 events read, 1 rows skipped, 12 joined to emails of the store, 12 stored" in said
    assert "A/B test of campaign ab" in said and "against the control teacher" in said
    assert "sends a conclusive result needs" in said
