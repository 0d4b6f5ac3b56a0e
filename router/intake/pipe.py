"""`router ingest`: one message on stdin from an MTA's pipe transport.

Exit codes follow sysexits(3), which MTAs understand: 0 stored; 75 (EX_TEMPFAIL) the database
could not commit, so the MTA keeps the mail and retries; 67 (EX_NOUSER) no role address; 65
(EX_DATAERR) empty or oversize message. A broken router.toml is our fault, not the sender's:
it gives 75 too (with the problems on stderr), so the MTA keeps the mail until it is fixed.
"""

from __future__ import annotations

import sys
from typing import BinaryIO

from router import log
from router import settings as config
from router.intake.accept import Envelope, StorageUnavailable, accept_sync
from router.mail import parse
from router.rules.address import resolve_address

EX_OK, EX_DATAERR, EX_NOUSER, EX_TEMPFAIL = 0, 65, 67, 75


def ingest(settings: config.Settings, raw: bytes, recipients: list[str], sender: str) -> int:
    logger = log.get("router.intake.pipe")
    if not raw.strip():
        print("router ingest: empty message on stdin", file=sys.stderr)
        return EX_DATAERR
    if len(raw) > settings.smtp.max_message_size:
        print(f"router ingest: message of {len(raw)} bytes exceeds max_message_size "
              f"({settings.smtp.max_message_size})", file=sys.stderr)
        return EX_DATAERR
    if not recipients:
        parsed = parse(raw)
        recipients = [a for _, a in parsed.to + parsed.cc
                      if resolve_address(settings, a) is not None]
        if not recipients:
            print("router ingest: no --recipient given and no role address in To/Cc",
                  file=sys.stderr)
            return EX_NOUSER
    unknown = [r for r in recipients if resolve_address(settings, r) is None]
    if unknown:
        print(f"router ingest: no team owns {', '.join(unknown)}", file=sys.stderr)
        return EX_NOUSER
    from router import db
    from router.app import prepare_database

    env = Envelope(channel="pipe", mail_from=sender, rcpt_to=recipients, raw=raw)
    try:
        prepare_database(settings)
        engine = db.make_engine(settings.database_url)
        try:
            accept_sync(engine, env)
        finally:
            engine.dispose()
    except (StorageUnavailable, Exception) as exc:
        logger.error("ingest_tempfail", error=f"{type(exc).__name__}: {exc}")
        print(f"router ingest: cannot store the message now ({exc}); try again later",
              file=sys.stderr)
        return EX_TEMPFAIL
    logger.info("ingested", size=len(raw), recipients=recipients)
    return EX_OK


def ingest_main(config_file: str | None, recipients: list[str], sender: str,
                stdin: BinaryIO | None = None) -> int:
    try:
        settings = config.load(config_file)
    except config.ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return EX_TEMPFAIL
    raw = (stdin or sys.stdin.buffer).read()
    return ingest(settings, raw, recipients, sender)
