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
import re
from collections.abc import Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from functools import cache
from typing import Any, cast

import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session as SmtpSession

from router import log
from router.intake.accept import Acceptor, Envelope, StorageUnavailable
from router.mail import DOT_ATOM_ADDR

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


# The address almost every MAIL and RCPT carries, <local@domain> of dot-atoms in ASCII: read
# by a regular expression, for the same result as the email parser's, which costs a tenth of
# the event loop's time per message. Anything else goes to that parser.
_PLAIN_ANGLE_ADDR = re.compile(rf"<({DOT_ATOM_ADDR})>")


class _FastAddr:
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        if not arg:
            return "", ""
        plain = _PLAIN_ANGLE_ADDR.match(arg)
        rest = arg[plain.end():] if plain is not None else ""
        if rest[:1] in (" ", "\t"):
            rest = rest.lstrip()  # the parser's CFWS after the address: all whitespace
        if plain is not None and not rest.startswith("("):
            addr = plain.group(1)
        else:
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


# What ends DATA: a line of a lone dot. Its leading CRLF may end the bytes read before.
_DOT_LINE = b".\r\n"
# aiosmtpd's limit: a line (CRLF included) longer than 1001 bytes gets a 500.
_LINE_MAX = SMTP.line_length_limit - 2


class _FastData:
    """DATA read in blocks, not a line at a time. aiosmtpd 1.4.6 awaits `readuntil` and
    joins fragments once per line, about 250 times for the benchmark's mean mail and 2,000
    for a 150 KB attachment: a third of intake's CPU per message. Here the stream is read up
    to each ".\r\n" (or a buffer's worth), and a piece ends DATA only when the two bytes
    before that dot are CRLF, so exactly aiosmtpd's rule holds: a line of a lone dot after
    CRLF, never after a bare LF or CR (SMTP smuggling). Replies, limits and the handler
    call are aiosmtpd's; `tests/test_intake_smtp.py` compares the two on the same bytes."""

    _reader: asyncio.StreamReader
    envelope: Any
    data_size_limit: int | None
    _decode_data: bool

    async def smtp_DATA(self, arg: str) -> None:
        server = cast(SMTP, self)
        if await server.check_helo_needed() or await server.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await server.push("503 Error: need RCPT command")
            return
        if arg:
            await server.push("501 Syntax: DATA")
            return
        await server.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            raw, problem = await self._read_data()
        except asyncio.CancelledError:
            server._writer.close()  # the connection went away mid-DATA, as aiosmtpd does
            raise
        if problem is not None:
            await server.push(problem)
            server._set_post_data_state()
            return
        # Dot-stuffing undone: the first byte of every line that starts with a dot goes.
        content = raw.replace(b"\r\n.", b"\r\n")
        if content.startswith(b"."):
            content = content[1:]
        assert not self._decode_data  # router stores bytes verbatim
        self.envelope.content = self.envelope.original_content = content
        status = await server._call_handler_hook("DATA")
        server._set_post_data_state()
        await server.push("250 OK" if status is aiosmtpd_smtp.MISSING else status)

    async def _read_data(self) -> tuple[bytes, str | None]:
        """The DATA bytes (still dot-stuffed, without the final dot line) and the error
        reply, if any. Past the size limit the rest is read and dropped, as aiosmtpd does;
        a too-long line found before the limit gets aiosmtpd's 500 instead of 552."""
        reader = self._reader
        limit = self.data_size_limit
        parts: list[bytes] = []
        size = 0
        tail = b"\r\n"  # DATA begins at the start of a line
        problem: str | None = None
        while True:
            try:
                piece = await reader.readuntil(_DOT_LINE)
                ended = (tail + piece)[-5:-3] == b"\r\n"
            except asyncio.LimitOverrunError as exc:
                piece = await reader.read(exc.consumed)
                ended = False
            tail = (tail + piece)[-2:]
            size += len(piece) - (3 if ended else 0)
            if problem is None and limit and size > limit:
                problem = _too_long(parts) or "552 Error: Too much mail data"
                parts.clear()
            if problem is None:
                parts.append(piece)
            if ended:
                break
        if problem is not None:
            return b"", problem
        raw = b"".join(parts)[:-3]
        return raw, _too_long([raw])


def _too_long(parts: list[bytes]) -> str | None:
    data = b"".join(parts)
    if len(data) > _LINE_MAX and max(map(len, data.split(b"\r\n"))) > _LINE_MAX:
        return "500 Line too long (see RFC5321 4.5.3.1.6)"
    return None


class RouterSMTP(_FastAddr, _FastData, SMTP):  # type: ignore[misc]
    pass


class RouterLMTP(_FastAddr, _FastData, LMTP):  # type: ignore[misc]
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
