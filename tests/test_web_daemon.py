"""The web console inside the real daemon: `router serve` with `[web] enabled`, accounts made
with `router user`, mail in by SMTP, replies out to a real SMTP sink standing in for the relay.

The browser test drives Debian's headless Chromium with Playwright (tests/browser.py); it
fails, never skips, when the browser is missing.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.browser import browser_page
from tests.conftest import free_port, write_config
from tests.daemon import (
    RouterProcess,
    make_mail,
    port_open,
    run_cli,
    send_smtp,
    start_router,
    wait_for_tickets,
    wait_until,
)
from tests.smtp_sink import Received, SmtpSink, smtp_sink  # noqa: F401
from tests.test_web import ADMIN, AGENT, LEAD, PASSWORD, XSS_HTML, assert_inert, html_mail


@dataclass
class Served:
    router: RouterProcess
    base: str
    token: str
    db_url: str


@pytest.fixture
def served(tmp_path: Path, smtp_sink: SmtpSink) -> Iterator[Served]:  # noqa: F811
    web_port = free_port()
    cfg = write_config(tmp_path / "etc", relay_port=smtp_sink.port,
                       extra=f'\n[web]\nenabled = true\nlisten = "127.0.0.1:{web_port}"\n')
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    for email, role in ((AGENT, "agent"), (LEAD, "lead"), (ADMIN, "admin")):
        r = run_cli("user", "add", email, "--role", role, "--password-file", str(secret),
                    "-c", str(cfg))
        assert r.returncode == 0, r.stderr.decode()
    r = run_cli("user", "token", AGENT, "--name", "tests", "-c", str(cfg))
    assert r.returncode == 0, r.stderr.decode()
    token = r.stdout.decode().strip()
    assert token.startswith("rt_")
    rp = start_router(cfg)
    try:
        wait_until(lambda: port_open("127.0.0.1", web_port), 20, what="the web listener")
        yield Served(rp, f"http://127.0.0.1:{web_port}", token,
                     f"sqlite:///{tmp_path / 'etc' / 'router.db'}")
    finally:
        try:
            rp.stop()
        except AssertionError as exc:   # the daemon's shutdown is not what these tests test
            rp.kill()
            warnings.warn(f"router did not stop cleanly: {str(exc)[-500:]}", stacklevel=1)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html
    return m.group(1)


def login(client: httpx.Client, email: str, password: str = PASSWORD) -> httpx.Response:
    page = client.get("/login")
    return client.post("/login", data={"email": email, "password": password,
                                       "csrf": csrf_of(page.text), "next": "/queues"})


def test_security_against_the_real_daemon(served: Served) -> None:
    send_smtp(served.router.port, html_mail(subject="inert please", html=XSS_HTML),
              ["support@acme.test"], mail_from="mallory@example.org")
    send_smtp(served.router.port, make_mail(subject="billing only", to="billing@acme.test"),
              ["billing@acme.test"], mail_from="alice@example.org")
    tickets = wait_for_tickets(served.db_url, 2)
    by_team = {t.team: t.id for t in tickets}
    with httpx.Client(base_url=served.base, timeout=10) as c:
        assert login(c, AGENT).status_code == 303
        page = c.get(f"/tickets/{by_team['support']}")
        assert page.status_code == 200
        assert "Hello <b>team</b>" in page.text
        assert_inert(page.text)
        assert "script-src 'self'" in page.headers["content-security-policy"]
        # Another team's ticket.
        assert c.get(f"/tickets/{by_team['billing']}").status_code == 403
        # CSRF: a POST without the token, and one with a wrong token.
        sid = by_team["support"]
        assert c.post(f"/tickets/{sid}/note", data={"text": "x"}).status_code == 403
        assert c.post(f"/tickets/{sid}/reply",
                      data={"text": "x", "csrf": "forged"}).status_code == 403
    with httpx.Client(base_url=served.base, timeout=10) as c:
        assert c.get("/api/tickets").status_code == 401
        assert c.get("/api/tickets",
                     headers={"Authorization": "Bearer rt_nope"}).status_code == 401
        ok = c.get("/api/tickets", headers={"Authorization": f"Bearer {served.token}"})
        assert ok.status_code == 200
        assert [t["team"] for t in ok.json()["tickets"]] == ["support"]
    # Login throttling in the daemon, per account and client address.
    with httpx.Client(base_url=served.base, timeout=10) as c:
        codes = [login(c, LEAD, "not the password").status_code for _ in range(6)]
        assert codes == [401] * 5 + [429]
        assert login(c, LEAD).status_code == 429


def _reply_arrived(sink: SmtpSink, text: str) -> Received | None:
    for m in sink.messages:
        if m.message["Auto-Submitted"] is None and text in m.raw.decode("utf-8", "replace"):
            return m
    return None


def test_browser_login_queue_open_reply(served: Served, smtp_sink: SmtpSink,  # noqa: F811
                                        tmp_path: Path) -> None:
    with browser_page() as page:
        page.goto(f"{served.base}/queues")
        assert "/login" in page.url
        page.fill("input[name=email]", AGENT)
        page.fill("input[name=password]", PASSWORD)
        page.click("form.login button[type=submit]")
        page.wait_for_url(re.compile(r".*/queues$"))
        assert page.locator("text=No tickets.").count() == 1

        send_smtp(served.router.port,
                  make_mail(subject="Browser-routed question", to="support@acme.test",
                            frm="Alice <alice@example.org>",
                            message_id="<browser-1@example.org>"),
                  ["support@acme.test"], mail_from="alice@example.org")
        deadline = time.monotonic() + 30
        link = page.locator("a", has_text="Browser-routed question")
        while link.count() == 0:
            assert time.monotonic() < deadline, "the routed ticket never showed in the queue"
            time.sleep(0.3)
            page.reload()
        link.first.click()
        page.wait_for_url(re.compile(r".*/tickets/\d+$"))
        ticket_id = int(page.url.rsplit("/", 1)[1])
        assert page.locator(".token").inner_text() == f"[#{ticket_id}]"
        page.fill("#reply-form textarea[name=text]", "Hello Alice, fixed from the console.")
        page.click("#send-reply")
        page.wait_for_url(re.compile(rf".*/tickets/{ticket_id}$"))
        page.locator("article.kind-out", has_text="fixed from the console").wait_for()
        assert page.locator("#status").inner_text() == "pending"
        page.screenshot(path=str(tmp_path / "ticket.png"), full_page=True)

    got = wait_until(lambda: _reply_arrived(smtp_sink, "fixed from the console"), 30,
                     what="the agent's reply at the relay")
    msg = got.message
    assert got.rcpt_tos == ["alice@example.org"]
    assert got.mail_from == "support@acme.test"
    assert f"[#{ticket_id}]" in str(msg["Subject"])
    assert str(msg["Subject"]).startswith("Re: Browser-routed question")
    assert str(msg["In-Reply-To"]) == "<browser-1@example.org>"
    assert "<browser-1@example.org>" in str(msg["References"])
