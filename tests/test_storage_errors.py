"""The database unable to work for a while (a full disk, a lock timeout) is not a message's
fault: the pipeline parks nothing for it, and routes everything once the database works
again. A message that raises for its own reasons is still parked."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from router.db import storage_unavailable
from tests.daemon import make_mail, open_store
from tests.test_sla import MONDAY, open_desk


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    """A file system of `size` (tmpfs) that a test can fill. Needs root, as CI has."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(1 << 16))
            f.flush()
    return filler


def _statuses(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute(
            "select status, count(*) from inbound group by status").fetchall())
    finally:
        conn.close()


def test_a_full_disk_parks_nothing(tmp_path: Path) -> None:
    with _small_disk(tmp_path / "disk", "24m") as disk:
        db = disk / "router.db"
        with open_store(tmp_path / "etc", db_url=f"sqlite:///{db}") as store:
            # Mail bigger than SQLite's page cache: routing writes to the log mid-statement.
            for i in range(4):
                store.accept(make_mail(subject=f"scan {i}", body="x" * 3_000_000,
                                       message_id=f"<scan.{i}@example.org>",
                                       frm=f"C{i} <c{i}@example.org>"))
            filler = _fill(disk)
            with pytest.raises(Exception) as err:
                store.pipeline.process_batch()
            assert storage_unavailable(err.value)
            assert "full" in str(err.value), "the disk's error, not one it caused"
            assert _statuses(db) == {"new": 4}, "parked for a full disk"
            filler.unlink()
            assert store.pipeline.drain() == 4
            assert _statuses(db) == {"done": 4}


def test_a_lock_timeout_parks_nothing_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """An admin's lock_timeout, and another transaction holding the customer's row longer:
    PostgreSQL gives up on the lock (55P03). That message and its batch wait; a message
    that raises for its own reasons in the same store is still parked."""
    url = pg_url + "?options=-c%20lock_timeout%3D200"
    with open_store(tmp_path / "etc", db_url=url) as store:
        store.accept(make_mail(subject="first", message_id="<first@example.org>"))
        assert store.pipeline.drain() == 1  # Alice is a customer now
        store.accept(make_mail(subject="second", message_id="<second@example.org>"))
        plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain) as holder:
            holder.execute("select id from customer where email = 'alice@example.org' "
                           "for update").fetchone()
            with pytest.raises(Exception) as err:
                store.pipeline.process_batch()
            assert storage_unavailable(err.value) and "lock" in str(err.value)
            holder.rollback()
        with psycopg.connect(plain) as conn:
            assert conn.execute("select status, count(*) from inbound group by status "
                                "order by 1").fetchall() == [("done", 1), ("new", 1)]
        assert store.pipeline.drain() == 1
        assert store.pipeline.parked == 0


def test_a_lock_timeout_delays_no_escalation_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The escalation scheduler's twin of the above: a ticket whose step hits a lock timeout
    is not set aside as broken (due again only RETRY_BROKEN later); the pass fails, and the
    step fires at the next one once the lock is gone. The lock: an admin's maintenance
    holding the outbox, which the step's notification is written to."""
    url = pg_url + "?options=-c%20lock_timeout%3D200"
    with open_desk(tmp_path / "etc", MONDAY, db_url=url) as desk:
        tid = desk.mail()
        due = desk.ticket(tid).next_due_at
        desk.later(minutes=15)
        scheduler = desk.scheduler()
        plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
        try:
            with psycopg.connect(plain) as holder:
                holder.execute("lock table outbox in share mode")
                with pytest.raises(Exception) as err:
                    scheduler.tick()
                assert storage_unavailable(err.value) and "lock" in str(err.value)
                assert desk.ticket(tid).next_due_at == due, "set aside as broken"
                holder.rollback()
            assert scheduler.tick() == 1
        finally:
            scheduler.close()


def test_what_counts_as_the_database_being_unavailable(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    with pytest.raises(sqlite3.Error) as missing:
        conn.execute("select * from nowhere")
    assert not storage_unavailable(missing.value)
    conn.execute("create table t (x)")
    other = sqlite3.connect(tmp_path / "a.db", timeout=0)
    conn.execute("begin immediate")
    with pytest.raises(sqlite3.Error) as locked:
        other.execute("begin immediate")
    assert storage_unavailable(locked.value)
    # Wrapped, as SQLAlchemy and our own code wrap it.
    try:
        raise RuntimeError("routing failed") from locked.value
    except RuntimeError as wrapped:
        assert storage_unavailable(wrapped)
    # A bug met while dealing with one is a bug: it must not hold the pipeline up forever.
    try:
        try:
            raise locked.value
        except sqlite3.Error:
            raise ValueError("a fallback's own mistake") from None
    except ValueError as bug:
        assert not storage_unavailable(bug)
    try:
        try:
            raise locked.value
        except sqlite3.Error:
            raise ValueError("a fallback's own mistake")  # noqa: B904
    except ValueError as bug:
        assert not storage_unavailable(bug)
    conn.rollback()
    conn.close()
    other.close()
