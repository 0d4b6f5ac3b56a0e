"""Assignment policies of new tickets: round robin, least loaded, the per-agent cap."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import col, select

from router.assign import assignment_hook, choose
from router.hooks import default_hooks
from router.models import Event, Outbox, Ticket, TicketStatus
from tests.daemon import Store, make_mail, open_store

TEAMS = """
[[team]]
name = "rr"
addresses = ["rr@acme.test"]
lead = "bea@acme.test"
assignment = "round_robin"
members = [
  { name = "Ann", email = "ann@acme.test" },
  { name = "Bea", email = "bea@acme.test", role = "lead" },
  { name = "Max", email = "max@acme.test", role = "manager" },
  { name = "Cem", email = "cem@acme.test" },
]

[[team]]
name = "capped"
addresses = ["capped@acme.test"]
lead = "xia@acme.test"
assignment = "round_robin"
max_open_per_agent = 1
business_hours = { mon = "09:00-09:01" }
members = [
  { name = "Xia", email = "xia@acme.test", role = "lead" },
  { name = "Yan", email = "yan@acme.test" },
]

[[team]]
name = "ll"
addresses = ["ll@acme.test"]
lead = "kim@acme.test"
assignment = "least_loaded"
max_open_per_agent = 2
members = [
  { name = "Kim", email = "kim@acme.test", role = "lead" },
  { name = "Lou", email = "lou@acme.test" },
]
"""


def _open(store: Store, to: str, n: int = 1) -> list[str | None]:
    """Open `n` new tickets at `to`; their assignees in order."""
    with store.session() as s:
        before = len(s.exec(select(Ticket)).all())
    for i in range(n):
        store.accept(make_mail(frm=f"c{before + i}@example.org", to=to,
                               subject=f"question {before + i}"), [to], "c@example.org")
        store.drain()
    with store.session() as s:
        rows = s.exec(select(Ticket).order_by(col(Ticket.id))).all()
        return [t.assignee for t in rows[before:]]


def _events(store: Store, kind: str) -> list[Event]:
    with store.session() as s:
        return list(s.exec(select(Event).where(Event.kind == kind).order_by(col(Event.id))))


def _solve(store: Store, assignee: str) -> None:
    with store.session() as s:
        t = s.exec(select(Ticket).where(Ticket.assignee == assignee)).first()
        assert t is not None
        t.status = TicketStatus.SOLVED
        s.add(t)
        s.commit()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    cm = open_store(tmp_path / "etc", db_url=url, extra=TEAMS, hooks=[assignment_hook])
    request.addfinalizer(lambda: cm.__exit__(None, None, None))
    return cm.__enter__()


def test_round_robin_in_config_order_skipping_managers(store: Store) -> None:
    assert _open(store, "rr@acme.test", 5) == [
        "ann@acme.test", "bea@acme.test", "cem@acme.test", "ann@acme.test", "bea@acme.test"]
    events = _events(store, "assigned")
    assert [e.data["policy"] for e in events] == ["round_robin"] * 5
    assert events[0].data["by"] == "router" and events[0].data["team"] == "rr"


def test_round_robin_turn_is_per_team_and_survives_other_assignments(store: Store) -> None:
    assert _open(store, "rr@acme.test") == ["ann@acme.test"]
    assert _open(store, "ll@acme.test") == ["kim@acme.test"]
    assert _open(store, "rr@acme.test") == ["bea@acme.test"]


def test_cap_skips_full_members_and_records_when_everyone_is_full(store: Store) -> None:
    # The team's hours are one minute a week: tickets are assigned outside them too.
    assert _open(store, "capped@acme.test", 3) == ["xia@acme.test", "yan@acme.test", None]
    [skipped] = _events(store, "assignment_skipped")
    assert "cap of 1" in skipped.data["reason"] and skipped.data["policy"] == "round_robin"
    _solve(store, "xia@acme.test")
    assert _open(store, "capped@acme.test") == ["xia@acme.test"]


def test_least_loaded_with_cap(store: Store) -> None:
    assert _open(store, "ll@acme.test", 4) == [
        "kim@acme.test", "lou@acme.test", "kim@acme.test", "lou@acme.test"]
    assert _open(store, "ll@acme.test") == [None], "both at the cap of 2"
    _solve(store, "lou@acme.test")
    assert _open(store, "ll@acme.test") == ["lou@acme.test"]
    assert [e.data["policy"] for e in _events(store, "assigned")] == ["least_loaded"] * 5


def test_manual_leaves_tickets_alone(store: Store) -> None:
    assert _open(store, "support@acme.test", 2) == [None, None]
    assert _events(store, "assigned") == [] and _events(store, "assignment_skipped") == []


def test_choose_least_loaded_prefers_config_order_on_ties() -> None:
    people = ["a", "b", "c"]
    assert choose("least_loaded", people, {"a": 3, "b": 1, "c": 1}, 0, None) == "b"
    assert choose("round_robin", people, {"a": 0, "b": 5, "c": 0}, 5, "a") == "c"
    assert choose("round_robin", people, {"a": 0, "b": 0, "c": 0}, 0, "gone") == "a"


def test_default_hooks_assign_before_notifying(tmp_path: Path) -> None:
    extra = TEAMS.replace('assignment = "least_loaded"',
                          'assignment = "least_loaded"\nnotify_agents = true')
    with open_store(tmp_path / "etc", extra=extra, hooks=default_hooks()) as store:
        assert _open(store, "ll@acme.test") == ["kim@acme.test"]
        with store.session() as s:
            notes = s.exec(select(Outbox).where(Outbox.kind == "agent_notify")).all()
            assert [n.rcpt_to for n in notes] == [["kim@acme.test"]]
