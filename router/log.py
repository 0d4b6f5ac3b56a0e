"""structlog, set up once: readable on a terminal, JSON lines everywhere else."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


class LineWriter:
    """Writes each log line with one write(2) on stderr's descriptor.

    The daemon, its pipeline process and their threads all log to the same descriptor; a
    buffered stream may split a line across two writes, and a JSON line interleaved with
    another process's is unreadable to whoever collects the logs."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8", "backslashreplace")
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _line_writer(*_args: Any) -> Any:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured or replaced stderr
        return structlog.PrintLogger(file=sys.stderr)
    sys.stderr.flush()
    return LineWriter(fd)


def setup(level: str = "info", json: bool | None = None) -> None:
    global _configured
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if json
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer] if json
        else [*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_line_writer,
        cache_logger_on_first_use=False,
    )
    _configured = True


def get(name: str = "router") -> Any:
    if not _configured:
        setup()
    return structlog.get_logger(name)
