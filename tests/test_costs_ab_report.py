"""Real costs for every configuration (the heuristic priced as the teacher it stands in for, local miniatures at a
named instance's hourly price) and the evaluation report's A/B section."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from evals.costs import DEFAULT_COST_BASIS, CostBasis, cost_figures
from evals.report import render_html, write_report
from evals.runner import EvalResult, parse_config, run_eval, world_eval_set
from graphs.arms import parse_arms, record_arms
from graphs.runner import add_prospects, run_campaign
from miniatures.pricing import DEFAULT_PRICES, Price
from outreach.settings import Settings
from store.models import EmailRecord
from tests.helpers import small_world
from tools import CorpusWeb

CALLS = [(1000, 200)] * 4  # tokens in / out of four model calls


def _figures(backends: tuple[str, ...], call_backends: list[str] | None = None, **kw):  # type: ignore[no-untyped-def]
    return cost_figures(backends=backends, emails=2, call_tokens=CALLS, call_costs_usd=[0.0] * 4,
                        call_latencies_ms=[1.0] * 4, run_latencies_ms=[5.0, 5.0], wall_s=1800.0,
                        call_backends=call_backends, **kw)


def test_the_heuristic_is_priced_as_the_teacher_it_stands_in_for_and_labelled_so() -> None:
    figures = _figures(("heuristic", "heuristic"))
    mini = DEFAULT_PRICES["gpt-4.1-mini"]
    expected = 4 * (1000 * mini.input_per_mtok + 200 * mini.output_per_mtok) / 1e6
    assert figures.stand_in_model == "gpt-4.1-mini" and figures.stand_in_cost_usd == pytest.approx(expected)
    assert figures.token_cost_usd == pytest.approx(expected) and figures.instance_cost_usd == 0.0
    assert figures.cost_per_1k_emails_usd == pytest.approx(expected / 2 * 1000) and figures.cost_per_1k_emails_usd > 0
    (line,) = figures.pricing
    assert "stand-in for an API teacher, priced as gpt-4.1-mini at 0.4 / 1.6 USD per million tokens" in line
    assert "2025-04-14" in line and "4,000 / 800 tokens" in line and figures.unpriced == []


def test_local_miniatures_cost_one_named_instance_for_their_wall_time() -> None:
    figures = _figures(("miniature:r", "miniature:w"))
    assert figures.instance_cost_usd == pytest.approx(DEFAULT_COST_BASIS.instance_usd_per_hour / 2)  # half an hour
    assert figures.token_cost_usd == 0.0 and figures.stand_in_model is None and figures.cost_per_1k_emails_usd > 0
    (line,) = figures.pricing
    assert line.startswith("miniature:r, miniature:w: local, one AWS EC2 c7i.large") and "0.08925 USD/h" in line
    # An instance price for the spec (an eval plan's [instance_prices]) replaces the basis for it.
    override = _figures(("miniature:r", "miniature:r"), instance_prices={"miniature": 2.0})
    assert override.instance_cost_usd == pytest.approx(1.0) and "instance_prices" in override.pricing[0]


def test_mixed_configuration_prices_each_call_by_its_backend() -> None:
    figures = _figures(("heuristic", "miniature:w"), call_backends=["heuristic", "miniature:w"] * 2)
    mini = DEFAULT_PRICES["gpt-4.1-mini"]
    per_call = (1000 * mini.input_per_mtok + 200 * mini.output_per_mtok) / 1e6
    assert figures.stand_in_cost_usd == pytest.approx(2 * per_call)
    assert figures.instance_cost_usd == pytest.approx(DEFAULT_COST_BASIS.instance_usd_per_hour / 2)
    assert len(figures.pricing) == 2
    with pytest.raises(ValueError, match="call_backends has 1 entries for 4 calls"):
        _figures(("heuristic",), call_backends=["heuristic"])


def test_the_cost_basis_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "outreach.toml"
    toml.write_text('[costs]\nstand_in_model = "gpt-4.1"\ninstance = "Hetzner CX22"\ninstance_usd_per_hour = 0.006\n'
                    '[prices."gpt-4.1"]\ninput_per_mtok = 2.0\noutput_per_mtok = 8.0\n', encoding="utf-8")
    monkeypatch.setenv("OUTREACH_CONFIG", str(toml))
    settings = Settings()
    basis = settings.cost_basis()
    assert (basis.stand_in_model, basis.instance, basis.instance_usd_per_hour) == ("gpt-4.1", "Hetzner CX22", 0.006)
    figures = _figures(("heuristic", "heuristic"), prices=settings.price_table(), basis=basis)
    assert figures.stand_in_cost_usd == pytest.approx(4 * (1000 * 2.0 + 200 * 8.0) / 1e6)
    missing = _figures(("heuristic",), prices={"heuristic": Price()}, basis=CostBasis(stand_in_model="unknown-model"))
    assert figures.unpriced == [] and "stand-in model 'unknown-model' has no price" in missing.unpriced[0]


@pytest.fixture
def evaluated(sqlite_engine: Engine, tmp_path: Path) -> EvalResult:
    """An evaluation of a small world in a store that also holds an A/B campaign with imported events."""
    world, corpus, offer, prospects = small_world(tmp_path, n=4)
    plan = parse_arms(["teacher=heuristic,heuristic", "mini=heuristic,heuristic"], seed=11)
    add_prospects(sqlite_engine, "ab", offer, prospects)
    record_arms(sqlite_engine, "ab", plan)
    asyncio.run(run_campaign(sqlite_engine, "ab", web=CorpusWeb(corpus), arms=plan))
    with Session(sqlite_engine) as s:
        ids = [e.message_id for e in s.exec(select(EmailRecord)).all()]
    events = tmp_path / "events.csv"
    events.write_text("message_id,event\n" + "".join(f"{m},delivered\n" + (f"{m},open\n" if i % 2 else "")
                                                     for i, m in enumerate(ids)), encoding="utf-8")
    from evals.abtest import import_events

    assert import_events(sqlite_engine, events).stored == len(ids) + len(ids) // 2
    return asyncio.run(run_eval(sqlite_engine, world_eval_set(world, split="train"),
                                [parse_config("teacher=heuristic,heuristic")], web=CorpusWeb(corpus),
                                run_name="costs"))


def test_report_has_nonzero_labelled_costs_and_the_ab_section(evaluated: EvalResult, tmp_path: Path) -> None:
    teacher = evaluated.config("teacher")
    assert teacher.cost is not None and teacher.cost.cost_per_1k_emails_usd and teacher.cost.stand_in_model
    (section,) = evaluated.ab_tests
    assert section.campaign == "ab" and {a.name for a in section.arms} == {"teacher", "mini"}
    files = write_report(evaluated, tmp_path / "out")
    data = json.loads(files.json.read_text(encoding="utf-8"))
    ab = data["ab_tests"][0]
    assert set(ab) >= {"arms", "rates", "comparisons", "plans"} and ab["plans"][0]["n_per_arm"] > 0
    for per in ab["rates"].values():
        assert per["open"]["ci_low"] <= per["open"]["rate"] <= per["open"]["ci_high"]
    assert EvalResult.model_validate(data).ab_tests[0].arms == section.arms
    html = render_html(evaluated)
    assert 'id="ab"' in html and "Campaign ab (control teacher" in html and "Wilson interval" in html
    assert "more sends per arm" in html and "priced as gpt-4.1-mini" in html
    assert f"{teacher.cost.cost_per_1k_emails_usd:.4f}" in html and "0.0000</td><td>0.0000" not in html
