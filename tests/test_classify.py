"""Decision effects through the real pipeline: spam, priority, tags, campaign, alerts, a
rule that suppresses the ack, and the decision record stored with the ticket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from router.ack import ack_hook
from router.models import Decision, Event, Inbound, InboundStatus, Outbox, Ticket
from tests.daemon import Store, make_mail, open_store

RULES = """
[vip]
addresses = ["ceo@bigco.test"]

[[rule]]
name = "junk"
subject = "crypto\\\\s+giveaway"
spam = true

[[rule]]
name = "angry-vip"
description = "a VIP writes angrily: the lead hears now"
vip = true
tone = ["negative"]
priority = "urgent"
tags = ["vip", "angry"]
alert = ["lead"]

[[rule]]
name = "partners"
sender_domain = ["partner.test"]
suppress_ack = true
tags = ["partner"]

[[campaign]]
name = "spring24"
tag = "spring24"
description = "Spring sale 2024: 20% off annual plans"
valid_from = 2024-03-01
valid_until = 2024-05-31
"""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "etc", extra=RULES, hooks=[ack_hook]) as s:
        yield s


def rows(store: Store, model: Any) -> list[Any]:
    with store.session() as s:
        return list(s.exec(select(model).order_by(model.id)).all())


def test_spam_is_stored_not_routed_not_acked(store: Store) -> None:
    store.accept(make_mail(subject="CRYPTO giveaway now", frm="x@spam.test"),
                 ["support@acme.test"], mail_from="x@spam.test")
    store.drain()
    assert rows(store, Ticket) == [] and rows(store, Outbox) == []
    [inb] = rows(store, Inbound)
    assert inb.status == InboundStatus.SPAM and inb.ticket_id is None
    assert inb.error.startswith("rule junk")
    [ev] = rows(store, Event)
    assert ev.kind == "spam" and ev.data["inbound_id"] == inb.id
    assert any(h["rule"] == "junk" and h["matched"] for h in ev.data["hits"])


def test_priority_tags_alert_and_decision_record(store: Store) -> None:
    store.accept(make_mail(to="billing@acme.test", frm="CEO <ceo@bigco.test>",
                           subject="Unacceptable", body="This is awful, I am furious."),
                 ["billing@acme.test"], mail_from="ceo@bigco.test")
    store.drain()
    [t] = rows(store, Ticket)
    assert (t.team, t.priority, t.tags) == ("billing", "urgent", ["vip", "angry"])
    alerts = [o for o in rows(store, Outbox) if o.kind == "alert"]
    [alert] = alerts
    assert alert.rcpt_to == ["lead-billing@acme.test"] and alert.ticket_id == t.id
    assert alert.customer_id is None
    assert b"Rule angry-vip raised an alert" in alert.raw
    assert [o.kind for o in rows(store, Outbox)].count("ack") == 1
    [d] = rows(store, Decision)
    summary = d.hits[-1]
    assert summary["rule"] == "decision" and summary["tone"]["label"] == "negative"
    assert summary["alerts"][0]["to"] == ["lead-billing@acme.test"]
    assert {h["rule"] for h in d.hits} >= {"address", "junk", "angry-vip", "partners"}


def test_rule_suppresses_the_ack_but_keeps_the_promise(store: Store) -> None:
    store.accept(make_mail(frm="p@partner.test"), ["support@acme.test"],
                 mail_from="p@partner.test")
    store.drain()
    [t] = rows(store, Ticket)
    assert t.tags == ["partner"] and t.promised_at is not None
    assert [o for o in rows(store, Outbox) if o.kind == "ack"] == []
    [ev] = [e for e in rows(store, Event) if e.kind == "ack_suppressed"]
    assert ev.data["rule"] == "rule"
    assert ev.data["reason"] == "rule partners suppresses the acknowledgement"


def test_campaign_plus_tag_on_the_ticket(store: Store) -> None:
    store.accept(make_mail(to="sales+spring24@acme.test"), ["sales+spring24@acme.test"])
    store.drain()
    [t] = rows(store, Ticket)
    assert (t.team, t.tag, t.campaign) == ("support", "spring24", "spring24")
    assert "campaign:spring24" in t.tags
    [d] = rows(store, Decision)
    camp = d.hits[-1]["campaign"]
    assert camp["description"] == "Spring sale 2024: 20% off annual plans"
    assert camp["expired"] is True   # the test runs after May 2024: recorded, still routed
