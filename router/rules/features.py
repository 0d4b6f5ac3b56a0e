"""Facts about a message that several rules test, computed at most once per message."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from router.calendar import BusinessCalendar
from router.language import detect_language
from router.mail import ParsedMail, normalize_address
from router.rules import Context
from router.rules.address import Resolved
from router.tone import Tone, analyze


@dataclass
class Features:
    message: ParsedMail
    context: Context
    resolved: Resolved | None
    language_hint: str | None = None     # e.g. the customer record's language
    notes: dict[str, str] = field(default_factory=dict)

    @cached_property
    def language(self) -> str | None:
        return detect_language(self.message) or self.language_hint

    @cached_property
    def tone(self) -> Tone:
        return analyze(self.message.subject, self.message.text, self.language)

    @property
    def computed_tone(self) -> Tone | None:
        """The tone if a rule needed it, else None (it is not worth computing otherwise)."""
        return self.__dict__.get("tone")

    @cached_property
    def sender(self) -> str:
        return normalize_address(self.message.sender_email or self.context.envelope_sender)

    @cached_property
    def vip(self) -> str | None:
        """Why the sender is a VIP, or None."""
        if self.context.customer_vip:
            return "customer record is marked VIP"
        attr = self.context.customer_attributes.get("vip")
        if attr is True or (isinstance(attr, str) and attr.lower() in ("true", "yes", "1")):
            return "customer attribute vip is set"
        return self.context.settings.vip.matches(self.sender) if self.sender else None

    @cached_property
    def hours(self) -> tuple[bool | None, str]:
        """(outside business hours?, why) for the team the address routes to."""
        if self.resolved is None:
            return None, "no role address, so no team whose hours apply"
        team = self.context.settings.team_by_name(self.resolved.team)
        if team is None:
            return None, f"team {self.resolved.team} is not configured"
        try:
            cal = BusinessCalendar.cached_for_team(team)
        except ValueError as exc:
            return None, str(exc)
        local = self.context.now.astimezone(cal.tz)
        when = f"{local:%a %Y-%m-%d %H:%M} {team.timezone}"
        if cal.is_open(self.context.now):
            return False, f"arrived {when}, within {team.name}'s business hours"
        holiday = " (a holiday)" if cal.is_holiday(local.date()) else ""
        return True, f"arrived {when}{holiday}, outside {team.name}'s business hours"
