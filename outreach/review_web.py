"""The review page of ``outreach review --web``: FastAPI, server-rendered HTML, no front-end build step.

One page shows the current queue item (``finetune.review``): the email (rendered and as templates), the
profile with its evidence quotes and source links, the validation checks, the counts and the queue position.
Plain HTML forms approve, reject and edit (an inline editor in a ``<details>`` element), so the page works
without JavaScript; a small inline script adds keyboard shortcuts (``a`` approve, ``e`` edit, Ctrl+Enter
save, ``r`` reject, ``j``/``k`` next/previous, ``?`` help). A POST writes through ``apply_review`` and
redirects (303) to the next item; a bad edit re-renders the page with the error and the reviewer's text
(400), a trace that no longer exists gives 404; neither writes anything.

Security (page text is hostile input: research reads the open web):

* **Binding**: 127.0.0.1 by default; any other address refuses to start without a token
  (``miniatures.server.check_bind``). With a token every request must carry it: ``?token=`` once (which
  sets an HttpOnly, SameSite=Strict cookie and redirects to the same page without it), the cookie, or
  ``Authorization: Bearer <token>``; otherwise 401. A ``Host`` header that is not ``host[:port]``
  (``miniatures.server.parse_host``: no userinfo such as ``evil.example@127.0.0.1``) is refused (400), and
  ``allowed_hosts`` refuses other host names (400), which stops DNS rebinding against a loopback server.
* **Escaping**: Jinja2 with autoescape on; nothing from the store is marked safe; links are made only of
  ``http``/``https`` URLs and carry ``rel="noopener noreferrer nofollow"``.
* **CSRF**: every form carries ``HMAC-SHA256(app secret, per-browser cookie)``; a POST without it, with a
  wrong one, or whose ``Origin``/``Referer`` names another origin gets 403. (``Referrer-Policy: no-referrer``
  makes browsers send ``Origin: null`` on same-origin form posts, so ``null`` is left to the token.)
* **Headers**: a ``Content-Security-Policy`` allowing only this response's nonce for scripts and styles,
  ``form-action 'self'``, ``base-uri 'none'``, ``frame-ancestors 'none'``; ``X-Content-Type-Options:
  nosniff``; ``Referrer-Policy: no-referrer``; ``Cache-Control: no-store``.

This module imports fastapi (extra ``serve``) and jinja2 (extra ``eval``): ``outreach review`` imports it only
for ``--web``, after checking they are installed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from starlette.concurrency import run_in_threadpool

from finetune.review import (
    REVIEW_ACTIONS,
    ReviewInputError,
    ReviewItem,
    ReviewNotFoundError,
    apply_review,
    editable_text,
    load_item,
    output_from_editable,
    queue_trace_ids,
    review_counts,
)
from miniatures.server import LOOPBACK_NAMES, parse_host

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "CSRF_COOKIE",
    "MAX_FORM_BYTES",
    "TOKEN_COOKIE",
    "create_review_app",
    "loopback_hosts",
    "run_review_server",
    "safe_url",
]

logger = logging.getLogger(__name__)

#: Cookie holding the access token (when the app has one).
TOKEN_COOKIE = "review_token"
#: Cookie holding the per-browser CSRF nonce.
CSRF_COOKIE = "review_csrf"
#: Largest accepted form body, bytes.
MAX_FORM_BYTES = 1_000_000
_TEMPLATES = Path(__file__).resolve().parent / "templates"
_TEMPLATE = "review.html.j2"


def safe_url(url: str | None) -> str | None:
    """``url`` when it is an absolute ``http``/``https`` URL with a host, else None (never a ``javascript:`` link)."""
    if not url:
        return None
    parts = urlsplit(url.strip())
    return url.strip() if parts.scheme.lower() in ("http", "https") and parts.netloc else None


def loopback_hosts(host: str) -> list[str]:
    """Host names a browser may use for a server bound to loopback ``host`` (``localhost``, 127.0.0.1, ::1)."""
    return sorted({host.strip("[]").lower(), *LOOPBACK_NAMES})


def _csrf_token(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, nonce.encode("utf-8"), hashlib.sha256).hexdigest()


def _host_name(request: Request) -> str | None:
    """The request's host name (lower case, IPv6 without brackets), or None unless exactly one ``Host`` header
    holds ``host[:port]``."""
    values = request.headers.getlist("host")
    try:
        return parse_host(values[0])[0] if len(values) == 1 else None
    except ValueError:
        return None


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}".lower()


def _foreign_origin(request: Request) -> str | None:
    """The other origin a POST comes from, or None when it is ours (or unknown: the CSRF token decides)."""
    origin = request.headers.get("origin")
    if origin and origin.strip().lower() != "null":
        return None if origin.strip().lower().rstrip("/") == _own_origin(request) else origin
    referer = request.headers.get("referer")
    if referer:
        parts = urlsplit(referer)
        if f"{parts.scheme}://{parts.netloc}".lower() != _own_origin(request):
            return referer
    return None


def create_review_app(
    engine: Engine,
    *,
    agent: str | None = None,
    campaign: str | None = None,
    backend: str | None = None,
    unreviewed_only: bool = True,
    failed_first: bool = True,
    token: str | None = None,
    reviewer: str = "",
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """Build the review page app over the store's queue.

    Args:
        engine: the store.
        agent, campaign, backend, unreviewed_only, failed_first: the queue's filters (``finetune.review.review_queue``).
        token: when set, every request must carry it (query once, cookie, or bearer header), else 401.
        reviewer: the name written on each review.
        allowed_hosts: host names accepted in the ``Host`` header (``loopback_hosts(host)`` for a loopback
            server); None accepts any well-formed one (a token, or the test client).

    Returns:
        The FastAPI app (``app.state.api_key`` is the token, so ``check_bind`` and ``serve_in_thread`` apply
        the loopback rule to it).

    Raises:
        ReviewInputError: ``agent`` is not a reviewed agent.
    """
    filters: dict[str, Any] = {"agent": agent, "campaign": campaign, "backend": backend}
    queue_filters: dict[str, Any] = {**filters, "unreviewed_only": unreviewed_only, "failed_first": failed_first}
    review_counts(engine, **filters)  # fails early on a bad filter
    secret = secrets.token_bytes(32)
    hosts = {h.strip("[]").lower() for h in allowed_hosts} if allowed_hosts is not None else None
    env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["safe_url"] = safe_url
    template = env.get_template(_TEMPLATE)

    app = FastAPI(title="outreach review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api_key = token
    app.state.engine = engine

    def _headers(response: Response, nonce: str) -> Response:
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "no-store"
        return response

    def _message_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
        html = template.render(nonce=request.state.nonce, title=title, message=message, item=None, counts=None,
                               standalone=True)
        return HTMLResponse(html, status_code=status)

    def _authorised(request: Request) -> bool:
        if token is None:
            return True
        offered = [request.cookies.get(TOKEN_COOKIE, "")]
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            offered.append(auth[7:].strip())
        return any(o and hmac.compare_digest(o.encode("utf-8"), token.encode("utf-8")) for o in offered)

    @app.middleware("http")
    async def security(request: Request, call_next: Any) -> Response:
        request.state.nonce = secrets.token_urlsafe(16)
        name = _host_name(request)
        if name is None or (hosts is not None and name not in hosts):
            return _headers(_message_page(request, 400, "Unknown host",
                                          "This review server does not answer for that host name; open it at the "
                                          "address `outreach review --web` printed."), request.state.nonce)
        if token is not None and not _authorised(request):
            query_token = request.query_params.get("token", "")
            if query_token and hmac.compare_digest(query_token.encode("utf-8"), token.encode("utf-8")):
                rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                redirect = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), status_code=303)
                redirect.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
                return _headers(redirect, request.state.nonce)
            return _headers(_message_page(request, 401, "Token required",
                                          "This review page needs its access token: open the URL with ?token=... "
                                          "that `outreach review --web` printed, or send Authorization: Bearer "
                                          "<token>."), request.state.nonce)
        response = await call_next(request)
        return _headers(response, request.state.nonce)

    def _page(request: Request, trace_id: int | None, *, status: int = 200, error: str | None = None,
              editor_text: str | None = None, note: str = "") -> Response:
        ids = queue_trace_ids(engine, **queue_filters)
        counts = review_counts(engine, **filters)
        nonce_cookie = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        item: ReviewItem | None = None
        if trace_id is None and ids:
            trace_id = ids[0]
        if trace_id is not None:
            try:
                item = load_item(engine, trace_id)
            except ReviewNotFoundError as exc:
                error, status = str(exc), 404
        position = ids.index(item.trace_id) if item is not None and item.trace_id in ids else None
        if item is not None and position is not None:
            prev_id = ids[position - 1] if position > 0 else None
            next_id = ids[position + 1] if position + 1 < len(ids) else None
        else:
            prev_id, next_id = None, (ids[0] if ids and (item is None or ids[0] != item.trace_id) else None)
        html = template.render(
            nonce=request.state.nonce, standalone=False, title="Review", message=None, item=item, counts=counts,
            position=position, queue_length=len(ids), prev_id=prev_id, next_id=next_id, error=error,
            editor_text=editor_text if editor_text is not None else (editable_text(item) if item else ""),
            editor_open=editor_text is not None, note=note, csrf=_csrf_token(secret, nonce_cookie),
            reviewer=reviewer, filters={k: v for k, v in filters.items() if v is not None},
            unreviewed_only=unreviewed_only,
        )
        response = HTMLResponse(html, status_code=status)
        if request.cookies.get(CSRF_COOKIE) != nonce_cookie:
            response.set_cookie(CSRF_COOKIE, nonce_cookie, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, trace: int | None = None) -> Response:
        return _page(request, trace)

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.post("/review/{trace_id}")
    async def review(request: Request, trace_id: int) -> Response:
        foreign = _foreign_origin(request)
        if foreign is not None:
            logger.warning("refused a review POST from another origin: %r", foreign)
            return _message_page(request, 403, "Refused", "This request came from another site; reviews can only "
                                 "be sent from the review page itself.")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return _message_page(request, 413, "Too large", f"The form is larger than {MAX_FORM_BYTES} bytes.")
        try:
            form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
        except UnicodeDecodeError:
            return _message_page(request, 400, "Bad form", "The form is not UTF-8 text.")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        sent = form.get("csrf", "")
        if not cookie or not sent or not hmac.compare_digest(sent, _csrf_token(secret, cookie)):
            return _message_page(request, 403, "Refused", "The form's CSRF token is missing or wrong (the page may "
                                 "be from an earlier server start): reload the review page and try again.")
        action, note, text = form.get("action", ""), form.get("note", ""), form.get("text", "")
        editing = REVIEW_ACTIONS.get(action.strip().lower()) == "edited"

        def apply() -> list[int]:
            ids = queue_trace_ids(engine, **queue_filters)
            edited = output_from_editable(load_item(engine, trace_id).kind, text) if editing else None
            apply_review(engine, trace_id, action, edited_output=edited, reviewer=reviewer, note=note)
            return ids

        try:
            ids = await run_in_threadpool(apply)
        except ReviewNotFoundError as exc:
            missing = str(exc)
            return await run_in_threadpool(lambda: _page(request, trace_id, status=404, error=missing))
        except ReviewInputError as exc:
            problem = str(exc)
            return await run_in_threadpool(lambda: _page(request, trace_id, status=400, error=problem,
                                                         editor_text=text if editing else None, note=note))
        later = ids[ids.index(trace_id) + 1:] if trace_id in ids else []
        return RedirectResponse(f"/?trace={later[0]}" if later else "/", status_code=303)

    return app


def run_review_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8765, log_level: str = "warning") -> None:
    """Serve the review app with uvicorn until interrupted (blocking; Ctrl-C stops it).

    Raises:
        miniatures.server.InsecureBindError: ``host`` is not loopback and the app has no token.
        OSError: the port is taken.
    """
    import uvicorn

    from miniatures.server import check_bind

    check_bind(host, getattr(app.state, "api_key", None))
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off")
