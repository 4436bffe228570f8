"""`outreach eval`'s terminal tables: the figures of each configuration, failed ones marked."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console

from evals.runner import ConfigResult, EmailFigures, EvalResult, ResearchFigures
from outreach.cli_eval import overview_tables


def _text(table) -> str:  # type: ignore[no-untyped-def]
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def _rows(table) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("│").split("│")]
                                          for line in _text(table).splitlines() if line.startswith("│"))}


def test_quality_table_counts_prospects_without_facts_and_misattributed_drops() -> None:
    research = ResearchFigures(f1=0.5, facts=7, dropped_facts=9,
                               drop_reasons={"ungrounded": 1, "misattributed": 6, "bad_value": 2})
    result = EvalResult(
        run_name="eval", eval_set="world (all)", n_prospects=10, created_at=datetime.now(UTC), elapsed_s=1.0,
        reference="teacher", judge="rubric", confidence=0.95, configs=[
            ConfigResult(name="teacher", researcher="heuristic", writer="heuristic", max_pages=5, campaign="eval:t",
                         prospects=10, done=6, no_facts=3, failed_runs=1, research=research),
            ConfigResult(name="broken", researcher="openai:x", writer="heuristic", max_pages=5, campaign="eval:b",
                         status="failed", error="unreachable"),
        ])
    quality, _cost = overview_tables(result)
    headers = [str(c.header) for c in quality.columns]
    assert headers[:4] == ["config", "valid", "F1", "no facts / misattr."]
    rows = _rows(quality)
    assert rows["teacher"][:4] == ["teacher", "ok", "0.500", "3 / 6"]
    assert rows["broken"][1] == "failed" and len(rows["broken"]) == len(headers)


def _emails(valid: int, prospects: int) -> EmailFigures:
    return EmailFigures(prospects=prospects, written=prospects, pass_rates={}, all_pass_rate=valid / prospects,
                        mean_checks_passed=9.0, graph_valid_rate=valid / prospects)


def test_valid_column_counts_valid_emails_instead_of_saying_ok() -> None:
    result = EvalResult(
        run_name="demo-heldout", eval_set="world (heldout)", n_prospects=60, created_at=datetime.now(UTC),
        elapsed_s=1.0, reference="teacher", judge="rubric", confidence=0.95, configs=[
            ConfigResult(name="teacher", researcher="heuristic", writer="heuristic", max_pages=5, campaign="t",
                         prospects=60, done=60, email=_emails(60, 60)),
            ConfigResult(name="miniatures", researcher="miniature:r", writer="miniature:w", max_pages=5,
                         campaign="m", prospects=60, done=59, failed_runs=1, email=_emails(59, 60)),
        ])
    quality, _cost = overview_tables(result)
    rows = _rows(quality)
    assert rows["teacher"][1] == "60/60" and rows["miniatures"][1] == "59/60"
    assert "ok" not in (rows["teacher"][1], rows["miniatures"][1])
    console = Console(width=80, record=True, force_terminal=True)
    console.print(quality)
    assert "\x1b[33m59/60" in console.export_text(styles=True)  # the incomplete one in yellow
    assert "\x1b[33m60/60" not in console.export_text(styles=True)
