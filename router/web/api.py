"""The REST API: JSON over HTTP with ``Authorization: Bearer TOKEN`` (`router user token`).

Shapes reuse router.queues (TICKET, MESSAGE, DECISION as `router tickets ... --json` prints
them), with the console's extra fields; fields are only ever added. The OpenAPI 3.1
description is at ``/api/openapi.json``.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router import __version__
from router.accounts import Principal
from router.queues import show_ticket
from router.web import queries, services
from router.web.auth import bearer_principal
from router.web.context import WebContext, ctx_of
from router.web.pages import _filter_from
from router.web.services import Forbidden, Invalid, NotFound

MAX_JSON = 1_000_000


def _problem(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="router"'} if status == 401 else None
    return JSONResponse({"error": message, "status": status}, status_code=status,
                        headers=headers)


def _auth(ctx: WebContext, request: Request, session: Session) -> Principal | None:
    return bearer_principal(session, ctx.settings, request, ctx.now())


def _guard(fn: Any) -> Any:
    """Map the services' exceptions to JSON problems; authenticate first."""
    def run(ctx: WebContext, request: Request, *args: Any) -> Response:
        with ctx.session() as session:
            me = _auth(ctx, request, session)
            if me is None:
                return _problem(401, "missing, unknown or revoked bearer token")
            try:
                result: Response = fn(ctx, request, session, me, *args)
                return result
            except NotFound as exc:
                return _problem(404, str(exc))
            except Forbidden as exc:
                return _problem(403, str(exc))
            except Invalid as exc:
                return _problem(400, str(exc))
    return run


@_guard
def _list(ctx: WebContext, request: Request, session: Session, me: Principal) -> Response:
    f = _filter_from(request.query_params, me)
    after = queries.Cursor.decode(request.query_params.get("after"))
    rows, nxt = queries.queue(session, f, after, ctx.now())
    return JSONResponse({"tickets": rows, "count": len(rows),
                         "next": nxt.encode() if nxt else None})


def _show_dict(session: Session, ctx: WebContext, me: Principal, ticket_id: int
               ) -> dict[str, Any]:
    ticket = services.load_ticket(session, me, ticket_id)
    data = show_ticket(session, ticket_id)
    assert data is not None
    data.update(queries.web_fields(ticket, [], ctx.now()))
    data["customer_tickets"] = [
        {k: v for k, v in r.items() if k != "visible"} | {"created_at": r["created_at"]
                                                           .isoformat()}
        for r in queries.customer_tickets(session, me, ticket.customer_id)]
    return data


@_guard
def _show(ctx: WebContext, request: Request, session: Session, me: Principal) -> Response:
    return JSONResponse(_show_dict(session, ctx, me, int(request.path_params["id"])))


@_guard
def _messages(ctx: WebContext, request: Request, session: Session, me: Principal) -> Response:
    data = _show_dict(session, ctx, me, int(request.path_params["id"]))
    return JSONResponse({"messages": data["messages"]})


@_guard
def _reply(ctx: WebContext, request: Request, session: Session, me: Principal,
           body: Any) -> Response:
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        raise Invalid('send a JSON object {"text": "...", "status": "pending"}')
    ticket = services.load_ticket(session, me, int(request.path_params["id"]))
    result = services.reply(session, ctx.settings, me, ticket, body["text"], ctx.now(),
                            status_after=str(body.get("status") or "pending"))
    session.commit()
    ctx.wake_outbox()
    ctx.wake_scheduler()
    return JSONResponse({"article_id": result.article_id, "outbox_id": result.outbox_id,
                         "message_id": result.message_id, "ticket_id": ticket.id},
                        status_code=201)


@_guard
def _queues(ctx: WebContext, request: Request, session: Session, me: Principal) -> Response:
    counts = queries.counts(session, me.teams)
    return JSONResponse({"queues": [{"team": t, "counts": counts.get(t, {})}
                                    for t in me.teams]})


async def list_tickets(request: Request) -> Response:
    return await run_in_threadpool(_list, ctx_of(request), request)


async def get_ticket(request: Request) -> Response:
    return await run_in_threadpool(_show, ctx_of(request), request)


async def get_messages(request: Request) -> Response:
    return await run_in_threadpool(_messages, ctx_of(request), request)


async def post_reply(request: Request) -> Response:
    raw = await request.body()
    if len(raw) > MAX_JSON:
        return _problem(413, "request too large")
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        body = None
    return await run_in_threadpool(_reply, ctx_of(request), request, body)


async def get_queues(request: Request) -> Response:
    return await run_in_threadpool(_queues, ctx_of(request), request)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_spec())


# ---------------------------------------------------------------------------- OpenAPI

def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
}
_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}


def openapi_spec() -> dict[str, Any]:
    ticket_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
    query = [
        {"name": "team", "in": "query", "schema": {"type": "string"},
         "description": "one of your teams (default: all of them)"},
        {"name": "status", "in": "query", "schema": {
            "type": "string",
            "enum": ["active", "all", "new", "open", "pending", "solved", "closed"]}},
        {"name": "priority", "in": "query", "schema": {
            "type": "string", "enum": list(services.PRIORITIES)}},
        {"name": "assignee", "in": "query", "schema": {"type": "string"},
         "description": "an address, `me`, or `none` for unassigned"},
        {"name": "tag", "in": "query", "schema": {"type": "string"},
         "description": "plus-address tag or campaign"},
        {"name": "sort", "in": "query", "schema": {"type": "string",
                                                   "enum": list(queries.SORTS)}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                    "maximum": queries.MAX_PAGE}},
        {"name": "after", "in": "query", "schema": {"type": "string"},
         "description": "the `next` cursor of the previous page"},
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "router API", "version": __version__,
                 "description": "Tickets, messages and replies of the teams you are in."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/tickets": {"get": {
                "operationId": "listTickets", "summary": "A page of tickets (keyset paging)",
                "parameters": query,
                "responses": {"200": _json_response("tickets", _ref("TicketPage")),
                              "400": {"$ref": "#/components/responses/BadRequest"},
                              **_ERRORS}}},
            "/api/tickets/{id}": {"get": {
                "operationId": "getTicket", "summary": "One ticket with its thread",
                "parameters": [ticket_id],
                "responses": {"200": _json_response("the ticket", _ref("TicketDetail")),
                              "404": {"$ref": "#/components/responses/NotFound"},
                              **_ERRORS}}},
            "/api/tickets/{id}/messages": {"get": {
                "operationId": "getMessages", "summary": "The ticket's messages",
                "parameters": [ticket_id],
                "responses": {"200": _json_response("messages", {
                    "type": "object", "required": ["messages"],
                    "properties": {"messages": {"type": "array",
                                                "items": _ref("Message")}}}),
                              "404": {"$ref": "#/components/responses/NotFound"},
                              **_ERRORS}}},
            "/api/tickets/{id}/replies": {"post": {
                "operationId": "postReply",
                "summary": "Answer the customer (through the outbox, threaded)",
                "parameters": [ticket_id],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _ref("ReplyRequest")}}},
                "responses": {"201": _json_response("queued", _ref("ReplyResult")),
                              "400": {"$ref": "#/components/responses/BadRequest"},
                              "404": {"$ref": "#/components/responses/NotFound"},
                              **_ERRORS}}},
            "/api/queues": {"get": {
                "operationId": "getQueues", "summary": "Ticket counts per team and status",
                "responses": {"200": _json_response("counts", {
                    "type": "object", "required": ["queues"],
                    "properties": {"queues": {"type": "array", "items": {
                        "type": "object", "required": ["team", "counts"],
                        "properties": {"team": {"type": "string"},
                                       "counts": {"type": "object", "additionalProperties": {
                                           "type": "integer"}}}}}}}),
                              **_ERRORS}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a token from `router user token`"}},
            "responses": {
                name: _json_response(text, _ref("Error"))
                for name, text in (("Unauthorized", "no valid bearer token"),
                                   ("Forbidden", "not one of your teams"),
                                   ("NotFound", "no such ticket"),
                                   ("BadRequest", "the request makes no sense"))},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "status"],
                          "properties": {"error": {"type": "string"},
                                         "status": {"type": "integer"}}},
                "Customer": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "email": {"type": "string"},
                    "name": {"type": "string"}}},
                "Ticket": {"allOf": [_ref("TicketBase"), {"type": "object", "properties": {
                    "messages": {"type": "integer", "description": "how many"}}}]},
                "TicketBase": {"type": "object", "required": ["id", "team", "status"],
                           "properties": {
                               "id": {"type": "integer"}, "team": {"type": "string"},
                               "status": {"type": "string"}, "priority": {"type": "string"},
                               "subject": {"type": "string"}, "customer": _ref("Customer"),
                               "address": {"type": "string"}, "tag": _NULLABLE_STR,
                               "language": _NULLABLE_STR, "assignee": _NULLABLE_STR,
                               "created_at": {"type": "string", "format": "date-time"},
                               "updated_at": {"type": "string", "format": "date-time"},
                               "first_response_at": _NULLABLE_TIME,
                               "promised_at": _NULLABLE_TIME,
                               "promise_basis": _NULLABLE_STR,
                               "promise_kept": {"type": ["boolean", "null"]},
                               "tags": {"type": "array", "items": {"type": "string"}},
                               "campaign": _NULLABLE_STR,
                               "age_seconds": {"type": "integer"},
                               "sla_state": {"type": "string"},
                               "sla_due_at": _NULLABLE_TIME, "next_due_at": _NULLABLE_TIME}},
                "TicketPage": {"type": "object", "required": ["tickets", "count", "next"],
                               "properties": {
                                   "tickets": {"type": "array", "items": _ref("Ticket")},
                                   "count": {"type": "integer"},
                                   "next": _NULLABLE_STR}},
                "Message": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "kind": {"type": "string",
                                                        "enum": ["in", "out", "note"]},
                    "automatic": {"type": "boolean"}, "message_id": _NULLABLE_STR,
                    "from": {"type": "string"}, "from_name": {"type": "string"},
                    "to": {"type": "array", "items": {"type": "string"}},
                    "subject": {"type": "string"}, "text": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "malformed": {"type": "boolean"},
                    "defects": {"type": "array", "items": {"type": "string"}},
                    "attachments": {"type": "array", "items": {"type": "object"}}}},
                "TicketDetail": {"allOf": [_ref("TicketBase"), {"type": "object", "properties": {
                    "messages": {"type": "array", "items": _ref("Message")},
                    "decisions": {"type": "array", "items": {"type": "object"}},
                    "events": {"type": "array", "items": {"type": "object"}},
                    "customer_tickets": {"type": "array", "items": {"type": "object"}}}}]},
                "ReplyRequest": {"type": "object", "required": ["text"], "properties": {
                    "text": {"type": "string", "minLength": 1},
                    "status": {"type": "string", "enum": ["open", "pending", "solved"],
                               "default": "pending"}}},
                "ReplyResult": {"type": "object",
                                "required": ["article_id", "outbox_id", "message_id"],
                                "properties": {"article_id": {"type": "integer"},
                                               "outbox_id": {"type": "integer"},
                                               "message_id": {"type": "string"},
                                               "ticket_id": {"type": "integer"}}},
            },
        },
    }
