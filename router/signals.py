"""Signals between the daemon and its child processes that survive a SIGKILL on either side.

`multiprocessing.Event` keeps a lock in shared memory: a process killed while it holds that
lock (inside `wait()` or `is_set()`, several times a second) leaves it held for good, and
the next `set()` hangs the daemon's event loop. These hold no lock: a `Doorbell` is a pipe
(a byte written, the reader drained), a `Flag` one shared byte.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os


class Doorbell:
    """"Something to do": rung by any process, waited on by one. Create it before the
    processes that use it are spawned (it travels with them as they start)."""

    def __init__(self) -> None:
        self._read, self._write = multiprocessing.get_context("spawn").Pipe(duplex=False)
        # A reader that is busy or gone must not block a ringer: a full pipe already rings.
        os.set_blocking(self._write.fileno(), False)

    def ring(self) -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._write.fileno(), b"\x01")

    def wait(self, timeout: float) -> bool:
        """True if rung since the last wait (the rings are consumed), else after `timeout`."""
        if not self._read.poll(timeout):
            return False
        os.set_blocking(self._read.fileno(), False)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read.fileno(), 4096):
                pass
        return True


class Flag:
    """A one-way switch, such as "stop", set by one process and read by others."""

    def __init__(self) -> None:
        self._value = multiprocessing.get_context("spawn").RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)
