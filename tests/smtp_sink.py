"""A real SMTP server on loopback standing in for the relay: records what it receives and can
be told to tempfail, reject, go down and come back, or answer like an out-of-office robot.

Use the `smtp_sink` fixture (``from tests.smtp_sink import smtp_sink  # noqa: F401``).
"""

from __future__ import annotations

import asyncio
import email.policy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, Literal

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import free_port

Mode = Literal["accept", "tempfail", "reject"]


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage

    @property
    def message_id(self) -> str | None:
        value = self.message["Message-ID"]
        return None if value is None else str(value).strip()


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() in self.sink.refuse_rcpt:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        mode = self.sink.mode
        if mode == "tempfail":
            self.sink._count_refusal()
            return "451 4.3.0 Temporary failure, try again later"
        if mode == "reject":
            self.sink._count_refusal()
            return "550 5.7.1 Message rejected"
        raw = bytes(envelope.original_content or envelope.content)
        msg = BytesParser(policy=email.policy.default).parsebytes(raw)
        assert isinstance(msg, EmailMessage)
        self.sink._record(Received(envelope.mail_from, list(envelope.rcpt_tos), raw, msg))
        return "250 2.0.0 OK queued"


class SmtpSink:
    """Thread-safe: the server runs in aiosmtpd's own thread and event loop."""

    def __init__(self, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.mode: Mode = "accept"
        self.responder: Callable[[Received], bytes | None] | None = None
        self.refuse_rcpt: set[str] = set()     # recipients answered with 550 at RCPT
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._replies: list[bytes] = []
        self._refusals = 0
        self._controller: Controller | None = None

    # -- control ---------------------------------------------------------------------

    def start(self) -> None:
        if self._controller is not None:
            return
        # aiosmtpd closes its loop on stop, so every start needs a fresh controller.
        controller = Controller(_Handler(self), hostname=self.host, port=self.port,
                                ready_timeout=10)
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode

    # -- what arrived ------------------------------------------------------------------

    def _record(self, received: Received) -> None:
        reply = self.responder(received) if self.responder else None
        with self._lock:
            self._messages.append(received)
            if reply is not None:
                self._replies.append(reply)

    def _count_refusal(self) -> None:
        with self._lock:
            self._refusals += 1

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    @property
    def replies(self) -> list[bytes]:
        """What the responder produced, e.g. out-of-office answers to feed back in."""
        with self._lock:
            return list(self._replies)

    @property
    def refusals(self) -> int:
        with self._lock:
            return self._refusals

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._replies.clear()
            self._refusals = 0

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Wait (without blocking the event loop) until `count` messages have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.messages
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"sink got {len(got)} messages, expected {count} "
                                     f"within {timeout}s")
            await asyncio.sleep(0.01)

    async def wait_refusals(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.refusals < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"sink refused {self.refusals}, expected {count}")
            await asyncio.sleep(0.01)


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()
