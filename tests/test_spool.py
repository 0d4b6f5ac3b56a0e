"""SMTP intake spools on SQLite (router.intake.spool): intake commits into a file of its own,
the pipeline moves each spooled message into ``inbound`` exactly once, and a 250 never
waits for the pipeline's write lock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from router import db
from router import settings as config
from router.hooks import default_hooks
from router.intake import spool as spool_module
from router.intake.accept import Acceptor, Envelope, _row, accept_sync
from router.intake.spool import (
    SPOOL_COLUMNS,
    T_SPOOLED,
    Spool,
    SpoolMover,
    spool_file,
    spool_files,
    unmoved,
)
from router.models import T_SPOOL_CURSOR, InboundStatus, Ticket
from router.pipeline import Pipeline
from tests.conftest import write_config
from tests.daemon import (
    count_rows,
    inbound_rows,
    make_mail,
    send_smtp,
    start_router,
    stored_count,
    wait_for_tickets,
)


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'router.db'}"
    db.upgrade(u)
    return u


def _spool_at(url: str, index: int = 0) -> Spool:
    return Spool(url, index)


async def _accept(spool: Spool, envs: list[Envelope]) -> None:
    acceptor = Acceptor(None, spool=spool)
    await acceptor.start()
    try:
        await asyncio.gather(*(acceptor.accept(e) for e in envs))
    finally:
        await acceptor.stop()


@contextlib.contextmanager
def _mover(url: str, **kw: Any) -> Iterator[SpoolMover]:
    read, write = db.make_engine(url), db.make_engine(url, immediate=True)
    mover = SpoolMover(url, read, write, **kw)
    try:
        yield mover
    finally:
        mover.close()
        read.dispose()
        write.dispose()


def _env(i: int, rcpt: str = "support@acme.test", tag: str = "m") -> Envelope:
    return Envelope("smtp", f"c{i}@example.org", [rcpt],
                    make_mail(subject=f"{tag} {i}", message_id=f"<{tag}.{i}@example.org>"))


def _spooled_count(spool: Spool) -> int:
    with spool.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(T_SPOOLED)).scalar_one())


def test_paths_follow_the_database_file(tmp_path: Path) -> None:
    assert spool_file(f"sqlite:///{tmp_path}/data/router.db", 2, 7) == \
        tmp_path / "data" / "router.spool-2-7.db"
    assert spool_file("sqlite://", 0, 1) is None
    assert spool_file("postgresql://postgres@127.0.0.1/test", 0, 1) is None
    for name in ("router.spool-0-10.db", "router.spool-0-9.db", "router.spool-7-1.db",
                 "router.spool-0-1.db-wal",   # SQLite's own files are not spools
                 "other.spool-1-1.db"):
        (tmp_path / name).touch()
    assert [(f.index, f.number) for f in spool_files(f"sqlite:///{tmp_path}/router.db")] == [
        (0, 9), (0, 10), (7, 1)]


def test_spooled_mail_is_moved_once_with_its_envelope(url: str) -> None:
    spool = _spool_at(url)
    envs = [_env(i) for i in range(5)]
    asyncio.run(_accept(spool, envs))
    assert inbound_rows(url) == []
    assert len(unmoved(url)) == 5 and _spooled_count(spool) == 5

    with _mover(url) as mover:
        assert mover.move() == 5
        assert mover.move() == 0
    rows = inbound_rows(url)
    assert [r.raw for r in rows] == [e.raw for e in envs]
    assert [r.mail_from for r in rows] == [e.mail_from for e in envs]
    assert all(r.rcpt_to == ["support@acme.test"] and r.status == InboundStatus.NEW
               and r.channel == "smtp" and r.deliveries == 1 for r in rows)
    assert rows[0].message_id == "<m.0@example.org>"
    assert unmoved(url) == []
    spool.close()


def test_a_mail_spooled_twice_is_one_inbound_row(url: str) -> None:
    """Dedupe happens when moving: the same mail in two spools (two intake processes) and
    twice in one is stored once, counting every delivery."""
    a, b = _spool_at(url, 0), _spool_at(url, 1)
    same = _env(1)
    asyncio.run(_accept(a, [same]))
    asyncio.run(_accept(a, [same]))
    asyncio.run(_accept(b, [same, _env(2)]))
    with _mover(url) as mover:
        mover.move()
    rows = inbound_rows(url)
    assert [(r.message_id, r.deliveries) for r in rows] == [
        ("<m.1@example.org>", 3), ("<m.2@example.org>", 1)]
    a.close()
    b.close()


def test_two_movers_at_once_move_each_message_once(url: str) -> None:
    """Every pipeline worker moves: the cursor, read again under the write lock, keeps two
    of them from inserting the same rows (which would count them as two deliveries)."""
    spool = _spool_at(url)
    asyncio.run(_accept(spool, [_env(i) for i in range(300)]))
    moved = [0, 0]

    def run(k: int) -> None:
        with _mover(url, max_rows=16) as mover:
            while True:
                n = mover.move()
                moved[k] += n
                if not n and not unmoved(url):
                    return

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    rows = inbound_rows(url)
    assert sum(moved) == 300 and len(rows) == 300
    assert {r.deliveries for r in rows} == {1}
    spool.close()


def test_full_files_are_removed_once_moved(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is deleted row by row: intake starts a new file when one is full, and a
    full file goes once every row of it was moved (never the one intake writes to)."""
    monkeypatch.setattr(spool_module, "ROTATE_ROWS", 10)
    spool = _spool_at(url)
    for k in range(5):  # five commits of five: files 1, 2 and 3, and 4 made ahead
        asyncio.run(_accept(spool, [_env(5 * k + i) for i in range(5)]))
    spool.settle()
    assert [f.number for f in spool_files(url)] == [1, 2, 3, 4]
    with _mover(url, max_rows=7) as mover:
        assert mover.move() == 7   # at most max_rows in all, from one file or several
        assert [f.number for f in spool_files(url)] == [1, 2, 3, 4]
        assert len(unmoved(url)) == 18
        moved = 7
        while n := mover.move():
            moved += n
        assert moved == 25
        assert [f.number for f in spool_files(url)] == [3, 4]
        assert not list(Path(url.removeprefix("sqlite:///")).parent.glob("*spool-0-1*"))
        # A new intake process carries on in the newest file (the one made ahead) and
        # seals the one before, which then goes too.
        spool.close()
        spool = _spool_at(url)
        assert spool.number == 4
        asyncio.run(_accept(spool, [_env(100)]))
        assert mover.move() == 1
        spool.settle()
        assert [f.number for f in spool_files(url)] == [4, 5]
    assert len(inbound_rows(url)) == 26
    assert {r.deliveries for r in inbound_rows(url)} == {1}
    spool.close()


def test_spools_are_moved_in_order_of_arrival(url: str) -> None:
    """Two intake processes' spools, each with a backlog: a fetch takes an equal share of
    each, and only what arrived before either share ran out, so mail reaches `inbound` in
    the order it arrived and replies seldom have to wait for their originals."""
    start = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    spools = [_spool_at(url, 0), _spool_at(url, 1)]
    for k, spool in enumerate(spools):
        envs = [_env(10 * k + i) for i in range(5)]
        for i, env in enumerate(envs):  # process 0 at :00, :02, :04 ... process 1 at :01 ...
            env.received_at = start + timedelta(seconds=2 * i + k)
        asyncio.run(_accept(spool, envs))
    with _mover(url, max_rows=4) as mover:
        # Two read from each: 0:00 and 0:02 of process 0, 0:01 and 0:03 of process 1, of
        # which 0:03 arrived after process 0's share ended.
        assert mover.move() == 3
        assert [r.message_id for r in inbound_rows(url)] == [
            "<m.0@example.org>", "<m.1@example.org>", "<m.10@example.org>"]
        while mover.move():
            pass
    assert sorted(r.message_id for r in inbound_rows(url)) == sorted(
        f"<m.{n}@example.org>" for n in (*range(5), *range(10, 15)))
    for spool in spools:
        spool.close()


def test_moves_are_not_synced_but_the_log_is_before_a_spool_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving spooled mail commits without a sync of its own, as routing does (a power cut
    could undo it, and the mail is still in its spool). The database's log is synced before
    a moved spool file is removed, so no power cut can undo a move whose file is gone."""
    monkeypatch.setattr(spool_module, "ROTATE_ROWS", 2)
    cfg = write_config(tmp_path / "etc", db_url=f"sqlite:///{tmp_path / 'router.db'}")
    settings = config.load(cfg)
    url = settings.database_url
    db.upgrade(url)
    levels: list[int] = []
    done: list[str] = []  # fsyncs and removals, in order

    def record_level(conn: Any, handled: Any) -> None:
        levels.append(conn.exec_driver_sql("PRAGMA synchronous").scalar())

    real_fsync, real_unlink = os.fsync, Path.unlink

    def fsync(fd: int) -> None:
        done.append("fsync " + Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        done.append("unlink " + self.name)
        real_unlink(self, missing_ok=missing_ok)

    spool = _spool_at(url)
    pipeline = Pipeline(url, lambda: settings, hooks=[record_level])
    try:
        for i in range(3):   # file 1 holds two and is sealed; file 2 the third
            asyncio.run(_accept(spool, [_env(i)]))
        spool.settle()
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(Path, "unlink", unlink)
        pipeline.drain()
        pipeline.process_batch()   # the next fetch finds file 1 moved to its end
    finally:
        pipeline.close()
        spool.close()
    assert levels == [1, 1, 1]  # NORMAL: the transactions that moved the mail included
    gone = [e for e in done if e.startswith("unlink router.spool-0-1")]
    assert gone, done
    first = done.index(gone[0])
    assert {"fsync router.db-wal", "fsync router.db"} <= set(done[:first]), done
    assert len(inbound_rows(url)) == 3


def test_only_the_first_worker_moves_and_the_others_see_the_spools(tmp_path: Path) -> None:
    """Worker 1 of 2 moves nothing (worker 0 does), yet its reply to an original still
    spooled waits for it, and threads once worker 0 has moved and routed it."""
    cfg = write_config(tmp_path / "etc", db_url=f"sqlite:///{tmp_path / 'router.db'}")
    settings = config.load(cfg)
    url = settings.database_url
    db.upgrade(url)
    spool = _spool_at(url)
    asyncio.run(_accept(spool, [Envelope("smtp", "alice@example.org", ["support@acme.test"],
                                         make_mail(subject="Printer on fire",
                                                   message_id="<orig@example.org>"))]))
    engine = db.make_engine(url)
    accept_sync(engine, Envelope("smtp", "alice@example.org", ["support@acme.test"],
                                 make_mail(subject="Re: Printer on fire",
                                           in_reply_to="<orig@example.org>")))
    engine.dispose()
    [reply] = inbound_rows(url)
    assert reply.id % 2 == 1  # worker 1's share
    first = Pipeline(url, lambda: settings, hooks=default_hooks(), part=(0, 2))
    second = Pipeline(url, lambda: settings, hooks=default_hooks(), part=(1, 2))
    try:
        assert second.process_batch() == 0
        assert second.deferred == 1 and len(unmoved(url)) == 1
        first.drain()
        assert len(unmoved(url)) == 0
        assert second.drain() == 1
    finally:
        first.close()
        second.close()
        spool.close()
    by_mid = {r.message_id: r for r in inbound_rows(url)}
    assert by_mid["<orig@example.org>"].ticket_id == \
        next(r for r in inbound_rows(url) if r.id == reply.id).ticket_id
    assert count_rows(url, Ticket) == 1


def test_a_spool_made_again_is_not_taken_as_moved(url: str) -> None:
    """The cursor belongs to the spool's own id: a spool file deleted and created again
    (ids from 1 again) must not have its mail skipped as "already moved"."""
    spool = _spool_at(url)
    asyncio.run(_accept(spool, [_env(i) for i in range(3)]))
    with _mover(url) as mover:
        assert mover.move() == 3
        spool.close()
        path = spool.path
        for p in path.parent.glob("*.spool-0-*"):  # the file, and the next one made ahead
            p.unlink()
        spool = _spool_at(url)
        assert spool.path == path
        asyncio.run(_accept(spool, [_env(10, tag="again")]))
        assert mover.move() == 1
    assert [r.message_id for r in inbound_rows(url)][-1] == "<again.10@example.org>"
    engine = db.make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(T_SPOOL_CURSOR)).scalar() == 2
    engine.dispose()
    spool.close()


def test_the_daemon_answers_250_while_the_database_is_locked(tmp_path: Path) -> None:
    """The point of the spools: a writer holding the database's lock (a pipeline worker in
    a long batch, an admin's sqlite3 shell) does not hold up a single 250. The mail is
    routed once the lock is free; a spool left by a former intake process is drained too."""
    url = f"sqlite:///{tmp_path / 'router.db'}"
    cfg = write_config(tmp_path / "etc", db_url=url, smtp_processes=2)
    db.upgrade(url)
    # A spool left by a daemon that ran with more intake processes, one message in it.
    leftover = _spool_at(url, 5)
    asyncio.run(_accept(leftover, [_env(0, rcpt="oops@acme.test", tag="leftover")]))
    leftover.close()
    proc = start_router(cfg)
    lock = sqlite3.connect(tmp_path / "router.db", isolation_level=None, timeout=30)
    try:
        wait_for_tickets(url, 1)
        lock.execute("BEGIN IMMEDIATE")  # the write lock, held by "somebody else"
        # Before spools, each send waited out the lock (10 s) and then failed with a 451.
        for i in range(6):
            send_smtp(proc.port, make_mail(subject=f"locked {i}", to="billing@acme.test"),
                      ["billing@acme.test"])
        assert len(unmoved(url)) == 6
        lock.execute("ROLLBACK")
        found = wait_for_tickets(url, 7)
        proc.stop()
    finally:
        lock.close()
        proc.kill()
    assert sorted(t.subject for t in found) == [
        "leftover 0", *(f"locked {i}" for i in range(6))]
    assert stored_count(url) == 7
    assert {f.index for f in spool_files(url)} == {0, 1, 5}


def test_a_damaged_spool_does_not_stop_the_others(url: str, tmp_path: Path) -> None:
    (tmp_path / "router.spool-3-1.db").write_bytes(b"not a database" * 100)
    spool = _spool_at(url, 0)
    asyncio.run(_accept(spool, [_env(1)]))
    with _mover(url) as mover:
        assert mover.move() == 1
    assert [r.message_id for r in inbound_rows(url)] == ["<m.1@example.org>"]
    spool.close()


def test_a_failed_rotation_loses_nothing(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are committed before the next file is started: if starting it fails (disk
    full, say), those senders still get their 250 and the full file takes more mail."""
    monkeypatch.setattr(spool_module, "ROTATE_ROWS", 2)
    real = spool_module._create
    failed: list[Path] = []
    full = True

    def flaky(path: Path) -> str:
        if full and path.name.endswith("-2.db"):
            failed.append(path)
            raise OSError("No space left on device")
        return real(path)

    monkeypatch.setattr(spool_module, "_create", flaky)
    spool = _spool_at(url)
    asyncio.run(_accept(spool, [_env(0), _env(1)]))
    # Making file 2 ahead failed, and so did making it at the rotation.
    assert len(failed) == 2 and spool.number == 1
    full = False
    asyncio.run(_accept(spool, [_env(2)]))
    assert spool.number == 2
    with _mover(url) as mover:
        assert mover.move() == 3
    spool.close()


def test_a_reply_moved_before_its_original_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spools are moved in order of arrival, but a spool that cannot be read a moment (a
    long transaction of its intake process) is moved later: a reply in another one can
    reach `inbound` before its original. It must wait and thread, not open a ticket."""
    cfg = write_config(tmp_path / "etc", db_url=f"sqlite:///{tmp_path / 'router.db'}")
    settings = config.load(cfg)
    url = settings.database_url
    db.upgrade(url)
    first, second = _spool_at(url, 0), _spool_at(url, 1)
    original = make_mail(subject="Printer on fire", message_id="<orig@example.org>")
    reply = make_mail(subject="Re: Printer on fire", message_id="<re@example.org>",
                      in_reply_to="<orig@example.org>", references="<orig@example.org>")
    asyncio.run(_accept(first, [_env(0, tag="other")]))
    asyncio.run(_accept(first, [Envelope("smtp", "alice@example.org", ["support@acme.test"],
                                         original)]))
    asyncio.run(_accept(second, [Envelope("smtp", "alice@example.org", ["support@acme.test"],
                                          reply)]))
    pipeline = Pipeline(url, lambda: settings, hooks=default_hooks())
    assert pipeline.mover is not None
    read = SpoolMover._read
    locked = {first.path}

    def read_unless_locked(self: SpoolMover, src: Any, *args: Any) -> Any:
        if any(self._sources.get(p) is src for p in locked):
            locked.clear()  # once
            raise sqlite3.OperationalError("database is locked")
        return read(self, src, *args)

    monkeypatch.setattr(SpoolMover, "_read", read_unless_locked)
    try:
        pipeline.process_batch()  # moves the reply, not the original
        assert pipeline.deferred == 1
        pipeline.drain()
    finally:
        pipeline.close()
    by_mid = {r.message_id: r for r in inbound_rows(url)}
    assert by_mid["<re@example.org>"].ticket_id == by_mid["<orig@example.org>"].ticket_id
    assert count_rows(url, Ticket) == 2
    first.close()
    second.close()


def test_only_sealed_files_are_removed(url: str) -> None:
    """A file is removed only after its intake process sealed it: a successor alone (the
    empty file a failed rotation leaves) does not mean intake stopped writing to it."""
    spool = _spool_at(url)
    asyncio.run(_accept(spool, [_env(0)]))
    stray = spool_file(url, 0, 2)
    assert stray is not None
    stray.touch()
    with _mover(url) as mover:
        assert mover.move() == 1
        mover.move()
        assert spool.path.exists()
        asyncio.run(_accept(spool, [_env(1)]))
        assert mover.move() == 1
        spool.close()
        spool = _spool_at(url)  # a restart carries on in file 2 and seals file 1
        assert spool.number == 2
        mover.move()
        first = spool_file(url, 0, 1)
        assert first is not None and not first.exists()
    assert len(inbound_rows(url)) == 2
    spool.close()


def test_the_next_file_is_made_ahead_and_the_full_one_closed_aside(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Making a spool file takes three commits, sealing one a fourth and closing it a
    checkpoint of its whole log: done on intake's writer thread at a rotation, or beside it
    with the checkpoint's writes, they held every sender waiting on that process."""
    monkeypatch.setattr(spool_module, "ROTATE_ROWS", 2)
    real_create, real_write = spool_module._create, spool_module.write_rows
    made: list[str] = []
    sealed: list[str] = []

    def create(path: Path) -> str:
        made.append(threading.current_thread().name)
        return real_create(path)

    def write(engine: Any, stmt: Any, rows: Any) -> None:
        if stmt is spool_module._SEAL:
            sealed.append(threading.current_thread().name)
        real_write(engine, stmt, rows)

    monkeypatch.setattr(spool_module, "_create", create)
    monkeypatch.setattr(spool_module, "write_rows", write)
    spool = _spool_at(url)
    spool.settle()
    assert made == ["MainThread", "spool-spare"]  # file 1 to start with, file 2 ahead
    asyncio.run(_accept(spool, [_env(0), _env(1)]))
    spool.settle()
    assert spool.number == 2
    assert made[2:] == ["spool-spare"] and sealed == ["spool-close"]
    assert [f.number for f in spool_files(url)] == [1, 2, 3]
    # Closed without a checkpoint: its log was not copied into it, only to be removed.
    first = spool_file(url, 0, 1)
    assert first is not None
    wal = first.with_name(first.name + "-wal")
    assert b"<m.0@example.org>" in wal.read_bytes()
    assert b"<m.0@example.org>" not in first.read_bytes()
    with _mover(url) as mover:
        assert mover.move() == 2
        mover.move()
    assert [f.number for f in spool_files(url)] == [2, 3]  # 1 was sealed, so it could go
    spool.close()


def test_a_commit_into_a_spool_is_one_statement(url: str) -> None:
    """Intake's writer thread takes the GIL back from the event loop after every call into
    SQLite, and on a busy machine each time costs a wait that every sender of the batch
    waits too: a batch is one INSERT, which SQLite commits by itself (no BEGIN, no COMMIT).
    A batch larger than one statement takes is still one transaction. What is stored reads
    back as written."""
    spool = _spool_at(url)
    statements: list[str] = []
    with spool.engine.connect() as conn:  # the pool's one connection, which intake uses
        conn.connection.driver_connection.set_trace_callback(statements.append)
    envs = [_env(i) for i in range(5)]
    asyncio.run(_accept(spool, envs))
    assert len(statements) == 1 and statements[0].startswith("INSERT INTO spooled")

    statements.clear()
    at = datetime(2026, 11, 23, 8, 30, 15, 123456, tzinfo=UTC)
    rows = [_row(_env(i, tag="big"), at) for i in range(150)]
    spool.write(rows)
    assert [s.split(" (")[0] for s in statements] == [
        "BEGIN", "INSERT INTO spooled", "INSERT INTO spooled", "INSERT INTO spooled", "COMMIT"]
    with spool.engine.connect() as conn:
        stored = conn.execute(select(T_SPOOLED).order_by(T_SPOOLED.c.id)).all()
    assert len(stored) == 155
    assert [{k: getattr(r, k) for k in SPOOL_COLUMNS} for r in stored[5:]] == [
        {k: r[k] for k in SPOOL_COLUMNS} for r in rows]
    assert [r.raw for r in stored[:5]] == [e.raw for e in envs]
    spool.close()
