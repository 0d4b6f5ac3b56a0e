"""`router tickets list/show` as a subprocess, in text and in JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from router.models import Ticket
from tests.daemon import Store, make_mail, open_store, run_cli


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """Three tickets: two of Carol (ops, billing with a reply), one of Dan (support)."""
    with open_store(tmp_path_factory.mktemp("cli") / "etc") as s:
        s.accept(make_mail(frm="Carol <carol@example.org>", to="oops@acme.test",
                           subject="Checkout throws 500", message_id="<c1@example.org>"),
                 ["oops@acme.test"])
        s.accept(make_mail(frm="Carol <carol@example.org>", to="billing+spring24@acme.test",
                           subject="Invoice 2024-17 wrong", message_id="<c2@example.org>",
                           body="The total is off by 10 EUR.\n"),
                 ["billing+spring24@acme.test"])
        s.accept(make_mail(frm="dan@example.org", to="support@acme.test",
                           subject="How do I export?"), ["support@acme.test"])
        s.drain()
        s.accept(make_mail(frm="carol@example.org", to="billing@acme.test",
                           subject="Re: Invoice 2024-17 wrong", in_reply_to="<c2@example.org>",
                           body="Any news?\n"), ["billing@acme.test"])
        s.drain()
        with s.session() as session:
            t = session.get(Ticket, 3)
            assert t is not None and t.subject == "How do I export?"
            t.status = "solved"
            session.add(t)
            session.commit()
        yield s


def cli(store: Store, *args: str) -> tuple[int, str, str]:
    res = run_cli("tickets", *args, "-c", str(store.config_path))
    return res.returncode, res.stdout.decode(), res.stderr.decode()


def cli_json(store: Store, *args: str) -> Any:
    code, out, err = cli(store, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_list_json(store: Store) -> None:
    data = cli_json(store, "list")
    assert data["count"] == 3 == len(data["tickets"])
    assert [t["id"] for t in data["tickets"]] == [3, 2, 1]  # newest first
    t2 = data["tickets"][1]
    assert (t2["team"], t2["subject"], t2["address"], t2["tag"], t2["messages"]) == (
        "billing", "Invoice 2024-17 wrong", "billing@acme.test", "spring24", 2)
    assert t2["customer"]["email"] == "carol@example.org"
    assert t2["customer"]["name"] == "Carol"
    for key in ("status", "priority", "created_at", "updated_at", "promised_at", "language"):
        assert key in t2


def test_list_filters(store: Store) -> None:
    assert [t["id"] for t in cli_json(store, "list", "--team", "ops")["tickets"]] == [1]
    assert [t["id"] for t in cli_json(store, "list", "--status", "solved")["tickets"]] == [3]
    assert [t["id"] for t in cli_json(store, "list", "--status", "active")["tickets"]] == [2, 1]
    assert cli_json(store, "list", "--team", "nobody") == {"tickets": [], "count": 0}
    assert [t["id"] for t in cli_json(store, "list", "--customer",
                                      "carol@example.org")["tickets"]] == [2, 1]


def test_list_text(store: Store) -> None:
    code, out, _ = cli(store, "list")
    assert code == 0
    assert "Checkout throws 500" in out and "Invoice 2024-17 wrong" in out
    assert "carol@example.org" in out


def test_show_json(store: Store) -> None:
    t = cli_json(store, "show", "2")
    assert (t["id"], t["team"], t["status"], t["tag"]) == (2, "billing", "new", "spring24")
    assert [m["subject"] for m in t["messages"]] == ["Invoice 2024-17 wrong",
                                                     "Re: Invoice 2024-17 wrong"]
    assert "off by 10 EUR" in t["messages"][0]["text"]
    assert all(m["kind"] == "in" and m["from"] == "carol@example.org" for m in t["messages"])
    assert [d["kind"] for d in t["decisions"]] == ["route", "thread"]
    assert t["decisions"][0]["hits"][0]["rule"] == "address"
    assert "spring24" in t["decisions"][0]["reason"]
    assert [e["kind"] for e in t["events"]] == ["created", "customer_reply"]
    assert t["customer"]["email"] == "carol@example.org"
    assert [(x["id"], x["team"]) for x in t["customer_tickets"]] == [(1, "ops"),
                                                                     (2, "billing")]


def test_show_text(store: Store) -> None:
    code, out, _ = cli(store, "show", "1")
    assert code == 0
    assert out.startswith("Ticket 1: Checkout throws 500")
    assert "team ops" in out and "carol@example.org" in out
    assert "Invoice 2024-17 wrong" in out  # the customer's other ticket


def test_show_unknown_ticket_is_exit_1(store: Store) -> None:
    code, out, err = cli(store, "show", "999")
    assert code == 1 and out == "" and "no ticket 999" in err
    code, _, err = cli(store, "show", "999", "--json")
    assert code == 1 and "no ticket 999" in err


def test_config_option_before_or_after_the_subcommand(store: Store) -> None:
    for args in (["tickets", "-c", str(store.config_path), "list", "--json"],
                 ["tickets", "list", "-c", str(store.config_path), "--json"]):
        res = run_cli(*args, env={"ROUTER_CONFIG": "/nonexistent/router.toml"})
        assert res.returncode == 0, (args, res.stderr.decode())
        assert json.loads(res.stdout)["count"] == 3
