"""structlog, set up once: readable on a terminal, JSON lines everywhere else."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get(name: str = "router") -> Any:
    if not _configured:
        setup()
    return structlog.get_logger(name)
