"""Pipeline benchmark: how fast stored mail becomes routed tickets, with nothing else running.

    python bench/pipeline.py [-n 2000] [--ack] [--profile | --instructions]

Stores N messages of `bench/intake.py`'s mix (same sizes, same share of replies) through the
durable intake path, then times the pipeline with every hook `router serve` runs (rules,
language, tone, SLA clocks, assignment, notifications; acknowledgements with `--ack`) until
all are routed. Prints messages/s, CPU ms per message, and with `--profile` the functions
that cost most. Use it to see where the pipeline's time goes; `bench/intake.py` measures it
under intake load.

Times on these machines move by a fifth from one run to the next. `--instructions` counts
instead: it runs the benchmark for N and for 2N messages under valgrind's callgrind, counting
only while the pipeline routes, and prints the CPU instructions per message routed (the
difference over N, so what routing costs once per run cancels out), which stay the same
whatever else the machine does. Use it to compare two commits; it takes a few minutes
(callgrind runs Python about fifty times slower while it counts).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import multiprocessing
import os
import pstats
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text as sql_text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from intake import CONFIG, TEAMS, make_messages  # noqa: E402

from router import log  # noqa: E402
from router import settings as config  # noqa: E402
from router.clock import system_clock  # noqa: E402
from router.db import upgrade  # noqa: E402
from router.hooks import default_hooks  # noqa: E402
from router.intake.accept import Envelope, InboundInsert, intake_engine, write_rows  # noqa: E402
from router.intake.accept import _row as inbound_row  # noqa: E402
from router.pipeline import Pipeline  # noqa: E402


def run(n: int, seed: int, ack: bool, profile: bool, batch: int,
        db_url: str | None = None, profile_out: str | None = None, workers: int = 1,
        counted: bool = False, schema_from: str | None = None) -> None:
    log.setup("warning", json=True)  # as bench/intake.py runs the daemon
    with tempfile.TemporaryDirectory(prefix="router-pipebench-") as tmp:
        db = Path(tmp) / "router.db"
        cfg = Path(tmp) / "router.toml"
        text = CONFIG.format(port=2525, db=db, templates=REPO / "templates", workers=1,
                             nice=19, processes=1) + TEAMS
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
        if schema_from:
            _copy_database(Path(schema_from), db)
        else:
            upgrade(url)
        engine = intake_engine(url)
        stmt = InboundInsert(engine)
        now = system_clock()
        rows = [inbound_row(Envelope("smtp", s, [r], raw), now)
                for s, r, raw in make_messages(n, seed)]
        for i in range(0, len(rows), 500):
            write_rows(engine, stmt, rows[i:i + 500])
        del rows  # freed now, not while routing is counted
        engine.dispose()

        if workers > 1:
            _run_workers(url, settings, batch, workers, n)
            return
        pipe = Pipeline(url, lambda: settings, batch_size=batch, hooks=default_hooks())
        if counted:
            # A batch per write transaction, not a slice of time: under callgrind a slice
            # would hold one message, and the count would be of commits.
            pipe.lock_slice = float("inf")
        pipe.warm_up()
        prof = cProfile.Profile() if profile else None
        t0, c0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        if counted:
            _callgrind_counts("on")
        done = pipe.drain(timeout=3600)
        if counted:
            _callgrind_counts("off")
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


def _worker(url: str, settings: config.Settings, batch: int, part: tuple[int, int],
            start: Any, done: Any) -> None:
    pipe = Pipeline(url, lambda: settings, batch_size=batch, hooks=default_hooks(), part=part)
    pipe.warm_up()
    start.wait()
    t0 = time.process_time()
    # Until this worker's share is routed (a batch of replies waiting for the other worker's
    # originals routes nothing, so an empty batch does not mean done).
    while True:
        if pipe.process_batch() == 0:
            with pipe.read_engine.connect() as conn:
                left = conn.execute(sql_text(
                    "select count(*) from inbound where status = 'new' and id % :n = :k"),
                    {"n": part[1], "k": part[0]}).scalar()
            if not left:
                break
            time.sleep(0.001)
    done.put((pipe.processed, pipe.parked, time.process_time() - t0, pipe.deferred))
    pipe.close()


def _run_workers(url: str, settings: config.Settings, batch: int, workers: int,
                 n: int) -> None:
    """The daemon's setup: `workers` processes, each its share of the messages by id."""
    ctx = multiprocessing.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, settings, batch, (k, workers), start, done))
             for k in range(workers)]
    for p in procs:
        p.start()
    time.sleep(3)  # language and tone models loaded in every worker
    t0 = time.perf_counter()
    start.set()
    results = [done.get() for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    routed = sum(r[0] for r in results)
    cpu = sum(r[2] for r in results)
    print(f"{routed} messages routed by {workers} workers in {wall:.2f} s: "
          f"{routed / wall:.1f} msg/s, {cpu / routed * 1000:.2f} ms CPU per message "
          f"(parked {sum(r[1] for r in results)}; replies deferred until their original "
          f"was routed: {sum(r[3] for r in results)} times)")


# "totals", not "summary": with counting switched on during the run, callgrind's summary
# line says 0.
_TOTAL = re.compile(rb"^totals: (\d+)", re.M)


def instructions(n: int, seed: int, ack: bool, batch: int) -> None:
    """Instructions per routed message: the difference of callgrind's totals for N and 2N
    messages, over N. Each run counts only while the pipeline drains (callgrind starts with
    counting off; the run switches it on and off around its drain), so starting Python,
    migrating, making up and storing the messages are left out, and run at the speed of
    valgrind's uninstrumented code. Hash seed fixed, transactions by batch: the same commit
    counts the same."""
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"--instructions runs {tool}, which is not installed (apt install "
                     "valgrind)")
    totals: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="router-pipebench-cg-") as tmp:
        # Migrated once, outside valgrind: the same in every run, so it would only cancel
        # out of the difference.
        schema = Path(tmp) / "schema.db"
        upgrade(f"sqlite:///{schema}")
        runs = []
        for k in (n, 2 * n):  # side by side: one per core
            out = Path(tmp) / f"callgrind.{k}"
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={out}", sys.executable, __file__, "-n", str(k),
                   "--seed", str(seed), "--batch", str(batch), "--counted",
                   "--schema-from", str(schema), *(["--ack"] if ack else [])]
            runs.append((k, out, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONHASHSEED": "0"})))
        for k, out, proc in runs:
            output, errors = proc.communicate()
            found = _TOTAL.search(out.read_bytes()) if out.exists() else None
            if proc.returncode != 0 or found is None:
                sys.exit(f"callgrind run of {k} messages failed (exit "
                         f"{proc.returncode}):\n{output[-1000:]}{errors[-2000:]}")
            totals[k] = int(found.group(1))
            print(f"under callgrind: {output.strip().splitlines()[-1]}")
    routed = (totals[2 * n] - totals[n]) / n
    print(f"{routed / 1e6:.3f} M instructions per message routed, from {n} and {2 * n} "
          "messages")


def _callgrind_counts(state: str) -> None:
    """Callgrind's counting switched on or off for this process (it runs under valgrind)."""
    done = subprocess.run(["callgrind_control", "--instr=" + state, str(os.getpid())],
                          capture_output=True, text=True)
    if done.returncode != 0 or "OK." not in done.stdout:
        sys.exit(f"callgrind_control --instr={state} failed (exit {done.returncode}):\n"
                 f"{done.stdout}{done.stderr}")


def _copy_database(source: Path, target: Path) -> None:
    """A copy of a SQLite database, whatever of it is still in its write-ahead log."""
    with contextlib.closing(sqlite3.connect(source)) as src, \
            contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def _empty(url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sql_text("drop schema public cascade; create schema public"))
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32, help="[pipeline] batch_size")
    ap.add_argument("--ack", action="store_true", help="acknowledgements on (outbox rows)")
    ap.add_argument("--workers", type=int, default=1,
                    help="worker processes sharing the messages, as [pipeline] workers")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-out", metavar="FILE",
                    help="with --profile: also save the pstats data to FILE")
    ap.add_argument("--instructions", action="store_true",
                    help="count CPU instructions per message under callgrind (N and 2N "
                    "messages) instead of timing: repeatable on a busy machine")
    ap.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)  # callgrind
    ap.add_argument("--schema-from", help=argparse.SUPPRESS)  # a migrated SQLite file
    ap.add_argument("--db", help="a scratch database URL instead of a temporary SQLite file "
                    "(PostgreSQL: it is emptied first)")
    args = ap.parse_args()
    if args.instructions:
        if args.profile or args.db or args.workers != 1:
            ap.error("--instructions counts one worker on SQLite, without --profile")
        instructions(args.messages, args.seed, args.ack, args.batch)
        return
    run(args.messages, args.seed, args.ack, args.profile, args.batch, args.db,
        args.profile_out, args.workers, args.counted, args.schema_from)


if __name__ == "__main__":
    main()
