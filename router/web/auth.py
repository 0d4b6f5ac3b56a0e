"""Sessions, CSRF and login throttling for the console; bearer tokens for the API.

Sessions are signed cookies (itsdangerous, HMAC-SHA1 over a key kept in the database, 12 h
lifetime) holding the account id, the account's `session_epoch` and a CSRF token. The epoch
makes them revocable: logging out, a password change or disabling the account bumps it and
every cookie issued before stops working. Cookies are HttpOnly, SameSite=Lax, and Secure
when the console is reached over HTTPS (directly or through a proxy that says so).

Every POST form carries the session's CSRF token (compared in constant time); the login form
too, with the token of the anonymous session, so nobody can log a victim into their account.
The API takes no cookies at all, only ``Authorization: Bearer``, so CSRF does not apply there.

Login throttling (in memory, per process): after 5 failures for one address from one IP
within 15 minutes that pair is refused (429) until the window passes, and after 20 failures
for one address from anywhere the address is; a success clears its pair. A refused attempt
does not check the password, so guessing costs nothing but time.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlmodel import Session
from starlette.requests import Request
from starlette.responses import Response

from router.accounts import Principal, account_for_token, principal_for
from router.models import Account
from router.settings import Settings

COOKIE = "router_session"
SESSION_AGE = 12 * 3600


@dataclass
class WebSession:
    csrf: str
    account_id: int | None = None
    epoch: int = 0
    fresh: bool = False            # made in this request: the cookie must be (re)set


class Sessions:
    def __init__(self, secret: str) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="router.web.session")

    def load(self, request: Request) -> WebSession:
        raw = request.cookies.get(COOKIE)
        if raw:
            try:
                data = self._s.loads(raw, max_age=SESSION_AGE)
            except BadSignature:
                data = None
            if isinstance(data, dict) and isinstance(data.get("c"), str):
                aid = data.get("a")
                return WebSession(data["c"], aid if isinstance(aid, int) else None,
                                  int(data.get("e", 0)))
        return WebSession(secrets.token_urlsafe(32), fresh=True)

    def store(self, request: Request, response: Response, ws: WebSession) -> None:
        value = self._s.dumps({"c": ws.csrf, "a": ws.account_id, "e": ws.epoch})
        response.set_cookie(COOKIE, value, max_age=SESSION_AGE, httponly=True, samesite="lax",
                            secure=is_https(request), path="/")


def is_https(request: Request) -> bool:
    return (request.url.scheme == "https"
            or request.headers.get("x-forwarded-proto", "").lower() == "https")


def csrf_ok(ws: WebSession, given: object) -> bool:
    return (isinstance(given, str) and bool(given) and not ws.fresh
            and hmac.compare_digest(given.encode(), ws.csrf.encode()))


def session_principal(session: Session, settings: Settings, ws: WebSession) -> Principal | None:
    if ws.account_id is None:
        return None
    account = session.get(Account, ws.account_id)
    if account is None or account.session_epoch != ws.epoch:
        return None
    return principal_for(settings, account)


def bearer_principal(session: Session, settings: Settings, request: Request, now: Any
                     ) -> Principal | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    found = account_for_token(session, token.strip())
    if found is None:
        return None
    account, row = found
    # Written at most once a minute per token: a busy integration must not turn every
    # read into a write.
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        row.last_used_at = now
        session.add(row)
        session.commit()
    return principal_for(settings, account)


# ---------------------------------------------------------------------------- throttling

@dataclass
class LoginLimiter:
    per_pair: int = 5
    per_account: int = 20
    window: float = 15 * 60
    clock: Callable[[], float] = time.monotonic
    _fails: dict[tuple[str, str], deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def blocked(self, email: str, ip: str) -> float:
        """Seconds until the next attempt is allowed (0: allowed now)."""
        now = self.clock()
        with self._lock:
            waits = []
            for key, cap in (((email, ip), self.per_pair), ((email, "*"), self.per_account)):
                q = self._recent(key, now)
                if len(q) >= cap:
                    waits.append(q[len(q) - cap] + self.window - now)
            return max(waits, default=0.0)

    def failed(self, email: str, ip: str) -> None:
        now = self.clock()
        with self._lock:
            for key in ((email, ip), (email, "*")):
                self._recent(key, now).append(now)
            if len(self._fails) > 100_000:      # bounded memory under a spray of addresses
                for k in [k for k, q in self._fails.items() if not q][:50_000]:
                    del self._fails[k]

    def succeeded(self, email: str, ip: str) -> None:
        with self._lock:
            self._fails.pop((email, ip), None)
