"""Learning from agents: corrections are recorded, the classifier trains on routed and
corrected tickets, and it routes only mail to generic addresses, never over a rule or a
team's own address."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from router import learn
from router.clock import system_clock
from router.models import ClassifierModel, Decision, Event, Ticket
from tests.daemon import Store, make_mail, open_store, run_cli

BILLING = ["Invoice {n} is wrong", "Refund for order {n}", "Charged twice on card {n}",
           "Faturam {n} yanlış geldi", "Ödeme iadesi {n} ne zaman", "VAT number on invoice {n}"]
OPS = ["Site is down again {n}", "Error 500 on checkout page {n}", "Login page broken {n}",
       "Sunucu çöktü {n}", "API timeout on endpoint {n}", "Outage in region {n}"]

LEARN = """
[learn]
enabled = true
apply_threshold = 0.5
generic_addresses = ["support@acme.test"]
min_examples = 10

[[rule]]
name = "press"
keywords = ["journalist"]
team = "support"
"""


def examples() -> list[learn.Example]:
    out = []
    for n in range(8):
        out += [learn.Example(t.format(n=n), "billing") for t in BILLING]
        out += [learn.Example(t.format(n=n), "ops") for t in OPS]
    return out


def test_evaluate_and_predict() -> None:
    metrics = learn.evaluate(examples())
    assert metrics["accuracy"] >= 0.9 and set(metrics["per_team"]) == {"billing", "ops"}
    model = learn.fit(examples())
    team, confidence = learn.predict(model, "my invoice shows the wrong amount")
    assert team == "billing" and 0.5 < confidence <= 1.0
    assert learn.predict(model, "the checkout page is down")[0] == "ops"


def test_too_few_examples_hold_nothing_out() -> None:
    few = [learn.Example("a", "x"), learn.Example("b", "y")]
    assert learn.evaluate(few)["accuracy"] is None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "etc", extra=LEARN) as s:
        yield s


def rows(store: Store, model: Any) -> list[Any]:
    with store.session() as s:
        return list(s.exec(select(model).order_by(model.id)).all())


def seed_tickets(store: Store) -> None:
    for n in range(3):
        for t in BILLING:
            store.accept(make_mail(to="billing@acme.test", subject=t.format(n=n)),
                         ["billing@acme.test"])
        for t in OPS:
            store.accept(make_mail(to="oops@acme.test", subject=t.format(n=n)),
                         ["oops@acme.test"])
    store.drain()


def test_move_train_and_route_generic_mail(store: Store) -> None:
    cfg = str(store.config_path)
    seed_tickets(store)
    # An agent corrects a ticket that arrived at the generic address.
    store.accept(make_mail(to="support@acme.test", subject="Invoice 77 is wrong"),
                 ["support@acme.test"])
    store.drain()
    wrong = rows(store, Ticket)[-1]
    assert wrong.team == "support"   # no model yet: the address decides
    res = run_cli("tickets", "move", str(wrong.id), "billing", "--by", "sam@acme.test",
                  "-c", cfg, "--json")
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout)["moved"] is True
    [reroute] = [d for d in rows(store, Decision) if d.kind == "reroute"]
    assert (reroute.ticket_id, reroute.team) == (wrong.id, "billing")
    assert reroute.hits[0]["from"] == "support" and reroute.hits[0]["by"] == "sam@acme.test"
    assert any(e.kind == "moved" for e in rows(store, Event))
    assert run_cli("tickets", "move", "9999", "billing", "-c", cfg).returncode == 1

    res = run_cli("train", "-c", cfg, "--json")
    assert res.returncode == 0, res.stderr.decode()
    metrics = json.loads(res.stdout)
    assert metrics["corrections"] == 1 and metrics["examples"] == 37
    assert metrics["accuracy"] is not None and "billing" in metrics["per_team"]
    [model] = rows(store, ClassifierModel)
    assert model.examples == 37 and model.metrics["accuracy"] == metrics["accuracy"]
    text = run_cli("train", "-c", cfg).stdout.decode()
    assert "held-out accuracy" in text and "billing" in text

    # Generic address: the classifier routes.
    store.accept(make_mail(to="support@acme.test", subject="Refund for my invoice please"),
                 ["support@acme.test"])
    # A team's own address: the address decides, the classifier is not even asked.
    store.accept(make_mail(to="oops@acme.test", subject="Refund for my invoice please"),
                 ["oops@acme.test"])
    # An explicit rule: never overridden.
    store.accept(make_mail(to="support@acme.test", subject="journalist asks about a refund"),
                 ["support@acme.test"])
    store.drain()
    t1, t2, t3 = rows(store, Ticket)[-3:]
    assert (t1.team, t2.team, t3.team) == ("billing", "ops", "support")
    d1, d2, d3 = [d for d in rows(store, Decision) if d.kind == "route"][-3:]
    learn_hit = next(h for h in d1.hits if h["rule"] == "learn")
    assert learn_hit["matched"] and learn_hit["team"] == "billing"
    assert not any(h["rule"] == "learn" for h in d2.hits)
    rule_hit = next(h for h in d3.hits if h["rule"] == "learn")
    assert not rule_hit["matched"] and "never overrides" in rule_hit["reason"]


def test_train_with_too_few_tickets(store: Store) -> None:
    res = run_cli("train", "-c", str(store.config_path))
    assert res.returncode == 1 and "not trained" in res.stdout.decode()


def test_suggest_only_when_disabled(store: Store) -> None:
    seed_tickets(store)
    model_id, _ = learn.train_and_store(store.engine, system_clock(), min_examples=10)
    assert model_id is not None
    store.settings = store.settings.model_copy(update={
        "learn": store.settings.learn.model_copy(update={"enabled": False})})
    store.accept(make_mail(to="support@acme.test", subject="Refund for order 5"),
                 ["support@acme.test"])
    store.drain()
    t = rows(store, Ticket)[-1]
    d = next(d for d in rows(store, Decision) if d.ticket_id == t.id)
    assert t.team == "support"
    assert d.hits[-1]["suggestion"]["team"] == "billing"
    hit = next(h for h in d.hits if h["rule"] == "learn")
    assert not hit["matched"] and "applying is disabled" in hit["reason"]
