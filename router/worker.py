"""The pipeline in its own process, so parsing and routing never take the GIL from intake.

`router serve` starts one; it runs at a lower CPU priority, so under a burst the sender's
250 comes first and routing catches up right behind (the stored message is safe either way).
It dies with its parent (PR_SET_PDEATHSIG), so a killed daemon leaves no orphan writing to
the database while a restarted one starts its own.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

from router import log
from router import settings as config

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the parent-pid check in the loop still catches it
        pass


def pipeline_main(config_path: str, wake: MpEvent, stop: MpEvent, nice: int,
                  log_level: str, log_json: bool | None) -> None:
    _die_with_parent()
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    if nice:
        os.nice(nice)
    log.setup(log_level, json=log_json)
    from router.hooks import default_hooks
    from router.pipeline import Pipeline

    settings = config.load(config_path)
    pipeline = Pipeline(settings.database_url, lambda: settings,
                        batch_size=settings.pipeline.batch_size, hooks=default_hooks())
    done = threading.Event()

    def relay_wake() -> None:
        # Bridge the cross-process event to the pipeline's own, and watch for orphaning.
        while not done.is_set():
            if wake.wait(0.2):
                wake.clear()
                pipeline.wake.set()
            if stop.is_set() or os.getppid() != parent:
                done.set()
                pipeline.wake.set()

    bridge = threading.Thread(target=relay_wake, daemon=True)
    bridge.start()
    try:
        pipeline.run(done)
    finally:
        pipeline.close()


class PipelineProcess:
    def __init__(self, config_path: Path, *, nice: int = 5, log_level: str = "info",
                 log_json: bool | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.wake = ctx.Event()
        self.stop_event = ctx.Event()
        self.process = ctx.Process(
            target=pipeline_main, name="router-pipeline",
            args=(str(config_path), self.wake, self.stop_event, nice, log_level, log_json))

    def start(self) -> None:
        self.process.start()

    def notify(self) -> None:
        self.wake.set()

    def stop(self, timeout: float = 30) -> int | None:
        self.stop_event.set()
        self.wake.set()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        return self.process.exitcode
