"""Crash test: mail keeps arriving while the daemon is killed with SIGKILL at random moments
and restarted. Every message that got a 250 must be stored exactly once and end up in
exactly one ticket; messages whose 250 never arrived may be stored (once) or not at all."""

from __future__ import annotations

import multiprocessing
import os
import random
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from router import db
from router.intake.spool import unmoved_count
from router.signals import Doorbell, Flag
from router.worker import pipeline_main
from tests.conftest import write_config
from tests.daemon import start_router

ROUNDS = 5
SENDERS = 6


def _sender(port_box: list[int], stop: threading.Event, acked: list[str], unacked: list[str],
            lock: threading.Lock, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        n += 1
        mid = f"<crash.{seed}.{n}@example.net>"
        to = rng.choice(["billing@acme.test", "support@acme.test", "oops@acme.test"])
        raw = (f"From: Customer {seed} <c{seed}@example.net>\r\nTo: {to}\r\n"
               f"Subject: crash {seed}.{n}\r\nMessage-ID: {mid}\r\n\r\n"
               f"body {n}\r\n").encode()
        try:
            with smtplib.SMTP("127.0.0.1", port_box[0], timeout=5) as client:
                client.sendmail(f"c{seed}@example.net", [to], raw)
        except (OSError, smtplib.SMTPException):
            with lock:
                unacked.append(mid)
            time.sleep(0.05)
            continue
        with lock:
            acked.append(mid)


@pytest.mark.parametrize("processes", [1, 2], ids=["one-intake", "two-intakes"])
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, processes: int) -> None:
    """With `[smtp] processes = 2` the kill also takes the second intake process down
    (it dies with the daemon) while it may be between its commit and its 250."""
    url = f"sqlite:///{tmp_path / 'router.db'}"
    cfg = write_config(tmp_path / "etc", db_url=url, smtp_processes=processes)
    rng = random.Random(20261122)
    acked: list[str] = []
    unacked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    proc = start_router(cfg)
    port_box = [proc.port]
    senders = [threading.Thread(target=_sender, args=(port_box, stop, acked, unacked, lock, i),
                                daemon=True) for i in range(SENDERS)]
    for t in senders:
        t.start()
    try:
        for _ in range(ROUNDS):
            time.sleep(rng.uniform(0.3, 1.5))
            proc.kill()  # SIGKILL: no shutdown code runs, in the daemon or its pipeline child
            assert proc.proc.returncode == -9
            proc = start_router(cfg)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in senders:
            t.join(10)
    try:
        # Let the last instance route everything, then stop it properly.
        engine = db.make_engine(url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                pending = conn.execute(
                    text("select count(*) from inbound where status = 'new'")).scalar_one()
            if pending == 0 and not unmoved_count(url):
                break
            time.sleep(0.2)
        proc.stop()
    finally:
        proc.kill()

    assert len(acked) > 50, "the senders should have got plenty of mail through"
    with engine.connect() as conn:
        rows = conn.execute(text(
            "select message_id, status, ticket_id from inbound")).all()
        articles = Counter(r[0] for r in conn.execute(
            text("select message_id from article where kind = 'in'")))
        tickets = conn.execute(text("select count(*) from ticket")).scalar_one()
    engine.dispose()
    stored = Counter(r.message_id for r in rows)
    # Stored exactly once, whether or not its 250 got back to the sender.
    assert all(n == 1 for n in stored.values())
    missing = [m for m in acked if m not in stored]
    assert not missing, f"{len(missing)} messages got a 250 but are not stored: {missing[:5]}"
    by_id = {r.message_id: r for r in rows}
    for mid in acked:
        assert by_id[mid].status == "done" and by_id[mid].ticket_id is not None, mid
        assert articles[mid] == 1, f"{mid} is in {articles[mid]} tickets"
    assert all(r.status == "done" for r in rows)
    # Every message is new (unique subject, no threading keys): one ticket each.
    assert tickets == len(rows)
    # No pipeline worker outlived the daemon that was killed while starting it.
    assert _orphaned_workers() == []


def _orphaned_workers() -> list[int]:
    """Pipeline workers and intake processes started during this test (they inherit its
    PYTEST_CURRENT_TEST) that init adopted: their daemon was killed and they kept running."""
    me = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if ppid == 1 and b"spawn_main" in cmd and me.encode() in env:
            out.append(int(pid))
    return out


def test_worker_whose_daemon_died_before_it_started_exits() -> None:
    """The daemon names itself to the worker: a worker that finds another parent (the daemon
    was killed before the worker could ask to die with it) stops at once."""
    ctx = multiprocessing.get_context("spawn")
    gone = ctx.Process(target=os.getpid)
    gone.start()
    gone.join()
    assert gone.pid is not None
    wake, stop = Doorbell(), Flag()  # held until the child has them
    worker = ctx.Process(target=pipeline_main, args=(
        "/nonexistent/router.toml", wake, stop, 0, "warning", True, None, gone.pid))
    worker.start()
    worker.join(60)
    alive = worker.is_alive()
    if alive:
        worker.kill()
    assert not alive and worker.exitcode == 0
