"""`[smtp] processes = 2`: two processes accept on one port (SO_REUSEPORT), each answering
250 only after its own commit; both follow config reloads and wake the pipeline."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from router import db
from router import settings as config
from tests.conftest import write_config
from tests.daemon import RouterProcess, make_mail, start_router, wait_until


def _send_many(port: int, rcpt: str, tag: str, n: int, threads: int = 6) -> list[str]:
    """`n` messages over as many new connections, from `threads` senders at once; returns
    the Message-IDs that got a 250 (an SMTP error fails the test)."""
    acked: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        for i in range(k, n, threads):
            mid = f"<{tag}.{i}@example.org>"
            raw = make_mail(subject=f"{tag} {i}", to=rcpt, message_id=mid,
                            frm=f"Customer {i} <c{i}@example.org>")
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.sendmail(f"c{i}@example.org", [rcpt], raw)
            except (OSError, smtplib.SMTPException) as exc:
                with lock:
                    errors.append(exc)
                continue
            with lock:
                acked.append(mid)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not errors, errors[:3]
    return acked


def _events(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def _accepted_per_process(log: str) -> list[int]:
    events = _events(log)
    child = [e["accepted"] for e in events if e.get("event") == "intake_process_stopped"]
    main = [e["accepted"] for e in events if e.get("event") == "router_stopped"]
    return main + child


@pytest.mark.slow
def test_two_intake_processes_share_the_port_and_follow_reloads(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    cfg = write_config(tmp_path / "etc", db_url=url, smtp_processes=2)
    proc = start_router(cfg)
    try:
        wait_until(lambda: '"intake_process_started"' in proc.log, 30,
                   what="the second intake process")
        first = _send_many(proc.port, "support@acme.test", "before", 60)

        # A new role address: every process must know it (each decides RCPT by itself).
        body = cfg.read_text(encoding="utf-8")
        cfg.write_text(body.replace('addresses = ["support@acme.test", "sales@acme.test"]',
                                    'addresses = ["support@acme.test", "sales@acme.test", '
                                    '"help@acme.test"]'), encoding="utf-8")
        version = config.load(cfg).digest[:16]
        wait_until(lambda: any(e.get("event") == "intake_config_applied"
                               and e.get("version") == version for e in _events(proc.log)),
                   30, what="the child's config reload")
        second = _send_many(proc.port, "help@acme.test", "after", 40)

        _wait_routed(url, 100, 60)
        log = proc.stop()
    finally:
        proc.kill()

    engine = db.make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("select message_id, ticket_id from inbound")).all()
        teams = Counter(r[0] for r in conn.execute(text("select team from ticket")))
    engine.dispose()
    stored = Counter(r.message_id for r in rows)
    assert set(stored) == set(first) | set(second) and all(n == 1 for n in stored.values())
    assert all(r.ticket_id is not None for r in rows)
    assert teams == {"support": 100}
    # Both processes took connections: the kernel spread 100 of them over the two.
    accepted = _accepted_per_process(log)
    assert len(accepted) == 2 and sum(accepted) == 100 and min(accepted) > 0, accepted


def _pids(log: str, event: str) -> list[int]:
    return [int(e["pid"]) for e in _events(log) if e.get("event") == event]


def _children(proc: RouterProcess) -> tuple[int, int]:
    """(intake process, pipeline worker) of a daemon with one of each, once both started."""
    wait_until(lambda: _pids(proc.log, "intake_process_started")
               and _pids(proc.log, "pipeline_worker_started"), 30,
               what="the children's start")
    [intake] = _pids(proc.log, "intake_process_started")
    [worker] = _pids(proc.log, "pipeline_worker_started")
    return intake, worker


def _wait_routed(url: str, n: int, timeout: float) -> None:
    engine = db.make_engine(url)

    def routed() -> bool:
        with engine.connect() as conn:
            return conn.execute(text(
                "select count(*) from inbound where status = 'done'")).scalar_one() == n
    try:
        wait_until(routed, timeout, what=f"all {n} messages routed")
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_dead_worker_or_intake_process_is_started_again(tmp_path: Path) -> None:
    """SIGKILL to a pipeline worker and to the second intake process (as the OOM killer
    would): the daemon starts both again, and mail keeps being accepted and routed."""
    url = f"sqlite:///{tmp_path / 'router.db'}"
    # Full CPU priority for the worker: this is about restarts, and a busy CI machine would
    # otherwise leave a nice-19 worker to route the mail at a crawl.
    cfg = write_config(tmp_path / "etc", db_url=url, smtp_processes=2,
                       extra="[pipeline]\nnice = 0\n")
    proc = start_router(cfg)
    try:
        intake, worker = _children(proc)
        os.kill(intake, signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: len(_pids(proc.log, "intake_process_started")) == 2
                   and len(_pids(proc.log, "pipeline_worker_started")) == 2, 30,
                   what="both children started again")
        died = {(e["kind"], e["pid"]) for e in _events(proc.log)
                if e.get("event") == "child_died"}
        assert died == {("intake", intake), ("pipeline", worker)}
        acked = _send_many(proc.port, "billing@acme.test", "again", 30)

        _wait_routed(url, 30, 90)
        log = proc.stop()
    finally:
        proc.kill()
    assert len(acked) == 30
    # The new intake process took its share of the connections.
    assert min(_accepted_per_process(log)) > 0


@pytest.mark.slow
def test_children_wait_for_the_daemon_to_stop_them(tmp_path: Path) -> None:
    """systemd stops a unit by sending SIGTERM to all its processes at once: the children
    ignore it, and the daemon stops them in order (each exits 0)."""
    cfg = write_config(tmp_path / "etc", smtp_processes=2)
    proc = start_router(cfg)
    try:
        children = _children(proc)
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        _send_many(proc.port, "oops@acme.test", "term", 10)
        time.sleep(1.5)  # longer than the supervisor's look: a dead child would be noticed
        assert '"child_died"' not in proc.log
        for pid in children:
            os.kill(pid, 0)  # still running (raises ProcessLookupError if not)
        log = proc.stop()
    finally:
        proc.kill()
    [stopped] = [e for e in _events(log) if e.get("event") == "router_stopped"]
    assert stopped["intake_exit"] == [0] and stopped["pipeline_exit"] == [0]
