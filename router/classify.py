"""Runs the rule chain over a message and returns a `Decision`: data, explainable later."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router.mail import ParsedMail
from router.rules import Context, Hit
from router.rules.address import AddressRule


class Unroutable(Exception):
    """No rule found a team: the message is parked for an admin, never dropped."""


@dataclass
class Decision:
    team: str
    address: str
    tag: str | None
    priority: str = "normal"
    hits: list[Hit] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(h.reason for h in self.hits if h.matched)

    def hits_json(self) -> list[dict[str, Any]]:
        return [h.as_dict() for h in self.hits]


def classify(message: ParsedMail, context: Context) -> Decision:
    hit = AddressRule().check(message, context)
    if not hit.matched:
        raise Unroutable(f"{hit.reason}: recipients {', '.join(context.envelope_rcpts) or '-'}")
    return Decision(team=hit.data["team"], address=hit.data["address"], tag=hit.data["tag"],
                    hits=[hit])
