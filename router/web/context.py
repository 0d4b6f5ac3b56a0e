"""What every request handler needs: database, live settings, clock, wake-ups, templates."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session
from starlette.requests import Request
from starlette.templating import Jinja2Templates

from router.clock import Clock
from router.settings import Settings
from router.web.auth import LoginLimiter, Sessions

HERE = Path(__file__).resolve().parent


def _age(seconds: int | float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


def _when(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M UTC")


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.autoescape = True           # every template, whatever its name
    env.filters["age"] = _age
    env.filters["when"] = _when
    return templates


@dataclass
class WebContext:
    engine: Engine
    settings_provider: Callable[[], Settings]
    clock: Clock
    sessions: Sessions
    wake_outbox: Callable[[], None] = lambda: None
    wake_scheduler: Callable[[], None] = lambda: None
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    templates: Jinja2Templates = field(default_factory=make_templates)

    @property
    def settings(self) -> Settings:
        return self.settings_provider()

    def now(self) -> datetime:
        return self.clock()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            try:
                yield s
            except BaseException:
                s.rollback()
                raise


def ctx_of(request: Request) -> WebContext:
    ctx: Any = request.app.state.ctx
    assert isinstance(ctx, WebContext)
    return ctx
