"""The console's HTML pages and forms (Jinja2, POST-redirect-GET, no front-end build).

Handlers are coroutines that read the request body and hand the database work to a thread
(`run_in_threadpool`), so the daemon's event loop (SMTP intake, outbox) never waits on a
query or on argon2.
"""

from __future__ import annotations

import re
import secrets
from typing import Any
from urllib.parse import quote, urlencode

from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from router import accounts, log
from router.accounts import Principal
from router.models import Account, Article, Attachment, Customer, TicketStatus
from router.web import queries, services
from router.web.auth import WebSession, csrf_ok, session_principal
from router.web.context import WebContext, ctx_of
from router.web.services import Forbidden, Invalid, NotFound

SAFE_INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "application/pdf",
                               "text/plain"})


# ---------------------------------------------------------------------------- plumbing

def _render(ctx: WebContext, request: Request, ws: WebSession, name: str,
            data: dict[str, Any], status: int = 200) -> Response:
    response = ctx.templates.TemplateResponse(
        request, name, {"csrf": ws.csrf, "settings": ctx.settings, **data}, status_code=status)
    if ws.fresh:
        ctx.sessions.store(request, response, ws)
    return response


def _error(ctx: WebContext, request: Request, ws: WebSession, me: Principal | None,
           status: int, message: str) -> Response:
    return _render(ctx, request, ws, "error.html",
                   {"me": me, "status": status, "message": message}, status)


def _local(path: str | None) -> str:
    """Only paths on this site: never an open redirect."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/queues"
    return path


def _login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def _user(ctx: WebContext, request: Request, session: Session
          ) -> tuple[WebSession, Principal | None]:
    ws = ctx.sessions.load(request)
    return ws, session_principal(session, ctx.settings, ws)


# ---------------------------------------------------------------------------- login

async def login_page(request: Request) -> Response:
    ctx = ctx_of(request)
    ws = ctx.sessions.load(request)
    return _render(ctx, request, ws, "login.html",
                   {"me": None, "next": _local(request.query_params.get("next")),
                    "error": None, "email": ""})


async def login(request: Request) -> Response:
    ctx = ctx_of(request)
    form = await request.form()
    return await run_in_threadpool(_login, ctx, request, form)


def _login(ctx: WebContext, request: Request, form: FormData) -> Response:
    ws = ctx.sessions.load(request)
    nxt = _local(str(form.get("next") or ""))
    if not csrf_ok(ws, form.get("csrf")):
        return _error(ctx, request, ws, None, 403, "The form expired or did not come from this "
                      "site. Reload the login page and try again.")
    email = accounts.normalize_address(str(form.get("email") or ""))[:320]
    password = str(form.get("password") or "")[:1024]
    ip = request.client.host if request.client else "?"
    wait = ctx.limiter.blocked(email, ip)
    if wait > 0:
        log.get("router.web").warning("login_throttled", email=email, ip=ip)
        response = _render(ctx, request, ws, "login.html",
                           {"me": None, "next": nxt, "email": email,
                            "error": f"Too many failed logins. Try again in "
                                     f"{int(wait // 60) + 1} minutes."}, 429)
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    with ctx.session() as session:
        account = accounts.by_email(session, email) if email else None
        ok = accounts.verify_password(account, password)
        principal = accounts.principal_for(ctx.settings, account) if ok and account else None
        if principal is None or account is None:
            ctx.limiter.failed(email, ip)
            log.get("router.web").warning("login_failed", email=email, ip=ip)
            return _render(ctx, request, ws, "login.html",
                           {"me": None, "next": nxt, "email": email,
                            "error": "Wrong address or password, or no access to any "
                                     "queue."}, 401)
        if accounts.needs_rehash(account):
            account.password_hash = accounts.hash_password(password)
            session.add(account)
            session.commit()
        ctx.limiter.succeeded(email, ip)
        log.get("router.web").info("login", email=email, ip=ip)
        fresh = WebSession(secrets.token_urlsafe(32), account.id, account.session_epoch)
    response = RedirectResponse(nxt, status_code=303)
    ctx.sessions.store(request, response, fresh)     # a new CSRF token: no session fixation
    return response


async def logout(request: Request) -> Response:
    ctx = ctx_of(request)
    form = await request.form()
    return await run_in_threadpool(_logout, ctx, request, form)


def _logout(ctx: WebContext, request: Request, form: FormData) -> Response:
    with ctx.session() as session:
        ws, me = _user(ctx, request, session)
        if not csrf_ok(ws, form.get("csrf")):
            return _error(ctx, request, ws, me, 403, "The form expired; reload and try again.")
        if me is not None:
            account = session.get(Account, me.account_id)
            if account is not None:
                account.session_epoch += 1    # ends this and every other session
                session.add(account)
                session.commit()
    response = RedirectResponse("/login", status_code=303)
    ctx.sessions.store(request, response, WebSession(secrets.token_urlsafe(32)))
    return response


# ---------------------------------------------------------------------------- queues

def _filter_from(params: Any, me: Principal) -> queries.QueueFilter:
    team = params.get("team") or ""
    if team and not me.can_see(team):
        raise Forbidden(f"you are not in team {team}")
    status = params.get("status") or "active"
    if status == "active":
        statuses: tuple[str, ...] = queries.ACTIVE
    elif status == "all":
        statuses = TicketStatus.ALL
    elif status in TicketStatus.ALL:
        statuses = (status,)
    else:
        raise Invalid(f"unknown status {status!r}")
    assignee = params.get("assignee") or None
    if assignee == "me":
        assignee = me.email
    sort = params.get("sort") or "newest"
    if sort not in queries.SORTS:
        raise Invalid(f"unknown sort {sort!r}")
    priority = params.get("priority") or None
    if priority and priority not in services.PRIORITIES:
        raise Invalid(f"unknown priority {priority!r}")
    try:
        limit = int(params.get("limit") or 50)
    except ValueError:
        raise Invalid("limit must be a number") from None
    return queries.QueueFilter(teams=(team,) if team else me.teams, statuses=statuses,
                               priority=priority, assignee=assignee,
                               tag=(params.get("tag") or None), sort=sort, limit=limit)


async def queues_page(request: Request) -> Response:
    return await run_in_threadpool(_queues_page, ctx_of(request), request)


def _queues_page(ctx: WebContext, request: Request) -> Response:
    with ctx.session() as session:
        ws, me = _user(ctx, request, session)
        if me is None:
            return _login_redirect(request)
        params = request.query_params
        try:
            f = _filter_from(params, me)
        except Forbidden as exc:
            return _error(ctx, request, ws, me, 403, str(exc))
        except Invalid as exc:
            return _error(ctx, request, ws, me, 400, str(exc))
        after = queries.Cursor.decode(params.get("after"))
        now = ctx.now()
        rows, nxt = queries.queue(session, f, after, now)
        counts = queries.counts(session, me.teams)
    keep = {k: v for k, v in params.items() if k not in ("after", "partial") and v}
    next_url = f"/queues?{urlencode({**keep, 'after': nxt.encode()})}" if nxt else None
    first_url = f"/queues?{urlencode(keep)}" if after else None
    name = "queue_rows.html" if params.get("partial") == "1" else "queues.html"
    return _render(ctx, request, ws, name, {
        "me": me, "rows": rows, "counts": counts, "params": keep, "next_url": next_url,
        "first_url": first_url, "statuses": TicketStatus.ALL,
        "priorities": services.PRIORITIES, "sorts": queries.SORTS})


# ---------------------------------------------------------------------------- a ticket

async def ticket_page(request: Request) -> Response:
    return await run_in_threadpool(_ticket_page, ctx_of(request), request)


def _ticket_page(ctx: WebContext, request: Request) -> Response:
    with ctx.session() as session:
        ws, me = _user(ctx, request, session)
        if me is None:
            return _login_redirect(request)
        try:
            ticket = services.load_ticket(session, me, int(request.path_params["id"]))
        except NotFound as exc:
            return _error(ctx, request, ws, me, 404, str(exc))
        except Forbidden as exc:
            return _error(ctx, request, ws, me, 403, str(exc))
        view = queries.ticket_view(session, ctx.settings, me, ticket, ctx.now())
    return _render(ctx, request, ws, "ticket.html",
                   {"me": me, **view, "priorities": services.PRIORITIES,
                    "token": ctx.settings.router.ticket_token.replace("{id}", str(ticket.id))})


_ACTIONS = ("claim", "assign", "reply", "note", "move", "priority", "tags", "status", "merge")


async def ticket_action(request: Request) -> Response:
    ctx = ctx_of(request)
    form = await request.form()
    return await run_in_threadpool(_ticket_action, ctx, request, form)


def _ticket_action(ctx: WebContext, request: Request, form: FormData) -> Response:
    action = request.path_params["action"]
    with ctx.session() as session:
        ws, me = _user(ctx, request, session)
        if not csrf_ok(ws, form.get("csrf")):
            return _error(ctx, request, ws, me, 403, "The form expired or did not come from "
                          "this site (missing or wrong CSRF token). Reload and try again.")
        if me is None:
            return _login_redirect(request)
        if action not in _ACTIONS:
            return _error(ctx, request, ws, me, 404, f"no action {action}")
        tid = int(request.path_params["id"])
        now = ctx.now()
        settings = ctx.settings
        target_id = tid
        wake = False
        try:
            ticket = services.load_ticket(session, me, tid)
            text = str(form.get("text") or "")
            if action == "claim":
                services.assign(session, settings, me, ticket, me.email, now)
            elif action == "assign":
                services.assign(session, settings, me, ticket, str(form.get("assignee") or ""),
                                now)
            elif action == "reply":
                services.reply(session, settings, me, ticket, text, now,
                               status_after=str(form.get("status_after") or "pending"))
                wake = True
            elif action == "note":
                services.note(session, me, ticket, text, now)
            elif action == "move":
                services.move(session, settings, me, ticket, str(form.get("team") or ""), now)
                wake = True
            elif action == "priority":
                services.set_priority(session, me, ticket, str(form.get("priority") or ""),
                                      now)
            elif action == "tags":
                services.set_tags(session, me, ticket, str(form.get("tags") or ""), now)
            elif action == "status":
                services.change_status(session, settings, me, ticket,
                                       str(form.get("do") or ""), now)
                wake = True
            elif action == "merge":
                raw = re.sub(r"\D", "", str(form.get("target") or ""))
                if not raw:
                    raise Invalid("give the number of the ticket to merge into")
                target = services.load_ticket(session, me, int(raw))
                services.merge(session, settings, me, ticket, target, now)
                target_id = int(raw)
                wake = True
            session.commit()
        except NotFound as exc:
            return _error(ctx, request, ws, me, 404, str(exc))
        except Forbidden as exc:
            return _error(ctx, request, ws, me, 403, str(exc))
        except Invalid as exc:
            return _error(ctx, request, ws, me, 400, str(exc))
    ctx.wake_outbox()
    if wake:
        ctx.wake_scheduler()
    if action == "move" and not me.can_see(ticket.team):
        return RedirectResponse("/queues", status_code=303)
    return RedirectResponse(f"/tickets/{target_id}", status_code=303)


# ---------------------------------------------------------------------------- attachments

def content_disposition(filename: str | None) -> str:
    name = filename or "attachment"
    ascii_name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:120] or "attachment"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name[:200], safe='')}"


async def attachment(request: Request) -> Response:
    return await run_in_threadpool(_attachment, ctx_of(request), request)


def _attachment(ctx: WebContext, request: Request) -> Response:
    with ctx.session() as session:
        ws, me = _user(ctx, request, session)
        if me is None:
            return _login_redirect(request)
        att = session.get(Attachment, int(request.path_params["id"]))
        article = session.get(Article, att.article_id) if att is not None else None
        try:
            if att is None or article is None:
                raise NotFound("no such attachment")
            services.load_ticket(session, me, article.ticket_id)
        except NotFound as exc:
            return _error(ctx, request, ws, me, 404, str(exc))
        except Forbidden as exc:
            return _error(ctx, request, ws, me, 403, str(exc))
        ctype = att.content_type.lower().split(";")[0].strip()
        safe = ctype if ctype in SAFE_INLINE_TYPES else "application/octet-stream"
        return Response(att.data, media_type=safe, headers={
            "Content-Disposition": content_disposition(att.filename),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, no-store"})


# ---------------------------------------------------------------------------- a customer

async def customer_page(request: Request) -> Response:
    return await run_in_threadpool(_customer_page, ctx_of(request), request)


def _customer_page(ctx: WebContext, request: Request) -> Response:
    with ctx.session() as session:
        ws, me = _user(ctx, request, session)
        if me is None:
            return _login_redirect(request)
        customer = session.get(Customer, int(request.path_params["id"]))
        if customer is None or customer.id is None:
            return _error(ctx, request, ws, me, 404, "no such customer")
        rows = queries.customer_tickets(session, me, customer.id, limit=200)
        if not any(r["visible"] for r in rows):
            # Only people who work one of the customer's tickets see the customer.
            return _error(ctx, request, ws, me, 403, "this customer has no ticket in your "
                          "teams")
    return _render(ctx, request, ws, "customer.html",
                   {"me": me, "customer": customer, "rows": rows})


async def home(request: Request) -> Response:
    return RedirectResponse("/queues", status_code=303)
