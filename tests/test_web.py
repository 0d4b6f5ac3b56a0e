"""The web console against Starlette's TestClient on a real (SQLite) database: login,
sessions, CSRF, team isolation, sanitising, actions, paging. The helpers here are shared by
the other test_web_* modules."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert
from sqlmodel import select
from starlette.testclient import TestClient

from router import accounts, db
from router.clock import system_clock
from router.models import (
    T_CUSTOMER,
    T_TICKET,
    Article,
    ArticleKind,
    Customer,
    Decision,
    Event,
    Outbox,
    ThreadKey,
    Ticket,
)
from router.web import create_app
from router.web.auth import LoginLimiter
from tests.daemon import Store, make_mail, open_store

PASSWORD = "correct horse battery"
AGENT = "sam@acme.test"            # support only
LEAD = "lead-ops@acme.test"        # ops only, role lead
ADMIN = "root@acme.test"           # every team


@dataclass
class FakeMonotonic:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Console:
    store: Store
    client: TestClient
    limiter: LoginLimiter
    mono: FakeMonotonic
    tokens: dict[str, str]

    def login(self, email: str, password: str = PASSWORD, client: TestClient | None = None
              ) -> TestClient:
        c = client or self.client
        c.cookies.clear()
        page = c.get("/login")
        r = c.post("/login", data={"email": email, "password": password,
                                   "csrf": csrf_of(page.text), "next": "/queues"},
                   follow_redirects=False)
        assert r.status_code == 303, r.text
        return c

    def route(self, raw: bytes, rcpts: list[str] | None = None) -> None:
        self.store.accept(raw, rcpts)
        self.store.drain()


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


@contextmanager
def console(tmp_path: Path, db_url: str | None = None) -> Iterator[Console]:
    from router.hooks import default_hooks

    with open_store(tmp_path / "etc", db_url=db_url, hooks=default_hooks()) as store:
        now = system_clock()
        tokens: dict[str, str] = {}
        with db.session_scope(store.engine) as s:
            for email, role in ((AGENT, "agent"), (LEAD, "lead"), (ADMIN, "admin")):
                acct = accounts.create_account(s, store.settings, email, role, PASSWORD, now)
                tokens[email] = accounts.new_token(s, acct, "test", now)
        mono = FakeMonotonic()
        limiter = LoginLimiter(clock=mono)
        app = create_app(store.engine, store.current_settings, limiter=limiter)
        with TestClient(app, base_url="http://testserver") as client:
            yield Console(store, client, limiter, mono, tokens)




# ---------------------------------------------------------------------------- tests

@pytest.fixture
def web(tmp_path: Path) -> Iterator[Console]:
    with console(tmp_path) as c:
        yield c


def html_mail(*, subject: str, html: str, to: str = "support@acme.test",
              frm: str = "Mallory <mallory@example.org>",
              attachment: tuple[str, str, bytes] | None = None) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = frm
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain="example.org")
    msg.set_content(html, subtype="html")
    if attachment:
        name, ctype, data = attachment
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


XSS_HTML = (
    "<p>Hello <b>team</b></p>"
    "<script>alert('xss-script')</script>"
    "<img src=x onerror=\"alert('xss-onerror')\">"
    "<a href=\"javascript:alert('xss-href')\">click</a>"
    "<a href=\"https://example.org/ok\" onmouseover=\"alert('xss-hover')\">fine link</a>"
    "<svg onload=\"alert('xss-svg')\"></svg>"
    "<iframe src=\"https://evil.example/\"></iframe>"
    "<div style=\"background:url(javascript:alert('xss-css'))\">styled</div>"
    "<form action=\"https://evil.example/\"><input name=q></form>"
)


def assert_inert(page: str) -> None:
    """No script but our own, no event handler attribute, no javascript: URL."""
    scripts = re.findall(r"<script\b[^>]*>", page, re.I)
    assert scripts == ['<script src="/static/app.js" defer>'], scripts
    assert not re.search(r"<[^>]+\son[a-z]+\s*=", page, re.I), "event handler attribute"
    assert "javascript:" not in page.lower()
    assert "<iframe" not in page.lower() and "<svg" not in page.lower()
    assert "<form action=\"https://evil" not in page
    assert "xss-script" not in page      # the script's text is dropped with it


def test_customer_html_renders_inert(web: Console) -> None:
    web.route(html_mail(subject="<img src=x onerror=alert('subj')> help", html=XSS_HTML,
                        frm="\"<script>alert('name')</script>\" <mallory@example.org>"))
    c = web.login(AGENT)
    page = c.get("/tickets/1")
    assert page.status_code == 200, page.text
    assert "Hello <b>team</b>" in page.text            # formatting survives
    assert 'href="https://example.org/ok"' in page.text
    assert_inert(page.text)
    # The subject and the sender's name are text, escaped wherever they appear.
    assert "&lt;img src=x onerror=" in page.text
    queue = c.get("/queues")
    assert "&lt;img src=x onerror=" in queue.text
    assert_inert(queue.text)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"


def test_login_needs_a_password_and_sets_a_safe_cookie(web: Console) -> None:
    c = web.client
    r = c.get("/queues", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    page = c.get("/login")
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    r = c.post("/login", data={"email": AGENT, "password": "wrong password!",
                               "csrf": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 401
    assert "Wrong address or password" in r.text
    r = c.post("/login", data={"email": "nobody@acme.test", "password": PASSWORD,
                               "csrf": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 401
    web.login(AGENT)
    assert c.get("/queues").status_code == 200


def test_login_redirect_stays_on_site(web: Console) -> None:
    c = web.client
    page = c.get("/login?next=https://evil.example/")
    assert 'name="next" value="/queues"' in page.text
    r = c.post("/login", data={"email": AGENT, "password": PASSWORD,
                               "csrf": csrf_of(page.text), "next": "//evil.example/x"},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/queues"


def test_post_without_or_with_a_wrong_csrf_token_is_refused(web: Console) -> None:
    web.route(make_mail(subject="csrf", to="support@acme.test"))
    c = web.login(AGENT)
    for data in ({"text": "no token"}, {"text": "bad token", "csrf": "x" * 43}):
        r = c.post("/tickets/1/note", data=data, follow_redirects=False)
        assert r.status_code == 403, r.text
    r = c.post("/tickets/1/reply", data={"text": "forged"}, follow_redirects=False)
    assert r.status_code == 403
    # A login form without the anonymous session's token is refused too (login CSRF).
    fresh = TestClient(c.app)
    r = fresh.post("/login", data={"email": AGENT, "password": PASSWORD},
                   follow_redirects=False)
    assert r.status_code == 403
    with web.store.session() as s:
        assert s.exec(select(Article).where(Article.kind != ArticleKind.IN)).all() == []
        assert s.exec(select(Outbox).where(Outbox.kind == "reply")).all() == []
    token = csrf_of(c.get("/tickets/1").text)
    r = c.post("/tickets/1/note", data={"text": "with token", "csrf": token},
               follow_redirects=False)
    assert r.status_code == 303


def test_an_agent_cannot_open_another_teams_ticket(web: Console) -> None:
    web.route(make_mail(subject="billing question", to="billing@acme.test"))   # 1: billing
    web.route(make_mail(subject="support question", to="support@acme.test"))  # 2: support
    c = web.login(AGENT)
    queue = c.get("/queues").text
    assert "support question" in queue and "billing question" not in queue
    assert c.get("/tickets/1").status_code == 403
    assert c.get("/tickets/2").status_code == 200
    assert c.get("/queues?team=billing").status_code == 403
    token = csrf_of(c.get("/tickets/2").text)
    r = c.post("/tickets/1/note", data={"text": "sneaky", "csrf": token},
               follow_redirects=False)
    assert r.status_code == 403
    r = c.post("/tickets/2/merge", data={"target": "1", "csrf": token},
               follow_redirects=False)
    assert r.status_code == 403
    assert c.get("/tickets/999").status_code == 404
    # An admin sees both.
    a = web.login(ADMIN, client=TestClient(c.app))
    assert a.get("/tickets/1").status_code == 200


def test_login_is_rate_limited_per_account_and_ip(web: Console) -> None:
    c = web.client
    token = csrf_of(c.get("/login").text)
    for _ in range(5):
        r = c.post("/login", data={"email": AGENT, "password": "guess guess", "csrf": token},
                   follow_redirects=False)
        assert r.status_code == 401
    r = c.post("/login", data={"email": AGENT, "password": PASSWORD, "csrf": token},
               follow_redirects=False)
    assert r.status_code == 429, "the right password must not get through while throttled"
    assert int(r.headers["retry-after"]) > 0
    # Other accounts from the same address are not locked out by it.
    r = c.post("/login", data={"email": LEAD, "password": PASSWORD, "csrf": token},
               follow_redirects=False)
    assert r.status_code == 303
    web.mono.now += 15 * 60 + 1
    web.login(AGENT)


def test_logout_ends_the_session_even_for_a_copied_cookie(web: Console) -> None:
    c = web.login(AGENT)
    stolen = c.cookies.get("router_session")
    token = csrf_of(c.get("/queues").text)
    assert c.post("/logout", data={"csrf": token}, follow_redirects=False).status_code == 303
    other = TestClient(c.app)
    other.cookies.set("router_session", stolen or "")
    r = other.get("/queues", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_reply_goes_through_the_outbox_threaded_with_the_token(web: Console) -> None:
    first = make_mail(subject="Invoice wrong", to="support@acme.test",
                      message_id="<c1@example.org>")
    web.route(first)
    web.route(make_mail(subject="Re: Invoice wrong", to="support@acme.test",
                        message_id="<c2@example.org>", in_reply_to="<c1@example.org>",
                        references="<c0@example.org> <c1@example.org>"))
    c = web.login(AGENT)
    token = csrf_of(c.get("/tickets/1").text)
    r = c.post("/tickets/1/reply", data={"text": "We fixed it.\nRegards", "csrf": token},
               follow_redirects=False)
    assert r.status_code == 303, r.text
    with web.store.session() as s:
        row = s.exec(select(Outbox).where(Outbox.kind == "reply")).one()
        ticket = s.get(Ticket, 1)
        assert ticket is not None
        out = s.exec(select(Article).where(Article.kind == ArticleKind.OUT)).one()
        events = [e.kind for e in s.exec(select(Event).where(Event.ticket_id == 1)).all()]
    msg = email.message_from_bytes(row.raw, policy=email.policy.default)
    assert row.mail_from == "support@acme.test" and row.rcpt_to == ["alice@example.org"]
    assert str(msg["Subject"]) == "Re: Invoice wrong [#1]"
    assert str(msg["In-Reply-To"]) == "<c2@example.org>"
    assert str(msg["References"]).split() == ["<c0@example.org>", "<c1@example.org>",
                                              "<c2@example.org>"]
    assert msg["Auto-Submitted"] is None
    assert "We fixed it." in msg.get_content()
    assert ticket.first_response_at is not None and ticket.status == "pending"
    assert ticket.assignee == AGENT
    assert out.author == AGENT and out.message_id == row.message_id
    assert "agent_reply" in events
    page = c.get("/tickets/1").text
    assert "We fixed it." in page


def test_actions_claim_note_priority_tags_status_move(web: Console) -> None:
    web.route(make_mail(subject="many things", to="support@acme.test"))
    c = web.login(AGENT)

    def post(action: str, **data: str) -> int:
        token = csrf_of(c.get("/tickets/1").text)
        return c.post(f"/tickets/1/{action}", data={"csrf": token, **data},
                      follow_redirects=False).status_code

    assert post("claim") == 303
    assert post("note", text="internal: call them") == 303
    assert post("priority", priority="high") == 303
    assert post("priority", priority="extreme") == 400
    assert post("tags", tags="Refund, vip ,refund") == 303
    assert post("assign", assignee="lead-support@acme.test") == 403   # agents only claim
    assert post("status", do="solve") == 303
    assert post("status", do="reopen") == 303
    page = c.get("/tickets/1").text
    assert "internal: call them" in page
    with web.store.session() as s:
        t = s.get(Ticket, 1)
        assert t is not None
        assert (t.assignee, t.priority, t.tags, t.status, t.reopened) == (
            AGENT, "high", ["refund", "vip"], "open", 1)
    assert post("move", team="billing") == 303
    assert c.get("/tickets/1").status_code == 403     # no longer the agent's team
    with web.store.session() as s:
        t = s.get(Ticket, 1)
        assert t is not None and t.team == "billing" and t.assignee is None
        d = s.exec(select(Decision).where(Decision.kind == "reroute")).one()
        assert d.team == "billing"
        assert d.hits == [{"rule": "agent", "matched": True, "reason": f"moved by {AGENT}"}]
        kinds = [e.kind for e in s.exec(select(Event).where(Event.ticket_id == 1)).all()]
    assert {"assigned", "note", "priority", "tags", "status", "moved"} <= set(kinds)


def test_merge_moves_articles_and_thread_keys_and_closes_the_source(web: Console) -> None:
    web.route(make_mail(subject="first", to="support@acme.test", message_id="<m1@x.org>"))
    web.route(make_mail(subject="second", to="sales@acme.test", message_id="<m2@x.org>"))
    c = web.login(AGENT)
    token = csrf_of(c.get("/tickets/2").text)
    r = c.post("/tickets/2/merge", data={"target": "#1", "csrf": token},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/tickets/1"
    with web.store.session() as s:
        src, dst = s.get(Ticket, 2), s.get(Ticket, 1)
        assert src is not None and dst is not None
        assert src.status == "closed"
        assert {a.ticket_id for a in s.exec(select(Article)).all()} == {1}
        keys = {k.message_id: k.ticket_id for k in s.exec(select(ThreadKey)).all()}
        assert keys["<m2@x.org>"] == 1
        assert [e.kind for e in s.exec(select(Event).where(Event.ticket_id == 2)).all()][-1] \
            == "merged_into"
    # A customer's reply to the merged ticket's mail now threads onto the target.
    web.route(make_mail(subject="Re: second", to="sales@acme.test", in_reply_to="<m2@x.org>"))
    with web.store.session() as s:
        assert len(s.exec(select(Ticket)).all()) == 2
        assert len(s.exec(select(Article).where(Article.ticket_id == 1)).all()) == 3
    assert "second" in c.get("/tickets/1").text


def test_attachments_download_safely_and_only_for_the_team(web: Console) -> None:
    web.route(html_mail(subject="see file", html="<p>file</p>",
                        attachment=("evil.html", "text/html", b"<script>alert(1)</script>")))
    c = web.login(AGENT)
    page = c.get("/tickets/1").text
    m = re.search(r'href="/attachments/(\d+)"', page)
    assert m, page
    r = c.get(f"/attachments/{m.group(1)}")
    assert r.status_code == 200
    assert r.content == b"<script>alert(1)</script>"
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith("attachment;")
    assert 'filename="evil.html"' in r.headers["content-disposition"]
    assert r.headers["x-content-type-options"] == "nosniff"
    lead = web.login(LEAD, client=TestClient(c.app))
    assert lead.get(f"/attachments/{m.group(1)}").status_code == 403


def test_customer_page_lists_history_across_addresses(web: Console) -> None:
    web.route(make_mail(subject="support thing", to="support@acme.test"))
    web.route(make_mail(subject="sales thing", to="sales@acme.test"))
    web.route(make_mail(subject="secret billing thing", to="billing@acme.test"))
    c = web.login(AGENT)
    with web.store.session() as s:
        cid = s.exec(select(Customer)).one().id
    page = c.get(f"/customers/{cid}").text
    assert "support thing" in page and "sales thing" in page
    assert "secret billing thing" not in page and "another team" in page
    assert "support@acme.test" in page and "sales@acme.test" in page


# ---------------------------------------------------------------------------- API

def test_api_needs_a_valid_bearer_token(web: Console) -> None:
    web.route(make_mail(subject="api", to="support@acme.test"))
    c = TestClient(web.client.app)
    assert c.get("/api/tickets").status_code == 401
    r = c.get("/api/tickets", headers={"Authorization": "Bearer rt_wrong"})
    assert r.status_code == 401 and r.json()["status"] == 401
    assert "bearer" in r.headers["www-authenticate"].lower()
    assert c.get("/api/tickets", headers={"Authorization": "Basic Zm9vOmJhcg=="}
                 ).status_code == 401
    # A console session cookie is no API credential.
    web.login(AGENT, client=c)
    assert c.get("/api/tickets").status_code == 401


def test_api_list_show_messages_reply_counts(web: Console) -> None:
    web.route(make_mail(subject="api one", to="support@acme.test", message_id="<a1@x.org>"))
    web.route(make_mail(subject="api billing", to="billing@acme.test"))
    c = TestClient(web.client.app)
    h = {"Authorization": f"Bearer {web.tokens[AGENT]}"}
    listing = c.get("/api/tickets", headers=h).json()
    assert [t["id"] for t in listing["tickets"]] == [1] and listing["next"] is None
    assert listing["tickets"][0]["customer"]["email"] == "alice@example.org"
    shown = c.get("/api/tickets/1", headers=h).json()
    assert shown["messages"][0]["message_id"] == "<a1@x.org>"
    assert c.get("/api/tickets/2", headers=h).status_code == 403
    assert c.get("/api/tickets/1/messages", headers=h).json()["messages"][0]["subject"] \
        == "api one"
    r = c.post("/api/tickets/1/replies", headers=h, json={"text": "Answer by API"})
    assert r.status_code == 201, r.text
    assert c.post("/api/tickets/1/replies", headers=h, json={"x": 1}).status_code == 400
    assert c.post("/api/tickets/2/replies", headers=h, json={"text": "no"}).status_code == 403
    queues = c.get("/api/queues", headers=h).json()
    assert queues == {"queues": [{"team": "support", "counts": {
        "new": 0, "open": 0, "pending": 1, "solved": 0, "closed": 0}}]}
    with web.store.session() as s:
        row = s.exec(select(Outbox).where(Outbox.kind == "reply")).one()
    assert row.id == r.json()["outbox_id"]
    assert b"In-Reply-To: <a1@x.org>" in row.raw


def test_openapi_document_validates(web: Console) -> None:
    from openapi_spec_validator import validate

    r = TestClient(web.client.app).get("/api/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    validate(spec)
    assert {"/api/tickets", "/api/tickets/{id}", "/api/tickets/{id}/messages",
            "/api/tickets/{id}/replies", "/api/queues"} <= set(spec["paths"])


# ---------------------------------------------------------------------------- scale

# Thousands of SQLite steps (measured: a page 8-12, the counts 300, the counts without
# their index 666).
PAGE_STEPS = 100
QUEUE_STEPS = 450


@contextmanager
def _sqlite_work(engine: Any) -> Iterator[list[int]]:
    """How much work SQLite does, in thousands of virtual machine steps (its progress
    handler): a measure of a query's cost that a busy machine does not change."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    def on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        dbapi_conn.set_progress_handler(tick, 1000)

    def on_checkin(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.set_progress_handler(None, 0)  # pooled connections count no more

    event.listen(engine, "checkout", on_checkout)
    event.listen(engine, "checkin", on_checkin)
    try:
        yield steps
    finally:
        event.remove(engine, "checkout", on_checkout)
        event.remove(engine, "checkin", on_checkin)


def test_queue_pages_stay_fast_at_100k_tickets(web: Console) -> None:
    """Keyset pages over 100,000 tickets: every page is a few index range scans. Measured
    in SQLite's steps, not seconds, which a busy machine stretches: one page of 100 takes
    about 10 thousand, reading one team's third of the table several hundred."""
    now = datetime.now(UTC)
    with web.store.engine.begin() as conn:
        cid = conn.execute(insert(T_CUSTOMER).returning(T_CUSTOMER.c.id), {
            "email": "bulk@example.org", "name": "Bulk", "language": None, "vip": False,
            "created_at": now, "last_seen_at": now, "attributes": {}}).scalar_one()
        teams = ["support", "billing", "ops"]
        statuses = ["new", "open", "pending", "solved", "closed"]
        rows = [{"team": teams[i % 3], "status": statuses[(i // 3) % 5], "priority": "normal",
                 "subject": f"bulk {i}", "customer_id": cid, "address": "support@acme.test",
                 "created_at": now - timedelta(seconds=i), "reopened": 0, "tags": [],
                 "updated_at": now - timedelta(seconds=(i * 7919) % 100_000),
                 "last_customer_at": now}
                for i in range(100_000)]
        conn.execute(insert(T_TICKET), rows)
    c = TestClient(web.client.app)
    h = {"Authorization": f"Bearer {web.tokens[AGENT]}"}
    for sort in ("newest", "updated"):
        seen: list[int] = []
        url = f"/api/tickets?limit=100&sort={sort}"
        for _ in range(5):
            with _sqlite_work(web.store.engine) as steps:
                body = c.get(url, headers=h).json()
            assert 0 < steps[0] < PAGE_STEPS, f"{sort} page took {steps[0]}k SQLite steps"
            seen += [t["id"] for t in body["tickets"]]
            assert all(t["team"] == "support" and t["status"] in ("new", "open", "pending")
                       for t in body["tickets"])
            url = f"/api/tickets?limit=100&sort={sort}&after={body['next']}"
        assert len(seen) == len(set(seen)) == 500
        if sort == "newest":
            assert seen == sorted(seen, reverse=True)
    with _sqlite_work(web.store.engine) as steps:
        page = c.get("/api/queues", headers=h).json()
    assert 0 < steps[0] < QUEUE_STEPS, f"queue counts took {steps[0]}k SQLite steps"
    # The same counts read from the table, not the index, are over the bound.
    with _sqlite_work(web.store.engine) as steps, web.store.engine.connect() as conn:
        conn.exec_driver_sql("SELECT status, count(*) FROM ticket NOT INDEXED "
                             "WHERE team = 'support' GROUP BY status").all()
    assert steps[0] > QUEUE_STEPS
    counts = page["queues"][0]["counts"]
    assert sum(counts.values()) == 33_334
    # The plan for one run is an index range scan (no table scan, no temp sort).
    with web.store.engine.connect() as conn:
        plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT * FROM ticket WHERE team='support' AND status='open' "
            "AND id < 50000 ORDER BY id DESC LIMIT 51"))
    assert "USING INDEX ix_ticket_team_status_id" in plan or "ix_ticket_team_status" in plan, \
        plan
    assert "TEMP B-TREE" not in plan, plan


@pytest.mark.postgres
def test_console_and_api_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    with console(tmp_path, db_url=pg_url) as web:
        for i in range(5):
            web.route(make_mail(subject=f"pg {i}", to="support@acme.test",
                                message_id=f"<pg{i}@x.org>"))
        c = web.login(AGENT)
        assert "pg 4" in c.get("/queues").text
        token = csrf_of(c.get("/tickets/1").text)
        for action, data in (("reply", {"text": "pg answer"}), ("claim", {}),
                             ("merge", {"target": "1"})):
            tid = 2 if action == "merge" else 1
            r = c.post(f"/tickets/{tid}/{action}", data={"csrf": token, **data},
                       follow_redirects=False)
            assert r.status_code == 303, (action, r.text)
        h = {"Authorization": f"Bearer {web.tokens[AGENT]}"}
        api = TestClient(c.app)
        seen = []
        url = "/api/tickets?limit=2&sort=updated&status=all"
        while url:
            body = api.get(url, headers=h).json()
            seen += [t["id"] for t in body["tickets"]]
            url = f"/api/tickets?limit=2&sort=updated&status=all&after={body['next']}" \
                if body["next"] else ""
        assert sorted(seen) == [1, 2, 3, 4, 5]
        with web.store.session() as s:
            assert s.get(Ticket, 2).status == "closed"  # type: ignore[union-attr]
            assert s.exec(select(Outbox).where(Outbox.kind == "reply")).one()
