"""The evaluation report: JSON with every figure, HTML with plots and tables, checked in headless Chromium."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import Engine

from evals.report import PLOT_TITLES, render_html, write_report
from evals.runner import EvalResult, parse_config, run_eval, world_eval_set
from tests.browser import headless_chromium
from tests.helpers import small_world
from tools import CorpusWeb

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
async def result(sqlite_engine: Engine, tmp_path: Path) -> EvalResult:
    """A real evaluation of a small world: two configurations that complete, one whose spec is hostile text."""
    world, corpus, _offer, _prospects = small_world(tmp_path, n=5)
    configs = [parse_config("teacher=heuristic,heuristic"), parse_config("shallow=heuristic,heuristic,max_pages=1"),
               parse_config("evil=miniature:<script>alert(1)</script>,heuristic")]
    return await run_eval(sqlite_engine, world_eval_set(world, split="train"), configs, web=CorpusWeb(corpus),
                          run_name="report-test")


def test_json_holds_every_figure_and_round_trips(result: EvalResult, tmp_path: Path) -> None:
    files = write_report(result, tmp_path / "out")
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert EvalResult.model_validate(data) == result
    teacher = data["configs"][0]
    for key in ("precision", "recall", "f1", "grounded_fact_rate", "schema_valid_rate", "per_field"):
        assert key in teacher["research"]
    for key in ("tokens_in_per_email", "tokens_out_per_email", "cost_per_1k_emails_usd", "latency_p50_ms",
                "latency_p95_ms", "throughput_emails_per_s"):
        assert key in teacher["cost"]
    assert set(data["configs"][1]["pairwise"]) >= {"wins", "losses", "ties", "win_rate", "ci_low", "ci_high"}
    assert data["configs"][2]["status"] == "failed" and "<script>" in data["configs"][2]["error"]
    assert set(files.plots) == set(PLOT_TITLES)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in files.plots.values())


def test_html_embeds_plots_and_escapes_hostile_text(result: EvalResult) -> None:
    html = render_html(result)
    assert html.count('src="data:image/png;base64,') == len(PLOT_TITLES)
    first = html.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(first).startswith(PNG_MAGIC)
    for table in ("overview", "research", "fields", "rubric", "pairwise", "cost", "failed"):
        assert f'id="{table}"' in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_looks_right_in_headless_chromium(result: EvalResult, tmp_path: Path) -> None:
    files = write_report(result, tmp_path / "out")
    with headless_chromium("1300,2400") as driver:
        from selenium.webdriver.common.by import By

        driver.get(files.html.resolve().as_uri())
        images = driver.find_elements(By.CSS_SELECTOR, "figure img")
        assert len(images) == len(PLOT_TITLES)
        for img in images:  # every plot decoded and laid out with a real size
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 300
            assert img.size["width"] > 200 and img.size["height"] > 100
        rows = {t: len(driver.find_elements(By.CSS_SELECTOR, f"#{t} tr"))
                for t in ("overview", "research", "rubric", "pairwise", "cost", "failed")}
        assert rows["overview"] == 3 and rows["research"] == 3 and rows["cost"] == 3  # header + 2 completed
        assert rows["rubric"] >= 9 and rows["pairwise"] == 2 and rows["failed"] == 2
        failed_text = driver.find_element(By.ID, "failed").text
        assert "evil" in failed_text and "<script>alert(1)</script>" in failed_text  # shown as text, not run
        assert driver.execute_script("return document.title").startswith("Evaluation report-test")
        shot = Path(tempfile.gettempdir()) / "outreach-eval-report.png"
        assert driver.save_screenshot(str(shot))
        print(f"\nscreenshot of the evaluation report: {shot}")
        assert shot.read_bytes().startswith(PNG_MAGIC)
