"""Rules: small named objects that look at a message and say, with a reason, whether they hit.

Modelled on GNU Mailman 3's rules: every rule leaves a `Hit` (matched or not) in the decision
record, so `router explain` and the ticket page can show why mail went where it went.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from router.mail import ParsedMail
from router.settings import Settings


@dataclass
class Context:
    settings: Settings
    envelope_rcpts: list[str]
    envelope_sender: str
    now: datetime


@dataclass
class Hit:
    rule: str
    matched: bool
    reason: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "matched": self.matched, "reason": self.reason, **self.data}


class Rule(Protocol):
    name: str
    description: str

    def check(self, message: ParsedMail, context: Context) -> Hit: ...
