"""The `router` command: serve | check | ingest | tickets | db | simulate."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from router import __version__
from router import settings as config


class UsageError(Exception):
    """Bad arguments or state the user can fix; printed without a traceback."""


def _load(args: argparse.Namespace) -> config.Settings:
    try:
        return config.load(args.config)
    except config.ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        raise SystemExit(78) from None  # EX_CONFIG


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------- commands

def cmd_check(args: argparse.Namespace) -> int:
    from router.checks import full_check

    settings, problems = full_check(args.config)
    errors = [p for p in problems if p.severity == "error"]
    if args.json:
        _print_json({"ok": not errors and settings is not None,
                     "file": str(config.config_path(args.config)),
                     "problems": [p.as_dict() for p in problems]})
    else:
        for p in problems:
            print(p, file=sys.stderr if p.severity == "error" else sys.stdout)
        if settings is not None and not errors:
            print(f"{settings.source}: ok: {len(settings.team)} teams, "
                  f"{sum(len(t.addresses) for t in settings.team)} addresses"
                  + (f", {len(problems)} warnings" if problems else ""))
    return 1 if errors or settings is None else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from router import log
    from router.app import serve

    log.setup(args.log_level, json=args.log_json)
    return serve(config.config_path(args.config), log_level=args.log_level,
                 log_json=args.log_json)


def cmd_db(args: argparse.Namespace) -> int:
    from router import db

    settings = _load(args)
    url = settings.database_url
    if args.db_command == "upgrade":
        db.upgrade(url)
        print(f"database at revision {db.current_revision(url)} (head {db.head_revision()})")
    else:
        cur = db.current_revision(url)
        head = db.head_revision()
        if args.json:
            _print_json({"current": cur, "head": head, "up_to_date": cur == head})
        else:
            print(f"current {cur or '(empty)'}, head {head}"
                  + ("" if cur == head else ": run `router db upgrade`"))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from router.intake.pipe import ingest_main

    return ingest_main(args.config, args.recipient, args.sender)


def cmd_status(args: argparse.Namespace) -> int:
    from router.status import run

    return run(args)


def cmd_explain(args: argparse.Namespace) -> int:
    from datetime import datetime
    from pathlib import Path

    from router.clock import system_clock
    from router.explain import explain, format_text

    settings = _load(args)
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc}") from None
    if args.at:
        now = datetime.fromisoformat(args.at)
        if now.tzinfo is None:
            raise UsageError("--at needs a time zone, e.g. 2026-03-02T09:30:00+01:00")
    else:
        now = system_clock()
    result = explain(settings, raw, recipients=args.recipient, sender=args.sender, now=now,
                     file=args.file)
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(format_text(result))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from router import db, learn
    from router.clock import system_clock

    settings = _load(args)
    engine = db.make_engine(settings.database_url)
    try:
        model_id, metrics = learn.train_and_store(
            engine, system_clock(), min_examples=settings.learn.min_examples)
    finally:
        engine.dispose()
    if args.json:
        _print_json({"model_id": model_id, **metrics})
    else:
        print(learn.format_metrics(model_id, metrics))
    return 0 if model_id is not None else 1


def cmd_tickets(args: argparse.Namespace) -> int:
    from router import queues

    settings = _load(args)
    return queues.run(settings, args)


def cmd_report(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from router import db
    from router.clock import system_clock
    from router.report import print_report, team_report

    settings = _load(args)
    engine = db.make_engine(settings.database_url)
    try:
        since = system_clock() - timedelta(days=args.days) if args.days else None
        rows = team_report(engine, since=since)
    finally:
        engine.dispose()
    if args.json:
        _print_json({"teams": rows})
    else:
        print_report(rows)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "simulate.py"
    if not script.is_file():
        raise UsageError("simulate runs bench/simulate.py from a source checkout; "
                         f"{script} is not there")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


# ---------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=None,
                        help="router.toml to use (default: $ROUTER_CONFIG or ./router.toml)")
    # For sub-subcommands: `-c` may come before or after them, and a default at the inner
    # level would overwrite the value given at the outer one.
    inner = argparse.ArgumentParser(add_help=False)
    inner.add_argument("-c", "--config", default=argparse.SUPPRESS,
                       help="router.toml to use (default: $ROUTER_CONFIG or ./router.toml)")
    p = argparse.ArgumentParser(prog="router", description="Digital response management daemon.")
    p.add_argument("--version", action="version", version=f"router {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the daemon")
    s.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                   help="JSON log lines (default: when stderr is not a terminal)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("check", parents=[common], help="validate router.toml and templates")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("ingest", parents=[common],
                       help="take one message on stdin (MTA pipe transport)")
    s.add_argument("--recipient", "-r", action="append", default=[],
                   help="envelope recipient (repeatable); default: the role addresses in To/Cc")
    s.add_argument("--sender", "-f", default="", help="envelope sender")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("tickets", parents=[common], help="the queues")
    from router.queues import add_arguments

    add_arguments(s, common)
    s.set_defaults(func=cmd_tickets)

    s = sub.add_parser("status", parents=[common],
                       help="running config version, rejected edits, changes awaiting restart")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("explain", parents=[common],
                       help="dry run: how the live config would route FILE.eml, and why")
    s.add_argument("file", help="the message (.eml), - for stdin")
    s.add_argument("--recipient", "-r", action="append", default=[],
                   help="envelope recipient (repeatable); default: the addresses in To/Cc")
    s.add_argument("--sender", "-f", default="", help="envelope sender (default: From)")
    s.add_argument("--at", help="arrival time, ISO 8601 with offset (default: now)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("train", parents=[common],
                       help="retrain the team classifier from routed and corrected tickets")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("user", parents=[common], help="web console accounts and API tokens")
    from router.accounts import add_arguments as add_user_arguments
    from router.accounts import cli_main as cmd_user

    add_user_arguments(s)
    s.set_defaults(func=cmd_user)

    s = sub.add_parser("db", parents=[common], help="database schema")
    dsub = s.add_subparsers(dest="db_command", required=True)
    dsub.add_parser("upgrade", parents=[inner], help="migrate to the newest schema")
    cur = dsub.add_parser("current", parents=[inner], help="show the schema revision")
    cur.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("report", parents=[common],
                       help="promises kept and first-response times per team")
    s.add_argument("--days", type=int, default=0, help="only tickets of the last N days")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("simulate", help="simulate a team to test the turnaround promises")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_simulate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # `router tickets list --json | head` should end quietly, like any Unix tool.
        import signal

        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 64  # EX_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
