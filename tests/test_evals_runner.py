"""Evaluation runs: several configurations through run_campaign, figures read back from the store."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import typer
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from sqlalchemy import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from evals.rubric import RUBRIC_CHECKS
from evals.runner import (
    EvalConfig,
    EvalSpecError,
    load_eval_plan,
    parse_config,
    run_eval,
    world_eval_set,
)
from graphs.models import ModelPool
from outreach.cli_eval import eval_command
from store.models import Campaign, Run
from tests.helpers import small_world
from tools import CorpusWeb


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_parse_config_forms() -> None:
    assert parse_config("teacher=heuristic,heuristic") == EvalConfig("teacher", "heuristic", "heuristic", 5)
    assert parse_config("mini=miniature:r@2, openai:m@http://127.0.0.1:8000/v1,max_pages=2") == EvalConfig(
        "mini", "miniature:r@2", "openai:m@http://127.0.0.1:8000/v1", 2)
    for bad in ("teacher", "teacher=heuristic", "t=a,b,c", "t=a,b,max_pages=0", "bad name=a,b", "=a,b"):
        with pytest.raises(EvalSpecError, match="--config"):
            parse_config(bad)


def test_load_eval_plan(tmp_path: Path) -> None:
    path = tmp_path / "eval.toml"
    path.write_text('reference = "b"\njudge = "openai:j@http://127.0.0.1:1/v1"\n[instance_prices]\nminiature = 0.35\n'
                    '[[configs]]\nname = "a"\nresearcher = "heuristic"\nwriter = "heuristic"\n'
                    '[[configs]]\nname = "b"\nresearcher = "heuristic"\nwriter = "miniature:w"\nmax_pages = 2\n',
                    encoding="utf-8")
    plan = load_eval_plan(path)
    assert [c.name for c in plan.configs] == ["a", "b"] and plan.configs[1].max_pages == 2
    assert plan.reference == "b" and plan.judge.startswith("openai:") and plan.instance_prices["miniature"] == 0.35
    path.write_text('[[configs]]\nname = "a"\nresearcher = "heuristic"\n', encoding="utf-8")
    with pytest.raises(EvalSpecError, match="missing key 'writer'"):
        load_eval_plan(path)
    path.write_text("configs = [", encoding="utf-8")
    with pytest.raises(EvalSpecError, match="not valid TOML"):
        load_eval_plan(path)


async def test_eval_runs_configurations_side_by_side_and_isolates_failures(
        sqlite_engine: Engine, tmp_path: Path) -> None:
    world, corpus, _offer, _prospects = small_world(tmp_path, n=6)
    eval_set = world_eval_set(world, split="train")
    judge_spec = "openai:judge@http://127.0.0.1:1/v1"
    judge = FakeListChatModel(responses=['{"winner": "A"}'] * 100)  # always the first email: pure position bias
    models = ModelPool(preloaded={judge_spec: judge})
    configs = [
        parse_config("teacher=heuristic,heuristic"),
        parse_config("shallow=heuristic,heuristic,max_pages=1"),
        parse_config("mini=miniature:missing,heuristic"),
        parse_config(f"down=heuristic,openai:m@http://127.0.0.1:{_closed_port()}/v1"),
    ]
    result = await run_eval(sqlite_engine, eval_set, configs, web=CorpusWeb(corpus), run_name="t1", judge=judge_spec,
                            models=models, probe=2, prospect_timeout_s=30)

    teacher, shallow, mini, down = (result.config(n) for n in ("teacher", "shallow", "mini", "down"))
    assert teacher.status == shallow.status == "ok"
    assert mini.status == "failed" and "no miniature 'missing' is registered" in (mini.error or "")
    assert down.status == "failed" and "probe prospects failed" in (down.error or "")
    assert "Connection" in (down.error or "") and down.done == 0 and down.failed_runs == 2  # stopped after the probe

    assert teacher.done == teacher.prospects == 6
    assert teacher.research and teacher.research.f1 is not None and teacher.research.f1 > 0.9
    assert teacher.research.grounded_fact_rate == 1.0 and teacher.research.schema_valid_rate == 1.0
    assert teacher.research.researcher_calls == 6 and set(teacher.research.per_field) >= {"location", "industry"}
    assert shallow.research and shallow.research.recall is not None and teacher.research.recall is not None
    assert shallow.research.recall < teacher.research.recall  # one page per prospect finds fewer facts
    assert teacher.email and set(teacher.email.pass_rates) == set(RUBRIC_CHECKS)
    assert teacher.email.all_pass_rate == 1.0 and teacher.email.written == 6
    assert teacher.cost and teacher.cost.emails == 6 and teacher.cost.model_calls == 12
    assert teacher.cost.tokens_in_per_email > teacher.cost.tokens_out_per_email > 0
    # The heuristic is priced as the API teacher it stands in for (evals.costs), never as free.
    assert teacher.cost.cost_per_1k_emails_usd and teacher.cost.stand_in_model == "gpt-4.1-mini"
    assert teacher.cost.latency_p95_ms >= teacher.cost.latency_p50_ms > 0
    assert teacher.cost.throughput_emails_per_s > 0

    assert teacher.pairwise is None  # the reference is not judged against itself
    assert shallow.pairwise and shallow.pairwise.judge == judge_spec
    assert (shallow.pairwise.ties, shallow.pairwise.n, shallow.pairwise.judge_calls) == (6, 6, 12)
    assert shallow.pairwise.win_rate == 0.5 and shallow.pairwise.ci_low < 0.5 < shallow.pairwise.ci_high

    with Session(sqlite_engine) as session:  # one campaign per configuration, through run_campaign
        names = set(session.exec(select(Campaign.name)).all())
        runs = session.exec(select(Run)).all()
    assert names == {"t1:teacher", "t1:shallow", "t1:mini", "t1:down"}
    assert {(r.researcher, r.writer) for r in runs if r.status == "done"} == {("heuristic", "heuristic")}

    again = await run_eval(sqlite_engine, eval_set, configs[:2], web=CorpusWeb(corpus), run_name="t1")
    assert again.config("teacher").done == 6 and again.config("teacher").research == teacher.research
    with Session(sqlite_engine) as session:
        assert len(session.exec(select(Run)).all()) == len(runs)  # resumed: nothing run twice
    back = await run_eval(sqlite_engine, eval_set, [configs[0], parse_config("down=heuristic,heuristic")],
                          web=CorpusWeb(corpus), run_name="t1", retry_failed=True)
    assert back.config("down").status == "ok" and back.config("down").done == 6  # the endpoint is "back"
    with pytest.raises(EvalSpecError, match="reference 'nope'"):
        await run_eval(sqlite_engine, eval_set, configs[:1], web=CorpusWeb(corpus), reference="nope")
    with pytest.raises(EvalSpecError, match="unique"):
        await run_eval(sqlite_engine, eval_set, [configs[0], configs[0]], web=CorpusWeb(corpus))


def test_cli_eval_writes_the_report(tmp_path: Path) -> None:
    world, _corpus, _offer, _prospects = small_world(tmp_path, n=4)
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("noop")(lambda: None)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "eval", "--world", str(world), "--split", "train", "--corpus", str(tmp_path / "corpus.sqlite"),
        "--store", f"sqlite:///{tmp_path / 'cli.sqlite'}", "--config", "teacher=heuristic,heuristic",
        "--config", "shallow=heuristic,heuristic,max_pages=1", "--config", "mini=miniature:nope,heuristic",
        "--instance-price", "heuristic=3.6", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "configuration mini failed" in result.output and "no miniature 'nope' is registered" in result.output
    assert "teacher" in result.output and "reference" in result.output
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [c["status"] for c in data["configs"]] == ["ok", "ok", "failed"]
    cost = data["configs"][0]["cost"]
    assert cost["instance_cost_usd"] == pytest.approx(3.6 * cost["wall_s"] / 3600)
    assert cost["cost_per_1k_emails_usd"] > 0
    assert (out / "report.html").is_file() and (out / "plots" / "quality_vs_cost.png").is_file()
    bad = CliRunner().invoke(app, ["eval", "--world", str(world), "--config", "oops"])
    assert bad.exit_code == 2 and "--config 'oops'" in bad.output


@pytest.mark.slow
async def test_200_prospects_x_3_configurations_all_finish(sqlite_engine: Engine, tmp_path: Path) -> None:
    """200 demo prospects through 3 offline configurations at concurrency 8 (speed: benchmarks/campaign_speed.py)."""
    from evals.world import generate_world
    from tools import Corpus, import_html

    world = tmp_path / "world"
    generate_world(world, n_companies=200, seed=7)
    corpus = Corpus(tmp_path / "corpus.sqlite")
    import_html(world / "sites", corpus, root=world / "sites")
    eval_set = world_eval_set(world, split="all")
    configs = [parse_config("teacher=heuristic,heuristic"), parse_config("shallow=heuristic,heuristic,max_pages=1"),
               parse_config("deep=heuristic,heuristic,max_pages=2")]
    result = await run_eval(sqlite_engine, eval_set, configs, web=CorpusWeb(corpus), concurrency=8)
    assert all(c.status == "ok" and c.done + c.failed_runs == 200 for c in result.configs)
    assert result.config("teacher").done == 200 and result.config("shallow").done >= 195
