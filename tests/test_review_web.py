"""The review page (`outreach review --web`): security with FastAPI's TestClient, and the whole flow with keyboard
shortcuts in headless Chromium against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import col, select

from finetune.review import ReviewItem, review_queue
from graphs.runner import add_prospects, run_campaign
from miniatures.server import InsecureBindError, serve_in_thread
from outreach.review_web import CSRF_COOKIE, TOKEN_COOKIE, create_review_app, loopback_hosts, run_review_server
from store import EmailRecord, FactRecord, ProfileRecord, Review, session_scope
from tests.browser import headless_chromium
from tests.helpers import small_world
from tests.test_review import fill_store
from tools import CorpusWeb, Document

PLANT = "<script>window.__pwned=1</script>"
ESCAPED = "&lt;script&gt;window.__pwned=1&lt;/script&gt;"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return small_world(tmp_path_factory.mktemp("review-web-world"), n=4)


@pytest.fixture
def store(sqlite_engine: Engine, world: Any) -> Engine:
    """The two campaigns of tests/test_review.py, with hostile page text planted in campaign c's first run: a
    fact's evidence and source URL (research reads the open web) and the email body."""
    fill_store(sqlite_engine, world)
    first = [i for i in review_queue(sqlite_engine, failed_first=False) if i.campaign == "c"][:2]
    with session_scope(sqlite_engine) as s:
        fact = s.exec(select(FactRecord).where(FactRecord.profile_id == first[0].profile.id)  # type: ignore[union-attr]
                      .order_by(col(FactRecord.id))).first()
        assert fact is not None
        fact.evidence = f"{fact.evidence} {PLANT}"
        fact.source_url = "javascript:window.__pwned=2"
        email = s.get(EmailRecord, first[1].email.id)  # type: ignore[union-attr]
        assert email is not None
        email.body = f"{email.body}\n{PLANT}"
    return sqlite_engine


def _queue(engine: Engine) -> list[ReviewItem]:
    return review_queue(engine)


def _reviews(engine: Engine) -> list[Review]:
    with session_scope(engine) as s:
        return list(s.exec(select(Review).order_by(col(Review.id))).all())


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "the page has no CSRF field"
    return match.group(1)


# --------------------------------------------------------------------------- TestClient


def test_page_shows_the_item_and_escapes_hostile_text(store: Engine) -> None:
    queue = _queue(store)
    client = TestClient(create_review_app(store, reviewer="web"))
    page = client.get("/")
    assert page.status_code == 200
    assert f'data-trace="{queue[0].trace_id}"' in page.text and "item 1 of 8" in page.text
    csp = page.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp)
    assert nonce and "default-src 'none'" in csp and "form-action 'self'" in csp and "base-uri 'none'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    assert page.text.count("<script") == 1 and f'<script nonce="{nonce.group(1)}">' in page.text
    assert CSRF_COOKIE in page.cookies

    planted = [i for i in queue if i.campaign == "c"][:2]  # profile, then email of the same run
    for item in planted:
        html = client.get(f"/?trace={item.trace_id}").text
        assert PLANT not in html and ESCAPED in html and html.count("<script") == 1
        assert "javascript:window.__pwned=2" in html and 'href="javascript' not in html  # text, never a link
        assert 'rel="noopener noreferrer nofollow"' in html
    email_html = client.get(f"/?trace={planted[1].trace_id}").text
    assert 'id="email"' in email_html and "{{" in email_html  # rendered email and its templates
    assert 'id="facts"' in email_html  # the facts behind the merge tags, with evidence
    profile_html = client.get(f"/?trace={planted[0].trace_id}").text
    assert profile_html.count("<blockquote") == len(planted[0].profile.facts)  # type: ignore[union-attr]


def test_drops_show_by_reason(store: Engine) -> None:
    item = next(i for i in _queue(store) if i.kind == "profile")
    with session_scope(store) as s:
        record = s.get(ProfileRecord, item.profile.id)  # type: ignore[union-attr]
        assert record is not None
        record.dropped_facts, record.drop_reasons = 4, {"misattributed": 3, "bad_value": 1}
    html = TestClient(create_review_app(store)).get(f"/?trace={item.trace_id}").text
    drops = re.search(r'<p class="muted" id="drops">([^<]*)', html)
    assert drops and " ".join(drops.group(1).split()) == "4 fact(s) dropped (misattributed 3, bad value 1) · sources:"
    assert "ungrounded" not in drops.group(1)


def test_writes_need_the_csrf_token_and_our_origin(store: Engine) -> None:
    queue = _queue(store)
    client = TestClient(create_review_app(store, reviewer="web"))
    token = _csrf(client.get("/").text)
    target = f"/review/{queue[0].trace_id}"
    form = {"action": "approve"}
    assert client.post(target, data=form).status_code == 403
    assert client.post(target, data={**form, "csrf": "0" * 64}).status_code == 403
    for header in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"}):
        refused = client.post(target, data={**form, "csrf": token}, headers=header)
        assert refused.status_code == 403 and "another site" in refused.text
    stranger = TestClient(create_review_app(store))  # another browser: its own cookie, so our token is wrong
    stranger.get("/")
    assert stranger.post(target, data={**form, "csrf": token}).status_code == 403
    assert _reviews(store) == []
    # same origin (browsers send Origin: null under Referrer-Policy: no-referrer) -> written, 303 to the next item
    done = client.post(target, data={**form, "csrf": token}, headers={"Origin": "null"}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/?trace={queue[1].trace_id}"
    rows = _reviews(store)
    assert [(r.trace_id, r.status, r.reviewer) for r in rows] == [(queue[0].trace_id, "approved", "web")]
    ok = client.post(f"/review/{queue[1].trace_id}", data={"action": "reject", "note": "spam", "csrf": token},
                     headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert ok.status_code == 303 and _reviews(store)[-1].note == "spam"


def test_token_is_required_on_every_request(store: Engine) -> None:
    app = create_review_app(store, token="s3cret")
    client = TestClient(app)
    denied = client.get("/")
    assert denied.status_code == 401 and "token" in denied.text and "content-security-policy" in denied.headers
    assert client.get("/?token=wrong").status_code == 401
    assert client.post(f"/review/{_queue(store)[0].trace_id}", data={"action": "approve"}).status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    entry = client.get("/?token=s3cret&trace=1", follow_redirects=False)
    assert entry.status_code == 303 and entry.headers["location"] == "/?trace=1"  # the token leaves the URL
    cookie = entry.headers["set-cookie"]
    assert f"{TOKEN_COOKIE}=s3cret" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert client.get("/").status_code == 200  # the cookie now carries it
    assert _reviews(store) == []


def test_bad_input_gives_clear_errors_and_writes_nothing(store: Engine) -> None:
    queue = _queue(store)
    client = TestClient(create_review_app(store))
    token = _csrf(client.get("/").text)
    email = next(i for i in queue if i.kind == "email")
    text = "Subject: Hi {{nickname}}\r\n\r\nHello <b>{{first_name}}</b>"
    bad = client.post(f"/review/{email.trace_id}", data={"action": "edit", "text": text, "csrf": token})
    assert bad.status_code == 400 and "{{nickname}}" in bad.text and 'id="error"' in bad.text
    assert "<details id=\"editor\" open>" in bad.text and "Hello &lt;b&gt;{{first_name}}&lt;/b&gt;" in bad.text
    gone = client.post("/review/999999", data={"action": "approve", "csrf": token})
    assert gone.status_code == 404 and "trace 999999 does not exist" in gone.text and "outreach review" in gone.text
    assert client.get("/?trace=999999").status_code == 404
    assert client.post(f"/review/{email.trace_id}", data={"action": "publish", "csrf": token}).status_code == 400
    assert _reviews(store) == []
    # an edit in the agent's JSON works too, and a profile edit is checked against its prompt
    profile = next(i for i in queue if i.kind == "profile")
    facts = json.loads(profile.output)["facts"]
    wrong = {"facts": [{**facts[0], "evidence": "S999"}]}
    assert client.post(f"/review/{profile.trace_id}", data={"action": "edit", "text": json.dumps(wrong),
                                                            "csrf": token}).status_code == 400
    saved = client.post(f"/review/{profile.trace_id}", data={"action": "edit", "text": json.dumps({"facts": facts[:2]}),
                                                             "csrf": token}, follow_redirects=False)
    assert saved.status_code == 303 and json.loads(_reviews(store)[0].edited_output or "") == {"facts": facts[:2]}


def test_binding_beyond_loopback_needs_a_token(store: Engine) -> None:
    with pytest.raises(InsecureBindError):
        run_review_server(create_review_app(store), host="0.0.0.0", port=8765)
    with pytest.raises(InsecureBindError), serve_in_thread(create_review_app(store), host="10.1.2.3"):
        pass
    # a loopback server answers only to loopback host names (DNS rebinding)
    client = TestClient(create_review_app(store, allowed_hosts=loopback_hosts("127.0.0.1")))
    assert client.get("/").status_code == 400
    assert client.get("/", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "localhost:8765"}).status_code == 200


def test_host_headers_are_parsed_strictly(store: Engine) -> None:
    """Host is host[:port] (RFC 9110 / RFC 3986): a URL parser would read 127.0.0.1 out of
    evil.example@127.0.0.1:P, so a DNS-rebinding page could pass as loopback. Refused, token or not."""
    loopback = create_review_app(store, allowed_hosts=loopback_hosts("127.0.0.1"))
    with_token = create_review_app(store, token="s3cret")  # allowed_hosts None: any well-formed host
    for app in (loopback, with_token):
        with serve_in_thread(app, host="127.0.0.1") as server, \
                httpx.Client(base_url=f"http://127.0.0.1:{server.port}", trust_env=False,
                             headers={"Authorization": "Bearer s3cret"}) as client:
            port = server.port
            for host in (f"evil.example@127.0.0.1:{port}", f"user:pw@localhost:{port}",
                         f"127.0.0.1:{port}@evil.example", f"[::1:{port}", f"127.0.0.1:{port}/x", "127.0.0.1:99999",
                         f"local host:{port}"):
                refused = client.get("/", headers={"Host": host})
                assert refused.status_code == 400 and "Unknown host" in refused.text, host
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
                assert client.get("/", headers={"Host": host}).status_code == 200, host
            rebound = client.get("/", headers={"Host": f"evil.example:{port}"})
            assert rebound.status_code == (400 if app is loopback else 200)
    assert _reviews(store) == []


# --------------------------------------------------------------------------- headless Chromium


def test_keyboard_review_in_headless_chromium(store: Engine) -> None:
    """Every step waits for a condition (WebDriverWait) on elements found afresh, never for a time: a key that
    submits a form navigates, and an element found on the old page goes stale under the new one."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    queue = _queue(store)  # failed first: bad profile, bad email, then c's profile (planted), c's email (planted)
    app = create_review_app(store, reviewer="browser", allowed_hosts=loopback_hosts("127.0.0.1"))
    with serve_in_thread(app, host="127.0.0.1") as server, headless_chromium() as driver:
        def until(condition: Any) -> Any:
            """Wait for ``condition(driver)`` to be truthy, re-trying while the page is being replaced."""
            return WebDriverWait(driver, 20, ignored_exceptions=(NoSuchElementException,
                                                                 StaleElementReferenceException)).until(condition)

        def press(keys: str) -> None:
            ActionChains(driver).send_keys(keys).perform()

        def wait_for(trace_id: int) -> None:
            """Wait until the page showing ``trace_id`` has loaded (its keyboard script is in place)."""
            until(lambda d: d.execute_script("return document.readyState") == "complete"
                  and d.find_element(By.ID, "item").get_attribute("data-trace") == str(trace_id))

        def help_shown(shown: bool) -> None:
            until(lambda d: d.find_element(By.ID, "help").is_displayed() == shown)

        driver.get(f"http://127.0.0.1:{server.port}/")
        wait_for(queue[0].trace_id)
        press("?")
        help_shown(True)
        press("?")
        help_shown(False)
        press("a")  # approve the failed profile
        wait_for(queue[1].trace_id)

        press("e")  # edit the failed email inline, save with Ctrl+Enter
        editor = until(lambda d: (e := d.find_element(By.ID, "edit-text")).is_displayed()
                       and d.switch_to.active_element == e and e)
        assert (editor.get_attribute("value") or "").startswith("Subject: Hi")
        editor.clear()
        editor.send_keys("Subject: A note for {{first_name}}\n\nHello {{first_name}}, edited in the browser.")
        editor.send_keys(Keys.CONTROL + Keys.ENTER)
        wait_for(queue[2].trace_id)

        # campaign c's profile: the planted evidence is visible as text and did not run
        evidence = driver.find_element(By.CSS_SELECTOR, "#facts blockquote.evidence").text
        assert PLANT in evidence
        assert driver.execute_script("return typeof window.__pwned") == "undefined"
        press("r")  # reject it
        wait_for(queue[3].trace_id)
        assert PLANT in driver.find_element(By.ID, "body").text
        assert driver.execute_script("return typeof window.__pwned") == "undefined"
        assert int(driver.find_element(By.ID, "left").text) == 5
        press("j")  # next and previous
        wait_for(queue[4].trace_id)
        press("k")
        wait_for(queue[3].trace_id)

    rows = _reviews(store)
    assert [(r.trace_id, r.status, r.reviewer) for r in rows] == [
        (queue[0].trace_id, "approved", "browser"), (queue[1].trace_id, "edited", "browser"),
        (queue[2].trace_id, "rejected", "browser")]
    assert rows[1].email_id == queue[1].email.id and rows[2].profile_id == queue[2].profile.id  # type: ignore[union-attr]
    assert json.loads(rows[1].edited_output or "") == {
        "subject": "A note for {{first_name}}", "body": "Hello {{first_name}}, edited in the browser."}


class _PlantingWeb(CorpusWeb):
    """The corpus, but every fetched page's text carries a script after each sentence: hostile page text as the
    researcher reads it from the web (it ends up in the evidence quotes the review page shows)."""

    async def fetch(self, url: str) -> Document:
        doc = await super().fetch(url)
        return doc.model_copy(update={"text": re.sub(r"\.(\s)", rf". {PLANT}\1", doc.text)})


def test_a_script_planted_in_a_researched_page_never_runs(sqlite_engine: Engine, world: Any) -> None:
    from selenium.webdriver.common.by import By

    _dir, corpus, offer, prospects = world
    add_prospects(sqlite_engine, "hostile", offer, prospects[:1])
    report = asyncio.run(run_campaign(sqlite_engine, "hostile", web=_PlantingWeb(corpus)))
    assert report.done == 1
    item = next(i for i in review_queue(sqlite_engine, agent="researcher"))
    planted = [f for f in item.profile.facts if PLANT in f.evidence]  # type: ignore[union-attr]
    assert planted, "the research should quote a planted sentence as evidence"
    app = create_review_app(sqlite_engine, reviewer="browser", allowed_hosts=loopback_hosts("127.0.0.1"))
    with serve_in_thread(app, host="127.0.0.1") as server, headless_chromium() as driver:
        driver.get(f"http://127.0.0.1:{server.port}/?trace={item.trace_id}")
        assert int(driver.find_element(By.ID, "item").get_attribute("data-trace") or 0) == item.trace_id
        assert driver.execute_script("return typeof window.__pwned") == "undefined"
        assert PLANT in driver.find_element(By.TAG_NAME, "body").text  # shown as text
