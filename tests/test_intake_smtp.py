"""SMTP/LMTP intake against real servers on loopback: what the sender is told matches what
was stored, byte for byte and row for row."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy.engine import make_url
from sqlmodel import Session, select

from router import db
from router.intake.accept import Envelope
from router.models import Inbound, InboundStatus, Ticket
from tests.conftest import write_config
from tests.daemon import (
    MakeRouter,
    inbound_rows,
    inproc_routers,
    make_mail,
    send_smtp,
    start_router,
    stored_count,
    wait_for_tickets,
)

# ---------------------------------------------------------------------------- helpers


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[MakeRouter]:
    async with inproc_routers(tmp_path) as make:
        yield make


async def smtp_client(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30)
    await client.connect()
    await client.ehlo()
    return client


async def send(port: int, raw: bytes, rcpts: Sequence[str],
               mail_from: str = "alice@example.org") -> aiosmtplib.SMTPResponse:
    """One transaction; returns the reply to DATA (raises on refusals)."""
    client = await smtp_client(port)
    try:
        await client.mail(mail_from)
        for r in rcpts:
            await client.rcpt(r)
        return await client.data(raw)
    finally:
        with contextlib.suppress(Exception):
            await client.quit()


class Line:
    """A raw client: bytes exactly as written, replies read line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Line:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        line = cls(reader, writer)
        assert (await line.reply())[0].startswith("220")
        return line

    async def reply(self) -> list[str]:
        """One (possibly multi-line) reply."""
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), 30)
            assert raw, f"connection closed; got so far {lines}"
            text = raw.decode().rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return lines

    async def cmd(self, text: str) -> list[str]:
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def rest(self) -> list[str]:
        """Everything the server still says until it closes the connection."""
        data = await asyncio.wait_for(self.reader.read(), 30)
        return [x for x in data.decode().split("\r\n") if x]

    def close(self) -> None:
        self.writer.close()


def tickets(url: str) -> list[Ticket]:
    engine = db.make_engine(url)
    try:
        with Session(engine, expire_on_commit=False) as s:
            return list(s.exec(select(Ticket).order_by(Ticket.id)).all())  # type: ignore[arg-type]
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- replies


async def test_250_only_after_commit(inproc: MakeRouter) -> None:
    r = await inproc()
    raw = make_mail(subject="committed first", message_id="<c1@example.org>")
    resp = await send(r.port, raw, ["support@acme.test"])
    assert resp.code == 250 and resp.message.startswith("2.0.0")
    # Right after the 250, with no waiting: the row is there, from another connection.
    rows = await asyncio.to_thread(inbound_rows, r.url)
    assert len(rows) == 1
    row = rows[0]
    assert row.message_id == "<c1@example.org>"
    assert row.rcpt_to == ["support@acme.test"]
    assert row.mail_from == "alice@example.org"
    assert row.channel == "smtp" and row.status == InboundStatus.NEW
    assert b"committed first" in row.raw and row.size == len(row.raw)


async def test_unknown_recipient_is_550_511(inproc: MakeRouter) -> None:
    r = await inproc()
    client = await smtp_client(r.port)
    try:
        await client.mail("alice@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as err:
            await client.rcpt("nobody@acme.test")
        assert err.value.code == 550
        assert err.value.message.startswith("5.1.1")
        # A known address on the same transaction is still fine.
        assert (await client.rcpt("Support@ACME.test")).code == 250
    finally:
        await client.quit()
    assert await asyncio.to_thread(inbound_rows, r.url) == []


async def test_plus_address_keeps_tag_and_base_address(inproc: MakeRouter) -> None:
    r = await inproc()
    raw = make_mail(to="billing+spring24@acme.test", subject="spring promo invoice")
    assert (await send(r.port, raw, ["billing+spring24@acme.test"])).code == 250
    assert await r.drain() == 1
    [t] = tickets(r.url)
    assert (t.team, t.address, t.tag) == ("billing", "billing@acme.test", "spring24")


async def test_oversize_message_is_552_and_not_stored(inproc: MakeRouter) -> None:
    r = await inproc(max_size="4KB")
    big = make_mail(body="x" * 70 + "\n" * 1 + ("y" * 76 + "\n") * 200)
    assert len(big) > 4096
    client = await smtp_client(r.port)
    try:
        await client.mail("alice@example.org")
        await client.rcpt("support@acme.test")
        with pytest.raises(aiosmtplib.SMTPDataError) as err:
            await client.data(big)
        assert err.value.code == 552
        # The connection stays usable and a small message still goes through.
        await client.mail("alice@example.org")
        await client.rcpt("support@acme.test")
        assert (await client.data(make_mail(subject="small"))).code == 250
    finally:
        await client.quit()
    rows = await asyncio.to_thread(inbound_rows, r.url)
    assert [b"small" in row.raw for row in rows] == [True]


# ---------------------------------------------------------------------------- database down


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `cut` closes the listener and every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        self.server = None


@pytest.mark.postgres
async def test_database_down_is_451_and_nothing_lost(inproc: MakeRouter, pg_url: str) -> None:
    await asyncio.to_thread(db.upgrade, pg_url)
    proxy = TcpProxy(make_url(pg_url).port or 5432)
    await proxy.start()
    via_proxy = make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
    r = await inproc(db_url=via_proxy, migrate=False)
    try:
        first = make_mail(subject="before the outage", message_id="<m1@example.org>")
        second = make_mail(subject="during the outage", message_id="<m2@example.org>")
        assert (await send(r.port, first, ["support@acme.test"])).code == 250

        await proxy.cut()
        with pytest.raises(aiosmtplib.SMTPDataError) as err:
            await send(r.port, second, ["support@acme.test"])
        assert err.value.code == 451 and err.value.message.startswith("4.3.0")
        # The sender was told to retry: the message is not half-stored somewhere.
        stored = await asyncio.to_thread(inbound_rows, pg_url)
        assert [x.message_id for x in stored] == ["<m1@example.org>"]

        await proxy.start()  # same port again
        assert (await send(r.port, second, ["support@acme.test"])).code == 250
        stored = await asyncio.to_thread(inbound_rows, pg_url)
        assert sorted(x.message_id or "" for x in stored) == ["<m1@example.org>",
                                                              "<m2@example.org>"]
        assert all(x.deliveries == 1 for x in stored)
    finally:
        await r.stop()
        if proxy.server is not None:
            await proxy.cut()


# ---------------------------------------------------------------------------- smuggling

SMUGGLED = (b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<billing@acme.test>\r\nDATA\r\n"
            b"From: evil@example.org\r\nTo: billing@acme.test\r\nSubject: smuggled\r\n\r\n"
            b"smuggled body\r\n")


@pytest.mark.parametrize("separator", [b"\n.\n", b"\r\n.\n", b"\n.\r\n"],
                         ids=["LF.LF", "CRLF.LF", "LF.CRLF"])
async def test_smtp_smuggling_stays_one_message(inproc: MakeRouter, separator: bytes) -> None:
    r = await inproc()
    c = await Line.open(r.port)
    try:
        assert (await c.cmd("EHLO client.example.org"))[-1].startswith("250")
        assert (await c.cmd("MAIL FROM:<alice@example.org>"))[0].startswith("250")
        assert (await c.cmd("RCPT TO:<support@acme.test>"))[0].startswith("250")
        assert (await c.cmd("DATA"))[0].startswith("354")
        head = (b"From: alice@example.org\r\nTo: support@acme.test\r\nSubject: real\r\n"
                b"Message-ID: <real@example.org>\r\n\r\nreal body")
        c.writer.write(head + separator + SMUGGLED + b"\r\n.\r\n")
        await c.writer.drain()
        assert (await c.reply())[0].startswith("250 2.0.0")
        c.writer.write(b"QUIT\r\n")
        await c.writer.drain()
        # Nothing else was answered: no second 250, no 503 for a stray DATA.
        rest = await c.rest()
        assert len(rest) == 1 and rest[0].startswith("221"), rest
    finally:
        c.close()
    rows = await asyncio.to_thread(inbound_rows, r.url)
    assert len(rows) == 1
    [row] = rows
    assert row.rcpt_to == ["support@acme.test"] and row.mail_from == "alice@example.org"
    assert b"MAIL FROM:<evil@example.org>" in row.raw
    assert b"smuggled body" in row.raw
    assert await r.drain() == 1
    [t] = tickets(r.url)
    assert t.team == "support" and t.subject == "real"


# ---------------------------------------------------------------------------- LMTP


async def test_lmtp_one_reply_per_recipient(inproc: MakeRouter) -> None:
    r = await inproc(protocol="lmtp")
    c = await Line.open(r.port)
    try:
        assert (await c.cmd("EHLO client.example.org"))[0][:1] == "5"  # LMTP wants LHLO
        assert (await c.cmd("LHLO client.example.org"))[-1].startswith("250")
        assert (await c.cmd("MAIL FROM:<alice@example.org>"))[0].startswith("250")
        assert (await c.cmd("RCPT TO:<support@acme.test>"))[0].startswith("250")
        assert (await c.cmd("RCPT TO:<nobody@acme.test>"))[0].startswith("550 5.1.1")
        assert (await c.cmd("RCPT TO:<billing+x@acme.test>"))[0].startswith("250")
        assert (await c.cmd("DATA"))[0].startswith("354")
        c.writer.write(make_mail(subject="lmtp", to="support@acme.test") + b".\r\n")
        await c.writer.drain()
        first = await c.reply()
        second = await c.reply()
        assert first == ["250 2.0.0 Message accepted <support@acme.test>"]
        assert second == ["250 2.0.0 Message accepted <billing+x@acme.test>"]
        c.writer.write(b"QUIT\r\n")
        await c.writer.drain()
        rest = await c.rest()
        assert len(rest) == 1 and rest[0].startswith("221"), rest
    finally:
        c.close()
    [row] = await asyncio.to_thread(inbound_rows, r.url)
    assert row.channel == "lmtp"
    assert row.rcpt_to == ["support@acme.test", "billing+x@acme.test"]


# ---------------------------------------------------------------------------- group commit


async def test_group_commit_under_concurrency(inproc: MakeRouter) -> None:
    r = await inproc()
    clients, per_client = 50, 5

    async def client(i: int) -> list[int]:
        c = await smtp_client(r.port)
        codes = []
        try:
            for j in range(per_client):
                raw = make_mail(subject=f"load {i}/{j}", frm=f"user{i}@example.org",
                                message_id=f"<load-{i}-{j}@example.org>")
                await c.mail(f"user{i}@example.org")
                await c.rcpt("support@acme.test")
                codes.append((await c.data(raw)).code)
        finally:
            await c.quit()
        return codes

    results = await asyncio.gather(*(client(i) for i in range(clients)))
    assert all(code == 250 for codes in results for code in codes)
    rows = await asyncio.to_thread(inbound_rows, r.url)
    ids = sorted(x.message_id or "" for x in rows)
    assert ids == sorted(f"<load-{i}-{j}@example.org>"
                         for i in range(clients) for j in range(per_client))
    assert all(x.deliveries == 1 for x in rows)
    assert r.acceptor.accepted == clients * per_client
    assert r.acceptor.batches < r.acceptor.accepted, "commits were not grouped"


async def test_acceptor_stop_answers_the_batch_in_flight(inproc: MakeRouter) -> None:
    """stop() promises to finish what is pending: a batch already handed to the writer
    thread must get its answer too, not be abandoned mid-commit."""
    r = await inproc()
    envs = [Envelope("smtp", "a@example.org", ["support@acme.test"],
                     make_mail(message_id=f"<stop-{i}@example.org>")) for i in range(20)]
    waiting = [asyncio.ensure_future(r.acceptor.accept(e)) for e in envs]
    await asyncio.sleep(0)  # the accepts queue up; the writer has not run yet
    await r.acceptor.stop()
    done, pending = await asyncio.wait(waiting, timeout=10)
    for f in pending:
        f.cancel()
    assert not pending, "accept() callers were left without an answer"
    assert all(f.exception() is None for f in done)
    assert len(await asyncio.to_thread(inbound_rows, r.url)) == 20


async def test_the_writer_takes_the_next_batch_without_the_event_loop(
        inproc: MakeRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Senders that arrived during a commit are committed as soon as it is done, even while
    the event loop is busy elsewhere: a busy loop took milliseconds to hand the writer its
    next batch, which every one of those senders waited out."""
    r = await inproc()
    acceptor = r.acceptor
    first_started, go, second_done = threading.Event(), threading.Event(), threading.Event()
    real_write = acceptor._write
    calls = 0

    def write(envs: list[Envelope]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            first_started.set()
            go.wait(10)  # held until the second message waits behind this commit
        real_write(envs)
        if calls == 2:
            second_done.set()

    monkeypatch.setattr(acceptor, "_write", write)
    envs = [Envelope("smtp", "a@example.org", ["support@acme.test"],
                     make_mail(message_id=f"<next-{i}@example.org>")) for i in range(2)]
    first = asyncio.ensure_future(acceptor.accept(envs[0]))
    assert await asyncio.to_thread(first_started.wait, 10)
    second = asyncio.ensure_future(acceptor.accept(envs[1]))
    await asyncio.sleep(0)  # queued behind the commit in progress
    go.set()
    # The loop is blocked from here until the second commit is done; a writer that needs
    # the loop between commits never gets to it.
    assert second_done.wait(10), "the second batch waited for the event loop"
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert acceptor.batches == 2
    assert len(await asyncio.to_thread(inbound_rows, r.url)) == 2


# ---------------------------------------------------------------------------- the real daemon


def test_serve_sigterm_is_clean_and_mail_survives_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    cfg = write_config(tmp_path / "etc", db_url=url)
    proc = start_router(cfg)
    try:
        for i in range(3):
            raw = make_mail(subject=f"e2e {i}", to="oops@acme.test")
            send_smtp(proc.port, raw, ["oops@acme.test"])
        log = proc.stop()
    finally:
        proc.kill()
    assert '"router_started"' in log
    # Every 250 was a commit: all three are stored, whatever the pipeline got to.
    assert stored_count(url) == 3
    proc = start_router(cfg)
    try:
        found = wait_for_tickets(url, 3)
        proc.stop()
    finally:
        proc.kill()
    assert sorted(t.subject for t in found) == ["e2e 0", "e2e 1", "e2e 2"]
    assert {t.team for t in found} == {"ops"}
    assert len(tickets(url)) == 3
    assert all(x.status == InboundStatus.DONE for x in inbound_rows(url))


def test_serve_sigkill_loses_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    cfg = write_config(tmp_path / "etc", db_url=url)
    proc = start_router(cfg)
    try:
        for i in range(5):
            raw = make_mail(subject=f"killed {i}", to="billing@acme.test")
            send_smtp(proc.port, raw, ["billing@acme.test"])
    finally:
        proc.kill()
    assert proc.proc.returncode == -9
    assert stored_count(url) == 5
    proc = start_router(cfg)
    try:
        wait_for_tickets(url, 5)
        proc.stop()
    finally:
        proc.kill()
    found = tickets(url)
    assert sorted(t.subject for t in found) == [f"killed {i}" for i in range(5)]
    assert {t.team for t in found} == {"billing"}
    engine = db.make_engine(url)
    try:
        with Session(engine) as s:
            done = s.exec(select(Inbound).where(Inbound.status == InboundStatus.DONE)).all()
            assert len({x.ticket_id for x in done}) == 5
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- DATA in blocks


class _Recorder:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        self.got.append(envelope.original_content)
        return "250 OK"


_LINES = b"".join(b"%076d\r\n" % i for i in range(2000))  # a base64-sized attachment
DATA_CASES: list[tuple[str, bytes, int]] = [
    ("empty", b".\r\n", 10_000),
    ("one line", b"a\r\n.\r\n", 10_000),
    ("no final CRLF seen as end", b"a.\r\n.\r\n", 10_000),
    ("stuffed dots", b"..x\r\n.y\r\n..\r\n...\r\nz\r\n.\r\n", 10_000),
    ("first line dotted", b".hello\r\nworld\r\n.\r\n", 10_000),
    ("sentences end in dots", b"End.\r\nMore. \r\n.\r\nQUIT-not\r\n", 10_000),
    ("LF.LF", b"a\n.\nMAIL FROM:<e@x>\r\n.\r\n", 10_000),
    ("CRLF.LF", b"a\r\n.\nb\r\n.\r\n", 10_000),
    ("LF.CRLF", b"a\n.\r\nb\r\n.\r\n", 10_000),
    ("CR.CRLF", b"a\r.\r\nb\r\n.\r\n", 10_000),
    ("8-bit", "Grüße\r\n.\r\n".encode("latin-1"), 10_000),
    ("large", _LINES + b".\r\n", 1_000_000),
    ("line of 999", b"x" * 999 + b"\r\n.\r\n", 10_000),
    ("line of 1000", b"x" * 1000 + b"\r\n.\r\n", 10_000),
    ("line of 5000", b"y\r\n" + b"x" * 5000 + b"\r\nz\r\n.\r\n", 100_000),
    ("exactly the limit", b"x" * 98 + b"\r\n.\r\n", 100),
    ("one byte over", b"x" * 99 + b"\r\n.\r\n", 100),
    ("far over", _LINES + b".\r\n", 20_000),
]


async def _data_replies(cls: type, payload: bytes, limit: int,
                        chunk: int | None) -> tuple[list[str], list[bytes]]:
    loop = asyncio.get_running_loop()
    recorder = _Recorder()
    server = await loop.create_server(
        lambda: cls(recorder, data_size_limit=limit, enable_SMTPUTF8=True,
                    decode_data=False, loop=loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        c = await Line.open(port)
        try:
            for command in ("EHLO client.example.org", "MAIL FROM:<a@example.org>",
                            "RCPT TO:<support@acme.test>", "DATA"):
                await c.cmd(command)
            # QUIT pipelined right behind the data: it must be left for the command loop.
            stream = payload + b"QUIT\r\n"
            step = chunk or len(stream)
            for i in range(0, len(stream), step):
                c.writer.write(stream[i:i + step])
                await c.writer.drain()
                if chunk:
                    await asyncio.sleep(0.002)
            return await c.rest(), recorder.got
        finally:
            c.close()
    finally:
        server.close()
        await server.wait_closed()


# Every case whole; the short ones also a few bytes per write, so each boundary case meets
# the end-of-data dot split across reads.
_DATA_RUNS = [pytest.param(p, lim, None, id=f"whole-{n}") for n, p, lim in DATA_CASES] + [
    pytest.param(p, lim, 3, id=f"in-3-byte-writes-{n}")
    for n, p, lim in DATA_CASES if len(p) <= 20_000]


@pytest.mark.parametrize(("payload", "limit", "chunk"), _DATA_RUNS)
async def test_data_in_blocks_answers_and_stores_as_aiosmtpd(
        payload: bytes, limit: int, chunk: int | None) -> None:
    from aiosmtpd.smtp import SMTP

    from router.intake.smtp import RouterSMTP

    theirs = await _data_replies(SMTP, payload, limit, chunk)
    ours = await _data_replies(RouterSMTP, payload, limit, chunk)
    assert ours == theirs
    assert theirs[0][-1].startswith("221")  # the pipelined QUIT was read as a command


_ADDRESSES = [
    "<alice@example.org>", "<alice@example.org> SIZE=123", "<Alice@Example.ORG>",
    "<alice@example.org>  SIZE=1 BODY=8BITMIME", "<alice@example.org>SIZE=1",
    "<alice@example.org>\tSIZE=1", "<alice@example.org> \x0bSIZE=1", "<alice@example.org>\x0b",
    "<alice@example.org> ", "<alice@example.org> (a comment) SIZE=1", "<alice@example.org>(c)",
    "<a.b+spring24@sub.example.org>", "<a/b=c?d^e`f{g|h}i~j!#$%&'*@x-y.z>",
    "<>", "<> SIZE=1", "alice@example.org", "alice@example.org SIZE=1", " <alice@example.org>",
    "<a..b@example.org>", "<.a@example.org>", "<a.@example.org>", "<a@example.org.>",
    "<a@.example.org>", "<a@[127.0.0.1]>", '<"quoted name"@example.org>',
    "<@relay.example:alice@example.org>", "<alice@example.org", "<alice>", "<@example.org>",
    "<ålice@example.org>", "<alice@exämple.org>", "<" + "a" * 65 + "@example.org>",
    "<" + "a" * 64 + "@example.org>", "<alice@example.org>>",
    "<alice@example.org> <bob@example.org>", "<a(b)@example.org>", "<alice@ex ample.org>",
    "<alice @example.org>", "<alice@example.org>\r", "<alice@example.org>\u3000SIZE=1",
]


@pytest.mark.parametrize("local_part_limit", [0, 64])
def test_addresses_are_read_as_aiosmtpd_reads_them(local_part_limit: int) -> None:
    """MAIL and RCPT addresses of the usual shape are read by a regular expression instead
    of the email parser: for every address, usual or not, the address and the parameters
    after it are what stock aiosmtpd makes of them."""
    from aiosmtpd.smtp import SMTP

    from router.intake.smtp import RouterSMTP

    class Limits:
        def __init__(self) -> None:
            self.local_part_limit = local_part_limit

    def outcome(read: Any, arg: str) -> Any:
        try:
            return read(Limits(), arg)
        except Exception as exc:  # the same failure counts as the same reading
            return type(exc)

    for arg in _ADDRESSES:
        assert outcome(RouterSMTP._getaddr, arg) == outcome(SMTP._getaddr, arg), arg
