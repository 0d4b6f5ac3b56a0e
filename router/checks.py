"""`router check`: the config's own problems plus those of the templates it names."""

from __future__ import annotations

import os

from router import settings as config


def full_check(path: str | os.PathLike[str] | None = None
               ) -> tuple[config.Settings | None, list[config.Problem]]:
    settings, problems = config.check(path)
    if settings is not None:
        from router import ack, escalate

        problems.extend(ack.template_problems(settings))
        problems.extend(escalate.template_problems(settings))
    return settings, problems
