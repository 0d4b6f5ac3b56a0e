"""While SMTP intake is busy the pipeline puts off its syncs of the disk (router.defer_sync):
WAL checkpoints and the removal of spool files moved to their end wait for a second without
intake commits, or for the disk budget to run out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from router import db
from router import settings as config
from router.checkpoint import Checkpointer
from router.defer_sync import SyncDeferral
from router.intake import spool as spool_module
from router.intake.accept import Acceptor, Envelope
from router.intake.spool import Spool, SpoolMover, spool_files
from tests.conftest import write_config
from tests.daemon import inbound_rows, make_mail, open_store


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'router.db'}"
    db.upgrade(u)
    return u


def _env(i: int, body: str = "hello") -> Envelope:
    return Envelope("smtp", f"c{i}@example.org", ["support@acme.test"],
                    make_mail(subject=f"m {i}", body=body, message_id=f"<m.{i}@example.org>"))


def _accept(spool: Spool, envs: list[Envelope]) -> None:
    async def run() -> None:
        acceptor = Acceptor(None, spool=spool)
        await acceptor.start()
        try:
            await asyncio.gather(*(acceptor.accept(e) for e in envs))
        finally:
            await acceptor.stop()

    asyncio.run(run())


def _wal_size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def _until(cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():  # type: ignore[operator]
        time.sleep(0.02)


# ------------------------------------------------------------------ when to hold


def test_held_while_intake_commits_and_not_a_second_after(url: str) -> None:
    deferral = SyncDeferral(url, 1024**3)
    assert not deferral.holding(), "no spool yet: nothing to wait for"
    spool = Spool(url, 0)
    try:
        _accept(spool, [_env(i) for i in range(3)])
        assert deferral.holding()
        # The same files seen from a moment more than a second later.
        later = SyncDeferral(url, 1024**3, now=lambda: time.time() + 1.5)
        assert not later.holding()
        # Off in the config.
        assert not SyncDeferral(url, 0).holding()
    finally:
        spool.close()


def test_not_held_past_the_limit(url: str) -> None:
    """The log and the spool files count: a budget they already fill is not held."""
    spool = Spool(url, 0)
    try:
        _accept(spool, [_env(i, body="x" * 20_000) for i in range(10)])
        # The database's log, and the spool files with theirs (not the shared-memory index).
        on_disk = sum(p.stat().st_size for p in Path(url.removeprefix("sqlite:///")).parent
                      .iterdir() if p.name == "router.db-wal" or (
                          ".spool-" in p.name and not p.name.endswith("-shm")))
        assert on_disk > 200_000
        assert SyncDeferral(url, on_disk + 100_000).holding()
        assert not SyncDeferral(url, on_disk - 1).holding()
    finally:
        spool.close()


def test_nothing_is_held_without_sqlite_files() -> None:
    assert not SyncDeferral("postgresql+psycopg://router@127.0.0.1:5432/test", 1024**3).holding()
    assert not SyncDeferral("sqlite://", 1024**3).holding()


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    """A file system of `size` (tmpfs), for the rule that deferral never takes more than
    half of the free disk. Needs root, as CI has."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_never_more_than_half_the_free_disk(tmp_path: Path) -> None:
    with _small_disk(tmp_path / "disk", "3m") as disk:
        url = f"sqlite:///{disk / 'router.db'}"
        db.upgrade(url)
        spool = Spool(url, 0)
        try:
            _accept(spool, [_env(0)])
            deferral = SyncDeferral(url, 1024**3)
            assert deferral.holding()
            # Mail fills the disk until what is held is more than what is left.
            i = 1
            while shutil.disk_usage(disk).free > 400_000:
                _accept(spool, [_env(i, body="y" * 100_000)])
                i += 1
            assert not deferral.holding(), "held past half the free disk"
            assert SyncDeferral(url, 1024**3).limit == 1024**3  # the config's limit was not it
        finally:
            spool.close()


# ------------------------------------------------------------------ the checkpointer


def test_the_checkpointer_waits_while_held_and_catches_up_after(tmp_path: Path) -> None:
    path = tmp_path / "router.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (x BLOB)")
    for _ in range(40):
        conn.execute("INSERT INTO t VALUES (?)", (b"x" * 50_000,))
    file_size = path.stat().st_size
    held = [True]
    cp = Checkpointer(path, interval=0.02, limit=500_000, wait=0.05, hold=lambda: held[0])
    try:
        _until(lambda: cp.held >= 10)
        assert cp.held >= 10 and cp.checkpoints == 0 and cp.truncations == 0
        assert _wal_size(path) > 1_000_000 and path.stat().st_size == file_size
        held[0] = False
        _until(lambda: _wal_size(path) == 0)
        assert cp.checkpoints > 0 and cp.truncations > 0, "not caught up once let go"
        assert path.stat().st_size > file_size + 1_000_000
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (40,)
    finally:
        cp.close()
        conn.close()


# ------------------------------------------------------------------ the spool mover


def test_moved_spool_files_are_kept_while_held(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "ROTATE_ROWS", 10)
    spool = Spool(url, 0)
    asked: list[bool] = []
    held = [True]

    def hold() -> bool:
        asked.append(held[0])
        return held[0]

    read, write = db.make_engine(url), db.make_engine(url, immediate=True)
    mover = SpoolMover(url, read, write, hold=hold)
    try:
        for k in range(5):  # files 1, 2 and 3 (two of them full), and 4 made ahead
            _accept(spool, [_env(5 * k + i) for i in range(5)])
        spool.settle()
        assert mover.move() == 25
        assert not asked, "asked with no file ready to go"
        assert mover.move() == 0
        assert [f.number for f in spool_files(url)] == [1, 2, 3, 4]
        assert asked == [True], "asked once per fetch"
        # A kept file is not read again: it was sealed and moved to its end.
        real_read = mover._read
        reads: list[str] = []

        def reading(src, max_rows, max_bytes):  # type: ignore[no-untyped-def]
            reads.append(next(p.name for p, s in mover._sources.items() if s is src))
            return real_read(src, max_rows, max_bytes)

        mover._read = reading  # type: ignore[method-assign]
        assert mover.move() == 0
        assert sorted(reads) == ["router.spool-0-3.db", "router.spool-0-4.db"]
        held[0] = False
        assert mover.move() == 0
        assert [f.number for f in spool_files(url)] == [3, 4]
        assert len(inbound_rows(url)) == 25
    finally:
        mover.close()
        read.dispose()
        write.dispose()
        spool.close()


# ------------------------------------------------------------------ in the pipeline


def test_the_pipeline_holds_by_its_config(tmp_path: Path) -> None:
    with open_store(tmp_path / "etc", extra="") as store:
        pipeline = store.pipeline
        assert pipeline.checkpointer is not None and pipeline.mover is not None
        assert pipeline.checkpointer.hold == pipeline.deferral.holding
        assert pipeline.mover.hold == pipeline.deferral.holding
        assert pipeline.deferral.limit == 1024**3  # the default until a batch reads the config
        # A reload: the next batch reads it.
        store.settings = store.settings.model_copy(
            update={"database": store.settings.database.model_copy(
                update={"busy_log_limit": 64 * 1024**2})})
        store.accept(make_mail(subject="one", message_id="<one@example.org>"))
        assert pipeline.drain() == 1
        assert pipeline.deferral.limit == 64 * 1024**2


def test_the_limit_in_router_toml(tmp_path: Path) -> None:
    def load(value: str) -> config.Settings:
        path = write_config(tmp_path / value.strip('"'), extra="")
        text = path.read_text()
        assert "[database]" in text
        path.write_text(text.replace("[database]", f"[database]\nbusy_log_limit = {value}", 1))
        return config.load(path)

    assert load('"512MB"').database.busy_log_limit == 512 * 1024**2
    assert load("0").database.busy_log_limit == 0
    with pytest.raises(config.ConfigError) as err:
        load('"lots"')
    assert "database.busy_log_limit" in str(err.value) and '"lots" is not a size' in str(err.value)
