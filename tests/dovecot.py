"""A real Dovecot IMAP server for tests and benchmarks: private config, passwd-file, Maildirs
and port, started with ``dovecot -F -c CONFIG`` and stopped/restarted at will.

Nothing of the system's Dovecot is used but the binary. Running as root (CI), the mail
processes run as ``nobody`` chrooted into the mail directory, so they need no access to the
(root-only) directories above it; the login processes run as ``dovenull``, which the
``dovecot-core`` package creates. Running as another user, everything runs as that user.

The module fails (never skips) when the ``dovecot`` binary is missing: the suite needs it.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imapclient import IMAPClient

PASSWORD = "secret"
INSTALL_HINT = ("the IMAP tests need Dovecot's `dovecot` binary: apt-get install -y "
                "dovecot-imapd (scripts/test installs it)")


def dovecot_binary() -> str:
    """Path of the dovecot binary, or raise RuntimeError naming the package to install."""
    found = shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise RuntimeError(INSTALL_HINT)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _identity() -> dict[str, Any]:
    """Users and ids the Dovecot processes run as."""
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
            pwd.getpwnam("dovenull")
        except KeyError as exc:
            raise RuntimeError(f"user {exc} is missing; {INSTALL_HINT}") from None
        return {"root": True, "internal": "root", "login": "dovenull", "group": "root",
                "uid": nobody.pw_uid, "gid": nobody.pw_gid}
    me = pwd.getpwuid(os.geteuid())
    return {"root": False, "internal": me.pw_name, "login": me.pw_name,
            "group": grp.getgrgid(me.pw_gid).gr_name, "uid": me.pw_uid, "gid": me.pw_gid}


CONFIG = """\
# Written by tests/dovecot.py for one test; everything lives under {directory}.
base_dir = {base_dir}
state_dir = {directory}/state
log_path = {directory}/dovecot.log
info_log_path = {directory}/dovecot.log
listen = 127.0.0.1
protocols = imap
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {internal}
default_internal_group = {internal_group}
default_login_user = {login}
first_valid_uid = 1
first_valid_gid = 1
{chroot}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 50
shutdown_clients = yes
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = {directory}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={home}
}}
service imap-login {{
  {no_chroot}
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service imap {{
  process_limit = 100
}}
# No growing auth penalty (2, 4, 8 ... 15 s) for the tests' repeated wrong passwords.
service anvil {{
  {no_chroot}
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol imap {{
  {capability}
  imap_idle_notify_interval = 2 mins
}}
{extra}
"""


@dataclass
class Dovecot:
    """One private Dovecot. `users` maps user name to password."""

    directory: Path
    port: int
    users: dict[str, str]
    idle: bool = True
    move: bool = True
    extra_config: str = ""
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _base_dir: str = field(default="", repr=False)

    # ------------------------------------------------------------------ lifecycle

    def write_config(self) -> Path:
        ident = _identity()
        self.directory.mkdir(parents=True, exist_ok=True)
        mail = self.directory / "mail"
        mail.mkdir(exist_ok=True)
        if not self._base_dir:
            # Unix socket paths are limited to 108 bytes; tmp_path can be deep.
            self._base_dir = tempfile.mkdtemp(prefix="dv-")
        (self.directory / "passwd").write_text(
            "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items()), encoding="utf-8")
        for user in self.users:
            user_home = mail / user
            user_home.mkdir(exist_ok=True)
            if ident["root"]:
                os.chown(user_home, ident["uid"], ident["gid"])
        if ident["root"]:
            os.chown(mail, ident["uid"], ident["gid"])
            # "/./" chroots the mail process into `mail`: it needs no access to the
            # root-only directories above it (pytest's tmp_path).
            chroot = f"valid_chroot_dirs = {mail}"
            home = f"{mail}/./%u"
        else:
            chroot = ""
            home = f"{mail}/%u"
        # An older server: the CAPABILITY a client sees after login leaves out IDLE (the
        # client must poll) and/or MOVE (COPY + EXPUNGE). Dovecot would still obey the
        # commands; a client must not send what is not announced.
        caps = ""
        if not (self.idle and self.move):
            names = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "ENABLE", "NAMESPACE",
                     "UIDPLUS", "UNSELECT", "CHILDREN", "ESEARCH"]
            names += ["IDLE"] if self.idle else []
            names += ["MOVE"] if self.move else []
            caps = "imap_capability = " + " ".join(names)
        text = CONFIG.format(
            directory=self.directory, base_dir=self._base_dir, internal=ident["internal"],
            internal_group=ident["group"],
            login=ident["login"], chroot=chroot, uid=ident["uid"], gid=ident["gid"],
            home=home, port=self.port, capability=caps, extra=self.extra_config,
            # Without root, processes cannot chroot (Dovecot's "rootless" setup).
            no_chroot="" if ident["root"] else "chroot =")
        path = self.directory / "dovecot.conf"
        path.write_text(text, encoding="utf-8")
        return path

    @property
    def config_path(self) -> Path:
        return self.directory / "dovecot.conf"

    @property
    def log(self) -> str:
        try:
            return (self.directory / "dovecot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start and wait until the server greets on its port."""
        if self.running:
            return
        binary = dovecot_binary()
        config = self.write_config()
        out = (self.directory / "dovecot.out").open("ab")
        try:
            self.proc = subprocess.Popen([binary, "-F", "-c", str(config)],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited {self.proc.returncode} on start:\n"
                                   f"{self._output()}\n{self.log}")
            if self._greets():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not answer on port {self.port}:\n"
                                   f"{self._output()}\n{self.log}")
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful, as an init system does it: SIGTERM the master, then whatever of its
        process group is left (Dovecot's master leaves its imap processes running, which
        then say BYE to their clients on SIGTERM)."""
        self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 15.0) -> None:
        """A crash: SIGKILL the whole process group; clients just see their sockets close."""
        self._end(signal.SIGKILL, timeout)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        group = proc.pid  # start_new_session: the master leads its own process group
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGKILL:
                    os.killpg(group, sig)
                else:
                    proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                proc.wait(timeout)
        deadline = time.monotonic() + timeout
        if _group_alive(group):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
            while _group_alive(group) and time.monotonic() < deadline - timeout / 2:
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        # The port must be free before a restart can bind it again.
        while self._port_open() and time.monotonic() < deadline:
            time.sleep(0.02)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.kill()
        if self._base_dir:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = ""

    def _output(self) -> str:
        try:
            return (self.directory / "dovecot.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                return s.recv(64).startswith(b"* OK")
        except OSError:
            return False

    # ------------------------------------------------------------------ clients

    @contextlib.contextmanager
    def client(self, user: str, folder: str | None = "INBOX") -> Iterator[IMAPClient]:
        """A logged-in imapclient connection (a person's mail client, say)."""
        c = IMAPClient(self.host, self.port, ssl=False, timeout=30)
        try:
            c.login(user, self.users[user])
            if folder is not None:
                c.select_folder(folder)
            yield c
        finally:
            with contextlib.suppress(Exception):
                c.logout()

    def append(self, user: str, raw: bytes, folder: str = "INBOX",
               flags: Iterable[bytes] = ()) -> int:
        """APPEND one message; return its UID (from APPENDUID)."""
        with self.client(user, folder=None) as c:
            return append_with(c, raw, folder, flags)

    def uids(self, user: str, folder: str = "INBOX", criteria: str = "ALL") -> list[int]:
        with self.client(user, folder=None) as c:
            if not c.folder_exists(folder):
                return []
            c.select_folder(folder, readonly=True)
            return sorted(int(u) for u in c.search(criteria))

    def flags(self, user: str, folder: str = "INBOX") -> dict[int, tuple[bytes, ...]]:
        with self.client(user, folder=None) as c:
            c.select_folder(folder, readonly=True)
            uids = c.search("ALL")
            return {int(u): tuple(f) for u, f in c.get_flags(uids).items()} if uids else {}

    def create_folder(self, user: str, folder: str) -> None:
        with self.client(user, folder=None) as c:
            if not c.folder_exists(folder):
                c.create_folder(folder)

    def uidvalidity(self, user: str, folder: str = "INBOX") -> int:
        with self.client(user, folder=None) as c:
            return int(c.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"])

    def delete_folder_and_recreate(self, user: str, folder: str) -> None:
        """Give `folder` a new UIDVALIDITY (what a restore from backup does)."""
        with self.client(user, folder=None) as c:
            c.delete_folder(folder)
            c.create_folder(folder)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def append_with(c: IMAPClient, raw: bytes, folder: str = "INBOX",
                flags: Iterable[bytes] = ()) -> int:
    resp = c.append(folder, raw, flags=tuple(flags))
    # b'[APPENDUID 1795367842 1] Append completed ...'
    text = resp.decode() if isinstance(resp, bytes) else str(resp)
    return int(text.split("]", 1)[0].split()[-1])


@contextlib.contextmanager
def running_dovecot(directory: Path, users: Iterable[str] = ("intake",), *,
                    idle: bool = True, move: bool = True, port: int | None = None,
                    extra_config: str = "") -> Iterator[Dovecot]:
    """Start a private Dovecot with the given users (password `PASSWORD`); stop it after."""
    server = Dovecot(directory, port or free_port(), {u: PASSWORD for u in users}, idle=idle,
                     move=move, extra_config=extra_config)
    try:
        server.start()
        yield server
    finally:
        server.close()
