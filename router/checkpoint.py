"""WAL checkpoints for the pipeline's SQLite database, off the write lock.

SQLite's default copies the write-ahead log back into the database file from inside the
commit that grew it past 1,000 pages, and then syncs the database file: with the pipeline
writing a few MB per commit (the mail moved from the spools, articles, attachments) that
was nearly every commit, all of it while the writer still held the database's one write
lock, so the other workers, the console and the outbox waited for disk I/O they did not
need. A PASSIVE checkpoint needs no write lock: it runs here, in a thread of the worker,
beside the writers, and the pipeline's own connections never checkpoint
(``wal_autocheckpoint=0``).

Every connection of the other writers (console, outbox, tools) keeps SQLite's default, so
the log is still copied back if no pipeline runs.

A PASSIVE checkpoint copies the log back but never starts it over: SQLite writes from the
start of the log again only once a checkpoint has copied all of it while no reader still
used it, and under steady load some worker is always writing or reading. The log then grew
for as long as mail kept coming: 1.7 GB for the 350 MB of the intake benchmark's 20,000
mails. So once the log passes `limit` bytes the thread asks for a TRUNCATE checkpoint. That
one takes the write lock and waits (up to `wait` seconds, then gives up until the next
round) until no reader uses the log, copies what is left, and empties the file. The
pipeline keeps its read snapshots short for it (`Pipeline._prepare_rows`), so the writers
it holds up wait for one small step of reading, not a batch.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote

from router import log

# About two seconds of the pipeline's writes at full speed: big enough that the log is
# emptied rarely, small enough that it never takes much of the disk.
LOG_LIMIT = 64 * 1024 * 1024


class Checkpointer:
    """A thread that checkpoints the database at `path` every `interval` seconds: at most
    that many syncs of the database file, however many commits there were."""

    def __init__(self, path: Path, *, interval: float = 0.5, limit: int = LOG_LIMIT,
                 wait: float = 0.25) -> None:
        self.path = path
        self.interval = interval
        self.limit = limit
        self.wait = wait
        self.checkpoints = 0
        self.truncations = 0
        self._stop = threading.Event()
        self._log = log.get("router.checkpoint")
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        failing = False
        try:
            while not self._stop.wait(self.interval):
                try:
                    if conn is None:
                        # Never creates the database: one removed under us stays removed.
                        # The timeout is how long a TRUNCATE waits: PASSIVE never does.
                        conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=rw",
                                               uri=True, timeout=self.wait,
                                               check_same_thread=False)
                    # (busy, frames in the log, frames copied back): nothing new, no sync.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                    if self._log_size() > self.limit:
                        # Busy (readers did not let go in time): again next round.
                        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                        if not busy:
                            self.truncations += 1
                    if failing:
                        failing = False
                        self._log.info("wal_checkpoint_recovered", database=str(self.path))
                except sqlite3.Error as exc:
                    # Tried again next round, logged once; the log only grows meanwhile.
                    if not failing:
                        failing = True
                        self._log.warning("wal_checkpoint_failed", database=str(self.path),
                                          error=str(exc))
                    if conn is not None:
                        conn.close()
                        conn = None
        finally:
            if conn is not None:
                conn.close()

    def _log_size(self) -> int:
        try:
            return self.path.with_name(self.path.name + "-wal").stat().st_size
        except FileNotFoundError:
            return 0
