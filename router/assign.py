"""Who gets a new ticket: the team's ``assignment`` policy, applied as the pipeline opens it.

- ``manual`` (default): nobody; agents claim tickets or leads assign them in the console.
- ``round_robin``: the next member with role agent or lead, in config order, after the one
  who got the team's previous automatically assigned ticket. That state is the newest
  ``assigned`` event with ``policy = "round_robin"`` for the team (searched over the last
  30 days, so the lookup stays cheap on a large event table), not a table of its own; when
  there is none, or its assignee left the team, the turn starts again at the first member.
- ``least_loaded``: the member with the fewest open tickets (new, open or pending) assigned
  to them; ties go to the one listed first.

Load counts a person's open tickets in every team, since one person in two teams has one
pair of hands. With ``max_open_per_agent = N`` (0: no cap) members holding N or more open
tickets are skipped; when everyone is at the cap the ticket stays unassigned and an
``assignment_skipped`` event says why, so the lead can see it and step in.

Business hours do not matter: a ticket that arrives outside the team's hours is still
assigned, so whoever gets it finds it first thing when the team opens (and the SLA clock,
counted in business time where configured, has not run in between).

Every automatic assignment records an ``assigned`` event with ``by = "router"`` and the
policy, alongside the console's manual ones.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Connection, func, insert, select

from router import fastsql, log
from router.models import T_EVENT, T_TICKET, Ticket, TicketStatus
from router.settings import Team

if TYPE_CHECKING:
    from router.pipeline import Handled

ASSIGN_ROLES = ("agent", "lead")
OPEN_STATUSES = (TicketStatus.NEW, TicketStatus.OPEN, TicketStatus.PENDING)
ROUND_ROBIN_MEMORY = timedelta(days=30)

_log = log.get("router.assign")
_INS_EVENT = insert(T_EVENT)


def candidates(team: Team) -> list[str]:
    """Members who take tickets, in config order (a person listed twice counts once)."""
    return list(dict.fromkeys(m.email for m in team.members if m.role in ASSIGN_ROLES))


def open_load(conn: Connection, people: list[str]) -> dict[str, int]:
    rows = conn.execute(select(T_TICKET.c.assignee, func.count())
                        .where(T_TICKET.c.assignee.in_(people),
                               T_TICKET.c.status.in_(OPEN_STATUSES))
                        .group_by(T_TICKET.c.assignee)).all()
    load = dict.fromkeys(people, 0)
    for assignee, n in rows:
        if assignee is not None:
            load[assignee] = int(n)
    return load


def last_round_robin(conn: Connection, team: str, now: datetime) -> str | None:
    data = T_EVENT.c.data
    row = conn.execute(select(data)
                       .where(T_EVENT.c.kind == "assigned",
                              T_EVENT.c.at >= now - ROUND_ROBIN_MEMORY,
                              data["policy"].as_string() == "round_robin",
                              data["team"].as_string() == team)
                       .order_by(T_EVENT.c.id.desc()).limit(1)).scalar()
    assignee = row.get("assignee") if isinstance(row, dict) else None
    return assignee if isinstance(assignee, str) else None


def choose(policy: str, people: list[str], load: dict[str, int], cap: int,
           last: str | None) -> str | None:
    """The assignee under `policy`, or None when everyone is at the cap."""
    eligible = [p for p in people if cap == 0 or load[p] < cap]
    if not eligible:
        return None
    if policy == "least_loaded":
        return min(eligible, key=lambda p: (load[p], people.index(p)))
    start = people.index(last) + 1 if last in people else 0
    turn = people[start:] + people[:start]
    return next(p for p in turn if p in eligible)


def assign_new(conn: Connection, ticket: Ticket, team: Team, now: datetime) -> str | None:
    """Apply the team's policy to a new, unassigned ticket in the caller's transaction. It
    sets `ticket.assignee`; writing the ticket is the caller's (the pipeline's `Handled`)."""
    policy = team.assignment
    if policy == "manual" or ticket.assignee is not None:
        return None
    people = candidates(team)
    if not people:
        reason = f"team {team.name} has no members with role agent or lead"
        load: dict[str, int] = {}
    else:
        load = open_load(conn, people)
        last = last_round_robin(conn, team.name, now) if policy == "round_robin" else None
        chosen = choose(policy, people, load, team.max_open_per_agent, last)
        if chosen is not None:
            ticket.assignee = chosen
            fastsql.execute(conn, _INS_EVENT, {
                "at": now, "ticket_id": ticket.id, "kind": "assigned",
                "data": {"by": "router", "assignee": chosen, "previous": None,
                         "policy": policy, "team": team.name, "open": load[chosen]}})
            _log.info("ticket assigned", ticket=ticket.id, team=team.name, assignee=chosen,
                      policy=policy, open=load[chosen])
            return chosen
        reason = (f"all {len(people)} members of team {team.name} are at the cap of "
                  f"{team.max_open_per_agent} open tickets")
    fastsql.execute(conn, _INS_EVENT, {
        "at": now, "ticket_id": ticket.id, "kind": "assignment_skipped",
        "data": {"policy": policy, "team": team.name, "reason": reason, "load": load}})
    _log.info("assignment skipped", ticket=ticket.id, team=team.name, policy=policy,
              reason=reason)
    return None


def assignment_hook(conn: Connection, handled: Handled) -> None:
    """`router.pipeline.Hook`: assign the ticket the pipeline just opened."""
    if not handled.new_ticket:
        return
    ticket = handled.get(Ticket, handled.ticket_id)
    team = handled.settings.team_by_name(ticket.team) if ticket is not None else None
    if ticket is None or team is None:
        return
    assign_new(conn, ticket, team, handled.now)
