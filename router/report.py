"""`router report`: how honest the acknowledgements were, per team.

The headline metric is the share of promises kept: of the tickets whose first human answer
has gone out and that carried a promise, how many were answered by the promised time.
"""

from __future__ import annotations

import statistics
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from router.models import T_TICKET


def team_report(engine: Engine, *, since: datetime | None = None) -> list[dict[str, Any]]:
    q = select(T_TICKET.c.team, T_TICKET.c.created_at, T_TICKET.c.first_response_at,
               T_TICKET.c.promised_at, T_TICKET.c.promise_kept, T_TICKET.c.promise_basis,
               T_TICKET.c.status)
    if since is not None:
        q = q.where(T_TICKET.c.created_at >= since)
    teams: dict[str, dict[str, Any]] = {}
    waits: dict[str, list[float]] = {}
    with engine.connect() as conn:
        for r in conn.execute(q):
            t = teams.setdefault(r.team, {"team": r.team, "tickets": 0, "answered": 0,
                                          "promised": 0, "kept": 0, "broken": 0,
                                          "from_history": 0, "open_promises": 0})
            t["tickets"] += 1
            if r.promised_at is not None:
                t["promised"] += 1
                if r.promise_basis == "history":
                    t["from_history"] += 1
            if r.first_response_at is not None:
                t["answered"] += 1
                waits.setdefault(r.team, []).append(
                    (r.first_response_at - r.created_at).total_seconds())
                if r.promise_kept is True:
                    t["kept"] += 1
                elif r.promise_kept is False:
                    t["broken"] += 1
            elif r.promised_at is not None:
                t["open_promises"] += 1
    out = []
    for name in sorted(teams):
        t = teams[name]
        judged = t["kept"] + t["broken"]
        t["kept_share"] = round(t["kept"] / judged, 4) if judged else None
        w = waits.get(name, [])
        t["median_first_response_s"] = round(statistics.median(w)) if w else None
        out.append(t)
    return out


def print_report(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no tickets yet")
        return
    print(f"{'TEAM':<12}{'TICKETS':>8}{'ANSWERED':>9}{'PROMISED':>9}{'KEPT':>6}{'BROKEN':>7}"
          f"{'KEPT %':>8}  MEDIAN FIRST RESPONSE")
    for r in rows:
        share = "-" if r["kept_share"] is None else f"{100 * r['kept_share']:.1f}"
        med = ("-" if r["median_first_response_s"] is None
               else str(timedelta(seconds=r["median_first_response_s"])))
        print(f"{r['team']:<12}{r['tickets']:>8}{r['answered']:>9}{r['promised']:>9}"
              f"{r['kept']:>6}{r['broken']:>7}{share:>8}  {med}")
