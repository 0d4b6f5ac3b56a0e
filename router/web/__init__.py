"""The agent console and the REST API (Starlette), served by uvicorn inside the daemon's loop.

`create_app` builds the ASGI app from an engine, a settings provider (the live config, so a
reload changes who sees which team at once) and a clock; `WebServer` runs it on the
``[web] listen`` address until the daemon stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router import accounts, log
from router.clock import Clock, system_clock
from router.settings import Settings
from router.web import api, pages
from router.web.auth import LoginLimiter, Sessions
from router.web.context import HERE, WebContext

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class SecurityHeaders:
    """CSP (no inline script: even a sanitiser bug cannot run customer script), no framing,
    no sniffing, no referrer leaks, no caching of pages with customer data."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [(b"content-security-policy", CSP.encode()),
                         (b"x-frame-options", b"DENY"),
                         (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"same-origin"),
                         (b"cross-origin-opener-policy", b"same-origin")]
                if not static:
                    extra.append((b"cache-control", b"no-store"))
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(engine: Engine, settings_provider: Callable[[], Settings], *,
               clock: Clock = system_clock, wake_outbox: Callable[[], None] | None = None,
               wake_scheduler: Callable[[], None] | None = None,
               limiter: LoginLimiter | None = None) -> Starlette:
    with Session(engine) as session:
        secret = accounts.session_secret(session, clock())
    ctx = WebContext(engine=engine, settings_provider=settings_provider, clock=clock,
                     sessions=Sessions(secret), limiter=limiter or LoginLimiter())
    if wake_outbox is not None:
        ctx.wake_outbox = wake_outbox
    if wake_scheduler is not None:
        ctx.wake_scheduler = wake_scheduler
    routes = [
        Route("/", pages.home),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/queues", pages.queues_page),
        Route("/tickets/{id:int}", pages.ticket_page),
        Route("/tickets/{id:int}/{action:str}", pages.ticket_action, methods=["POST"]),
        Route("/attachments/{id:int}", pages.attachment),
        Route("/customers/{id:int}", pages.customer_page),
        Route("/api/openapi.json", api.openapi),
        Route("/api/tickets", api.list_tickets),
        Route("/api/tickets/{id:int}", api.get_ticket),
        Route("/api/tickets/{id:int}/messages", api.get_messages),
        Route("/api/tickets/{id:int}/replies", api.post_reply, methods=["POST"]),
        Route("/api/queues", api.get_queues),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
    app.state.ctx = ctx
    return app


class _Server(uvicorn.Server):
    # uvicorn would take over SIGTERM/SIGINT; the daemon owns the signals and tells us.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    """uvicorn on the daemon's event loop."""

    def __init__(self, app: Any, host: str, port: int, engine: Engine | None = None) -> None:
        self.engine = engine            # disposed on stop, when the server owns it
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                lifespan="off", server_header=False, proxy_headers=False)
        self.server = _Server(config)
        self.task: asyncio.Task[None] | None = None
        self.host, self.port = host, port

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(), name="web")
        while not self.server.started:
            if self.task.done():
                # uvicorn logs a bind error and exits the task with SystemExit.
                with contextlib.suppress(SystemExit):
                    self.task.result()
                raise OSError(f"web server cannot listen on {self.host}:{self.port}")
            await asyncio.sleep(0.02)
        log.get("router.web").info("web_started", listen=f"http://{self.host}:{self.port}")

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.task
        self.task = None
        if self.engine is not None:
            self.engine.dispose()


async def start(settings_provider: Callable[[], Settings], url: str, *,
                wake_outbox: Callable[[], None] | None = None,
                wake_scheduler: Callable[[], None] | None = None) -> WebServer:
    """For app.py: a running server with an engine of its own; `await server.stop()`."""
    from router import db
    from router.settings import parse_hostport

    settings = settings_provider()
    # The console's transactions read, then write (claim, reply, the session secret): on
    # SQLite a deferred one fails with "database is locked" when the pipeline committed in
    # between, and no busy timeout helps. Taking the write lock at BEGIN waits instead; the
    # console's transactions are short and few.
    engine = db.make_engine(url, immediate=True)
    app = await asyncio.to_thread(create_app, engine, settings_provider,
                                  wake_outbox=wake_outbox, wake_scheduler=wake_scheduler)
    host, port = parse_hostport(settings.web.listen, "listen")
    server = WebServer(app, host, port, engine)
    try:
        await server.start()
    except BaseException:
        engine.dispose()
        raise
    return server
