"""The pipeline in its own process, so parsing and routing never take the GIL from intake.

`router serve` starts one; it runs at a lower CPU priority, so under a burst the sender's
250 comes first and routing catches up right behind (the stored message is safe either way).
It dies with its parent (PR_SET_PDEATHSIG), so a killed daemon leaves no orphan writing to
the database while a restarted one starts its own.

Config reloads come from the daemon (router.reload): it sends every config it applied through
a queue, and the worker swaps it in between batches. A SIGHUP sent to the worker is passed on
to the daemon, which validates and records the reload for everyone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import threading
from pathlib import Path
from typing import Any, cast

from router import log
from router import settings as config
from router.child import ChildProcess
from router.reload import LiveConfig
from router.signals import Doorbell, Flag

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the parent-pid check in the loop still catches it
        pass


def forward_hup(parent: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(parent, signal.SIGHUP)


def first_settings(config_path: str, updates: Any) -> config.Settings:
    """The daemon sends the config it runs right after starting us; use that one (it is the
    validated one, with its templates snapshot), else load the file ourselves."""
    if updates is not None:
        with contextlib.suppress(queue.Empty):
            return cast(config.Settings, updates.get(timeout=10))
    return config.load(config_path)


def pipeline_main(config_path: str, wake: Doorbell, stop: Flag, nice: int,
                  log_level: str, log_json: bool | None, updates: Any = None,
                  parent: int | None = None, part: tuple[int, int] = (0, 1)) -> None:
    die_with_parent()
    # The parent is named by the daemon, not read here: a daemon killed before the line
    # above ran would leave us adopted by init, and getppid() would then name init.
    parent = parent if parent is not None else os.getppid()
    if os.getppid() != parent:
        return
    # The daemon decides when we stop, and in which order: systemd's stop sends SIGTERM to
    # every process of the unit at once, and we would die mid-batch before it asked us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Reloading is the daemon's job (router.reload): it validates, records and then sends
    # each applied config through `updates`. A SIGHUP sent to us goes to it.
    signal.signal(signal.SIGHUP, lambda *_: forward_hup(parent))
    if nice:
        os.nice(nice)
    log.setup(log_level, json=log_json)
    from router.hooks import default_hooks
    from router.pipeline import Pipeline

    settings = first_settings(config_path, updates)
    live = LiveConfig(settings)
    taking = threading.Lock()  # two threads take updates: keep them in the order sent
    logger = log.get("router.worker")

    def take_updates() -> None:
        with taking:
            while updates is not None:
                try:
                    new = updates.get_nowait()
                except queue.Empty:
                    return
                live.swap(new, trigger="daemon")
                pipeline.batch_size = new.pipeline.batch_size
                logger.info("worker_config_applied", version=new.digest[:16], pid=os.getpid())

    def current_settings() -> config.Settings:
        # Asked once per batch: a batch finishes under the config it began with, and the
        # next one starts with whatever the daemon has sent by then.
        take_updates()
        return live.current()

    logger.info("pipeline_worker_started", pid=os.getpid(), part=f"{part[0]}/{part[1]}")
    pipeline = Pipeline(settings.database_url, current_settings,
                        batch_size=settings.pipeline.batch_size, hooks=default_hooks(),
                        part=part)
    done = threading.Event()

    def relay_wake() -> None:
        # Bridge the cross-process event to the pipeline's own, and watch for orphaning.
        while not done.is_set():
            if wake.wait(0.2):
                take_updates()
                pipeline.wake.set()
            else:
                take_updates()
            if stop.is_set() or os.getppid() != parent:
                done.set()
                pipeline.wake.set()

    bridge = threading.Thread(target=relay_wake, daemon=True)
    bridge.start()
    pipeline.warm_up()
    try:
        pipeline.run(done)
    finally:
        pipeline.close()


class PipelineProcess(ChildProcess):
    kind = "pipeline"

    def __init__(self, config_path: Path, *, nice: int = 5, log_level: str = "info",
                 log_json: bool | None = None, part: tuple[int, int] = (0, 1)) -> None:
        super().__init__()
        self.wake = Doorbell()
        self._args = (str(config_path), nice, log_level, log_json, part)

    def _new_process(self) -> Any:
        path, nice, log_level, log_json, part = self._args
        return self._ctx.Process(
            target=pipeline_main, name="router-pipeline",
            args=(path, self.wake, self.stop_event, nice, log_level, log_json,
                  self.updates, os.getpid(), part))

    def _wake(self) -> None:
        self.wake.ring()

    def notify(self) -> None:
        self.wake.ring()
