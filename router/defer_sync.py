"""When the pipeline holds back its syncs of the disk: while SMTP intake is busy.

On SQLite every `250` waits for a synced commit into a spool file (router.intake.spool). The
pipeline's own commits are not synced (synchronous=NORMAL), but two of its jobs are: the WAL
checkpoints (router.checkpoint) copy the log into the database file and sync that, and the
removal of a spool file moved to its end syncs the log first. Each pushes tens of MB to the
disk at once, and an intake commit synced meanwhile waits behind them: in bench/intake.py,
blocks of 50 messages (every connection at once) waited 200 ms and more for their `250`.

Neither has to happen at that moment. Routing's writes are safe in the log (a power cut
undoes some routing, which is done again from the stored mail), and a spool file moved to its
end only takes disk space. So while intake has committed within the last `quiet` second, both
wait, within a budget of disk: the log and the spool files together stay under `[database]
busy_log_limit` and under half of what the disk has left. Past the budget, or after a second
without intake commits, they run as before; the kernel writes the log out meanwhile at its
own pace, without making anybody wait for it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from router.db import sqlite_file
from router.intake.spool import spool_files

QUIET = 1.0  # seconds without an intake commit before the pipeline syncs what it held


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


class SyncDeferral:
    """`holding()`: whether the pipeline should put off its syncs now. Asked by the WAL
    checkpointer twice a second and by the spool mover when a file is ready to go."""

    def __init__(self, url: str, limit: int, *, quiet: float = QUIET,
                 now: Callable[[], float] = time.time) -> None:
        self.url = url
        self.database = sqlite_file(url)
        self.limit = limit  # bytes; set again from each batch's config by the pipeline
        self.quiet = quiet
        self._now = now  # the files' clock: modification times are wall-clock time

    def holding(self) -> bool:
        if self.limit <= 0 or self.database is None:
            return False
        try:
            held = _size(_wal(self.database))
            newest = 0.0
            for f in spool_files(self.url):
                held += _size(f.path)
                try:
                    st = os.stat(_wal(f.path))
                except FileNotFoundError:
                    continue
                held += st.st_size
                newest = max(newest, st.st_mtime)  # intake writes a spool's log per commit
            if self._now() - newest > self.quiet:
                return False
            free = shutil.disk_usage(self.database.parent).free
        except OSError:
            return False  # cannot tell: sync as before
        return held < min(self.limit, (held + free) // 2)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
