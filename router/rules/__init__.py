"""Rules: small named objects that look at a message and say, with a reason, whether they hit.

Modelled on GNU Mailman 3's rules: every rule leaves a `Hit` (matched or not) in the decision
record, so `router explain` and the ticket page can show why mail went where it went.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from router.mail import ParsedMail

if TYPE_CHECKING:  # router.settings imports router.rules.config, which imports this package
    from router.settings import Settings


@dataclass(frozen=True)
class Suggestion:
    """What the learned classifier thinks: a team and how sure it is (0..1)."""

    team: str
    confidence: float
    model_id: int | None = None


@dataclass
class Context:
    settings: Settings
    envelope_rcpts: list[str]
    envelope_sender: str
    now: datetime
    # The customer record's VIP flag and attributes (the pipeline and explain look them up).
    customer_vip: bool = False
    customer_attributes: dict[str, Any] = field(default_factory=dict)
    # The learned team classifier, when a model is trained (router.learn).
    suggest: Callable[[str], Suggestion | None] | None = None
    # Facts about the message computed once per classification (router.rules.features).
    features: Any = None


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
