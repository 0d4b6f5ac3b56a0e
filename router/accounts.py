"""Accounts of the web console and the API: who someone is, and which queues they may see.

- Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106 "low memory").
- API tokens are 256 random bits, shown once and stored as their SHA-256: a token is not a
  password, so a fast hash is right, and the lookup is one indexed equality.
- Roles: ``agent`` and ``lead`` must be members of at least one team in router.toml and see
  exactly those teams; ``admin`` sees every team. Membership is read from the live config on
  every request, so removing someone from router.toml takes their access away at once.

`router user add EMAIL --role agent|lead|admin [--password-file F]`,
`router user passwd EMAIL [--password-file F]`, `router user token EMAIL [--name N]`,
`router user list [--json]`, `router user disable EMAIL`.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import secrets
import sys
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from router.clock import Clock, system_clock
from router.mail import normalize_address
from router.models import Account, ApiToken, WebSecret
from router.settings import Settings

ROLES = ("agent", "lead", "admin")
MIN_PASSWORD = 10
TOKEN_PREFIX = "rt_"

_hasher = PasswordHasher()


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # Verified against when the account does not exist, so a login for an unknown address
    # takes as long as one with a wrong password (no account enumeration by timing).
    return _hasher.hash(secrets.token_urlsafe(16))


class AccountError(Exception):
    """Something the admin can fix (unknown address, weak password ...)."""


@dataclass(frozen=True)
class Principal:
    """A logged-in person (or API token holder) as seen by one request."""

    account_id: int
    email: str
    role: str
    teams: tuple[str, ...]         # teams whose queues they may see and work

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_lead(self) -> bool:
        return self.role in ("lead", "admin")

    def can_see(self, team: str) -> bool:
        return team in self.teams


def member_teams(settings: Settings, email: str) -> tuple[str, ...]:
    email = email.lower()
    return tuple(t.name for t in settings.team if t.member(email) is not None)


def principal_for(settings: Settings, account: Account) -> Principal | None:
    """None when the account may not use the console now (disabled, or no longer a member of
    any team while not an admin)."""
    if account.disabled or account.id is None:
        return None
    if account.role == "admin":
        teams = tuple(t.name for t in settings.team)
    else:
        teams = member_teams(settings, account.email)
        if not teams:
            return None
    return Principal(account.id, account.email, account.role, teams)


# ---------------------------------------------------------------------------- passwords

def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise AccountError("a password may have at most 1024 characters")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(account: Account | None, password: str) -> bool:
    """Constant work whether or not the account exists; never raises."""
    stored = account.password_hash if account is not None else None
    try:
        return _hasher.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(account: Account) -> bool:
    return bool(account.password_hash) and _hasher.check_needs_rehash(account.password_hash or "")


def by_email(session: Session, email: str) -> Account | None:
    return session.exec(select(Account).where(Account.email == normalize_address(email))).first()


def create_account(session: Session, settings: Settings, email: str, role: str,
                   password: str | None, now: datetime) -> Account:
    email = normalize_address(email)
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}")
    if role != "admin" and not member_teams(settings, email):
        raise AccountError(f"{email} is not a member of any team in {settings.source}; add it "
                           "to a team's members (or use --role admin)")
    if by_email(session, email) is not None:
        raise AccountError(f"account {email} exists already (use `router user passwd`)")
    if password is not None:
        check_password_strength(password)
    account = Account(email=email, role=role,
                      password_hash=hash_password(password) if password else None,
                      created_at=now, updated_at=now)
    session.add(account)
    try:
        session.flush()
    except IntegrityError as exc:
        raise AccountError(f"account {email} exists already") from exc
    return account


def set_password(session: Session, account: Account, password: str, now: datetime) -> None:
    check_password_strength(password)
    account.password_hash = hash_password(password)
    account.session_epoch += 1        # every existing session ends
    account.updated_at = now
    session.add(account)


# ---------------------------------------------------------------------------- API tokens

def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token(session: Session, account: Account, name: str, now: datetime) -> str:
    assert account.id is not None
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(account_id=account.id, token_hash=hash_token(token), name=name,
                         created_at=now))
    session.flush()
    return token


def account_for_token(session: Session, token: str) -> tuple[Account, ApiToken] | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(token))).first()
    if row is None or row.revoked:
        return None
    account = session.get(Account, row.account_id)
    if account is None or account.disabled:
        return None
    return account, row


# ---------------------------------------------------------------------------- session key

def session_secret(session: Session, now: datetime) -> str:
    """The cookie-signing key, made once per database."""
    row = session.exec(select(WebSecret).order_by(col(WebSecret.id))).first()
    if row is not None:
        return row.secret
    session.add(WebSecret(secret=secrets.token_urlsafe(48), created_at=now))
    session.commit()
    # Two instances starting together: whichever row came first is the key for both.
    first = session.exec(select(WebSecret).order_by(col(WebSecret.id))).first()
    assert first is not None
    return first.secret


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    inner = argparse.ArgumentParser(add_help=False)
    inner.add_argument("-c", "--config", default=argparse.SUPPRESS,
                       help="router.toml to use (default: $ROUTER_CONFIG or ./router.toml)")
    sub = parser.add_subparsers(dest="user_command", required=True)
    p = sub.add_parser("add", parents=[inner], help="create a console account")
    p.add_argument("email")
    p.add_argument("--role", choices=ROLES, default="agent")
    p.add_argument("--password-file", help="read the password from this file's first line "
                   "(default: ask on the terminal)")
    p = sub.add_parser("passwd", parents=[inner], help="set an account's password (and end "
                       "its sessions)")
    p.add_argument("email")
    p.add_argument("--password-file")
    p = sub.add_parser("token", parents=[inner], help="make an API token (printed once)")
    p.add_argument("email")
    p.add_argument("--name", default="")
    p = sub.add_parser("list", parents=[inner], help="the accounts")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("disable", parents=[inner], help="lock an account out (sessions and "
                       "tokens)")
    p.add_argument("email")


def _read_password(path: str | None, confirm: bool = True) -> str:
    if path:
        text = Path(path).read_text(encoding="utf-8")
        return text.splitlines()[0] if text else ""
    if not sys.stdin.isatty():
        raise AccountError("no terminal to ask for the password: give --password-file")
    first = getpass.getpass("password: ")
    if confirm and getpass.getpass("again: ") != first:
        raise AccountError("the passwords differ")
    return first


def cli_main(args: argparse.Namespace) -> int:
    """`router user ...`"""
    from router import settings as config

    try:
        settings = config.load(args.config)
    except config.ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return 78  # EX_CONFIG
    return run(settings, args)


def run(settings: Settings, args: argparse.Namespace, clock: Clock = system_clock) -> int:
    from router import db
    from router.app import prepare_database

    prepare_database(settings)     # SQLite: migrate; PostgreSQL: refuse a stale schema
    engine = db.make_engine(settings.database_url, immediate=True)
    now = clock()
    try:
        with db.session_scope(engine) as session:
            cmd = args.user_command
            if cmd == "list":
                rows = session.exec(select(Account).order_by(col(Account.email))).all()
                data: list[dict[str, Any]] = [
                    {"email": a.email, "role": a.role, "disabled": a.disabled,
                     "teams": list(member_teams(settings, a.email)),
                     "has_password": a.password_hash is not None} for a in rows]
                if args.json:
                    print(json.dumps({"accounts": data}, indent=2))
                else:
                    for d in data:
                        print(f"{d['email']:<40} {d['role']:<6} "
                              f"{'disabled ' if d['disabled'] else ''}"
                              f"{','.join(d['teams']) or '-'}")
                return 0
            if cmd == "add":
                password = _read_password(args.password_file)
                create_account(session, settings, args.email, args.role, password, now)
                print(f"account {normalize_address(args.email)} ({args.role}) created")
                return 0
            account = by_email(session, args.email)
            if account is None:
                raise AccountError(f"no account {args.email} (create it with `router user "
                                   "add`)")
            if cmd == "passwd":
                set_password(session, account, _read_password(args.password_file), now)
                print(f"password of {account.email} changed; its sessions have ended")
            elif cmd == "token":
                print(new_token(session, account, args.name, now))
            elif cmd == "disable":
                account.disabled = True
                account.session_epoch += 1
                account.updated_at = now
                session.add(account)
                print(f"account {account.email} disabled")
        return 0
    except (AccountError, OSError) as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
