"""The ``outreach`` CLI end to end on a small demo world: world generate, run (with a bad CSV row),
traces list/show/export, emails export in every format."""

from __future__ import annotations

import csv
import email
import json

import pytest
from typer.testing import CliRunner

from outreach.cli import app


@pytest.fixture
def cli_env(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTREACH_CONFIG", str(tmp_path / "outreach.toml"))
    (tmp_path / "outreach.toml").write_text('store_url = "sqlite:///cli.sqlite"\ncorpus_path = "cli-corpus.sqlite"\n')
    return tmp_path


def test_world_run_and_exports(cli_env):
    runner = CliRunner()
    result = runner.invoke(app, ["world", "generate", "--out", "world", "--companies", "4", "--heldout", "0"])
    assert result.exit_code == 0, result.output
    prospects = (cli_env / "world" / "prospects_train.csv").read_text()
    (cli_env / "p.csv").write_text(prospects + "Zed,Q,CTO,not-an-email,Zeta,https://zeta.example\n")
    run = ["run", "p.csv", "--offer", "world/offer.toml", "--campaign", "t", "--concurrency", "2"]
    result = runner.invoke(app, run)
    assert result.exit_code == 0, result.output
    assert "row 6" in result.output and "invalid email" in result.output
    assert "4 prospects added" in result.output

    result = runner.invoke(app, ["traces", "list", "--agent", "writer"])
    assert result.exit_code == 0 and result.output.count("heuristic") == 4
    result = runner.invoke(app, ["traces", "show", "1"])
    assert result.exit_code == 0 and '"messages"' in result.output
    assert runner.invoke(app, ["traces", "show", "999"]).exit_code == 1

    result = runner.invoke(app, ["traces", "export", "--format", "openai-jsonl", "--out", "t.jsonl"])
    assert result.exit_code == 0
    rows = [json.loads(line) for line in (cli_env / "t.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["messages"][-1]["role"] == "assistant" for r in rows)

    assert runner.invoke(app, ["emails", "export", "--format", "csv", "--out", "e.csv"]).exit_code == 0
    with (cli_env / "e.csv").open() as fh:
        exported = list(csv.DictReader(fh))
    assert len(exported) == 4 and all("{{" not in r["body"] for r in exported)
    assert runner.invoke(app, ["emails", "export", "--format", "jsonl", "--out", "e.jsonl"]).exit_code == 0
    assert len((cli_env / "e.jsonl").read_text().splitlines()) == 4
    assert runner.invoke(app, ["emails", "export", "--format", "eml", "--out", "outbox"]).exit_code == 0
    emls = sorted((cli_env / "outbox").glob("*.eml"))
    assert len(emls) == 4
    message = email.message_from_bytes(emls[0].read_bytes())
    assert message["Subject"] and "@" in message["To"]
    assert runner.invoke(app, ["emails", "export", "--format", "pdf"]).exit_code == 2

    # rerun resumes: nothing to do
    result = runner.invoke(app, ["run", "p.csv", "--offer", "world/offer.toml", "--campaign", "t"])
    assert result.exit_code == 0 and "0 prospects added, 4 already there" in result.output


def test_run_errors_are_clear(cli_env):
    runner = CliRunner()
    (cli_env / "p.csv").write_text("first_name,email,company\nA,a@x.example,X\n")
    (cli_env / "offer.toml").write_text('sender_name = "S"\n')
    result = runner.invoke(app, ["run", "p.csv", "--offer", "offer.toml"])
    assert result.exit_code == 2 and "sender_company" in result.output
    (cli_env / "offer.toml").write_text(
        'sender_name="S"\nsender_company="C"\nproduct="P"\nvalue_proposition="V"\ncall_to_action="Call?"\n')
    result = runner.invoke(app, ["run", "p.csv", "--offer", "offer.toml"])
    assert result.exit_code == 2 and "no corpus" in result.output
    result = runner.invoke(app, ["run", "p.csv", "--offer", "offer.toml", "--writer", "gpt-5"])
    assert result.exit_code == 2 and "unknown backend spec" in result.output


def test_demo_refuses_a_folder_holding_another_demo_world(tmp_path):
    world = tmp_path / "demo" / "world"
    world.mkdir(parents=True)
    (world / "world.json").write_text(json.dumps({"seed": 7, "n_companies": 200}))
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--distill"])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "already holds a demo world of 200 companies" in said and "Use another --out folder" in said
    assert not (world / "prospects_train.csv").exists()  # nothing generated over it
