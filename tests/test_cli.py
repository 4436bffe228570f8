"""The ``outreach`` CLI end to end on a small demo world: world generate, run (with a bad CSV row),
traces list/show/export, emails export in every format."""

from __future__ import annotations

import csv
import email
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

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


# ------------------------------------------------------------------------------------------------
# A new user's first hour: missing extras, missing stores, dead backends, help text
# ------------------------------------------------------------------------------------------------


OFFER = 'sender_name="S"\nsender_company="C"\nproduct="P"\nvalue_proposition="V"\ncall_to_action="Call?"\n'


def _said(result: Result) -> str:
    return " ".join(result.output.split())


def _tiny_inputs(folder: Path) -> None:
    """A one-prospect CSV, an offer and an events file, valid, in ``folder``."""
    (folder / "p.csv").write_text("first_name,email,company,website\nAda,ada@acme.example,Acme,https://acme.example\n")
    (folder / "o.toml").write_text(OFFER)
    (folder / "events.csv").write_text("message_id,variant,event\nm1,A,sent\nm2,B,sent\n")


@pytest.mark.parametrize(("missing", "args", "extras"), [
    (("torch",), ["demo", "--out", "d", "--distill"], ".[train]"),
    (("torch", "scipy"), ["demo", "--out", "d", "--distill"], ".[train,eval]"),
    (("torch",), ["finetune", "train", "--agent", "writer", "--name", "w", "--base-model", "b"], ".[train]"),
    (("tokenizers",), ["finetune", "bootstrap-base", "--out", "b"], ".[train]"),
    (("scipy",), ["abtest", "plan", "--baseline", "0.05", "--mde", "0.2"], ".[eval]"),
    (("statsmodels",), ["abtest", "report", "events.csv", "--no-save"], ".[eval]"),
    (("matplotlib",), ["eval", "--world", "w", "--config", "t=heuristic,heuristic"], ".[eval]"),
    (("torch",), ["eval", "--world", "w", "--config", "m=miniature:r,heuristic"], ".[train]"),
    (("matplotlib",), ["demo", "--out", "d", "--distill"], ".[train,eval]"),
    (("torch",), ["run", "p.csv", "--offer", "o.toml", "--researcher", "miniature:r"], ".[train]"),
    (("fastapi",), ["serve", "w"], ".[serve]"),
    (("torch",), ["serve", "w"], ".[train]"),
])
def test_a_missing_extra_is_named_before_any_work(cli_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                  missing: tuple[str, ...], args: list[str], extras: str) -> None:
    import sys

    _tiny_inputs(cli_env)
    for module in missing:
        monkeypatch.setitem(sys.modules, module, None)  # find_spec says None, import raises ModuleNotFoundError
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, ModuleNotFoundError)
    said = _said(result)
    assert f'pip install -e "{extras}"' in said and all(m in said for m in missing)
    assert ("torch==2.13.0" in said) == ("torch" in missing)
    assert not (cli_env / "d").exists()  # demo --distill: nothing generated, no campaign run
    assert not (cli_env / "cli.sqlite").exists()


@pytest.mark.parametrize("args", [
    ["traces", "list"], ["traces", "show", "1"], ["traces", "export", "--out", "t.jsonl"],
    ["emails", "export", "--out", "e.csv"], ["miniatures", "list"], ["miniatures", "show", "w"],
    ["finetune", "dataset", "--agent", "writer", "--out", "ds"], ["replay", "--campaign", "q4"],
    ["review", "--agent", "writer"],
])
def test_reading_commands_in_an_empty_folder_create_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUTREACH_CONFIG", raising=False)
    monkeypatch.delenv("OUTREACH_STORE_URL", raising=False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    said = _said(result)
    assert "no store at outreach.sqlite (store_url sqlite:///outreach.sqlite)" in said and "--store" in said
    assert list(tmp_path.iterdir()) == []  # no outreach.sqlite, no export file, no dataset folder


def test_reading_commands_say_which_store_is_empty(cli_env: Path) -> None:
    from store import open_store

    open_store("sqlite:///cli.sqlite").dispose()
    runner = CliRunner()
    result = runner.invoke(app, ["traces", "list", "--agent", "writer"])
    assert result.exit_code == 0 and "no traces of agent 'writer' in the store sqlite:///cli.sqlite" in _said(result)
    result = runner.invoke(app, ["emails", "export", "--out", "e.csv", "--campaign", "q4"])
    said = _said(result)
    assert result.exit_code == 0 and "wrote 0 emails from the store sqlite:///cli.sqlite to e.csv" in said
    assert "the store has no valid emails of campaign 'q4'" in said
    result = runner.invoke(app, ["miniatures", "list"])
    assert result.exit_code == 0 and "no miniatures registered in the store sqlite:///cli.sqlite" in _said(result)


def test_demo_says_where_the_emails_are_and_its_export_command_works(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUTREACH_CONFIG", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--out", "d", "--companies", "4", "--concurrency", "2"])
    assert result.exit_code == 0, result.output
    said = _said(result)
    hint = "export them with `outreach emails export --store sqlite:///d/outreach.sqlite --out d/emails.csv`"
    assert "valid emails of campaign demo-train are in the store sqlite:///d/outreach.sqlite" in said and hint in said
    n = int(said.split("emails: ", 1)[1].split(" ", 1)[0])
    export = runner.invoke(app, ["emails", "export", "--store", "sqlite:///d/outreach.sqlite", "--out", "d/emails.csv"])
    assert export.exit_code == 0 and f"wrote {n} emails" in export.output and n > 0
    with (tmp_path / "d" / "emails.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == n


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_backend_that_does_not_answer_stops_the_run_before_prospects_are_added(cli_env: Path) -> None:
    from sqlmodel import Session, select

    from store import open_store
    from store.models import Campaign

    _tiny_inputs(cli_env)
    port = _closed_port()
    spec = f"openai:m@http://user:sekrit-key@127.0.0.1:{port}/v1"
    result = CliRunner().invoke(app, ["run", "p.csv", "--offer", "o.toml", "--writer", spec])
    assert result.exit_code == 2, result.output
    said = _said(result)
    assert f"the writer backend does not answer at http://127.0.0.1:{port}/v1 (ConnectError" in said
    assert "Nothing was run" in said and "sekrit-key" not in said and "prospects added" not in said
    if (cli_env / "cli.sqlite").exists():
        with Session(open_store("sqlite:///cli.sqlite")) as session:
            assert session.exec(select(Campaign)).all() == []


class _RefusingModel:
    """An OpenAI-compatible server on loopback that lists models but answers every chat request with HTTP 400."""

    def __enter__(self) -> str:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._send(200, b'{"object": "list", "data": [{"id": "m", "object": "model"}]}')

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self._send(400, b'{"error": {"message": "model m is not loaded", "type": "invalid_request_error"}}')

            def log_message(self, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_campaign_whose_every_prospect_failed_exits_non_zero_naming_the_endpoint(cli_env: Path) -> None:
    runner = CliRunner()
    world = runner.invoke(app, ["world", "generate", "--out", "world", "--companies", "2", "--heldout", "0"])
    assert world.exit_code == 0, world.output
    with _RefusingModel() as url:
        result = runner.invoke(app, ["run", "world/prospects_train.csv", "--offer", "world/offer.toml",
                                     "--writer", f"openai:m@{url}"])
    assert result.exit_code == 1, result.output
    said = _said(result)
    assert "2 prospects added" in said and "every prospect run now failed, 2 of 2" in said
    assert f"writer openai:m at {url}" in said and "researcher heuristic" in said


def _placeholders(text: str | None) -> set[str]:
    import re

    return set(re.findall(r"<[a-z_]+>", text or ""))


def test_help_keeps_every_placeholder_and_bracket() -> None:
    """Rich markdown eats ``<model>``-style words as HTML tags unless they are code: each `<...>` in a command's
    docstring or an option's help must show in its ``--help``."""
    import typer

    def walk(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():  # a group (typer's own click)
            yield from walk(sub, [*path, name])

    checked = 0
    for path, command in walk(typer.main.get_command(app), []):
        wanted = _placeholders(command.help) | {p for param in command.params
                                                for p in _placeholders(getattr(param, "help", None))}
        if not wanted:
            continue
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "300"}).output
        assert wanted <= _placeholders(shown), (path, wanted - _placeholders(shown))
        checked += 1
    assert checked >= 5
    run_help = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"}).output
    assert "openai:<model>[@<base_url>]" in run_help


def test_demo_help_promises_only_what_it_evaluates() -> None:
    said = " ".join(CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "300"}).output.split())
    assert "each mix" not in said and "the teacher, and both miniatures together" in said
    assert "demo-researcher" in said and "OUT/outreach.sqlite" in said


def test_progress_callback_hands_steps_and_the_latest_losses_to_the_bar(caplog: pytest.LogCaptureFixture) -> None:
    import io
    import logging
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    from rich.console import Console

    from finetune.train import TrainProgress, progress_callback
    from outreach.cli_finetune import training_progress

    caplog.set_level(logging.INFO, logger="finetune.train")
    seen: list[TrainProgress] = []
    screen = io.StringIO()
    state = SimpleNamespace(global_step=0, max_steps=3, epoch=0.0, is_local_process_zero=True)
    with training_progress("training w", Console(file=screen, force_terminal=True, width=120)) as bar:
        def both(update: TrainProgress) -> None:
            seen.append(update)
            bar(update)

        callback = progress_callback(both)
        callback.on_train_begin(None, state, None)
        for step in (1, 2, 3):
            state.global_step, state.epoch = step, step / 3
            callback.on_step_end(None, state, None)
            callback.on_log(None, state, None, logs={"loss": 2.0 / step, "grad_norm": 1.5, "epoch": step / 3})
            if step == 2:
                callback.on_log(None, state, None, logs={"eval_loss": 0.9})
    assert seen[0] == TrainProgress(step=0, total_steps=3, epoch=0.0)
    assert seen[-1] == TrainProgress(step=3, total_steps=3, epoch=1.0, loss=2 / 3, eval_loss=0.9)
    assert any(r.getMessage().startswith("step 3/3: loss 0.6667, grad_norm 1.5") for r in caplog.records)
    final = screen.getvalue().rsplit("\r", 1)[-1]
    assert "training w" in final and "3/3" in final and "loss 0.667 (eval 0.900)" in final


@pytest.mark.slow
def test_training_progress_bar_shows_steps_and_loss_and_nothing_goes_to_stdout(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A real (tiny) training run through the CLI's bar: the bar ends at steps done of planned with the loss;
    the Trainer prints no ``{'loss': ...}`` dicts and no tqdm bars."""
    import io
    import random

    pytest.importorskip("trl")
    from rich.console import Console

    from finetune.config import TrainConfig
    from finetune.train import TrainProgress, main
    from outreach.cli_common import quiet_library_bars
    from outreach.cli_finetune import training_progress
    from tests.miniature_fixtures import build_tiny_base

    base = build_tiny_base(tmp_path / "base", hidden=32, layers=1, heads=2)
    data = tmp_path / "data"
    data.mkdir()
    rnd = random.Random(0)
    for split, n in (("train", 8), ("eval", 4)):
        rows = [{"messages": [{"role": "user", "content": f"logistics software in {city}"},
                              {"role": "assistant", "content": f"city: {city}"}]}
                for city in (rnd.choice(["Austin", "Denver", "Boston"]) for _ in range(n))]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(base_model=str(base), dataset_dir=str(data), output_dir=str(tmp_path / "run"), method="full",
                         num_train_epochs=1, per_device_train_batch_size=4, logging_steps=1, eval_steps=1,
                         save_steps=1000)
    quiet_library_bars()
    capfd.readouterr()  # what building the base printed
    seen: list[TrainProgress] = []
    screen = io.StringIO()
    with training_progress("training tiny", Console(file=screen, force_terminal=True, width=120)) as bar:
        def both(update: TrainProgress) -> None:
            seen.append(update)
            bar(update)

        result = main(config, on_progress=both)
    out, err = capfd.readouterr()
    assert out == "" and "{'loss'" not in err and "it/s" not in err and "examples/s" not in err
    assert seen[0].step == 0 and seen[-1].step == seen[-1].total_steps == result.metrics["global_step"] == 2
    assert seen[-1].loss == pytest.approx(result.metrics["final_train_loss"]) and seen[-1].eval_loss is not None
    final = screen.getvalue().rsplit("\r", 1)[-1]
    assert "training tiny" in final and "2/2" in final and f"loss {seen[-1].loss:.3f} (eval " in final


@pytest.mark.parametrize(("args", "label"), [
    (["corpus", "search", "acme", "--corpus", "bad.sqlite"], "corpus bad.sqlite is not a usable SQLite corpus"),
    (["traces", "list", "--store", "sqlite:///bad.sqlite"], "store bad.sqlite is not a SQLite database"),
])
def test_a_damaged_store_or_corpus_is_one_line_not_a_traceback(tmp_path: Path, args: list[str], label: str) -> None:
    import subprocess
    import sys

    (tmp_path / "bad.sqlite").write_bytes(bytes(range(256)) * 64)  # not a SQLite file
    done = subprocess.run([sys.executable, "-m", "outreach", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "COLUMNS": "200"})
    assert done.returncode == 2, done.stderr
    said = " ".join(done.stderr.split())
    assert label in said and "Traceback" not in done.stderr and "Traceback" not in done.stdout


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1#outreach", "http://127.0.0.1:8000/v1#vllm",
                                 "http://user:key@127.0.0.1:8000/v1?api_key=k#llama.cpp"])
def test_backend_endpoint_drops_the_server_kind_fragment(url: str) -> None:
    """The probe asks <endpoint>/models: a #<server kind> fragment left on the endpoint would swallow the path."""
    from miniatures.specs import parse_backend_spec
    from outreach.cli_common import backend_endpoint

    assert backend_endpoint(parse_backend_spec(f"openai:m@{url}")) == "http://127.0.0.1:8000/v1"
