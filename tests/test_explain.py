"""`router explain`: a dry run through the live config that writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from sqlmodel import select

from router import db
from router import settings as config
from router.models import Inbound, Ticket
from tests.conftest import write_config
from tests.daemon import make_mail, open_store, run_cli

RULES = """
[[rule]]
name = "urgent"
urgent = true
priority = "urgent"
alert = ["lead"]

[[rule]]
name = "invoices"
keywords = ["invoice", "fatura"]
team = "billing"

[[rule]]
name = "never"
keywords = ["invoice"]
tags = ["x"]
"""


def eml(tmp_path: Path, raw: bytes) -> Path:
    path = tmp_path / "mail.eml"
    path.write_bytes(raw)
    return path


def test_explain_text_without_database(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", extra=RULES)
    mail = eml(tmp_path, make_mail(to="support@acme.test", subject="Invoice wrong, URGENT",
                                   body="Please fix this invoice immediately."))
    res = run_cli("explain", str(mail), "-c", str(path), "--at", "2026-03-03T10:00:00+03:00")
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr.decode()
    assert "database: none" in out
    assert "team: billing (by rule invoices; address support@acme.test)" in out
    assert "priority: urgent" in out
    assert "  HIT  address: To support@acme.test is a role address of team support" in out
    assert "  HIT  urgent: urgent (" in out
    assert "  HIT  invoices: keyword \"Invoice\" in the subject  -> team billing [stop]" in out
    assert "  miss never: not evaluated: rule invoices stopped the chain" in out
    assert "alert: lead-billing@acme.test now (rule urgent)" in out
    assert "ack: would be sent" in out
    # Tuesday 10:00 in Istanbul, billing's SLA is 4 business hours, no history: fallback.
    assert "turnaround: within about 4 hours (sla_fallback;" in out
    assert not (tmp_path / "etc" / "router.db").exists()


def test_explain_json_says_why_no_ack(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", extra=RULES)
    mail = eml(tmp_path, make_mail(to="oops@acme.test", frm="noreply@example.org",
                                   headers={"Auto-Submitted": "auto-replied"}))
    res = run_cli("explain", str(mail), "-c", str(path), "--json")
    data = json.loads(res.stdout)
    assert data["decision"]["team"] == "ops"
    assert data["ack"] == {"sent": False, "code": "loop_guard",
                           "reason": "Auto-Submitted: auto-replied (RFC 3834: never answer "
                                     "automatic mail)"}
    assert [h["rule"] for h in data["hits"]] == ["address", "urgent", "invoices", "never",
                                                 "decision"]


def test_explain_unroutable(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", extra=RULES)
    mail = eml(tmp_path, make_mail(to="nobody@elsewhere.test"))
    res = run_cli("explain", str(mail), "-c", str(path))
    assert res.returncode == 0
    assert "team: none: no team: the message would be parked" in res.stdout.decode()


def test_explain_reads_the_database_and_writes_nothing(tmp_path: Path) -> None:
    with open_store(tmp_path / "etc", extra=RULES) as store:
        first = make_mail(to="billing@acme.test", frm="ann@example.org", subject="Fatura")
        store.accept(first, ["billing@acme.test"], mail_from="ann@example.org")
        store.drain()
        url = store.url
    before = Path(config.load(tmp_path / "etc" / "router.toml").database_url[10:]).read_bytes()
    # A second mail of the same customer: threads onto nothing (new subject), would be
    # acked? No: the grace period of the ack (24h) applies only to acks actually sent, and
    # this store ran without the ack hook, so it would be sent.
    mail = eml(tmp_path, make_mail(to="billing@acme.test", frm="ann@example.org",
                                   subject="Another invoice question"))
    res = run_cli("explain", str(mail), "-c", str(tmp_path / "etc" / "router.toml"), "--json")
    data = json.loads(res.stdout)
    assert data["database"] == "read" and data["thread"] is None
    assert data["turnaround"]["backlog"] == 1   # the first ticket is waiting
    engine = db.make_engine(url)
    from sqlmodel import Session

    with Session(engine) as s:
        assert len(s.exec(select(Ticket)).all()) == 1
        assert len(s.exec(select(Inbound)).all()) == 1
    engine.dispose()
    after = Path(config.load(tmp_path / "etc" / "router.toml").database_url[10:]).read_bytes()
    assert before == after
