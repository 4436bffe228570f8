"""Credentials in backend specs and upstream errors are used for requests but never stored, printed or logged.

A loopback OpenAI-compatible server checks the credentials of ``openai:heuristic@http://USER:KEY@host/v1?api_key=QKEY``
(HTTP Basic from the userinfo, the query with every request) and answers with the heuristic teacher; in its
failing mode it rejects every call with an error that echoes what it got (the Basic header, the key in clear,
the query string, a ``Bearer sk-...`` key). Campaigns through it must leave none of these anywhere in the store,
the logs (DEBUG, httpx's request lines included) or the CLI's output.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import pytest
from langchain_core.messages import HumanMessage, convert_to_messages
from sqlalchemy import Engine, select
from sqlmodel import SQLModel
from typer.testing import CliRunner

from agents import HeuristicChatModel
from graphs.recorder import TraceRecorder
from graphs.runner import add_prospects, run_campaign
from miniatures.redaction import (
    HTTP_LOGGERS,
    MASK,
    RedactingFilter,
    install_log_redaction,
    redact,
    register_secret,
    split_url_credentials,
)
from miniatures.specs import BackendSpecError, parse_backend_spec
from store.models import Run, Trace
from tests.helpers import small_world
from tools import CorpusWeb

USER = "team"
KEY = "hunter2-KEY-9f3a"  # no known key shape: masked only because the backend registered it
QUERY_KEY = "q-secret-77c1"
ENV_KEY = "sk-test-Zq8rLw3NvB6xY1"
BASIC = base64.b64encode(f"{USER}:{KEY}".encode()).decode()
SECRETS = (KEY, QUERY_KEY, BASIC, ENV_KEY)


@dataclass
class _State:
    """What the server expects and saw: ``fail`` makes it reject every chat call, echoing the credentials."""

    fail: bool = False
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Authorization)


class _Handler(BaseHTTPRequestHandler):
    model = HeuristicChatModel()
    state: _State  # set on a subclass per server

    def _authorised(self) -> bool:
        query = parse_qs(urlsplit(self.path).query)
        return self.headers.get("Authorization") == f"Basic {BASIC}" and query.get("api_key") == [QUERY_KEY]

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _reject(self, status: int) -> None:
        """An error that echoes every credential it got, as careless proxies and servers do."""
        auth = self.headers.get("Authorization")
        echo = (f"rejected {self.command} {self.path} with Authorization: {auth}; password {KEY!r}; "
                f"headers {dict(self.headers)}; expected Bearer {ENV_KEY}")
        self._send(status, {"error": {"message": echo, "type": "invalid_request_error", "code": status}})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.state.seen.append(("GET", self.path, self.headers.get("Authorization")))
        if urlsplit(self.path).path != "/v1/models":
            self._reject(404)
        elif not self._authorised():
            self._reject(401)
        else:
            self._send(200, {"object": "list", "data": [{"id": "heuristic", "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.state.seen.append(("POST", self.path, self.headers.get("Authorization")))
        if urlsplit(self.path).path != "/v1/chat/completions":
            self._reject(404)
            return
        if self.state.fail or not self._authorised():
            self._reject(401)
            return
        answer = self.model.invoke(convert_to_messages(body["messages"]))
        usage = answer.usage_metadata
        tokens = (usage["input_tokens"], usage["output_tokens"]) if usage else (0, 0)
        self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer.text}}],
            "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1], "total_tokens": sum(tokens)},
        })

    def log_message(self, *args: object) -> None:
        return


@dataclass
class _Server:
    state: _State
    port: int

    @property
    def spec(self) -> str:
        return f"openai:heuristic@http://{USER}:{KEY}@127.0.0.1:{self.port}/v1?api_key={QUERY_KEY}"


@pytest.fixture
def server() -> Iterator[_Server]:
    state = _State()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Server(state=state, port=int(httpd.server_address[1]))
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def bare_http_loggers() -> Iterator[None]:
    """The HTTP stack's loggers without a ``RedactingFilter`` (before and after): a test must get them
    from the code under test, not from an earlier test."""

    def strip() -> None:
        for name in list(logging.root.manager.loggerDict):
            if name.split(".", 1)[0] in HTTP_LOGGERS:
                target = logging.getLogger(name)
                for f in [f for f in target.filters if isinstance(f, RedactingFilter)]:
                    target.removeFilter(f)

    strip()
    yield
    strip()


def _stored_text(engine: Engine) -> str:
    """Every row of every table, as text (runs, traces and tool_calls included)."""
    with engine.connect() as conn:
        return "\n".join(repr(conn.execute(select(table)).all()) for table in SQLModel.metadata.sorted_tables)


def _assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} found in {where}"


# -- redact, by shape and by value ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("openai:m@http://u:p4ssw0rd-x@host:8000/v1", "openai:m@http://***@host:8000/v1"),
    ("openai:m@http://ONLYKEY@host/v1", "openai:m@http://***@host/v1"),
    ("http://u:p@ss@host/v1/models", "http://***@host/v1/models"),
    ("http://host/v1?api_key=abc123&model=x", "http://host/v1?api_key=***&model=x"),
    ("GET https://h/x?page=2&access_token=t0k#top failed", "GET https://h/x?page=2&access_token=***#top failed"),
    ("401: Authorization: Bearer abc.def-ghi_jkl", "401: Authorization: ***"),
    ("{'authorization': 'Basic dXNlcjpwYXNz'}", "{'authorization': '***'}"),
    ("Incorrect API key provided: sk-proj-a1B2c3D4e5F6g7.", "Incorrect API key provided: ***."),
    ("token hf_abcdefghijklmnopqrstu expired", "token *** expired"),
    ("x-api-key: zzz-123", "x-api-key: ***"),
])
def test_redact_masks_credentials_by_shape(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "Basic authentication failed; bearer token missing",
    "openai:gpt-4.1-mini@http://127.0.0.1:8000/v1",
    "ollama:qwen2.5:3b",
    "see https://example.com/about?page=2 or mail jane@example.com",
    "the task-manager-service risk-assessment is fine",
])
def test_redact_leaves_text_without_secrets_alone(text: str) -> None:
    assert redact(text) == text


def test_registered_secret_is_masked_wherever_it_appears() -> None:
    secret = "plain-words-secret-5b1e"
    assert redact(f"server said: {secret} is wrong") == f"server said: {secret} is wrong"
    register_secret(secret)
    assert redact(f"server said: {secret} is wrong") == f"server said: {MASK} is wrong"
    register_secret("abc")  # too short to replace everywhere: ignored
    assert redact("abc abc") == "abc abc"
    assert redact(None) is None


def test_split_url_credentials_decodes_userinfo_and_keeps_the_query() -> None:
    parts = split_url_credentials("http://us%40er:p%40ss-word@127.0.0.1:8000/v1?api_key=QQ-123&api-version=2")
    assert parts.url == "http://127.0.0.1:8000/v1"
    assert parts.auth == ("us@er", "p@ss-word")
    assert parts.params == (("api_key", "QQ-123"), ("api-version", "2"))
    assert {"p%40ss-word", "p@ss-word", "QQ-123"} <= set(parts.secrets)
    assert "2" not in parts.secrets  # not a secret-named parameter
    bare = split_url_credentials("http://127.0.0.1:8000/v1")
    assert (bare.url, bare.auth, bare.params, bare.secrets) == ("http://127.0.0.1:8000/v1", None, (), ())


def test_spec_errors_do_not_quote_the_key() -> None:
    with pytest.raises(BackendSpecError) as info:
        parse_backend_spec("openai:@http://u:not-a-shape-9z@host/v1")
    assert "not-a-shape-9z" not in str(info.value) and MASK in str(info.value)


def test_redacting_filter_masks_message_args_and_traceback(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("tests.secrets.filter")
    log.addFilter(RedactingFilter())
    caplog.set_level(logging.DEBUG, logger=log.name)
    try:
        raise RuntimeError("upstream said Authorization: Bearer tok-3f9a8b7c6d5e")
    except RuntimeError:
        log.warning("call to %s failed", "http://u:pw-77aa@h/v1?token=t-1", exc_info=True)
    assert "tok-3f9a8b7c6d5e" not in caplog.text and "pw-77aa" not in caplog.text and "t-1" not in caplog.text
    assert "http://***@h/v1?token=***" in caplog.text and "RuntimeError" in caplog.text  # traceback kept, masked
    assert caplog.records[0].exc_info is None


@pytest.mark.usefixtures("bare_http_loggers")
def test_install_log_redaction_covers_existing_child_loggers() -> None:
    child = logging.getLogger("httpcore2.tests_secrets_child")
    install_log_redaction()
    assert any(isinstance(f, RedactingFilter) for f in child.filters)
    assert any(isinstance(f, RedactingFilter) for f in logging.getLogger("httpx").filters)
    install_log_redaction()
    assert sum(isinstance(f, RedactingFilter) for f in child.filters) == 1


def test_recorder_stores_backend_and_model_errors_masked() -> None:
    spec = "openai:m@http://u:rec-key-1234@h/v1"
    recorder = TraceRecorder({"writer": spec})
    run_id = uuid4()
    recorder.on_chat_model_start({}, [[HumanMessage("hi")]], run_id=run_id, metadata={"agent": "writer"})
    recorder.on_llm_error(RuntimeError("401: Bearer rec-key-1234 refused"), run_id=run_id)
    assert [(t.backend, t.error) for t in recorder.traces] == [
        ("openai:m@http://***@h/v1", f"RuntimeError: 401: Bearer {MASK} refused")]


# -- end to end: a campaign, the store, the logs, the CLI ---------------------------------------------------


@pytest.mark.usefixtures("bare_http_loggers")
def test_campaign_sends_credentials_and_stores_and_logs_none(tmp_path: Path, sqlite_engine: Engine,
                                                             server: _Server, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, corpus, offer, prospects = small_world(tmp_path, n=2)
    add_prospects(sqlite_engine, "ok", offer, prospects)
    ok = asyncio.run(run_campaign(sqlite_engine, "ok", web=CorpusWeb(corpus), researcher=server.spec,
                                  writer=server.spec))
    assert ok.done == len(prospects), ok.failures  # the server accepted every call's credentials
    posts = [s for s in server.state.seen if s[0] == "POST"]
    assert posts and all(path == f"/v1/chat/completions?api_key={QUERY_KEY}" and auth == f"Basic {BASIC}"
                         for _, path, auth in posts)

    server.state.fail = True
    add_prospects(sqlite_engine, "echo", offer, prospects)
    bad = asyncio.run(run_campaign(sqlite_engine, "echo", web=CorpusWeb(corpus), researcher=server.spec,
                                   writer=server.spec))
    assert bad.failed == len(prospects)
    assert all("rejected POST" in reason and MASK in reason for _, reason in bad.failures)
    _assert_no_secret("the campaign report", repr(bad))
    # The key from $OPENAI_API_KEY, sent as a Bearer token to a URL without credentials, echoed back.
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    add_prospects(sqlite_engine, "env", offer, prospects[:1])
    env = asyncio.run(run_campaign(sqlite_engine, "env", web=CorpusWeb(corpus),
                                   researcher=f"openai:heuristic@http://127.0.0.1:{server.port}/v1"))
    assert env.failed == 1 and server.state.seen[-1][2] == f"Bearer {ENV_KEY}"
    _assert_no_secret("the campaign report", repr(env))

    shown = f"openai:heuristic@http://***@127.0.0.1:{server.port}/v1?api_key=***"
    plain = f"openai:heuristic@http://127.0.0.1:{server.port}/v1"
    with sqlite_engine.connect() as conn:
        assert set(conn.execute(select(Run.researcher, Run.writer)).all()) == {  # type: ignore[call-overload]
            (shown, shown), (plain, "heuristic")}
        assert {row[0] for row in conn.execute(select(Trace.backend))} == {shown, plain}  # type: ignore[call-overload]
        errors = [row[0] for row in conn.execute(select(Trace.error).where(Trace.error.is_not(None)))]  # type: ignore[call-overload,union-attr]
    assert errors and all("rejected POST" in e for e in errors)
    _assert_no_secret("the store", _stored_text(sqlite_engine))
    db = Path(str(sqlite_engine.url.database))
    for path in (db, db.with_name(db.name + "-wal")):
        if path.exists():
            _assert_no_secret(path.name, path.read_bytes().decode("latin-1"))

    _assert_no_secret("the logs", caplog.text + "\n".join(r.getMessage() for r in caplog.records))
    requests = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HTTP Request:")]
    assert any(f"127.0.0.1:{server.port}/v1/chat/completions?api_key=*** " in m for m in requests)  # logged, masked
    assert any(r.name == "graphs.runner" and "rejected POST" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("bare_http_loggers")
def test_cli_run_prints_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: _Server,
                                  caplog: pytest.LogCaptureFixture) -> None:
    from outreach.cli import app

    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTREACH_CONFIG", str(tmp_path / "outreach.toml"))
    (tmp_path / "outreach.toml").write_text('store_url = "sqlite:///cli.sqlite"\ncorpus_path = "cli-corpus.sqlite"\n')
    runner = CliRunner()
    world = runner.invoke(app, ["world", "generate", "--out", "world", "--companies", "2", "--heldout", "0"])
    assert world.exit_code == 0, world.output
    run = ["-v", "run", "world/prospects_train.csv", "--offer", "world/offer.toml", "--researcher", server.spec,
           "--writer", server.spec]
    ok = runner.invoke(app, [*run, "--campaign", "ok"])
    assert ok.exit_code == 0, ok.output
    assert "prospects added" in ok.output
    assert ("GET", f"/v1/models?api_key={QUERY_KEY}", f"Basic {BASIC}") in server.state.seen  # the probe's credentials
    server.state.fail = True
    bad = runner.invoke(app, [*run, "--campaign", "echo"])
    assert bad.exit_code != 0 and "rejected POST" in bad.output, bad.output
    for result in (ok, bad):
        _assert_no_secret("the CLI output", result.output + result.stderr)
    _assert_no_secret("the logs", caplog.text)
