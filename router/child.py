"""A process the daemon runs beside itself (pipeline worker, intake process): spawned with a
queue of validated configs, told to stop by a flag, started again when it dies."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from typing import Any

from router import settings as config
from router.signals import Flag


class ChildProcess:
    kind = "child"

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self.stop_event = Flag()
        self.updates: Any = self._ctx.Queue()
        self._swap = threading.Lock()  # a restart replaces `updates` while reloads put
        self.process: Any = None

    def _new_process(self) -> Any:
        """A process object for `self._ctx`, not started, reading `self.updates`."""
        raise NotImplementedError

    def _wake(self) -> None:
        """Tell the child there is news (a config, or stop), if it sleeps on a doorbell."""

    def start(self) -> None:
        self.process = self._new_process()
        self.process.start()

    def restart(self, current: Callable[[], config.Settings]) -> None:
        """The child died: start another in its place, with a new queue (the dead one may
        have held the old one's lock) and the daemon's config as it is now."""
        with self._swap:
            self.updates.cancel_join_thread()
            self.updates.close()
            self.updates = self._ctx.Queue()
            self.start()
        # Now, not before the swap: a config a reload sent meanwhile went to the old queue.
        self.update(current())

    def update(self, settings: config.Settings) -> None:
        """Hand the child a validated config; it swaps it in at its next chance."""
        with self._swap:
            self.updates.put(settings)
        self._wake()

    def stop(self, timeout: float = 30) -> int | None:
        self.stop_event.set()
        if self.process is None:
            return None  # never started
        self._wake()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.updates.cancel_join_thread()  # a dead reader must not hold up our exit
        self.updates.close()
        return int(self.process.exitcode) if self.process.exitcode is not None else None
