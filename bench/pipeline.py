"""Pipeline benchmark: how fast stored mail becomes routed tickets, with nothing else running.

    python bench/pipeline.py [-n 2000] [--ack] [--profile]

Stores N messages of `bench/intake.py`'s mix (same sizes, same share of replies) through the
durable intake path, then times the pipeline with every hook `router serve` runs (rules,
language, tone, SLA clocks, assignment, notifications; acknowledgements with `--ack`) until
all are routed. Prints messages/s, CPU ms per message, and with `--profile` the functions
that cost most. Use it to see where the pipeline's time goes; `bench/intake.py` measures it
under intake load.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from intake import CONFIG, TEAMS, make_messages  # noqa: E402

from router import log  # noqa: E402
from router import settings as config  # noqa: E402
from router.clock import system_clock  # noqa: E402
from router.db import upgrade  # noqa: E402
from router.hooks import default_hooks  # noqa: E402
from router.intake.accept import Envelope, insert_statement, intake_engine, write_rows  # noqa: E402
from router.intake.accept import _row as inbound_row  # noqa: E402
from router.pipeline import Pipeline  # noqa: E402


def run(n: int, seed: int, ack: bool, profile: bool, batch: int,
        db_url: str | None = None, profile_out: str | None = None) -> None:
    log.setup("warning", json=True)  # as bench/intake.py runs the daemon
    with tempfile.TemporaryDirectory(prefix="router-pipebench-") as tmp:
        db = Path(tmp) / "router.db"
        cfg = Path(tmp) / "router.toml"
        text = CONFIG.format(port=2525, db=db, templates=REPO / "templates", workers=1,
                             nice=19) + TEAMS
        if ack:
            text = text.replace("[ack]\nenabled = false", "[ack]\nenabled = true")
        cfg.write_text(text)
        if db_url:
            text = text.replace(f'url = "sqlite:///{db}"', f'url = "{db_url}"')
        cfg.write_text(text)
        settings = config.load(cfg)
        url = settings.database_url
        if db_url:
            _empty(url)
        upgrade(url)
        engine = intake_engine(url)
        stmt = insert_statement(engine)
        now = system_clock()
        rows = [inbound_row(Envelope("smtp", s, [r], raw), now)
                for s, r, raw in make_messages(n, seed)]
        for i in range(0, len(rows), 500):
            write_rows(engine, stmt, rows[i:i + 500])
        engine.dispose()

        pipe = Pipeline(url, lambda: settings, batch_size=batch, hooks=default_hooks())
        pipe.warm_up()
        prof = cProfile.Profile() if profile else None
        t0, c0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        done = pipe.drain(timeout=3600)
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        pipe.close()
        print(f"{done} messages routed in {wall:.2f} s: {done / wall:.1f} msg/s, "
              f"{cpu / done * 1000:.2f} ms CPU per message (parked {pipe.parked})")
        if prof:
            if profile_out:
                prof.dump_stats(profile_out)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(45)


def _empty(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("drop schema public cascade; create schema public"))
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ack", action="store_true", help="acknowledgements on (outbox rows)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-out", metavar="FILE",
                    help="with --profile: also save the pstats data to FILE")
    ap.add_argument("--db", help="a scratch database URL instead of a temporary SQLite file "
                    "(PostgreSQL: it is emptied first)")
    args = ap.parse_args()
    run(args.messages, args.seed, args.ack, args.profile, args.batch, args.db,
        args.profile_out)


if __name__ == "__main__":
    main()
