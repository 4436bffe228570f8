"""`outreach eval`'s terminal tables: the figures of each configuration, failed ones marked."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console

from evals.runner import ConfigResult, EvalResult, ResearchFigures
from outreach.cli_eval import overview_tables


def _text(table) -> str:  # type: ignore[no-untyped-def]
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


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
    assert headers[:4] == ["config", "status", "F1", "no facts / misattr."]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("│").split("│")]
                                          for line in _text(quality).splitlines() if line.startswith("│"))}
    assert rows["teacher"][:4] == ["teacher", "ok", "0.500", "3 / 6"]
    assert rows["broken"][1] == "failed" and len(rows["broken"]) == len(headers)
