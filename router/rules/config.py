"""The router.toml schema of rules, campaigns, VIPs and the learned classifier.

Kept here (not in router.settings) so the rules own their configuration; `Settings` imports
these models. This module must not import router.settings at import time (settings imports
it), so it has its own strict base class.

A rule is one ``[[rule]]`` table: a name, conditions and actions, all flat keys::

    [[rule]]
    name = "angry-vip"
    description = "a VIP writes angrily: the lead hears now"
    vip = true
    tone = ["negative"]
    priority = "urgent"
    alert = ["lead"]

Conditions (every one given must hold; ``match = "any"``: one is enough; none given: the rule
matches every message): ``header`` (name → regular expression, "" for "present"),
``sender``, ``sender_domain``, ``recipient``, ``subject``/``body`` (regular expressions),
``keywords`` (words in subject or body), ``attachment``, ``attachment_type``, ``language``,
``vip``, ``outside_hours``, ``urgent``, ``tone``.

Actions: ``team``, ``priority``, ``tags``, ``alert``, ``suppress_ack``, ``spam``; ``stop``
ends the chain after a hit. ``stop`` defaults to true for rules that route (``team``) or mark
spam and to false for the rest, so tagging and alerting rules compose and the first routing
rule wins.

Regular expressions are compiled when the config loads (a bad one is a config error naming
the rule, the line and the column in the expression) and run with the `regex` package's
``timeout`` on at most `MAX_MATCH_CHARS` characters, so a pathological pattern cannot stall
intake: a match that runs out of time counts as a miss with the reason "timed out".
"""

from __future__ import annotations

import re
from datetime import date
from functools import lru_cache
from typing import Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Priority = Literal["low", "normal", "high", "urgent"]
ToneLabel = Literal["negative", "neutral", "positive"]
PRIORITIES: tuple[str, ...] = ("low", "normal", "high", "urgent")

REGEX_FLAGS = regex.IGNORECASE | regex.UNICODE
REGEX_TIMEOUT = 0.05          # seconds per match
MAX_MATCH_CHARS = 64 * 1024   # of a body; subjects and headers are short anyway
ALERT_ROLES = ("lead", "manager")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
_DOMAIN = re.compile(r"^(?:\*\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)+$")


def _clean_domains(v: list[str]) -> list[str]:
    out = []
    for d in v:
        d = d.strip().lower().lstrip("@")
        if not _DOMAIN.match(d):
            raise ValueError(f"\"{d}\" is not a domain (write example.com or *.example.com)")
        out.append(d)
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """Compile once; the config validators call this at load, the rules at run time (cached)."""
    return regex.compile(pattern, REGEX_FLAGS)


def _check_pattern(pattern: str) -> str:
    try:
        compile_pattern(pattern)
    except regex.error as exc:
        col = getattr(exc, "colno", None) or ((exc.pos or 0) + 1)
        raise ValueError(f"bad regular expression {pattern!r} at column {col}: "
                         f"{getattr(exc, 'msg', str(exc))}") from None
    return pattern


def keyword_pattern(words: tuple[str, ...]) -> regex.Pattern[str]:
    alternatives = "|".join(regex.escape(w.strip()) for w in words if w.strip())
    return compile_pattern(rf"(?<!\w)(?:{alternatives})(?!\w)")


def _address(value: str) -> str:
    value = value.strip().lower()
    if not _ADDRESS.match(value):
        raise ValueError(f"\"{value}\" is not a mail address (expected name@domain.tld)")
    return value


class RuleConfig(_Strict):
    name: str
    description: str = ""
    match: Literal["all", "any"] = "all"
    # -- conditions
    header: dict[str, str] = {}
    sender: list[str] = []
    sender_domain: list[str] = []
    recipient: list[str] = []
    subject: str | None = None
    body: str | None = None
    keywords: list[str] = []
    attachment: bool | None = None
    attachment_type: list[str] = []
    language: list[str] = []
    vip: bool | None = None
    outside_hours: bool | None = None
    urgent: bool | None = None
    tone: list[ToneLabel] = []
    # -- actions
    team: str | None = None
    priority: Priority | None = None
    tags: list[str] = []
    alert: list[str] = []
    suppress_ack: bool = False
    spam: bool = False
    stop: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"rule name \"{v}\" must be lowercase letters, digits, ., - or _")
        return v

    @field_validator("subject", "body")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        return None if v is None else _check_pattern(v)

    @field_validator("header")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            if not re.fullmatch(r"[!-9;-~]+", name):
                raise ValueError(f"\"{name}\" is not a header name")
            if pattern:
                try:
                    _check_pattern(pattern)
                except ValueError as exc:
                    raise ValueError(f"header {name}: {exc}") from None
        return v

    @field_validator("sender", "recipient")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        return [_address(a) for a in v]

    @field_validator("sender_domain")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        return _clean_domains(v)

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, v: list[str]) -> list[str]:
        if any(not w.strip() for w in v):
            raise ValueError("empty keyword")
        return v

    @field_validator("attachment_type")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        for t in v:
            if not (re.fullmatch(r"\.[A-Za-z0-9]+", t)
                    or re.fullmatch(r"[a-z0-9.+-]+/(?:\*|[a-z0-9.+-]+)", t.lower())):
                raise ValueError(f"\"{t}\" is not a MIME type (application/pdf, image/*) or a "
                                 "file extension (.pdf)")
        return [t.lower() for t in v]

    @field_validator("language")
    @classmethod
    def _langs(cls, v: list[str]) -> list[str]:
        for lang in v:
            if not re.fullmatch(r"[a-z]{2,3}", lang.lower()):
                raise ValueError(f"\"{lang}\" is not a language code (en, tr, de, ...)")
        return [lang.lower() for lang in v]

    @field_validator("alert")
    @classmethod
    def _alert(cls, v: list[str]) -> list[str]:
        return [a if a in ALERT_ROLES else _address(a) for a in v]

    @model_validator(mode="after")
    def _has_action(self) -> RuleConfig:
        if not (self.team or self.priority or self.tags or self.alert or self.suppress_ack
                or self.spam):
            raise ValueError(f"rule \"{self.name}\" has no action; give team, priority, tags, "
                             "alert, suppress_ack or spam")
        if self.spam and self.team:
            raise ValueError(f"rule \"{self.name}\": spam is not routed, drop team or spam")
        return self

    @property
    def stops(self) -> bool:
        if self.stop is not None:
            return self.stop
        return bool(self.team or self.spam)


class Campaign(_Strict):
    """A campaign address (``spring24@``) or plus-tag (``billing+spring24@``)."""

    name: str
    address: str | None = None
    tag: str | None = None
    description: str = ""
    valid_from: date | None = None
    valid_until: date | None = None

    @field_validator("address")
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        return None if v is None else _address(v)

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", v):
            raise ValueError(f"plus-tag \"{v}\" may only hold letters, digits, ., - and _")
        return None if v is None else v.lower()

    @model_validator(mode="after")
    def _one_key(self) -> Campaign:
        if (self.address is None) == (self.tag is None):
            raise ValueError(f"campaign \"{self.name}\": give exactly one of address or tag")
        if self.valid_from and self.valid_until and self.valid_until < self.valid_from:
            raise ValueError(f"campaign \"{self.name}\": valid_until is before valid_from")
        return self


class VipConfig(_Strict):
    """Customers treated as VIPs; a customer record with ``vip`` set (or an attribute
    ``vip = true``) counts too."""

    addresses: list[str] = []
    domains: list[str] = []

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        return [_address(a) for a in v]

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        return _clean_domains(v)

    def matches(self, email: str) -> str | None:
        email = email.lower()
        if email in self.addresses:
            return f"{email} is on the VIP list"
        domain = email.rpartition("@")[2]
        for d in self.domains:
            if domain_matches(domain, d):
                return f"domain {domain} is a VIP domain"
        return None


class LearnConfig(_Strict):
    enabled: bool = False             # apply confident suggestions (else only suggest)
    apply_threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    generic_addresses: list[str] = []
    min_examples: int = Field(default=20, ge=2)

    @field_validator("generic_addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        return [_address(a) for a in v]


def domain_matches(domain: str, pattern: str) -> bool:
    """``example.com`` matches itself and its subdomains; ``*.example.com`` only subdomains."""
    domain = domain.lower()
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern or domain.endswith("." + pattern)


Problem = tuple[tuple[str | int, ...], str, Literal["error", "warning"]]


def config_problems(settings: object) -> list[Problem]:
    """Checks across fields (teams named by rules exist, ...) for settings.semantic_problems."""
    from router.rules.address import resolve_address
    from router.settings import Settings

    assert isinstance(settings, Settings)
    out: list[Problem] = []
    teams = {t.name for t in settings.team}
    seen: set[str] = set()
    for i, rule in enumerate(settings.rule):
        if rule.name in seen:
            out.append((("rule", i, "name"), f"rule name \"{rule.name}\" is used twice",
                        "error"))
        seen.add(rule.name)
        if rule.team is not None and rule.team not in teams:
            out.append((("rule", i, "team"), f"team \"{rule.team}\" does not exist; teams: "
                        f"{', '.join(sorted(teams))}", "error"))
        for a in rule.recipient:
            if resolve_address(settings, a) is None:
                out.append((("rule", i, "recipient"), f"{a} is not a role address of any "
                            "team, so this condition never holds", "warning"))
    names: set[str] = set()
    for i, camp in enumerate(settings.campaign):
        if camp.name in names:
            out.append((("campaign", i, "name"), f"campaign \"{camp.name}\" is used twice",
                        "error"))
        names.add(camp.name)
        if camp.address is not None and resolve_address(settings, camp.address) is None:
            out.append((("campaign", i, "address"), f"{camp.address} is not a role address "
                        "of any team (or a plus-address of one), so no mail reaches it",
                        "error"))
    for i, addr in enumerate(settings.learn.generic_addresses):
        if resolve_address(settings, addr) is None:
            out.append((("learn", "generic_addresses", i), f"{addr} is not a role address "
                        "of any team", "error"))
    return out
