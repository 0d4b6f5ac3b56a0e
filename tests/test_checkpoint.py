"""The pipeline's commits never copy the WAL back into the database (that would happen under
the write lock); its checkpoint thread does, beside the writers."""

from __future__ import annotations

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

