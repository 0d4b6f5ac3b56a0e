"""The pipeline's commits never copy the WAL back into the database (that would happen under
the write lock); its checkpoint thread does, beside the writers."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import text

from router.checkpoint import Checkpointer
from tests.daemon import make_mail, open_store


def test_pipeline_commits_leave_the_wal_to_the_checkpointer(tmp_path: Path) -> None:
    with open_store(tmp_path / "etc") as store:
        pipeline = store.pipeline
        assert pipeline.checkpointer is not None
        with pipeline.write_engine.connect() as conn:
            assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 0
        body = "x" * 200_000
        for i in range(20):  # about 4 MB: past SQLite's own 1,000-page threshold
            store.accept(make_mail(subject=f"big {i}", body=body,
                                   message_id=f"<big.{i}@example.org>"))
        db = Path(store.url.removeprefix("sqlite:///"))
        # Only a checkpoint makes the database file itself grow: what routing writes (the
        # articles, 4 MB) is in the log until then.
        store.engine.dispose()
        before = db.stat().st_size
        assert pipeline.drain() == 20
        deadline = time.monotonic() + 10
        # The file grows while the checkpoint copies, before the thread counts it.
        while time.monotonic() < deadline and (db.stat().st_size < before + 3_000_000
                                               or not pipeline.checkpointer.checkpoints):
            time.sleep(0.1)
        assert db.stat().st_size >= before + 3_000_000, "the log was not copied back"
        assert pipeline.checkpointer.checkpoints > 0


def test_checkpointer_survives_a_missing_database(tmp_path: Path) -> None:
    """A database removed under it (a test's temporary directory, an admin's mistake) is
    logged and tried again, not a crashed thread."""
    gone = tmp_path / "router.db"
    cp = Checkpointer(gone, interval=0.05)
    time.sleep(0.3)
    cp.close()
    assert cp.checkpoints == 0
    assert not gone.exists(), "a checkpoint must never create the database"



def _wal_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # as the pipeline's connections
    conn.execute("CREATE TABLE IF NOT EXISTS t (x BLOB)")
    return conn


def _wal_size(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_a_log_past_its_limit_is_emptied_once_no_reader_uses_it(tmp_path: Path) -> None:
    """PASSIVE checkpoints alone never start the log over while someone reads: under steady
    load it grew without end. Past `limit` it is emptied, as soon as readers let go."""
    db = tmp_path / "router.db"
    writer = _wal_db(db)
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (0,)  # an old snapshot
    for _ in range(40):
        writer.execute("INSERT INTO t VALUES (?)", (b"x" * 50_000,))
    assert _wal_size(db) > 1_000_000
    cp = Checkpointer(db, interval=0.05, limit=500_000, wait=0.05)
    try:
        time.sleep(0.6)
        # The reader still uses the log: nothing emptied, its snapshot intact.
        assert cp.checkpoints > 0 and cp.truncations == 0
        assert _wal_size(db) > 1_000_000
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (0,)
        reader.execute("ROLLBACK")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _wal_size(db) > 0:
            time.sleep(0.05)
        assert _wal_size(db) == 0, "the log was not emptied"
        assert cp.truncations > 0
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (40,)
        # Writing goes on in the emptied log.
        writer.execute("INSERT INTO t VALUES (?)", (b"y",))
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (41,)
    finally:
        cp.close()
        reader.close()
        writer.close()


def test_a_log_under_its_limit_is_left_to_passive_checkpoints(tmp_path: Path) -> None:
    db = tmp_path / "router.db"
    writer = _wal_db(db)
    for _ in range(10):
        writer.execute("INSERT INTO t VALUES (?)", (b"x" * 50_000,))
    cp = Checkpointer(db, interval=0.05, limit=50_000_000)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and cp.checkpoints < 3:
            time.sleep(0.05)
        assert cp.checkpoints >= 3 and cp.truncations == 0
        assert _wal_size(db) > 400_000  # copied back, but the file is kept for reuse
    finally:
        cp.close()
        writer.close()


def test_the_pipeline_keeps_its_log_bounded(tmp_path: Path) -> None:
    """A reader (the other worker, the console) holds the log while the pipeline writes
    4 MB: once it lets go, the pipeline's checkpointer empties the log."""
    with open_store(tmp_path / "etc") as store:
        pipeline = store.pipeline
        assert pipeline.checkpointer is not None
        pipeline.checkpointer.limit = 1_000_000
        pipeline.checkpointer.interval = 0.05
        body = "x" * 200_000
        for i in range(20):
            store.accept(make_mail(subject=f"big {i}", body=body,
                                   message_id=f"<big.{i}@example.org>"))
        db = Path(store.url.removeprefix("sqlite:///"))
        reader = sqlite3.connect(db, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM ticket").fetchone()
            # The checkpointer may have emptied the log of the accepted mail already.
            before = pipeline.checkpointer.truncations
            assert pipeline.drain() == 20
            assert _wal_size(db) > 3_000_000
            assert pipeline.checkpointer.truncations == before
            reader.execute("ROLLBACK")
            deadline = time.monotonic() + 10
            while (time.monotonic() < deadline
                   and pipeline.checkpointer.truncations == before):
                time.sleep(0.05)
            assert pipeline.checkpointer.truncations > before
            assert _wal_size(db) == 0
            assert reader.execute("SELECT count(*) FROM ticket").fetchone() == (20,)
        finally:
            reader.close()


def test_preparing_a_batch_lets_go_of_its_read_snapshot_every_few_mails(tmp_path: Path) -> None:
    """A snapshot held through a whole batch would hold up emptying the log that long."""
    from router.pipeline import PREPARE_STEP

    with open_store(tmp_path / "etc") as store:
        pipeline = store.pipeline
        for i in range(3 * PREPARE_STEP + 1):
            store.accept(make_mail(subject=f"m {i}", message_id=f"<m.{i}@example.org>"))
        prepare = pipeline._prepare
        in_snapshot: list[bool] = []

        def watching(conn, inbound, settings):  # type: ignore[no-untyped-def]
            in_snapshot.append(conn.in_transaction())
            return prepare(conn, inbound, settings)

        pipeline._prepare = watching  # type: ignore[method-assign]
        assert pipeline.drain() == 3 * PREPARE_STEP + 1
        # The batch's read began a snapshot; after every PREPARE_STEP mails it is let go.
        assert len(in_snapshot) == 3 * PREPARE_STEP + 1
        assert [i for i, held in enumerate(in_snapshot) if not held] == [
            PREPARE_STEP, 2 * PREPARE_STEP, 3 * PREPARE_STEP]
