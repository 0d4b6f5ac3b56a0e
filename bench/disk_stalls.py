"""Disk stalls: how often a small synced write, as intake's commit makes, waits long.

    python bench/disk_stalls.py [--seconds 15] [--rounds 3] [--heavy-mb 15] [--dir DIR]

SMTP intake answers 250 only after an fdatasync of its spool, so every sender waiting for a
commit waits out any stall of the disk at once. This writes mail-sized records (51 KB, three
mails) to a file in DIR and syncs each, for SECONDS, in ROUNDS pairs: once alone and once
beside a second process that writes HEAVY_MB and syncs it every half second (about what the
pipeline's checkpoints write while intake runs in `bench/intake.py`). It prints, for each
run, the syncs made, their p50, p99 and longest wait, and how many waited over 40 ms.

Use it to tell whether a p99 miss in `bench/intake.py` came from the disk: on a virtual
disk the longest syncs are stalls of the host, not work of ours.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

RECORD = 3 * 17 * 1024  # three mails of bench/intake.py's mean size: one intake commit
SLOW = 0.040


def _heavy_writer(path: Path, megabytes: int, stop: Any) -> None:
    chunk = os.urandom(1 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    offset = 0
    try:
        while not stop.is_set():
            for _ in range(megabytes):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
            os.fsync(fd)
            stop.wait(0.5)
    finally:
        os.close(fd)
        path.unlink()


def _synced_writes(path: Path, seconds: float) -> list[float]:
    record = os.urandom(RECORD)
    waits: list[float] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.write(fd, record)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            waits.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return waits


def run(directory: Path, seconds: float, heavy_mb: int) -> list[float]:
    if not heavy_mb:
        return _synced_writes(directory / "small", seconds)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    writer = ctx.Process(target=_heavy_writer, args=(directory / "heavy", heavy_mb, stop))
    writer.start()
    try:
        return _synced_writes(directory / "small", seconds)
    finally:
        stop.set()
        writer.join()


def _summary(name: str, waits: list[float]) -> str:
    xs = sorted(waits)
    n = len(xs)
    return (f"{name:<24} {n:>7} {xs[n // 2] * 1e3:>7.2f} {xs[int(n * 0.99)] * 1e3:>7.2f} "
            f"{xs[-1] * 1e3:>8.1f} {sum(1 for x in xs if x > SLOW):>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="per run")
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs, alone and beside")
    ap.add_argument("--heavy-mb", type=int, default=15,
                    help="MB the second process writes and syncs every half second")
    ap.add_argument("--dir", type=Path, help="where to write (default: a temporary "
                    "directory under $TMPDIR); use the database's file system")
    args = ap.parse_args()
    if args.seconds <= 0 or args.rounds < 1 or args.heavy_mb < 1:
        ap.error("--seconds must be positive, --rounds and --heavy-mb at least 1")
    if args.dir is not None and not args.dir.is_dir():
        ap.error(f"--dir {args.dir}: not a directory")
    with tempfile.TemporaryDirectory(prefix="router-stalls-", dir=args.dir) as tmp:
        print(f"{'run':<24} {'syncs':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} "
              f"{'>40ms':>6}")
        totals = {"alone": 0, "beside": 0}
        for _ in range(args.rounds):
            for name, heavy in (("alone", 0), ("beside", args.heavy_mb)):
                waits = run(Path(tmp), args.seconds, heavy)
                totals[name] += sum(1 for x in waits if x > SLOW)
                label = name if not heavy else f"beside {heavy} MB/0.5 s"
                print(_summary(label, waits), flush=True)
    print(f"syncs over 40 ms: {totals['alone']} alone, {totals['beside']} beside the writer "
          f"({args.rounds} x {args.seconds:g} s each)")


if __name__ == "__main__":
    main()
