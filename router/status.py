"""`router status`: which config the daemon runs, whether the last edit was rejected and why,
which changes wait for a restart, and how much accepted mail waits to be routed.

It reads what `router.reload` records in the database (`config_applied` / `config_rejected`
events with ``ticket_id`` NULL, and `ConfigVersion`), so it works from any shell, for any
instance sharing the database, and (the case it exists for) while router.toml is broken: the
database URL is then found without validating the file (ROUTER_DATABASE_URL, else the
``[database] url`` line, else the default). `read_status` is what a console banner uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from router import settings as config
from router.models import T_CONFIG_VERSION, T_EVENT, T_INBOUND, InboundStatus
from router.reload import KIND_APPLIED, KIND_REJECTED, text_digest

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_UNKNOWN = 3

_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\- ]+?)\s*\]\s*(?:#.*)?$")
_URL = re.compile(r"""^\s*url\s*=\s*(?:"([^"]*)"|'([^']*)')""")


def database_url(path: Path, env: Mapping[str, str] | None = None) -> str:
    """The database a config names, even when the config does not validate."""
    env = os.environ if env is None else env
    base = path.resolve().parent
    settings, _ = config.check(path, env)
    if settings is not None:
        return settings.database_url
    if env.get("ROUTER_DATABASE_URL"):
        return config.resolve_database_url(env["ROUTER_DATABASE_URL"], base)
    url = config.DatabaseSection().url
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return config.resolve_database_url(url, base)
    try:
        found = tomllib.loads(text).get("database", {}).get("url")
        if isinstance(found, str):
            url = found
    except tomllib.TOMLDecodeError:
        # Broken TOML: find `url = "..."` under [database] line by line.
        table = ""
        for line in text.splitlines():
            m = _TABLE.match(line)
            if m:
                table = m.group(1).replace(" ", "")
                continue
            u = _URL.match(line)
            if table == "database" and u:
                url = u.group(1) if u.group(1) is not None else u.group(2)
                break
    return config.resolve_database_url(url, base)


def _alive(pid: Any, host: Any) -> bool | None:
    if host != socket.gethostname() or not isinstance(pid, int):
        return None  # another machine or container: cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def read_status(url: str, config_file: Path | None = None, *, scan: int = 500
                ) -> dict[str, Any]:
    """The config state recorded in the database at `url` (and of the file on disk)."""
    from router.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(T_EVENT.c.id, T_EVENT.c.at, T_EVENT.c.kind, T_EVENT.c.data)
                .where(T_EVENT.c.ticket_id.is_(None))
                .where(T_EVENT.c.kind.in_([KIND_APPLIED, KIND_REJECTED]))
                .order_by(T_EVENT.c.id.desc()).limit(scan)).all()
            applied = next((r for r in rows if r.kind == KIND_APPLIED), None)
            rejected = next((r for r in rows if r.kind == KIND_REJECTED), None)
            first_applied = None
            if applied is not None:
                first_applied = conn.execute(
                    select(T_CONFIG_VERSION.c.applied_at)
                    .where(T_CONFIG_VERSION.c.digest == applied.data.get("digest"))).scalar()
    finally:
        engine.dispose()

    out: dict[str, Any] = {
        "config": str(config_file) if config_file else None,
        "database": make_url(url).render_as_string(hide_password=True),
        "running": None, "last_edit_rejected": False, "rejected": None,
        "restart_needed": [], "on_disk": None,
    }
    if applied is not None:
        d = applied.data
        out["running"] = {
            "version": d.get("version"), "digest": d.get("digest"),
            "applied_at": _iso(applied.at), "first_applied_at": _iso(first_applied),
            "trigger": d.get("trigger"), "source": d.get("source"),
            "templates_digest": d.get("templates_digest"), "pid": d.get("pid"),
            "host": d.get("host"), "alive": _alive(d.get("pid"), d.get("host")),
            "warnings": d.get("warnings", []),
        }
        out["restart_needed"] = d.get("restart_needed", [])
    if rejected is not None and (applied is None or rejected.id > applied.id):
        d = rejected.data
        out["last_edit_rejected"] = True
        out["rejected"] = {
            "at": _iso(rejected.at), "version": d.get("version"), "trigger": d.get("trigger"),
            "running_version": d.get("running_version"), "problems": d.get("problems", []),
        }
    if config_file is not None:
        digest = text_digest(config_file)
        running_digest = out["running"]["digest"] if out["running"] else None
        out["on_disk"] = {"version": digest[:16] if digest else None,
                          "matches_running": digest is not None and digest == running_digest}
    return out


def read_backlog(url: str) -> dict[str, Any]:
    """Accepted mail not routed yet: in ``inbound`` and, on SQLite, still in SMTP intake's
    spools (`router.intake.spool`), with when the oldest of it arrived; and parked mail."""
    from router.db import make_engine
    from router.intake.spool import unmoved_backlog

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            by_status = {row.status: row for row in conn.execute(
                select(T_INBOUND.c.status, func.count().label("n"),
                       func.min(T_INBOUND.c.received_at).label("oldest"))
                .where(T_INBOUND.c.status.in_([InboundStatus.NEW, InboundStatus.PARKED]))
                .group_by(T_INBOUND.c.status))}
    finally:
        engine.dispose()
    spooled, oldest_spooled = unmoved_backlog(url)
    new = by_status.get(InboundStatus.NEW)
    parked = by_status.get(InboundStatus.PARKED)
    oldest = [at for at in (new.oldest if new else None, oldest_spooled) if at is not None]
    return {"waiting": (new.n if new else 0) + spooled, "spooled": spooled,
            "oldest_waiting": _iso(min(oldest)) if oldest else None,
            "parked": parked.n if parked else 0}


def _problem_line(p: Mapping[str, Any]) -> str:
    return str(config.Problem(p.get("file", ""), p.get("path", ""), p.get("message", ""),
                              p.get("line"), p.get("severity", "error")))


def format_status(status: Mapping[str, Any]) -> str:
    lines = [f"config:   {status.get('config')}", f"database: {status.get('database')}"]
    run = status.get("running")
    if run is None:
        lines.append("running:  no config recorded (has `router serve` run on this database?)")
    else:
        alive = {True: "running", False: "not running", None: "state unknown"}[run["alive"]]
        lines.append(f"running:  version {run['version']}, applied {run['applied_at']} "
                     f"({run['trigger']}), pid {run['pid']} on {run['host']}: {alive}")
        for w in run.get("warnings") or []:
            lines.append(f"  {_problem_line(w)}")
    rej = status.get("rejected")
    if rej is not None:
        n = len(rej["problems"])
        keeps = ("keeps running" if run is None or run["alive"] is not False
                 else "was running when the daemon stopped")
        lines.append(f"last edit REJECTED at {rej['at']} ({rej['trigger']}): {n} problem"
                     f"{'' if n == 1 else 's'}; version {rej['running_version']} {keeps}")
        lines.extend(f"  {_problem_line(p)}" for p in rej["problems"])
    else:
        lines.append("last edit: applied")
    restart = status.get("restart_needed") or []
    if restart:
        lines.append("needs a restart to take effect:")
        lines.extend(f"  {r['field']}: running {r['running']!s}, configured {r['configured']!s}"
                     for r in restart)
    disk = status.get("on_disk")
    if disk is not None and run is not None and not disk["matches_running"] and rej is None:
        lines.append(f"on disk:  version {disk['version']}, not applied yet")
    intake = status.get("intake")
    if intake is not None:
        lines.append(f"intake:   {_backlog_line(intake)}")
    return "\n".join(lines)


def _backlog_line(intake: Mapping[str, Any]) -> str:
    n, spooled, parked = intake["waiting"], intake["spooled"], intake["parked"]
    if n:
        line = (f"{n} message{'' if n == 1 else 's'} waiting to be routed"
                f"{f' ({spooled} in SMTP intake spools)' if spooled else ''}, the oldest "
                f"received {intake['oldest_waiting']}")
    else:
        line = "no mail waiting to be routed"
    if parked:
        line += (f"; {parked} parked (the pipeline could not process "
                 f"{'it' if parked == 1 else 'them'}: router tickets parked)")
    return line


def run(args: argparse.Namespace) -> int:
    path = config.config_path(args.config)
    try:
        url = database_url(path)
        status = read_status(url, path)
        status["intake"] = read_backlog(url)
    except SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        msg = (f"cannot read the status from the database: {cause} (has `router serve` run "
               "on this database?)")
        if args.json:
            json.dump({"config": str(path), "error": msg}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(f"router: {msg}", file=sys.stderr)
        return EXIT_UNKNOWN
    if args.json:
        json.dump(status, sys.stdout, indent=2, ensure_ascii=False, default=str)
        sys.stdout.write("\n")
    else:
        print(format_status(status))
    if status["running"] is None:
        return EXIT_UNKNOWN
    return EXIT_REJECTED if status["last_edit_rejected"] else EXIT_OK
