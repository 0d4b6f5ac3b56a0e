"""Campaigns: which promotion or product a customer answers, told by the address they used.

A campaign is either its own address (``spring24@acme.example``, which must still be a role
address of a team, or a plus-address of one) or a plus-tag on any role address
(``billing+spring24@``). A ticket that arrives through one carries the campaign's name
(``Ticket.campaign``) and the decision record carries its description for the agents. Outside
its valid dates (inclusive, in the time zone of the team the address belongs to) the campaign
is still recorded, marked expired, and the mail is routed as usual: a customer answering an old
mailing must not be lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from router.mail import normalize_address
from router.rules.address import Resolved
from router.rules.config import Campaign
from router.settings import Settings


@dataclass(frozen=True)
class CampaignMatch:
    campaign: Campaign
    via: str              # the address or tag that named it
    expired: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        c = self.campaign
        return {"name": c.name, "description": c.description, "via": self.via,
                "expired": self.expired,
                "valid_from": c.valid_from.isoformat() if c.valid_from else None,
                "valid_until": c.valid_until.isoformat() if c.valid_until else None}


def _validity(c: Campaign, today: date) -> tuple[bool, str]:
    if c.valid_from and today < c.valid_from:
        return True, f"not yet valid (from {c.valid_from.isoformat()})"
    if c.valid_until and today > c.valid_until:
        return True, f"expired on {c.valid_until.isoformat()}"
    return False, "valid"


def find_campaign(settings: Settings, addressed: list[str], resolved: Resolved | None,
                  now: datetime) -> CampaignMatch | None:
    """The campaign of the first recipient that names one (exact address first, then the
    plus-tag of the resolved role address)."""
    if not settings.campaign:
        return None
    tz = "UTC"
    if resolved is not None:
        team = settings.team_by_name(resolved.team)
        tz = team.timezone if team else "UTC"
    today = now.astimezone(ZoneInfo(tz)).date()
    wanted = [normalize_address(a) for a in addressed if a]
    for camp in settings.campaign:
        if camp.address is not None and camp.address in wanted:
            expired, why = _validity(camp, today)
            return CampaignMatch(camp, camp.address, expired,
                                 f"addressed to campaign address {camp.address}: {why}")
    if resolved is not None and resolved.tag:
        tag = resolved.tag.lower()
        for camp in settings.campaign:
            if camp.tag == tag:
                expired, why = _validity(camp, today)
                return CampaignMatch(camp, f"+{tag}", expired,
                                     f"plus tag \"{tag}\" names campaign {camp.name}: {why}")
    return None
