"""A fake OpenAI-compatible teacher on loopback: the heuristic teacher behind HTTP with a fixed latency.

For scale benchmarks and tests of what happens between workers and an API teacher: every
``POST /v1/chat/completions`` is answered with the heuristic backend's answer to the same messages (so both
agents' formats are met), no sooner than ``latency_s`` after it arrived; ``too_many_every=k`` answers every
k-th request with HTTP 429 and a ``Retry-After`` header instead, as a rate-limited API does. It also answers
``GET /v1/models`` (the CLI's backend probe), ``GET /stats`` (requests seen, by status, the most in flight
at once, answers held and answers computed since the last reset) and ``POST /reset`` (forget the requests
seen and, unless the body is ``{"answers": false}``, the computed answers). The heuristic answer to identical
messages is computed once and kept (it is deterministic), so a warm-up pass over a campaign leaves later
passes with the heuristic teacher's own answers to their exact messages at the cost of a dictionary lookup,
as an API's CPU is not the caller's. It listens on ``127.0.0.1`` only.

Usage: ``with FakeTeacher(latency_s=0.2) as url: ...`` (a thread of this process), or
``FakeTeacher.in_subprocess(...)`` (its own process, so its work does not share this process's GIL).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeTeacher", "RequestRecord"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestRecord:
    """One chat-completions request as the server saw it: arrival and answer times (``time.time()`` seconds)
    and the HTTP status it answered with."""

    arrived: float
    answered: float
    status: int


class FakeTeacher:
    """The server (see the module docstring).

    Args:
        latency_s: seconds from a request's arrival to its answer at least (the answer is computed meanwhile).
        too_many_every: answer every k-th chat request with 429 (0: never).
        retry_after_s: the ``Retry-After`` a 429 carries, seconds (also sent as ``retry-after-ms``).
        port: TCP port on 127.0.0.1 (0: any free one).
        answer_unknown: the answer to messages that are not an agent's task (which the heuristic teacher
            refuses); None: such a request gets HTTP 400, as an API answers a request it cannot serve.
        keep_bodies: keep each chat request's JSON body in ``bodies``, in arrival order (for tests that check
            what a client sends; off for benchmarks, whose bodies would add up).

    Raises:
        ValueError: a negative latency or ``too_many_every``.
    """

    def __init__(self, latency_s: float = 0.2, *, too_many_every: int = 0, retry_after_s: float = 0.05,
                 port: int = 0, answer_unknown: str | None = None, keep_bodies: bool = False) -> None:
        if latency_s < 0 or too_many_every < 0:
            raise ValueError(f"latency_s and too_many_every must be >= 0, got {latency_s} and {too_many_every}")
        self.latency_s, self.too_many_every, self.retry_after_s = latency_s, too_many_every, retry_after_s
        self.port = port
        self.answer_unknown = answer_unknown
        self.records: list[RequestRecord] = []
        self.keep_bodies = keep_bodies
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._count = 0
        self._in_flight = 0
        self.max_in_flight = 0
        self._answers: dict[str, tuple[str, int, int]] = {}
        self._computed = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- answering -----------------------------------------------------------------------------------------

    def _answer(self, messages: list[dict[str, Any]]) -> tuple[str, int, int]:
        from langchain_core.messages import convert_to_messages

        from agents.heuristic import HeuristicChatModel

        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        cached = self._answers.get(key)
        if cached is None:
            try:
                answer = HeuristicChatModel().invoke(convert_to_messages(messages))
            except ValueError:  # not an agent's task
                if self.answer_unknown is None:
                    raise
                return self.answer_unknown, 1, 1
            usage = answer.usage_metadata or {"input_tokens": 0, "output_tokens": 0}
            cached = (answer.text, int(usage["input_tokens"]), int(usage["output_tokens"]))
            with self._lock:
                self._answers[key] = cached
                self._computed += 1
        return cached

    def reset(self, *, answers: bool = True) -> None:
        """Forget the requests seen and, with ``answers``, the answers computed; either way each benchmark
        configuration then pays the same (all answers computed anew, or all taken from a warm-up pass)."""
        with self._lock:
            self.records.clear()
            self.bodies.clear()
            if answers:
                self._answers.clear()
            self._count = 0
            self._computed = 0
            self.max_in_flight = self._in_flight

    def stats(self) -> dict[str, Any]:
        """Requests seen (``requests``), by HTTP status (``statuses``), the most in flight at once, answers held
        (``answers``), answers computed since the last reset (``computed``; the rest were looked up) and the
        CPU seconds this process has used (``cpu_s``, all threads)."""
        with self._lock:
            statuses: dict[str, int] = {}
            for r in self.records:
                statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
            return {"requests": len(self.records), "statuses": statuses, "max_in_flight": self.max_in_flight,
                    "answers": len(self._answers), "computed": self._computed, "cpu_s": time.process_time()}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as an API's clients use it

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "fake"}]})
                elif self.path == "/stats":
                    self._send(200, teacher.stats())
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                arrived = time.time()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/reset":
                    teacher.reset(answers=bool(body.get("answers", True)))
                    self._send(200, teacher.stats())
                    return
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with teacher._lock:
                    if teacher.keep_bodies:
                        teacher.bodies.append(body)
                    teacher._count += 1
                    number = teacher._count
                    teacher._in_flight += 1
                    teacher.max_in_flight = max(teacher.max_in_flight, teacher._in_flight)
                status, headers = 500, {}
                payload: dict[str, Any] = {"error": {"message": "internal error"}}
                try:
                    if teacher.too_many_every and number % teacher.too_many_every == 1 % teacher.too_many_every:
                        status, payload = 429, {"error": {"message": "Rate limit reached", "type": "requests",
                                                          "code": "rate_limit_exceeded"}}
                        headers = {"Retry-After": f"{teacher.retry_after_s:g}",
                                   "retry-after-ms": str(int(teacher.retry_after_s * 1000))}
                    else:
                        try:
                            text, tokens_in, tokens_out = teacher._answer(body.get("messages", []))
                        except ValueError as exc:
                            status, payload = 400, {"error": {"message": str(exc), "type": "invalid_request_error"}}
                            return
                        status = 200
                        payload = {
                            "id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(arrived),
                            "model": body.get("model", "fake"),
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                                      "total_tokens": tokens_in + tokens_out},
                        }
                        wait = teacher.latency_s - (time.time() - arrived)
                        if wait > 0:
                            time.sleep(wait)
                finally:
                    with teacher._lock:
                        teacher._in_flight -= 1
                        teacher.records.append(RequestRecord(arrived, time.time(), status))
                    self._send(status, payload, headers)

            def log_message(self, *args: object) -> None:
                return

        return Handler

    # --- serving -------------------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve in a daemon thread; return the base URL (``http://127.0.0.1:PORT/v1``)."""
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-teacher")
        self._thread.start()
        self.port = self._server.server_address[1]
        return self.url

    @property
    def url(self) -> str:
        """The base URL (``http://127.0.0.1:PORT/v1``) once started."""
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _serve(latency_s: float, too_many_every: int, ready: Any) -> None:
        teacher = FakeTeacher(latency_s, too_many_every=too_many_every)
        ready.send(teacher.start())
        threading.Event().wait()  # until the parent terminates this process

    @classmethod
    def in_subprocess(cls, latency_s: float = 0.2, *, too_many_every: int = 0
                      ) -> tuple[multiprocessing.process.BaseProcess, str]:
        """Serve from a new process (spawned); return it and the base URL. ``terminate()`` it when done."""
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=cls._serve, args=(latency_s, too_many_every, child), daemon=True,
                                  name="fake-teacher")
        process.start()
        if not parent.poll(60):
            process.terminate()
            raise RuntimeError("the fake teacher's process did not start within 60 s")
        return process, str(parent.recv())
