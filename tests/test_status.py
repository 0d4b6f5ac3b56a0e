"""`router status` on the mail side: how much accepted mail waits to be routed (in
``inbound`` and in SMTP intake's spools), since when, and how much is parked."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from sqlalchemy import update

from router import db
from router.intake.accept import Acceptor, Envelope
from router.intake.spool import Spool, SpoolMover, unmoved
from router.models import T_INBOUND, InboundStatus
from tests.conftest import write_config
from tests.daemon import inbound_rows, make_mail, run_cli


def _accept(url: str, first: int, n: int) -> None:
    async def go() -> None:
        spool = Spool(url, 0)
        acceptor = Acceptor(None, spool=spool)
        await acceptor.start()
        try:
            for i in range(first, first + n):  # one by one: received in this order
                await acceptor.accept(Envelope(
                    "smtp", f"c{i}@example.org", ["support@acme.test"],
                    make_mail(subject=f"m {i}", message_id=f"<m.{i}@example.org>")))
        finally:
            await acceptor.stop()
            spool.close()

    asyncio.run(go())


def _status(config: Path) -> tuple[dict[str, object], str]:
    as_json = run_cli("status", "-c", str(config), "--json")
    text = run_cli("status", "-c", str(config))
    # 3: no daemon has recorded a config in this database; the backlog is read all the same.
    assert as_json.returncode == text.returncode == 3, as_json.stderr + text.stderr
    return json.loads(as_json.stdout)["intake"], text.stdout.decode()


def test_status_counts_mail_waiting_spooled_and_parked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    db.upgrade(url)
    config = write_config(tmp_path, db_url=url)
    intake, text = _status(config)
    assert intake == {"waiting": 0, "spooled": 0, "oldest_waiting": None, "parked": 0}
    assert "intake:   no mail waiting to be routed\n" in text

    _accept(url, 0, 3)
    intake, _ = _status(config)
    oldest = unmoved(url)[0].received_at.isoformat()
    assert intake == {"waiting": 3, "spooled": 3, "oldest_waiting": oldest, "parked": 0}
    read, write = db.make_engine(url), db.make_engine(url, immediate=True)
    mover = SpoolMover(url, read, write)
    assert mover.move() == 3
    mover.close()
    _accept(url, 3, 2)  # left in the spool
    rows = inbound_rows(url)
    with write.begin() as conn:  # as the pipeline parks a message that raised
        conn.execute(update(T_INBOUND).where(T_INBOUND.c.id == rows[0].id)
                     .values(status=InboundStatus.PARKED, error="Traceback ..."))
    read.dispose()
    write.dispose()

    intake, text = _status(config)
    oldest = rows[1].received_at.isoformat()  # the oldest one not parked
    assert intake == {"waiting": 4, "spooled": 2, "oldest_waiting": oldest, "parked": 1}
    assert (f"intake:   4 messages waiting to be routed (2 in SMTP intake spools), the "
            f"oldest received {oldest}; 1 parked (the pipeline could not process it: "
            "router tickets parked)\n") in text
