"""Pipeline workers take turns at SQLite's write lock through a lock file (router.turns)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from router.turns import Turns, turns_file
from tests.daemon import make_mail, open_store


def _taken_within(turns: Turns, seconds: float) -> threading.Event:
    """Start taking a turn in a thread; the event is set once it has it."""
    got = threading.Event()

    def take() -> None:
        with turns.turn():
            got.set()

    threading.Thread(target=take, daemon=True).start()
    got.wait(seconds)
    return got


def test_a_turn_waits_for_the_one_in_progress(tmp_path: Path) -> None:
    db = tmp_path / "router.db"
    first, second = Turns(db), Turns(db)
    try:
        with first.turn():
            got = _taken_within(second, 0.3)
            assert not got.is_set(), "two turns at once"
        assert got.wait(10), "the turn ended, and the waiting worker did not get it"
        assert turns_file(db).exists()
    finally:
        first.close()
        second.close()


def test_a_killed_worker_holds_no_turn(tmp_path: Path) -> None:
    """The kernel lets go of a dead process's lock: a worker killed while writing (the OOM
    killer, SIGKILL) must not stop the others."""
    db = tmp_path / "router.db"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from router.turns import Turns\n"
         "t = Turns(Path(sys.argv[1]))\n"
         "with t.turn():\n"
         "    print('holding', flush=True); time.sleep(60)\n", str(db)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    mine = Turns(db)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        got = _taken_within(mine, 0.3)
        assert not got.is_set()
        os.kill(holder.pid, signal.SIGKILL)
        assert got.wait(10), "a dead worker's turn was never released"
    finally:
        holder.kill()
        holder.wait()
        mine.close()


def test_without_a_lock_file_turns_are_sqlites_own(tmp_path: Path) -> None:
    """No lock file to be had (here: its directory is missing): writing still works, with
    SQLite's own waiting, and the log says why."""
    turns = Turns(tmp_path / "missing" / "router.db")
    with turns.turn(), turns.turn():  # nothing held: not even by itself
        pass
    turns.close()


def test_the_pipeline_writes_only_in_its_turn(tmp_path: Path) -> None:
    with open_store(tmp_path / "etc") as store:
        pipeline = store.pipeline
        assert pipeline.turns is not None
        # Models loaded and the first batch done: the next one takes milliseconds.
        store.accept(make_mail(subject="before", message_id="<turn.0@example.org>"))
        assert pipeline.drain() == 1
        store.accept(make_mail(subject="in turn", message_id="<turn.1@example.org>"))
        other = Turns(Path(store.url.removeprefix("sqlite:///")))
        done = threading.Event()
        routed: list[int] = []

        def route() -> None:
            routed.append(pipeline.drain())
            done.set()

        try:
            with other.turn():
                threading.Thread(target=route, daemon=True).start()
                # Parsed and classified meanwhile, but nothing written while we hold it.
                assert not done.wait(2)
            assert done.wait(30)
        finally:
            other.close()
        assert routed == [1]


def test_while_another_worker_writes_a_worker_prepares_more(tmp_path: Path) -> None:
    """Waiting for the other worker's turn, a worker prepares its next messages instead of
    idling (up to `max_prepared`), and routes them all in its turn."""
    with open_store(tmp_path / "etc") as store:
        pipeline = store.pipeline
        pipeline.batch_size = 2
        pipeline.max_prepared = 8
        store.accept(make_mail(subject="warm", message_id="<more.0@example.org>"))
        assert pipeline.drain() == 1
        for i in range(1, 7):
            store.accept(make_mail(subject=f"more {i}", message_id=f"<more.{i}@example.org>"))
        calls: list[int] = []
        all_prepared = threading.Event()
        prepare_rows = pipeline._prepare_rows

        def counting(*args: object, **kw: object) -> None:
            prepare_rows(*args, **kw)  # type: ignore[arg-type]
            calls.append(1)
            if len(calls) == 3:
                all_prepared.set()

        pipeline._prepare_rows = counting  # type: ignore[method-assign]
        other = Turns(Path(store.url.removeprefix("sqlite:///")))
        routed: list[int] = []
        worker = threading.Thread(target=lambda: routed.append(pipeline.process_batch()))
        try:
            with other.turn():
                worker.start()
                assert all_prepared.wait(30), f"prepared {len(calls)} batches while waiting"
            worker.join(30)
        finally:
            other.close()
        assert routed == [6]
        # Nobody else writing: one batch at a time, as before.
        store.accept(make_mail(subject="alone 1", message_id="<alone.1@example.org>"))
        store.accept(make_mail(subject="alone 2", message_id="<alone.2@example.org>"))
        store.accept(make_mail(subject="alone 3", message_id="<alone.3@example.org>"))
        assert pipeline.process_batch() == 2
