"""IMAP intake: mailboxes router cannot sit in front of, read with imapclient.

One `ImapIntake` per configured ``[[imap]]`` account, each in its own thread (imapclient is
blocking; an IDLE wait would otherwise hold the event loop), which

1. connects (``tls`` = ssl / starttls / none), reads ``password_file`` afresh, logs in;
2. selects ``folder`` and loads the cursor (``imap_cursor``: UIDVALIDITY and last UID). A
   changed UIDVALIDITY means the UIDs mean something else now: the cursor starts again at 0
   and the dedupe key of `intake.accept` absorbs the messages it had already taken;
3. takes every message above the cursor, ``BODY.PEEK[]`` in batches of `batch_size` UIDs per
   FETCH, through the same durable accept as SMTP (channel ``imap``, ``mail_from`` from
   Return-Path, ``rcpt_to`` = the account's role address). A batch goes to the acceptor at
   once, so the group commit stores it in one transaction. A message over ``[smtp]
   max_message_size`` (its ``RFC822.SIZE``, fetched first) is not fetched: it stays in the
   mailbox, flagged ``\\Flagged`` and not ``\\Seen``, and is logged as an error;
4. only after the commit: marks the batch ``\\Seen`` (``after = "seen"``), moves it
   (``"move"``: MOVE, or COPY + ``\\Deleted`` + EXPUNGE on servers without MOVE) or deletes it
   (``"delete"``), and then advances the cursor. A crash between commit and step 4 leaves the
   message in place above the cursor: it is fetched again and deduplicated, never duplicated;
5. waits with IDLE (renewed every `idle_renew`, below the 29 minutes RFC 2177 allows) or,
   when the server has no IDLE or the account says ``idle = false``, polls every
   `poll_interval`.

Any failure (network, server restart, refused login, database down) ends the session; the
thread logs it once, waits (exponential backoff from `backoff_initial` up to `backoff_max`,
reset once a session has done a full pass) and connects again. Accounts never wait on each
other. `ImapManager` runs one intake per account of the live settings and restarts those
whose settings changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from imapclient import DELETED, FLAGGED, SEEN, IMAPClient
from imapclient.exceptions import LoginError
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from router import log
from router.clock import Clock, system_clock
from router.db import is_sqlite
from router.intake.accept import Envelope, StorageUnavailable, write_rows
from router.models import T_IMAP_CURSOR
from router.settings import ImapAccount, Settings

Accept = Callable[[Envelope], Awaitable[None]]
ErrorHook = Callable[[str, BaseException], None]


@dataclass(frozen=True)
class ImapOptions:
    """Tuning shared by all accounts; the defaults are the production ones."""

    idle: bool = True                 # use IDLE where the server offers it
    poll_interval: float = 60.0       # seconds between polls without IDLE
    idle_renew: float = 25 * 60.0     # leave and re-enter IDLE this often (RFC 2177: < 29 min)
    batch_size: int = 50              # UIDs per FETCH
    backoff_initial: float = 1.0      # first wait after a failure, doubled each time ...
    backoff_max: float = 300.0        # ... up to this
    timeout: float = 60.0             # socket timeout of a command (not of an IDLE wait)
    stop_timeout: float = 10.0        # how long `run` waits for its thread on stop
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)


class ImapLoginRefused(Exception):
    """The server refused the credentials (wrong password, locked account)."""


class ImapPasswordUnreadable(Exception):
    """password_file could not be read."""


class ImapSessionEnded(Exception):
    """The server closed the session (BYE, or the connection dropped during IDLE)."""


class _Stopping(Exception):
    pass


def return_path(raw: bytes) -> str:
    """The address of the first (outermost) Return-Path header, "" if none or ``<>``."""
    end = len(raw)
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep, 0, 256 * 1024)
        if i != -1:
            end = min(end, i)
    try:
        head = BytesHeaderParser(policy=compat32).parsebytes(raw[: min(end, 256 * 1024)])
        value = head.get("Return-Path")
    except Exception:
        return ""
    if value is None:
        return ""
    return parseaddr(str(value))[1].strip()


class _ContextLog:
    def __init__(self, logger: Any, ctx: dict[str, Any]) -> None:
        self._logger = logger
        self._ctx = ctx

    def __getattr__(self, level: str) -> Callable[..., None]:
        method = getattr(self._logger, level)

        def emit(event: str, **kw: Any) -> None:
            method(event, **self._ctx, **kw)
        return emit


def _keepalive(sock: socket.socket) -> None:
    """Notice a silently dead connection (NAT timeout, unplugged peer) within ~2 minutes
    during a long IDLE, instead of at the next renewal."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 20), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _pop_new_mail_notices(client: IMAPClient) -> bool:
    """Forget (and report) the untagged EXISTS / RECENT that imaplib kept from the last
    commands' responses."""
    untagged: dict[str, list[Any]] = client._imap.untagged_responses
    found = False
    for key in ("EXISTS", "RECENT"):
        if untagged.pop(key, None):
            found = True
    return found


def _batches(uids: Sequence[int], size: int) -> list[list[int]]:
    return [list(uids[i:i + size]) for i in range(0, len(uids), size)]


class ImapIntake:
    """One account: a thread that holds the IMAP session, and `run` to start and stop it."""

    def __init__(self, account: ImapAccount, accept: Accept, engine: Engine, *,
                 clock: Clock = system_clock, options: ImapOptions | None = None,
                 on_error: ErrorHook | None = None, base_dir: str | Path = ".",
                 max_size: Callable[[], int] | None = None) -> None:
        self.account = account
        self.max_size = max_size  # bytes, read at each batch: a reload applies at once
        self.accept = accept
        self.engine = engine
        self.clock = clock
        opts = options or ImapOptions()
        # Per-account overrides, for when router.toml grows `idle` / `poll_interval` fields.
        idle = getattr(account, "idle", None)
        poll = getattr(account, "poll_interval", None)
        if isinstance(idle, bool):
            opts = replace(opts, idle=idle)
        if isinstance(poll, timedelta):
            opts = replace(opts, poll_interval=poll.total_seconds())
        self.options = opts
        self.on_error = on_error
        self.base_dir = Path(base_dir)
        # Context passed on every call, not bound: a bound structlog logger would keep the
        # processors configured when it was made.
        self._ctx: dict[str, Any] = {"account": account.name, "user": account.user,
                                     "host": f"{account.host}:{account.port}",
                                     "folder": account.folder}
        self._log = _ContextLog(log.get("router.intake.imap"), self._ctx)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._idle_sock: socket.socket | None = None
        self._healthy = False
        self._is_sqlite = is_sqlite(str(engine.url))
        # Observable state, for tests, metrics and the log.
        self.connected = threading.Event()
        self.mode: str | None = None          # "idle" | "poll" once connected
        self.taken = 0                        # messages committed and acted on
        self.too_large = 0                    # messages left in the mailbox for their size
        self.failures = 0                     # consecutive failed sessions
        self.sessions = 0
        self.idle_rounds = 0                  # IDLE commands issued (renewals included)

    # ------------------------------------------------------------------ event loop side

    async def run(self, stop: asyncio.Event) -> None:
        """Hold the account's session until `stop` is set (or this task is cancelled)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping.clear()
        finished: asyncio.Future[None] = loop.create_future()

        def mark_finished() -> None:
            if not finished.done():
                finished.set_result(None)

        def target() -> None:
            try:
                self._thread_main()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    loop.call_soon_threadsafe(mark_finished)

        thread = threading.Thread(target=target, name=f"imap-{self.account.name}",
                                  daemon=True)
        thread.start()
        waiter: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([finished, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            self.request_stop()
            try:
                await asyncio.wait_for(asyncio.shield(finished), self.options.stop_timeout)
            except TimeoutError:
                self._log.warning("imap_stop_slow", waited=self.options.stop_timeout)

    def request_stop(self) -> None:
        """Ask the thread to end; wakes an IDLE wait at once (safe from any thread)."""
        self._stopping.set()
        with self._lock:
            sock = self._idle_sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ the thread

    def _thread_main(self) -> None:
        delay = self.options.backoff_initial
        while not self._stopping.is_set():
            self._healthy = False
            try:
                self._session()
            except _Stopping:
                break
            except Exception as exc:
                if self._stopping.is_set():
                    break
                if self._healthy:
                    delay = self.options.backoff_initial
                    self.failures = 0
                self.failures += 1
                self._report(exc, delay)
                if self.on_error is not None:
                    with contextlib.suppress(Exception):
                        self.on_error(self.account.name, exc)
                if self._stopping.wait(delay):
                    break
                delay = min(delay * 2, self.options.backoff_max)
        self.connected.clear()
        self._log.info("imap_stopped", taken=self.taken)

    def _report(self, exc: BaseException, retry_in: float) -> None:
        """One log line per failed session, i.e. at most one per backoff period."""
        a = self.account
        common: dict[str, Any] = {"retry_in": round(retry_in, 3), "failures": self.failures,
                                  "error": f"{type(exc).__name__}: {exc}"}
        if isinstance(exc, ImapLoginRefused):
            source = (f"password_file {a.password_file}" if a.password_file else "password")
            self._log.error("imap_login_failed", **common,
                            hint=f"the server refused user {a.user}; check the {source} of "
                                 f"[[imap]] account \"{a.name}\"")
        elif isinstance(exc, ImapPasswordUnreadable):
            self._log.error("imap_password_file_unreadable", **common)
        elif isinstance(exc, StorageUnavailable):
            self._log.error("imap_storage_unavailable", **common)
        elif isinstance(exc, (OSError, imaplib.IMAP4.abort, ImapSessionEnded)):
            self._log.warning("imap_connection_lost", **common)
        else:
            self._log.error("imap_error", **common)

    def _password(self) -> str:
        a = self.account
        if a.password_file:
            path = Path(a.password_file)
            if not path.is_absolute():
                path = self.base_dir / path
            try:
                return path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ImapPasswordUnreadable(f"cannot read password_file {path}: "
                                             f"{exc.strerror or exc}") from exc
        return a.password or ""

    def _connect(self) -> IMAPClient:
        a = self.account
        ctx = self.options.ssl_context or ssl.create_default_context()
        client = IMAPClient(a.host, a.port, ssl=a.tls == "ssl",
                            ssl_context=ctx if a.tls == "ssl" else None,
                            timeout=self.options.timeout)
        try:
            if a.tls == "starttls":
                client.starttls(ctx)
            try:
                client.login(a.user, self._password())
            except LoginError as exc:
                raise ImapLoginRefused(str(exc)) from None
            _keepalive(client.socket())
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    def _session(self) -> None:
        a = self.account
        client = self._connect()
        try:
            caps = set(client.capabilities())
            if a.after == "move" and a.move_to and not client.folder_exists(a.move_to):
                client.create_folder(a.move_to)
                self._log.info("imap_folder_created", created=a.move_to)
            info = client.select_folder(a.folder)
            uidvalidity = int(info[b"UIDVALIDITY"])
            last_uid = self._load_cursor(uidvalidity)
            use_idle = self.options.idle and b"IDLE" in caps
            self.mode = "idle" if use_idle else "poll"
            self.sessions += 1
            self._log.info("imap_connected", mode=self.mode, uidvalidity=uidvalidity,
                           last_uid=last_uid, after_failures=self.failures)
            self.connected.set()
            while True:
                self._check_stop()
                last_uid = self._catch_up(client, caps, uidvalidity, last_uid)
                self._healthy = True
                if use_idle:
                    self._idle_wait(client)
                elif self._stopping.wait(self.options.poll_interval):
                    raise _Stopping
        finally:
            self.connected.clear()
            # No LOGOUT: on a dead connection it would wait for the read timeout.
            with contextlib.suppress(Exception):
                client.shutdown()

    def _check_stop(self) -> None:
        if self._stopping.is_set():
            raise _Stopping

    # ------------------------------------------------------------------ taking messages

    def _catch_up(self, client: IMAPClient, caps: set[bytes], uidvalidity: int,
                  last_uid: int) -> int:
        """Take everything above `last_uid`; return the new cursor."""
        while True:
            _pop_new_mail_notices(client)
            # "N:*" always matches the highest UID, even below N: filter.
            found = client.search(["UID", f"{last_uid + 1}:*"])
            uids = sorted(int(u) for u in found if int(u) > last_uid)
            if not uids:
                if _pop_new_mail_notices(client):
                    # Mail arrived while the server ran the SEARCH: announced with its
                    # response, not part of its result, and not announced again in IDLE.
                    continue
                return last_uid
            for batch in _batches(uids, self.options.batch_size):
                self._check_stop()
                last_uid = self._take(client, caps, uidvalidity, batch, last_uid)

    def _take(self, client: IMAPClient, caps: set[bytes], uidvalidity: int,
              batch: list[int], last_uid: int) -> int:
        a = self.account
        wanted = self._not_too_large(client, batch)
        fetched = client.fetch(wanted, ["BODY.PEEK[]"]) if wanted else {}
        pending: list[tuple[int, Future[None]]] = []
        for uid in wanted:
            item = fetched.get(uid)
            raw = item.get(b"BODY[]") if item else None
            if raw is None:  # expunged by someone else since the SEARCH: nothing to take
                continue
            env = Envelope(channel="imap", mail_from=return_path(raw),
                           rcpt_to=[a.address], raw=bytes(raw),
                           extra={"imap_account": a.name, "uid": uid,
                                  "uidvalidity": uidvalidity})
            pending.append((uid, self._submit(env)))
        committed: list[int] = []
        failure: BaseException | None = None
        for uid, fut in pending:
            try:
                self._wait(fut)
                committed.append(uid)
            except Exception as exc:
                failure = failure or exc
        if committed:
            self._after(client, caps, committed)
            self.taken += len(committed)
        # The cursor passes only UIDs all of whose predecessors in the batch are stored (or
        # were left out: expunged meanwhile, or too large).
        done = set(committed) | {u for u in batch if u not in {p[0] for p in pending}}
        advance = last_uid
        for uid in batch:
            if uid not in done:
                break
            advance = uid
        if advance != last_uid:
            self._save_cursor(uidvalidity, advance)
        if committed:
            self._log.debug("imap_taken", uids=committed, cursor=advance)
        if failure is not None:
            raise failure
        return advance

    def _not_too_large(self, client: IMAPClient, batch: list[int]) -> list[int]:
        """The UIDs of `batch` within the size limit. The others are never fetched (a
        mailbox may hold a message far larger than memory should): they stay where they
        are, flagged for a person to see, and the cursor passes them."""
        if self.max_size is None:
            return batch
        limit = self.max_size()
        sizes = {uid: int(item.get(b"RFC822.SIZE", 0))
                 for uid, item in client.fetch(batch, ["RFC822.SIZE"]).items()}
        too_large = {uid: size for uid, size in sizes.items() if size > limit}
        if not too_large:
            return batch
        client.add_flags(sorted(too_large), [FLAGGED], silent=True)
        self.too_large += len(too_large)
        for uid, size in sorted(too_large.items()):
            self._log.error("imap_message_too_large", uid=uid, size=size, limit=limit,
                            action="left in the mailbox, flagged; not taken")
        return [uid for uid in batch if uid not in too_large]

    def _submit(self, env: Envelope) -> Future[None]:
        loop = self._loop
        if loop is None or loop.is_closed():
            raise _Stopping
        return asyncio.run_coroutine_threadsafe(self._accept_one(env), loop)

    async def _accept_one(self, env: Envelope) -> None:
        await self.accept(env)

    def _wait(self, fut: Future[None]) -> None:
        while True:
            try:
                fut.result(timeout=1.0)
                return
            except TimeoutError:
                loop = self._loop
                if loop is None or loop.is_closed():
                    raise _Stopping from None

    def _after(self, client: IMAPClient, caps: set[bytes], uids: list[int]) -> None:
        """Tell the server the batch is stored: the account's `after` action."""
        a = self.account
        if a.after == "seen":
            client.add_flags(uids, [SEEN], silent=True)
        elif a.after == "move":
            assert a.move_to, "checked by settings: after = move needs move_to"
            client.add_flags(uids, [SEEN], silent=True)
            if b"MOVE" in caps:
                client.move(uids, a.move_to)
            else:
                client.copy(uids, a.move_to)
                self._delete(client, caps, uids)
        else:
            self._delete(client, caps, uids)

    @staticmethod
    def _delete(client: IMAPClient, caps: set[bytes], uids: list[int]) -> None:
        client.add_flags(uids, [DELETED], silent=True)
        if b"UIDPLUS" in caps:
            client.uid_expunge(uids)   # only ours, not what someone else marked \Deleted
        else:
            client.expunge()

    # ------------------------------------------------------------------ waiting

    def _idle_wait(self, client: IMAPClient) -> None:
        """IDLE until the server reports new mail, the renewal time comes, or stop."""
        client.idle()
        self.idle_rounds += 1
        renew_at = time.monotonic() + self.options.idle_renew
        while True:
            remaining = renew_at - time.monotonic()
            if remaining <= 0:
                break
            span = min(remaining, 60.0)
            with self._lock:
                if self._stopping.is_set():
                    raise _Stopping
                self._idle_sock = client.socket()
            started = time.monotonic()
            try:
                responses = client.idle_check(timeout=span)
            finally:
                with self._lock:
                    self._idle_sock = None
            self._check_stop()
            for resp in responses:
                if len(resp) >= 1 and resp[0] == b"BYE":
                    raise ImapSessionEnded(f"server said BYE: {resp[1:]!r}")
            if any(len(r) >= 2 and r[1] in (b"EXISTS", b"RECENT") for r in responses):
                break
            if not responses and time.monotonic() - started < span * 0.5:
                # idle_check reports EOF as "no responses": leave IDLE; DONE on a closed
                # connection raises, on a live one it costs a round trip.
                break
        client.idle_done()

    # ------------------------------------------------------------------ the cursor

    def _load_cursor(self, uidvalidity: int) -> int:
        a = self.account
        with self.engine.connect() as conn:
            row = conn.execute(
                select(T_IMAP_CURSOR.c.uidvalidity, T_IMAP_CURSOR.c.last_uid)
                .where(T_IMAP_CURSOR.c.account == a.name,
                       T_IMAP_CURSOR.c.folder == a.folder)).first()
        if row is None:
            self._save_cursor(uidvalidity, 0)
            return 0
        if int(row.uidvalidity) != uidvalidity:
            self._log.warning("imap_uidvalidity_changed", old=int(row.uidvalidity),
                              new=uidvalidity, old_last_uid=int(row.last_uid),
                              note="taking the folder again; duplicates are merged by dedupe")
            self._save_cursor(uidvalidity, 0)
            return 0
        return int(row.last_uid)

    def _save_cursor(self, uidvalidity: int, last_uid: int) -> None:
        dialect = sqlite if self._is_sqlite else postgresql
        stmt = dialect.insert(T_IMAP_CURSOR)
        stmt = stmt.on_conflict_do_update(
            index_elements=[T_IMAP_CURSOR.c.account, T_IMAP_CURSOR.c.folder],
            set_={"uidvalidity": stmt.excluded.uidvalidity, "last_uid": stmt.excluded.last_uid,
                  "updated_at": stmt.excluded.updated_at})
        write_rows(self.engine, stmt, [{
            "account": self.account.name, "folder": self.account.folder,
            "uidvalidity": uidvalidity, "last_uid": last_uid, "updated_at": self.clock()}])


def load_cursor(engine: Engine, account: str, folder: str = "INBOX") -> tuple[int, int] | None:
    """(uidvalidity, last_uid) stored for an account's folder, or None."""
    with engine.connect() as conn:
        row = conn.execute(
            select(T_IMAP_CURSOR.c.uidvalidity, T_IMAP_CURSOR.c.last_uid)
            .where(T_IMAP_CURSOR.c.account == account, T_IMAP_CURSOR.c.folder == folder)).first()
    return None if row is None else (int(row.uidvalidity), int(row.last_uid))


class ImapManager:
    """One `ImapIntake` per ``[[imap]]`` account of the live settings.

    Every `reload_interval` seconds it compares the accounts with the running ones and
    restarts what changed (an edited password_file needs no restart: it is read at connect).
    """

    def __init__(self, settings_provider: Callable[[], Settings], accept: Accept,
                 engine: Engine, *, clock: Clock = system_clock,
                 options: ImapOptions | None = None, on_error: ErrorHook | None = None,
                 reload_interval: float = 5.0) -> None:
        self.settings_provider = settings_provider
        self.accept = accept
        self.engine = engine
        self.clock = clock
        self.options = options or ImapOptions()
        self.on_error = on_error
        self.reload_interval = reload_interval
        self.intakes: dict[str, ImapIntake] = {}
        self._running: dict[str, tuple[ImapAccount, asyncio.Event, asyncio.Task[None]]] = {}
        self._log = log.get("router.intake.imap")

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.reconcile()
                except Exception as exc:  # a bad settings object must not end IMAP intake
                    self._log.error("imap_reconcile_failed",
                                    error=f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.reload_interval)
        finally:
            await self._stop_all(list(self._running))

    def _max_size(self) -> int:
        return self.settings_provider().smtp.max_message_size

    async def reconcile(self) -> None:
        settings = self.settings_provider()
        wanted = {a.name: a for a in settings.imap}
        stale = [name for name, (acct, _, task) in self._running.items()
                 if wanted.get(name) != acct or task.done()]
        await self._stop_all(stale)
        for name, acct in wanted.items():
            if name in self._running:
                continue
            intake = ImapIntake(acct, self.accept, self.engine, clock=self.clock,
                                options=self.options, on_error=self.on_error,
                                base_dir=settings.base_dir, max_size=self._max_size)
            stop = asyncio.Event()
            task = asyncio.create_task(intake.run(stop), name=f"imap-{name}")
            self._running[name] = (acct, stop, task)
            self.intakes[name] = intake
            self._log.info("imap_account_started", account=name, address=acct.address)

    async def _stop_all(self, names: list[str]) -> None:
        entries = [self._running.pop(n) for n in names if n in self._running]
        for name in names:
            self.intakes.pop(name, None)
        for _, stop, _task in entries:
            stop.set()
        for _, _, task in entries:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
