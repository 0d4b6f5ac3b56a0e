"""SMTP and LMTP intake on aiosmtpd: refuse what no team owns, accept only what is committed.

Replies:
- RCPT for an address no team owns: ``550 5.1.1``; plus-addresses resolve to their base.
- DATA over the size limit: ``552`` (aiosmtpd enforces ``data_size_limit``).
- the database cannot commit: ``451 4.3.0``, so the sending MTA keeps the mail and retries.
- committed: ``250 2.0.0`` (LMTP: one reply per accepted recipient, as RFC 2033 wants).

Two per-connection costs of aiosmtpd 1.4.6 are avoided (PERF-NOTES): `SMTP.__init__` calls
`inspect.getmembers()` on itself and the handler only to find ``auth_*`` methods, and
`_getaddr` defines a `typing.Protocol` class on every MAIL/RCPT.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from functools import cache
from typing import Any

import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session as SmtpSession

from router import log
from router.intake.accept import Acceptor, Envelope, StorageUnavailable

# aiosmtpd logs every connection at INFO; at our rates that is a measurable cost and noise.
logging.getLogger("mail.log").setLevel(logging.WARNING)


@cache
def _auth_names(cls: type) -> tuple[str, ...]:
    return tuple(n for n in dir(cls) if n.startswith("auth_"))


class _CheapInspect:
    """`inspect` for aiosmtpd's module, with a `getmembers` that lists only ``auth_*`` names
    by class (cached) instead of evaluating every attribute of every new connection."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def getmembers(obj: object, predicate: Any = None) -> list[tuple[str, Any]]:
        return [(n, getattr(obj, n)) for n in _auth_names(type(obj))]


aiosmtpd_smtp.inspect = _CheapInspect()  # type: ignore[assignment]


class _FastAddr:
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        if not arg:
            return "", ""
        try:
            parser = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
            token, rest = parser(arg)
        except HeaderParseError:
            return None, None
        addr = token.addr_spec
        local_limit = getattr(self, "local_part_limit", 0)
        if local_limit and len(addr.rpartition("@")[0]) > local_limit:
            return None, None
        return addr, rest


class RouterSMTP(_FastAddr, SMTP):  # type: ignore[misc]
    pass


class RouterLMTP(_FastAddr, LMTP):  # type: ignore[misc]
    pass


class IntakeHandler:
    """aiosmtpd handler: decides RCPT by the live config, hands DATA to the acceptor."""

    def __init__(self, acceptor: Acceptor, owns_address: Callable[[str], bool],
                 channel: str = "smtp") -> None:
        self.acceptor = acceptor
        self.owns_address = owns_address
        self.channel = channel
        self.lmtp = channel == "lmtp"
        self._log = log.get("router.intake.smtp")

    async def handle_RCPT(self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not self.owns_address(address):
            return f"550 5.1.1 <{address}>: no such role address here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: SmtpSession,
                          envelope: SmtpEnvelope) -> str:
        raw = envelope.original_content or b""
        env = Envelope(channel=self.channel, mail_from=envelope.mail_from or "",
                       rcpt_to=list(envelope.rcpt_tos), raw=raw)
        try:
            await self.acceptor.accept(env)
        except StorageUnavailable as exc:
            self._log.warning("intake_tempfail", error=str(exc), size=len(raw))
            reply = "451 4.3.0 Storage temporarily unavailable, please try again later"
        else:
            reply = "250 2.0.0 Message accepted"
        if self.lmtp:
            return "\r\n".join(f"{reply[:3]} {reply[4:]} <{r}>" for r in envelope.rcpt_tos)
        return reply


async def start_server(handler: IntakeHandler, host: str, port: int, *, hostname: str,
                       max_size: int, reuse_port: bool = False) -> asyncio.Server:
    cls = RouterLMTP if handler.lmtp else RouterSMTP
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return cls(handler, hostname=hostname, data_size_limit=max_size,
                   enable_SMTPUTF8=True, decode_data=False, ident="router ESMTP",
                   loop=loop)

    return await loop.create_server(factory, host, port, reuse_port=reuse_port or None,
                                    backlog=1024)
