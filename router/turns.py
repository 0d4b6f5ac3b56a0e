"""Pipeline workers take turns at SQLite's write lock through a lock file of their own.

SQLite's busy handler waits for a held write lock by sleeping, in steps that grow to 25, 50
and 100 ms. Two workers whose write transactions last up to a slice of 50 ms each then
spend a quarter of their time asleep after the lock was free already (measured with
``bench/pipeline.py --workers 2``). A worker blocked in ``flock`` on ``<database>-turns``
instead is woken by the kernel the moment the other lets go, and only then asks SQLite for
the write lock. Other writers (intake's group commit, the console, the outbox, `router
ingest`) do not take turns: for them the workers' transactions are SQLite's lock as before.

The kernel lets go of a dead process's ``flock``, so a worker killed while writing holds no
one up. Where there is no lock file to be had (a read-only directory), workers fall back to
SQLite's own waiting, which is correct, only slower.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from router import log

# A turn longer than this is worth a line in the log: a worker's slice is 50 ms.
SLOW_WAIT = 10.0


def turns_file(database: Path) -> Path:
    return database.with_name(database.name + "-turns")


class Turns:
    """One worker's handle on the turns of the database at `database`."""

    def __init__(self, database: Path) -> None:
        self.path = turns_file(database)
        self._log = log.get("router.turns")
        self._fd: int | None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._fd = None
            self._log.warning("write_turns_unavailable", path=str(self.path), error=str(exc))

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the turn: every other worker's `turn` waits until this one ends."""
        fd = self._fd
        if fd is None:
            yield
            return
        if not _try_lock(fd):
            started = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = time.monotonic() - started
            if waited > SLOW_WAIT:
                self._log.warning("write_turn_slow", waited_s=round(waited, 1),
                                  path=str(self.path))
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def busy(self) -> bool:
        """Whether another worker has its turn now (a hint: it may end a moment later)."""
        fd = self._fd
        if fd is None:
            return False
        if not _try_lock(fd):
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _try_lock(fd: int) -> bool:
    """Take the turn if nobody has it; whether we got it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
