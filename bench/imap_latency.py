"""IMAP intake latency: APPEND to a real Dovecot → committed inbound row, with IDLE.

    python bench/imap_latency.py [-n 50] [--mode sequential|burst|both] [--poll SECONDS]
                                 [--json]

Starts a private Dovecot (tests/dovecot.py; needs the `dovecot` binary) and a throw-away
SQLite database, runs one `ImapIntake` (after = "seen") through the real group-committing
`Acceptor`, and appends N messages with a second IMAP connection:

- sequential: one message at a time, the next after the previous is committed (and a short
  pause), so each figure is one mail's path: APPEND → IDLE notice → SEARCH → FETCH → commit;
- burst: N APPENDs back to back; each latency is counted from its own APPEND.

Printed: p50/p99/max in milliseconds, from just before APPEND to the commit of that message
(observed in the accept callable). `--poll S` measures without IDLE, polling every S seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imapclient import IMAPClient  # noqa: E402

from router import db  # noqa: E402
from router import settings as config  # noqa: E402
from router.intake.accept import Acceptor, Envelope, intake_engine  # noqa: E402
from router.intake.imap import ImapIntake, ImapOptions  # noqa: E402
from router.mail import quick_headers  # noqa: E402
from tests.conftest import write_config  # noqa: E402
from tests.daemon import make_mail  # noqa: E402
from tests.dovecot import PASSWORD, running_dovecot  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def summary(latencies: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1),
            "p99_ms": round(percentile(ms, 0.99), 1), "max_ms": round(max(ms), 1),
            "min_ms": round(min(ms), 1)}


async def run(n: int, modes: list[str], poll: float | None) -> dict[str, Any]:
    results: dict[str, Any] = {"messages": n, "wait": f"poll {poll}s" if poll else "IDLE"}
    with tempfile.TemporaryDirectory(prefix="imap-bench-") as tmp, \
            running_dovecot(Path(tmp) / "dovecot", ["support"]) as server:
        url = f"sqlite:///{Path(tmp) / 'router.db'}"
        account = f"""
            [[imap]]
            name = "bench"
            host = "127.0.0.1"
            port = {server.port}
            tls = "none"
            user = "support"
            password = "{PASSWORD}"
            address = "support@acme.test"
            after = "seen"
            """
        settings = config.load(write_config(Path(tmp) / "etc", db_url=url, extra=account))
        await asyncio.to_thread(db.upgrade, url)
        engine = intake_engine(url)
        acceptor = Acceptor(engine)
        await acceptor.start()
        committed: dict[str, float] = {}
        arrived = asyncio.Event()

        async def accept(env: Envelope) -> None:
            await acceptor.accept(env)
            committed[quick_headers(env.raw).message_id or ""] = time.perf_counter()
            arrived.set()

        options = ImapOptions(idle=poll is None, poll_interval=poll or 60.0)
        intake = ImapIntake(settings.imap[0], accept, engine, options=options)
        stop = asyncio.Event()
        task = asyncio.create_task(intake.run(stop))
        while not intake.connected.is_set():
            await asyncio.sleep(0.01)
        client = IMAPClient(server.host, server.port, ssl=False, timeout=30)
        client.login("support", PASSWORD)

        async def append(i: int, tag: str) -> tuple[str, float]:
            raw = make_mail(subject=f"{tag} {i}", body=f"message {i} of the {tag} run\n")
            msgid = quick_headers(raw).message_id or ""
            t0 = time.perf_counter()
            await asyncio.to_thread(client.append, "INBOX", raw)
            return msgid, t0

        async def wait_for(ids: list[str], timeout: float = 60.0) -> None:
            deadline = time.monotonic() + timeout
            while not all(i in committed for i in ids):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{sum(i in committed for i in ids)}/{len(ids)} "
                                       "messages committed in time")
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), 1.0)

        try:
            if "sequential" in modes:
                lat = []
                for i in range(n):
                    msgid, t0 = await append(i, "sequential")
                    await wait_for([msgid])
                    lat.append(committed[msgid] - t0)
                    await asyncio.sleep(0.05)
                results["sequential"] = summary(lat)
            if "burst" in modes:
                sent = [await append(i, "burst") for i in range(n)]
                await wait_for([m for m, _ in sent])
                results["burst"] = summary([committed[m] - t0 for m, t0 in sent])
                results["burst"]["commit_batches"] = acceptor.batches
        finally:
            client.logout()
            stop.set()
            await task
            await acceptor.stop()
            engine.dispose()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50, help="messages per mode (default 50)")
    ap.add_argument("--mode", choices=["sequential", "burst", "both"], default="both")
    ap.add_argument("--poll", type=float, default=None,
                    help="poll every SECONDS instead of IDLE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    modes = ["sequential", "burst"] if args.mode == "both" else [args.mode]
    r = asyncio.run(run(args.n, modes, args.poll))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"IMAP intake latency, APPEND -> committed row ({r['wait']}), "
          f"{r['messages']} messages per mode")
    print(f"{'mode':<12}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'min ms':>9}")
    for mode in modes:
        s = r[mode]
        print(f"{mode:<12}{s['p50_ms']:>9}{s['p99_ms']:>9}{s['max_ms']:>9}{s['min_ms']:>9}")


if __name__ == "__main__":
    main()
