"""A/B statistics: figures checked against textbook examples and the libraries' own documented results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import typer
from sqlalchemy import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from evals.abtest import (
    REFERENCE_REPLY_RATE,
    ab_report,
    compare_rates,
    count_variants,
    import_events,
    load_events,
    read_events,
    sample_size,
    wilson_interval,
)
from outreach.cli_eval import abtest_app
from store.models import EngagementEvent


@pytest.mark.parametrize(
    ("x", "n", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no correction)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_newcombe_and_statsmodels(x: int, n: int, low: float, high: float) -> None:
    from statsmodels.stats.proportion import proportion_confint

    got = wilson_interval(x, n)
    assert got == pytest.approx((low, high), abs=5e-5)
    assert got == pytest.approx(proportion_confint(x, n, alpha=0.05, method="wilson"), abs=1e-12)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(2.5, 5)  # fractional successes (ties as half wins)
    assert low < 0.5 < high and high - 0.5 == pytest.approx(0.5 - low)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(6, 5)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 5, confidence=1.0)


def test_z_test_matches_statsmodels_documented_example() -> None:
    # statsmodels proportions_ztest docstring: count=[5, 12], nobs=[83, 99] -> p = 0.159
    c = compare_rates(5, 83, 12, 99)
    assert f"{c.p_value_z:0.3f}" == "0.159"
    assert c.z > 0 and c.difference == pytest.approx(12 / 99 - 5 / 83)


def test_fisher_matches_scipy_documented_example() -> None:
    # scipy.stats.fisher_exact docstring: [[8, 2], [1, 5]] -> statistic 20.0, p = 0.034965034965034975
    c = compare_rates(8, 10, 1, 6)
    assert c.odds_ratio == pytest.approx(20.0)
    assert c.p_value_fisher == pytest.approx(0.034965034965034975, rel=1e-12)
    assert c.significant() and not compare_rates(5, 83, 12, 99).significant()


def test_lift_interval_matches_statsmodels_log_ratio() -> None:
    from statsmodels.stats.proportion import confint_proportions_2indep

    c = compare_rates(5, 83, 12, 99)
    low, high = confint_proportions_2indep(12, 99, 5, 83, method="log", compare="ratio")
    assert c.lift == pytest.approx((12 / 99) / (5 / 83) - 1)
    assert (c.lift_ci_low, c.lift_ci_high) == pytest.approx((low - 1, high - 1), rel=1e-9)
    zero = compare_rates(0, 50, 3, 50)
    assert math.isnan(zero.lift) and math.isnan(zero.lift_ci_low)


def test_sample_size_matches_r_power_prop_test() -> None:
    # R stats documentation: power.prop.test(p1 = .50, p2 = .75, power = .90)  # => n = 76.7
    size = sample_size(0.50, 0.25, power=0.90, relative=False)
    assert size.n_per_variant == 77 and size.total == 154
    assert sample_size(0.50, 0.5, power=0.90).n_per_variant == 77  # the same as a relative lift


def test_sample_size_agrees_with_statsmodels_cohen_h_and_scales_for_low_reply_rates() -> None:
    size = sample_size(0.05, 0.2)
    assert size.target == pytest.approx(0.06)
    assert size.n_per_variant == 8158
    assert abs(size.n_per_variant - size.n_cohen_h) / size.n_per_variant < 0.01
    replies = sample_size(REFERENCE_REPLY_RATE, 0.2)
    assert replies.n_per_variant > 24_000  # a realistic reply rate needs ~3x the emails of a 5% baseline
    assert sample_size(0.05, 0.4).n_per_variant < size.n_per_variant < sample_size(0.05, 0.1).n_per_variant
    for bad in ({"baseline": 0.0, "mde": 0.2}, {"baseline": 0.05, "mde": 0.0}, {"baseline": 0.9, "mde": 0.2}):
        with pytest.raises(ValueError, match="baseline|mde"):
            sample_size(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ events

CSV = """message_id,recipient,variant,event,timestamp
m1,a@x.example,A,sent,2025-03-01T09:00:00Z
m1,a@x.example,A,delivered,2025-03-01T09:00:05Z
m1,a@x.example,A,opened,2025-03-01T10:00:00Z
m1,a@x.example,A,open,2025-03-01T11:00:00Z
m2,b@x.example,A,processed,1740819600
m2,b@x.example,A,bounce,1740819660
m3,c@x.example,B,sent,2025-03-01T09:00:00Z
m3,c@x.example,B,replied,2025-03-02T09:00:00Z
m4,d@x.example,B,sent,2025-03-01T09:00:00Z
m4,d@x.example,B,unsubscribed,2025-03-02T09:00:00Z
m5,e@x.example,B,teleported,2025-03-01T09:00:00Z
m6,f@x.example,,open,2025-03-01T09:00:00Z
m7,g@x.example,B,open,yesterday
m8,h@x.example,B,open,2025-03-01T09:00:00Z,extra
,,B,open,2025-03-01T09:00:00Z
"""


def test_read_events_reports_bad_rows_by_line(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(CSV, encoding="utf-8")
    parsed = read_events(path)
    assert len(parsed.events) == 10
    lines = dict(parsed.errors)
    assert sorted(lines) == [12, 13, 14, 15, 16]
    assert "unknown event 'teleported'" in lines[12]
    assert "no variant" in lines[13]
    assert "timestamp 'yesterday'" in lines[14]
    assert "fields" in lines[15]
    assert "message_id nor recipient" in lines[16]
    assert {e.event for e in parsed.events} == {"sent", "delivered", "open", "bounce", "reply", "unsubscribe"}


def test_read_events_jsonl_and_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([
        json.dumps({"sg_message_id": "x1", "email": "a@x.example", "group": "A", "event": "delivered",
                    "timestamp": 1740819600}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"message_id": "x2", "variant": "B", "type": "click"}),
    ]) + "\n", encoding="utf-8")
    parsed = read_events(path)
    assert [(e.line, e.event, e.variant, e.key) for e in parsed.events] == [
        (1, "delivered", "A", "x1"), (4, "click", "B", "x2")]
    assert [line for line, _ in parsed.errors] == [2, 3]
    bad = tmp_path / "bad.csv"
    bad.write_text("who,what\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no 'event' column"):
        read_events(bad)
    with pytest.raises(FileNotFoundError):
        read_events(tmp_path / "missing.csv")


def test_counting_rules(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(CSV, encoding="utf-8")
    counts = count_variants(read_events(path).events)
    a, b = counts["A"], counts["B"]
    assert (a.sent, a.delivered, a.open, a.bounce) == (2, 1, 1, 1)  # two opens of m1 count once
    assert (b.sent, b.delivered, b.reply, b.unsubscribe) == (2, 2, 1, 1)
    assert a.rate("open").rate == 1.0 and a.rate("bounce").rate == 0.5
    report = ab_report(read_events(path).events, control="A")
    assert report.control == "A" and {c.b for c in report.comparisons} == {"B"}
    with pytest.raises(ValueError, match="control variant 'Z'"):
        ab_report(read_events(path).events, control="Z")


def test_import_events_stores_once(sqlite_engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(CSV.replace("message_id,recipient,variant,event,timestamp",
                             "message_id,recipient,variant,event,timestamp,email_id")
                    .replace("m3,c@x.example,B,sent,2025-03-01T09:00:00Z",
                             "m3,c@x.example,B,sent,2025-03-01T09:00:00Z,99"),
                    encoding="utf-8")
    first = import_events(sqlite_engine, path)
    assert first.stored == 10 and first.duplicates == 0
    assert [line for line, _ in first.warnings] == [8]  # email_id 99 is not in this store
    again = import_events(sqlite_engine, path)
    assert again.stored == 0 and again.duplicates == 10
    with Session(sqlite_engine) as session:
        rows = session.exec(select(EngagementEvent)).all()
    assert len(rows) == 10 and {r.event for r in rows} >= {"open", "bounce", "reply"}
    assert all(r.email_id is None for r in rows)
    assert len(load_events(sqlite_engine, ["B"])) == 4


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(abtest_app, name="abtest")
    return app


def test_cli_plan_makes_the_sample_size_obvious() -> None:
    result = CliRunner().invoke(_app(), ["abtest", "plan", "--baseline", "0.05", "--mde", "0.2", "--per-week", "2000"])
    assert result.exit_code == 0, result.output
    assert "8,158 emails per variant, 16,316 in all" in result.output
    assert "24,769" in result.output and "1.71%" in result.output and "8.2 weeks" in result.output
    bad = CliRunner().invoke(_app(), ["abtest", "plan", "--baseline", "1.5", "--mde", "0.2"])
    assert bad.exit_code == 2 and "baseline=1.5" in bad.output


def test_cli_report_imports_and_reports_by_line(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(CSV, encoding="utf-8")
    store = f"sqlite:///{tmp_path / 'store.sqlite'}"
    result = CliRunner().invoke(_app(), ["abtest", "report", str(path), "--store", store], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"{path}:12: skipped: unknown event 'teleported'" in result.output
    said = " ".join(result.output.split())
    assert "10 events read, 5 rows skipped, 0 joined to emails of the store, 10 stored" in said
    assert "rates per variant" in result.output and "against the control A" in result.output
    empty = tmp_path / "empty.csv"
    empty.write_text("event,variant,message_id\nnope,A,m1\n", encoding="utf-8")
    failed = CliRunner().invoke(_app(), ["abtest", "report", str(empty), "--no-save"], terminal_width=200)
    assert failed.exit_code == 1 and ":2: skipped" in failed.output and "no valid events" in failed.output
