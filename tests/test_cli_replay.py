"""`outreach replay` end to end: a campaign, a replay of it, a replay of the replay, the comparison table,
trace filters and the errors a user can cause."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from outreach.cli import app
from outreach.cli_replay import TraceFilterError, parse_trace_filter
from store import open_store
from store.models import Campaign, Trace


@pytest.fixture
def cli_env(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTREACH_CONFIG", str(tmp_path / "outreach.toml"))
    (tmp_path / "outreach.toml").write_text('store_url = "sqlite:///cli.sqlite"\ncorpus_path = "cli-corpus.sqlite"\n')
    runner = CliRunner()
    world = runner.invoke(app, ["world", "generate", "--out", "world", "--companies", "3", "--heldout", "0"])
    assert world.exit_code == 0, world.output
    result = runner.invoke(app, ["run", "world/prospects_train.csv", "--offer", "world/offer.toml", "--campaign", "q4"])
    assert result.exit_code == 0, result.output
    return tmp_path


def test_replay_prints_a_comparison_and_links_traces(cli_env) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    result = runner.invoke(app, ["replay", "--campaign", "q4", "--researcher", "heuristic", "--writer", "heuristic",
                                 "--name", "r1"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "3 runs done" in out
    for figure in ("grounded-fact rate", "fields agreeing with the source", "rubric all-pass rate",
                   "text similarity to the source", "identical inputs"):
        assert figure in out
    result = runner.invoke(app, ["replay", "--campaign", "r1", "--writer", "heuristic", "--name", "r2"])
    assert result.exit_code == 0, result.output
    assert "3 calls answered from the records" in " ".join(result.output.split())
    engine = open_store("sqlite:///cli.sqlite")
    with Session(engine) as s:
        names = set(s.exec(select(Campaign.name)).all())
        traces = s.exec(select(Trace)).all()
    assert names == {"q4", "r1", "r2"}
    assert len(traces) == 6 + 6 + 3 and sum(t.replay_of_id is not None for t in traces) == 9
    # Only the runs of the matching traces are replayed.
    writer = next(t for t in traces if t.agent == "writer" and t.replay_of_id is None)
    result = runner.invoke(app, ["replay", "--traces", f"campaign=q4 ids={writer.id}", "--writer", "heuristic",
                                 "--name", "one"])
    assert result.exit_code == 0 and "1 runs done" in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--campaign", "q4"], "--researcher SPEC, --writer SPEC or both"),
    (["--campaign", "nope", "--writer", "heuristic"], "no campaign named 'nope'"),
    (["--writer", "heuristic"], "exactly one of --campaign"),
    (["--traces", "agent=writer colour=red", "--writer", "heuristic"], "cannot read 'colour=red'"),
    (["--traces", "backend=openai:none", "--writer", "heuristic"], "no finished run has a trace matching"),
    (["--campaign", "q4", "--writer", "gpt"], "unknown backend spec 'gpt'"),
    (["--campaign", "q4", "--writer", "heuristic", "--snapshots-only"], "nothing of 'q4' replayed"),
])
def test_replay_errors_are_clear(cli_env, args, message) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["replay", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_runs_without_a_verified_fact_are_replayed(cli_env) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    # A company the corpus knows nothing about: its research keeps no verified fact (status no_facts).
    (cli_env / "nobody.csv").write_text("first_name,last_name,title,email,company,website\n"
                                        "Ana,Ruiz,CTO,ana@quillmere.example,Quillmere Robotics,"
                                        "https://www.quillmere.example/\n")
    result = runner.invoke(app, ["run", "nobody.csv", "--offer", "world/offer.toml", "--campaign", "nf"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["replay", "--traces", "campaign=q4 no_facts", "--researcher", "heuristic"])
    assert result.exit_code == 2 and "no finished run has a trace matching" in result.output, result.output
    result = runner.invoke(app, ["replay", "--traces", "campaign=nf no_facts", "--researcher", "heuristic",
                                 "--name", "nf2"])
    assert result.exit_code == 0, result.output
    assert "0 runs done, 1 without a verified fact, 0 failed now" in " ".join(result.output.split())


def test_trace_filter_syntax() -> None:
    assert parse_trace_filter("campaign=q4 agent=writer ids=3,10-12 failed") == {
        "campaign": "q4", "agent": "writer", "trace_ids": [3, 10, 11, 12], "failed_only": True}
    assert parse_trace_filter("no_facts failed") == {"no_facts_only": True, "failed_only": True}
    with pytest.raises(TraceFilterError, match="ids must be numbers"):
        parse_trace_filter("ids=a-b")
