"""SMTP intake benchmark: router against a do-nothing aiosmtpd server, in one run.

    python bench/intake.py [-n 20000] [-c 50] [--workers 2] [--processes 2]
                           [--client {c,python}] [--intake-only] [--json]

Both servers run as subprocesses on loopback and get the same load (the do-nothing server
before and after router, pooled, as this machine's speed drifts): N messages (realistic
sizes, a mix of new mails and replies) over C concurrent connections, a new connection per
message (as Postfix's smtp-source does). Printed: messages/s for each and their ratio,
p50/p99 time from the end of DATA to the 250, and for router how long its pipeline takes to
turn all accepted mail into routed tickets, and the CPU time each server's processes spent
per message from the first message of the load to the last one routed (start-up and
warm-up excluded; the load generator is not counted). On a 2-core machine that figure says
how fast routing could keep up at best: two cores divided by router's CPU per message.
Router runs as the example router.toml sets it up (two intake processes, two pipeline
workers) unless told otherwise.

The load comes from bench/smtpload.c, built on demand with the system's C compiler into
bench/.build/. On a 2-core machine every CPU-second the load generator spends is taken from
the servers being measured, and an asyncio client spends about twice smtpload's (~0.35 ms
per message against ~0.17 ms, nearly all of that the kernel's TCP work); a C client leaves
the servers the CPU, as smtp-source did for the reference figures in PERF-NOTES (smtp-source
itself cannot report per-message latency).
Without a C compiler, or with --client python, the load comes from asyncio in this process.
smtpload's latency clock starts when the payload's last byte is written; the Python client's
when the payload is handed to asyncio, so for large messages it also counts part of the
transfer.

Figures from a noisy shared machine are only comparable within one run; report ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from router.intake.spool import spool_files, unmoved_count  # noqa: E402

SMTPLOAD_SRC = REPO / "bench" / "smtpload.c"
BUILD_DIR = REPO / "bench" / ".build"
DOMAIN = "acme.example"
ROLES = ["oops", "billing", "support", "sales"]

NULL_SERVER = textwrap.dedent("""
    import asyncio, sys
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    from aiosmtpd.smtp import SMTP
    class Handler:
        async def handle_DATA(self, server, session, envelope):
            return "250 OK"
    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: SMTP(Handler()), "127.0.0.1", int(sys.argv[1]),
                                       backlog=1024)
        print("ready", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
""")

CONFIG = """
templates = "{templates}"

[smtp]
listen = "127.0.0.1:{port}"
hostname = "bench.router"
max_message_size = "25MB"
processes = {processes}

[database]
url = "sqlite:///{db}"

[relay]
host = "127.0.0.1"
port = 9

[ack]
enabled = false

[pipeline]
workers = {workers}
nice = {nice}
"""
TEAMS = "".join(f"""
[[team]]
name = "{r}"
addresses = ["{r}@{DOMAIN}"]
lead = "lead-{r}@{DOMAIN}"
members = [{{ name = "Lead {r}", email = "lead-{r}@{DOMAIN}" }}]
""" for r in ROLES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_messages(n: int, seed: int) -> list[tuple[str, str, bytes]]:
    """(sender, recipient, raw) with sizes and a reply share like a support inbox's."""
    rng = random.Random(seed)
    words = ("invoice order refund broken login password account delivery please thanks "
             "problem error page slow payment card help urgent again still wrong").split(" ")
    out: list[tuple[str, str, bytes]] = []
    sent_ids: list[str] = []
    for i in range(n):
        customer = f"customer{rng.randrange(max(1, n // 4))}@example.net"
        role = rng.choice(ROLES)
        msgid = f"<bench.{seed}.{i}@example.net>"
        headers = [f"From: Customer {i} <{customer}>", f"To: {role}@{DOMAIN}",
                   f"Message-ID: {msgid}", "Date: Sun, 22 Nov 2026 10:00:00 +0000",
                   "MIME-Version: 1.0"]
        if sent_ids and rng.random() < 0.3:
            parent = rng.choice(sent_ids)
            headers += [f"Subject: Re: question {i}", f"In-Reply-To: {parent}",
                        f"References: {parent}"]
        else:
            headers.append(f"Subject: question {i} about {rng.choice(words)}")
        # Sizes: most mails a few KB of text, one in ten with an attachment of 20-200 KB.
        body_len = int(rng.lognormvariate(7.3, 0.7))
        body = " ".join(rng.choice(words) for _ in range(body_len // 6))
        lines = textwrap.wrap(body, 76) or [""]
        if rng.random() < 0.1:
            import base64

            blob = base64.encodebytes(rng.randbytes(rng.randrange(20_000, 200_000))).decode()
            text = ("\r\n".join([*headers, 'Content-Type: multipart/mixed; boundary="b1"', "",
                                 "--b1", "Content-Type: text/plain; charset=utf-8", "",
                                 *lines, "--b1",
                                 "Content-Type: application/pdf; name=\"scan.pdf\"",
                                 "Content-Transfer-Encoding: base64", "",
                                 blob.replace("\n", "\r\n"), "--b1--", ""]))
        else:
            text = "\r\n".join([*headers, "Content-Type: text/plain; charset=utf-8", "",
                                *lines, ""])
        raw = text.encode()
        out.append((customer, f"{role}@{DOMAIN}", raw))
        sent_ids.append(msgid)
    return out


@dataclass
class Result:
    name: str
    sent: int
    ok: int
    failed: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    def slow(self, ms: float) -> int:
        """How many waited longer than `ms`: a stall that holds every connection at once
        shows here as a block of `concurrency` slow messages, and a few such blocks move
        the p99 from one run to the next while this count tells them apart."""
        return sum(1 for x in self.latencies if x * 1000 > ms)

    def longest(self) -> float:
        return max(self.latencies, default=float("nan")) * 1000


async def _expect(reader: asyncio.StreamReader, code: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise RuntimeError(line.decode(errors="replace").strip())
            return line


def _dot_stuff(raw: bytes) -> bytes:
    data = raw.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


async def send_one(port: int, sender: str, rcpt: str, payload: bytes) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _expect(reader, b"220")
        writer.write(b"EHLO bench.client\r\n")
        await _expect(reader, b"250")
        writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
        await _expect(reader, b"250")
        writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
        await _expect(reader, b"250")
        writer.write(b"DATA\r\n")
        await _expect(reader, b"354")
        writer.write(payload)
        t0 = time.perf_counter()
        await _expect(reader, b"250")
        latency = time.perf_counter() - t0
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return latency
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def load(name: str, port: int, messages: list[tuple[str, str, bytes]],
               concurrency: int) -> Result:
    payloads = [(s, r, _dot_stuff(raw)) for s, r, raw in messages]
    queue = iter(payloads)
    latencies: list[float] = []
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for sender, rcpt, payload in queue:
            for _attempt in range(3):
                try:
                    latencies.append(await send_one(port, sender, rcpt, payload))
                    break
                except (OSError, ConnectionError, RuntimeError):
                    await asyncio.sleep(0.05)
            else:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(name, len(messages), len(latencies), failed, time.perf_counter() - t0,
                  latencies)


def build_smtpload() -> Path:
    """The C client, compiled when missing or older than its source; RuntimeError if it
    cannot be."""
    binary = BUILD_DIR / "smtpload"
    if binary.exists() and binary.stat().st_mtime >= SMTPLOAD_SRC.stat().st_mtime:
        return binary
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) found")
    BUILD_DIR.mkdir(exist_ok=True)
    # Built under a private name and renamed: a concurrent run never executes half a binary.
    tmp = BUILD_DIR / f"smtpload.{os.getpid()}"
    res = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-std=c11", "-o", str(tmp),
                          str(SMTPLOAD_SRC)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} could not build {SMTPLOAD_SRC.name}:\n{res.stderr.strip()}")
    tmp.replace(binary)
    return binary


def write_msgfile(path: Path, messages: list[tuple[str, str, bytes]]) -> None:
    """smtpload's input: per message three fields, each a big-endian u32 length and the
    bytes: sender, recipient, and the dot-stuffed DATA payload ending in CRLF.CRLF."""
    with open(path, "wb") as f:
        for sender, rcpt, raw in messages:
            for field in (sender.encode(), rcpt.encode(), _dot_stuff(raw)):
                f.write(struct.pack(">I", len(field)))
                f.write(field)


def c_load(binary: Path, name: str, port: int, msgfile: Path, concurrency: int) -> Result:
    """load() by smtpload: the messages of msgfile, as written by write_msgfile."""
    with tempfile.TemporaryDirectory(prefix="smtpload-") as tmp:
        out = Path(tmp) / "latencies"
        res = subprocess.run([str(binary), "127.0.0.1", str(port), str(concurrency),
                              str(msgfile), str(out)], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"smtpload exited with {res.returncode}: {res.stderr.strip()}")
        summary = json.loads(res.stdout.splitlines()[-1])
        # One line per accepted message, in seconds.
        latencies = [float(x) for x in out.read_text().split()]
    ok, failed = int(summary["ok"]), int(summary["failed"])
    return Result(name, ok + failed, ok, failed, float(summary["seconds"]), latencies)


def pick_client(client: str) -> Path | None:
    """smtpload's binary for client "c", None for the Python client."""
    if client == "python":
        return None
    try:
        return build_smtpload()
    except RuntimeError as e:
        print(f"note: {e}\nnote: using the Python load generator instead, which competes "
              "with the servers for CPU", file=sys.stderr)
        return None


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by process `pid` and every process below it (Linux /proc):
    measured around the main load only, so start-up and warm-up do not count."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # After the parenthesised name: ppid is the 2nd field, utime and stime the 12th
            # and 13th.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(entry.name)] = (int(fields[1]),
                                      (int(fields[11]) + int(fields[12])) / tick)
    below = {pid}
    grew = True
    while grew:
        grew = False
        for p, (parent, _cpu) in stats.items():
            if parent in below and p not in below:
                below.add(p)
                grew = True
    return sum(stats[p][1] for p in below if p in stats)


def pipeline_done(db: Path) -> tuple[int, int]:
    """(messages stored, messages not routed yet), counting those still in intake's spools."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        total = conn.execute("select count(*) from inbound").fetchone()[0]
        pending = conn.execute("select count(*) from inbound where status = 'new'").fetchone()[0]
    finally:
        conn.close()
    spooled = unmoved_count(f"sqlite:///{db}")
    return total + spooled, pending + spooled


_SEALED: dict[tuple[Path, int], tuple[str, int]] = {}  # (path, inode) -> (spool id, last id)


def routing_finished(db: Path) -> bool:
    """Whether every stored message is routed: asked every 50 ms while the pipeline works,
    so it must cost next to nothing. (Counting as `pipeline_done` does took half a core from
    the servers being measured, more than the do-nothing server spends on the whole load.)
    The spools are read first, then the cursors and `inbound` in one snapshot: a message
    moved meanwhile is then either still in a spool or already in `inbound`, never in
    neither (moving inserts it and advances the cursor in one transaction)."""
    spooled: dict[str, int] = {}
    for f in spool_files(f"sqlite:///{db}"):
        try:
            key = (f.path, f.path.stat().st_ino)
        except FileNotFoundError:
            continue  # removed since it was listed: moved whole
        if key in _SEALED:
            spool_id, last = _SEALED[key]
            spooled[spool_id] = last
            continue
        try:
            spool = sqlite3.connect(f"file:{f.path}?mode=ro", uri=True, timeout=30)
        except sqlite3.OperationalError:
            continue  # removed since it was listed: moved whole
        try:
            row = spool.execute("select value from spool_meta where key = 'id'").fetchone()
            sealed = spool.execute(
                "select 1 from spool_meta where key = 'sealed'").fetchone() is not None
            last = spool.execute("select max(id) from spooled").fetchone()[0]
        except sqlite3.OperationalError:
            continue  # being created right now: nothing in it yet
        finally:
            spool.close()
        if last is not None:
            if row is None:
                return False
            spooled[row[0]] = last
            if sealed:  # written to no more: its last id is read once
                _SEALED[key] = (row[0], last)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30, isolation_level=None)
    try:
        conn.execute("begin")
        moved = dict(conn.execute("select spool, moved_through from spool_cursor").fetchall())
        if any(last > moved.get(spool, 0) for spool, last in spooled.items()):
            return False
        return not conn.execute("select 1 from inbound where status = 'new' limit 1").fetchone()
    finally:
        conn.close()


def run(n: int, concurrency: int, seed: int, warmup: int, intake_only: bool = False,
        nice: int = 19, workers: int = 2, client: str = "c",
        processes: int = 2) -> dict[str, object]:
    messages = make_messages(n + warmup, seed)
    warm, main = messages[:warmup], messages[warmup:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    binary = pick_client(client)

    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmpdir:
        tmp = Path(tmpdir)
        batches = {"warmup": warm, "main": main}
        if binary:
            # Written once, before any clock runs; every server gets the same files.
            for batch, msgs in batches.items():
                write_msgfile(tmp / f"{batch}.msgs", msgs)

        def send(name: str, port: int, batch: str) -> Result:
            if binary is None:
                return runner(load(name, port, batches[batch], concurrency))
            return c_load(binary, name, port, tmp / f"{batch}.msgs", concurrency)

        null_cpu = [0.0]

        def null_run() -> Result:
            port = free_port()
            null = subprocess.Popen([sys.executable, "-c", NULL_SERVER, str(port)], env=env,
                                    stdout=subprocess.DEVNULL)
            try:
                wait_port(port, null)
                send("warmup", port, "warmup")
                cpu0 = tree_cpu(null.pid)
                result = send("aiosmtpd (does nothing)", port, "main")
                null_cpu[0] += tree_cpu(null.pid) - cpu0
                return result
            finally:
                stop(null)

        # The reference runs before and after router: this machine's speed drifts within
        # minutes, and a ratio against one side alone would carry that drift.
        before = null_run()

        db = tmp / "router.db"
        port = free_port()
        cfg = tmp / "router.toml"
        cfg.write_text(CONFIG.format(port=port, db=db, templates=REPO / "templates",
                                     workers=0 if intake_only else workers, nice=nice,
                                     processes=processes)
                       + TEAMS)
        log = open(tmp / "router.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "router", "serve", "-c", str(cfg),
                                 "--log-json", "--log-level", "warning"],
                                env=env, stdout=log, stderr=log, cwd=REPO)
        try:
            wait_port(port, proc)
            send("warmup", port, "warmup")
            while not intake_only and not routing_finished(db):
                time.sleep(0.1)
            t0 = time.perf_counter()
            cpu0 = tree_cpu(proc.pid)
            routed = send("router", port, "main")
            accept_done = time.perf_counter() - t0
            # How far routing got while intake ran: the two share the CPU.
            total, pending = pipeline_done(db)
            routed_during_intake = 0 if intake_only else total - pending - warmup
            while not intake_only and time.perf_counter() - t0 < 1200:
                if routing_finished(db):
                    break
                time.sleep(0.05)
            pipeline_secs = time.perf_counter() - t0
            router_cpu = tree_cpu(proc.pid) - cpu0
            conn = sqlite3.connect(db)
            tickets = conn.execute("select count(*) from ticket").fetchone()[0]
            parked = conn.execute(
                "select count(*) from inbound where status = 'parked'").fetchone()[0]
            conn.close()
        finally:
            stop(proc)
            log.close()

        after = null_run()
    base = Result(before.name, before.sent + after.sent, before.ok + after.ok,
                  before.failed + after.failed, before.seconds + after.seconds,
                  before.latencies + after.latencies)
    pipeline_rate = routed.ok / pipeline_secs if pipeline_secs else 0.0
    report = {
        "messages": n, "concurrency": concurrency, "seed": seed, "intake_processes": processes,
        "pipeline_workers": 0 if intake_only else workers,
        "client": "python" if binary is None else "c",
        "mean_size_bytes": int(statistics.mean(len(m[2]) for m in main)),
        "aiosmtpd": {"rate": round(base.rate, 1), "p50_ms": round(base.pct(0.5), 2),
                     "p99_ms": round(base.pct(0.99), 2), "failed": base.failed,
                     "over_100ms": base.slow(100), "max_ms": round(base.longest(), 2),
                     "rate_before": round(before.rate, 1), "rate_after": round(after.rate, 1)},
        "router": {"rate": round(routed.rate, 1), "p50_ms": round(routed.pct(0.5), 2),
                   "p99_ms": round(routed.pct(0.99), 2), "failed": routed.failed,
                   "over_100ms": routed.slow(100), "max_ms": round(routed.longest(), 2),
                   "accept_seconds": round(accept_done, 2),
                   "routed_during_intake": routed_during_intake,
                   "pipeline_seconds": round(pipeline_secs, 2),
                   "pipeline_rate": round(pipeline_rate, 1),
                   "tickets": tickets, "parked": parked},
        # CPU per message of the main load, all of the server's processes, client excluded.
        "cpu_ms_per_message": {
            "aiosmtpd": round(1000 * null_cpu[0] / (2 * n), 3),
            "router": round(1000 * router_cpu / n, 3)},
        "ratio_accept": round(routed.rate / base.rate, 3) if base.rate else None,
        "ratio_pipeline": round(pipeline_rate / base.rate, 3) if base.rate else None,
    }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("-c", "--concurrency", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--intake-only", action="store_true",
                    help="run router with no pipeline worker (acceptance alone)")
    ap.add_argument("--nice", type=int, default=19,
                    help="the pipeline worker's CPU priority ([pipeline] nice)")
    # Defaults as in the example router.toml.
    ap.add_argument("--workers", type=int, default=2,
                    help="pipeline worker processes ([pipeline] workers)")
    ap.add_argument("--processes", type=int, default=2,
                    help="SMTP intake processes sharing the port ([smtp] processes)")
    ap.add_argument("--client", choices=["c", "python"], default="c",
                    help="load generator: bench/smtpload.c (built on demand; Python if no "
                    "compiler) or asyncio in this process")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(args.messages, args.concurrency, args.seed, args.warmup, args.intake_only,
            args.nice, args.workers, args.client, args.processes)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    a, b = r["aiosmtpd"], r["router"]
    assert isinstance(a, dict) and isinstance(b, dict)
    print(f"{r['messages']} messages (mean {r['mean_size_bytes']} B), "
          f"{r['concurrency']} connections, new connection per message, "
          f"client {r['client']}; router: {r['intake_processes']} intake processes, "
          f"{r['pipeline_workers']} pipeline workers")
    print(f"{'server':<26}{'msg/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'>100 ms':>9}{'failed':>8}")
    for name, row in (("aiosmtpd (does nothing)", a), ("router (durable, SQLite)", b)):
        print(f"{name:<26}{row['rate']:>9}{row['p50_ms']:>9}{row['p99_ms']:>9}"
              f"{row['max_ms']:>9}{row['over_100ms']:>9}{row['failed']:>8}")
    print(f"(aiosmtpd ran before and after router: {a['rate_before']} and {a['rate_after']}"
          " msg/s; its row pools both)")
    print(f"acceptance ratio router/aiosmtpd: {r['ratio_accept']}")
    print(f"pipeline: all {b['tickets']} tickets routed {b['pipeline_seconds']} s after the "
          f"first message ({b['pipeline_rate']} msg/s, ratio {r['ratio_pipeline']}), "
          f"parked {b['parked']}; {b['routed_during_intake']} of {r['messages']} routed "
          f"while intake ran ({b['accept_seconds']} s)")
    cpu = r["cpu_ms_per_message"]
    assert isinstance(cpu, dict)
    work = "intake" if r["pipeline_workers"] == 0 else "intake and routing"
    print(f"CPU per message, all of a server's processes, from the first message of the load "
          f"to the last routed: router {cpu['router']} ms ({work}), aiosmtpd doing nothing "
          f"{cpu['aiosmtpd']} ms")


if __name__ == "__main__":
    main()
