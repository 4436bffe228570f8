"""The ``openai:`` backend against a real OpenAI-compatible HTTP server on loopback, started here.

The server answers ``POST /v1/chat/completions`` by running the heuristic teacher on the request's
messages, so a campaign through ``openai:heuristic@http://127.0.0.1:PORT/v1`` must write exactly the
emails the in-process ``heuristic`` backend writes, with token usage taken from the response.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from langchain_core.messages import convert_to_messages
from langchain_core.messages.ai import UsageMetadata
from sqlmodel import Session, select

from agents import HeuristicChatModel
from graphs.runner import add_prospects, run_campaign
from store.models import EmailRecord, Trace
from tests.helpers import small_world
from tools import CorpusWeb


class _Handler(BaseHTTPRequestHandler):
    model = HeuristicChatModel()
    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        self.requests.append(body)
        answer = self.model.invoke(convert_to_messages(body["messages"]))
        usage = answer.usage_metadata or UsageMetadata(input_tokens=0, output_tokens=0, total_tokens=0)
        payload = {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer.text}}],
            "usage": {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
                      "total_tokens": usage["total_tokens"]},
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def openai_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_campaign_over_openai_compatible_server_matches_in_process(tmp_path, sqlite_engine, openai_server):
    _, corpus, offer, prospects = small_world(tmp_path, n=3)
    spec = f"openai:heuristic@{openai_server}"
    add_prospects(sqlite_engine, "remote", offer, prospects)
    add_prospects(sqlite_engine, "local", offer, prospects)
    remote = asyncio.run(run_campaign(sqlite_engine, "remote", web=CorpusWeb(corpus), researcher=spec, writer=spec))
    local = asyncio.run(run_campaign(sqlite_engine, "local", web=CorpusWeb(corpus)))
    assert remote.done == local.done == len(prospects)
    assert len(_Handler.requests) == 2 * len(prospects)
    assert all(r["model"] == "heuristic" and r["temperature"] == 0 for r in _Handler.requests)
    with Session(sqlite_engine) as s:
        emails = s.exec(select(EmailRecord).order_by(EmailRecord.run_id)).all()
        traces = s.exec(select(Trace).where(Trace.backend == spec)).all()
    half = len(emails) // 2
    assert [(e.subject, e.body) for e in emails[:half]] == [(e.subject, e.body) for e in emails[half:]]
    assert len(traces) == 2 * len(prospects)
    assert all(t.input_tokens > 0 and t.output_tokens > 0 and t.latency_ms > 0 for t in traces)


def test_a_second_event_loop_reaches_the_same_server(tmp_path, sqlite_engine, openai_server):
    """Two campaigns, each in its own ``asyncio.run``, over one base URL: the second must not reuse an HTTP
    client bound to the first (closed) loop, which failed its runs with "Event loop is closed"."""
    _, corpus, offer, prospects = small_world(tmp_path, n=2)
    spec = f"openai:heuristic@{openai_server}"
    reports = []
    for campaign in ("first", "second"):
        add_prospects(sqlite_engine, campaign, offer, prospects)
        reports.append(asyncio.run(run_campaign(sqlite_engine, campaign, web=CorpusWeb(corpus), researcher=spec,
                                                writer=spec, concurrency=1)))
    assert [(r.done, r.failed) for r in reports] == [(len(prospects), 0), (len(prospects), 0)]
