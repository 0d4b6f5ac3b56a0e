"""`router report`: the share of promises kept, per team, from real rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlmodel import Session

from router import db
from router.models import Customer, Ticket
from router.report import team_report

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def _ticket(team: str, cid: int, minutes_to_answer: int | None, promise_minutes: int | None,
            basis: str = "history") -> Ticket:
    answered = T0 + timedelta(minutes=minutes_to_answer) if minutes_to_answer else None
    promised = T0 + timedelta(minutes=promise_minutes) if promise_minutes else None
    kept = None if answered is None or promised is None else answered <= promised
    return Ticket(team=team, customer_id=cid, address=f"{team}@acme.test", created_at=T0,
                  updated_at=T0, last_customer_at=T0, first_response_at=answered,
                  promised_at=promised, promise_basis=basis if promised else None,
                  promise_kept=kept)


def test_kept_share_per_team(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    with Session(engine) as s:
        c = Customer(email="ann@example.net", created_at=T0, last_seen_at=T0)
        s.add(c)
        s.flush()
        assert c.id is not None
        s.add_all([
            _ticket("billing", c.id, 30, 60), _ticket("billing", c.id, 90, 60),
            _ticket("billing", c.id, 45, 60, "sla_fallback"), _ticket("billing", c.id, None, 60),
            _ticket("ops", c.id, 10, None),
        ])
        s.commit()
    rows = {r["team"]: r for r in team_report(engine)}
    engine.dispose()
    b = rows["billing"]
    assert (b["tickets"], b["answered"], b["promised"], b["kept"], b["broken"]) == (4, 3, 4, 2, 1)
    assert b["kept_share"] == round(2 / 3, 4)
    assert b["from_history"] == 3 and b["open_promises"] == 1
    assert b["median_first_response_s"] == 45 * 60
    assert rows["ops"]["kept_share"] is None and rows["ops"]["promised"] == 0


def test_report_cli_json(tmp_path: Path) -> None:
    from tests.conftest import write_config
    from tests.daemon import run_cli

    url = f"sqlite:///{tmp_path / 'r.db'}"
    cfg = write_config(tmp_path / "etc", db_url=url)
    db.upgrade(url)
    out = run_cli("report", "-c", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"teams": []}
    text = run_cli("report", "-c", str(cfg))
    assert b"no tickets yet" in text.stdout
