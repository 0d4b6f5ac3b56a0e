"""A wake-up signal for an asyncio worker that any thread may raise.

The outbox worker and the escalation scheduler sleep until their next due time; routing
(in other threads) and the web console wake them early when new work is due sooner.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable


class Wakeup:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The loop the worker runs on (None when it stops); `set` hops onto it."""
        with self._lock:
            self._loop = loop

    def set(self) -> None:
        """Callable from any thread; asyncio.Event itself is not thread-safe."""
        with self._lock:
            loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            self._event.set()
        else:
            loop.call_soon_threadsafe(self._event.set)

    def clear(self) -> None:
        self._event.clear()

    async def wait(self, stop: asyncio.Event, timeout: float | None = None,
                   sleep: Awaitable[None] | None = None) -> None:
        """Until woken, stopped, `timeout` seconds passed, or `sleep` (an injectable clock's
        sleep, for simulated time) finished."""
        waiters = [asyncio.ensure_future(self._event.wait()),
                   asyncio.ensure_future(stop.wait())]
        if sleep is not None:
            waiters.append(asyncio.ensure_future(sleep))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
