"""Runs the rule chain over a message and returns a `Decision`: data, explainable later.

The chain, in order, every step leaving a `Hit` (matched or not) in the decision:

1. ``address``: the role address the customer wrote to names a team (router.rules.address);
   its plus-tag or a campaign address names a campaign (router.campaigns).
2. The admin's ``[[rule]]`` entries of router.toml, in file order (router.rules.configured).
   A matching rule applies its actions (team, priority, tags, alert, suppress_ack, spam) and
   the chain ends when it ``stop``s: by default a rule that routes or marks spam stops, one
   that only tags, prioritises or alerts continues. Later rules override earlier priorities
   (the highest priority given wins) and add tags and alerts. Rules after a stop are recorded
   as "not evaluated".
3. ``learn``: for mail to a generic address (``[learn] generic_addresses``) or to no role
   address at all, the classifier trained on routed and agent-corrected tickets suggests a
   team; with ``[learn] enabled`` and a confidence of at least ``apply_threshold`` it routes.
   It never overrides a rule that routed or the role address of a non-generic team.

No team at the end (and not spam) raises `Unroutable`: the message is parked, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router.campaigns import CampaignMatch, find_campaign
from router.mail import ParsedMail, normalize_address
from router.rules import Context, Hit, Suggestion
from router.rules.address import AddressRule, Resolved
from router.rules.config import PRIORITIES
from router.rules.configured import ConfiguredRule
from router.rules.features import Features
from router.tone import Tone

LEARN_TEXT_CHARS = 5000


class Unroutable(Exception):
    """No rule found a team: the message is parked for an admin, never dropped."""


@dataclass
class Alert:
    rule: str
    to: list[str]
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "to": self.to, "reason": self.reason}


@dataclass
class Decision:
    team: str
    address: str
    tag: str | None
    priority: str = "normal"
    hits: list[Hit] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    suppress_ack: str | None = None      # why no ack (a rule said so), or None
    spam: str | None = None              # why it is spam, or None
    campaign: CampaignMatch | None = None
    tone: Tone | None = None
    language: str | None = None
    suggestion: Suggestion | None = None
    routed_by: str = "address"

    @property
    def reason(self) -> str:
        return "; ".join(h.reason for h in self.hits if h.matched)

    def summary(self) -> dict[str, Any]:
        """Everything decided besides the hits, for agents and `router explain`."""
        return {
            "team": self.team or None, "address": self.address or None, "tag": self.tag,
            "routed_by": self.routed_by, "priority": self.priority, "tags": self.tags,
            "alerts": [a.as_dict() for a in self.alerts], "suppress_ack": self.suppress_ack,
            "spam": self.spam, "language": self.language,
            "campaign": self.campaign.as_dict() if self.campaign else None,
            "tone": self.tone.as_dict() if self.tone else None,
            "suggestion": ({"team": self.suggestion.team,
                            "confidence": round(self.suggestion.confidence, 3),
                            "model_id": self.suggestion.model_id}
                           if self.suggestion else None),
        }

    def hits_json(self) -> list[dict[str, Any]]:
        """The decision record stored in Decision.hits: every hit and miss, then a
        ``{"rule": "decision", ...}`` entry with the summary."""
        return [h.as_dict() for h in self.hits] + [
            {"rule": "decision", "matched": False, "reason": "summary", **self.summary()}]


def _higher(a: str, b: str) -> str:
    return a if PRIORITIES.index(a) >= PRIORITIES.index(b) else b


def learn_text(message: ParsedMail) -> str:
    return f"{message.subject}\n{message.text[:LEARN_TEXT_CHARS]}"


def classify(message: ParsedMail, context: Context, *, language_hint: str | None = None,
             with_tone: bool = False) -> Decision:
    """Route `message` by address, campaigns, rules and the learned classifier.

    The tone (VADER, the costliest feature) is computed only when a rule asks about it, or
    with `with_tone` (``router explain``); otherwise the decision's tone is None."""
    settings = context.settings
    address_hit = AddressRule().check(message, context)
    hits: list[Hit] = [address_hit]
    resolved: Resolved | None = None
    if address_hit.matched:
        resolved = Resolved(address_hit.data["team"], address_hit.data["address"],
                            address_hit.data["tag"])
    features = Features(message, context, resolved, language_hint)
    context.features = features

    team = resolved.team if resolved else ""
    routed_by = "address" if resolved else ""
    priority = "normal"
    tags: list[str] = []
    pending_alerts: list[tuple[str, list[str], str]] = []
    suppress: str | None = None
    spam: str | None = None

    addressed = ([a for _, a in message.to] + [a for _, a in message.cc]
                 + list(context.envelope_rcpts))
    campaign = find_campaign(settings, addressed, resolved, context.now)
    if campaign is not None:
        hits.append(Hit("campaign", True, campaign.reason, {"campaign": campaign.as_dict()}))
        tags.append(f"campaign:{campaign.campaign.name}")

    stopped_by: str | None = None
    rule_routed = False
    for config in settings.rule:
        if stopped_by is not None:
            hits.append(Hit(config.name, False,
                            f"not evaluated: rule {stopped_by} stopped the chain",
                            {"configured": True, "evaluated": False}))
            continue
        rule = ConfiguredRule(config)
        hit = rule.check(message, context)
        hits.append(hit)
        if not hit.matched:
            continue
        actions: list[str] = []
        if config.spam:
            spam = f"rule {config.name}: {hit.reason}"
            actions.append("spam")
        if config.team:
            team, routed_by, rule_routed = config.team, f"rule {config.name}", True
            actions.append(f"team {config.team}")
        if config.priority:
            priority = _higher(priority, config.priority)
            actions.append(f"priority {config.priority}")
        for tag in config.tags:
            if tag not in tags:
                tags.append(tag)
        if config.tags:
            actions.append("tags " + ", ".join(config.tags))
        if config.alert:
            pending_alerts.append((config.name, list(config.alert), hit.reason))
            actions.append("alert " + ", ".join(config.alert))
        if config.suppress_ack:
            suppress = f"rule {config.name} suppresses the acknowledgement"
            actions.append("no ack")
        hit.data["actions"] = actions
        if config.stops:
            hit.data["stop"] = True
            stopped_by = config.name

    suggestion: Suggestion | None = None
    if spam is None:
        generic = {normalize_address(a) for a in settings.learn.generic_addresses}
        learn_hit, suggestion = _learn(message, context, resolved, rule_routed, generic)
        if learn_hit is not None:
            hits.append(learn_hit)
            if learn_hit.matched and suggestion is not None:
                team, routed_by = suggestion.team, "learn"

    if not team and spam is None:
        raise Unroutable(f"{address_hit.reason}: recipients "
                         f"{', '.join(context.envelope_rcpts) or '-'}")

    address = resolved.address if resolved else ""
    team_cfg = settings.team_by_name(team) if team else None
    if not address and team_cfg is not None:
        address = team_cfg.addresses[0]
    alerts: list[Alert] = []
    for rule_name, targets, why in pending_alerts:
        to: list[str] = []
        for t in targets:
            if t == "lead" and team_cfg is not None:
                to.append(team_cfg.lead)
            elif t == "manager" and team_cfg is not None and team_cfg.manager:
                to.append(team_cfg.manager)
            elif "@" in t:
                to.append(t)
        to = list(dict.fromkeys(to))
        if to:
            alerts.append(Alert(rule_name, to, why))
    if spam is not None:
        alerts = []  # spam is stored, not routed: nobody is woken for it
    return Decision(
        team=team, address=address, tag=resolved.tag if resolved else None, priority=priority,
        hits=hits, tags=tags, alerts=alerts, suppress_ack=suppress, spam=spam,
        campaign=campaign, tone=features.tone if with_tone else features.computed_tone,
        language=features.language,
        suggestion=suggestion, routed_by=routed_by)


def _learn(message: ParsedMail, context: Context, resolved: Resolved | None,
           rule_routed: bool, generic: set[str]) -> tuple[Hit | None, Suggestion | None]:
    learn = context.settings.learn
    if context.suggest is None:
        return None, None
    if resolved is not None and resolved.address not in generic:
        return None, None  # the role address of a team decides; nothing to learn here
    if rule_routed:
        return Hit("learn", False, "an explicit rule routed; the classifier never overrides "
                   "it"), None
    suggestion = context.suggest(learn_text(message))
    if suggestion is None:
        return Hit("learn", False, "no trained model"), None
    if context.settings.team_by_name(suggestion.team) is None:
        return Hit("learn", False, f"suggested team {suggestion.team} is no longer "
                   "configured"), None
    data = {"team": suggestion.team, "confidence": round(suggestion.confidence, 3),
            "threshold": learn.apply_threshold, "model_id": suggestion.model_id}
    text = f"classifier suggests {suggestion.team} ({suggestion.confidence:.0%})"
    if not learn.enabled:
        return Hit("learn", False, f"{text}; applying is disabled ([learn] enabled = false)",
                   data), suggestion
    if suggestion.confidence < learn.apply_threshold:
        return Hit("learn", False, f"{text}, below the threshold "
                   f"{learn.apply_threshold:.0%}", data), suggestion
    return Hit("learn", True, f"{text}, at or above the threshold "
               f"{learn.apply_threshold:.0%}: routed to {suggestion.team}", data), suggestion
