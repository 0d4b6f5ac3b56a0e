"""router.toml: its schema, its loader, and the checks that speak an admin's language.

Every problem is reported with the file, the field path (``team[1].sla.first_response``) and,
where the TOML text lets us find it, the line. `load` raises `ConfigError` holding *all*
problems at once, so an admin fixes a config in one pass rather than one error per run.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, time, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.rules.config import (
    Campaign,
    LearnConfig,
    RuleConfig,
    VipConfig,
    config_problems,
)
from router.tomllines import key_lines, line_of

DEFAULT_CONFIG = "router.toml"
ENV_CONFIG = "ROUTER_CONFIG"

# ---------------------------------------------------------------------------- value types

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
DURATION_HELP = (
    "use a number followed by a unit, without spaces: 90s, 15m, 2h, 1d "
    "(units s, m, h, d; they combine, as in 1h30m)"
)


def parse_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"a duration must be text such as \"15m\"; {DURATION_HELP}")
    if isinstance(value, int):
        raise ValueError(f"bare number {value} has no unit; {DURATION_HELP}")
    text = value.strip().lower()
    m = _DURATION.match(text)
    if not text or not m or not any(m.groups()):
        raise ValueError(f"\"{value}\" is not a duration; {DURATION_HELP}")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return timedelta(days=d, hours=h, minutes=mi, seconds=s)


def format_duration(td: timedelta) -> str:
    secs = int(td.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            parts.append(f"{secs // size}{unit}")
            secs %= size
    return "".join(parts) or "0s"


_SIZE = re.compile(r"^(\d+)\s*(b|kb|k|mb|m|gb|g)?$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2,
               "g": 1024**3, "gb": 1024**3}


def parse_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    m = _SIZE.match(str(value).strip()) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"\"{value}\" is not a size; use bytes or a unit: 512KB, 25MB, 1GB")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower() if m.group(2) else None]


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"{what} \"{value}\" must be host:port, e.g. 127.0.0.1:2525")
    return host.strip("[]") or "127.0.0.1", int(port)


_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")


def check_address(value: str) -> str:
    if not _ADDRESS.match(value):
        raise ValueError(f"\"{value}\" is not a mail address (expected name@domain.tld)")
    return value.strip().lower()


# ---------------------------------------------------------------------------- schema

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterSection(Strict):
    name: str = "router"
    ticket_token: str = "[#{id}]"
    default_language: str = "en"

    @field_validator("ticket_token")
    @classmethod
    def _token(cls, v: str) -> str:
        if "{id}" not in v:
            raise ValueError(f"ticket_token \"{v}\" must contain {{id}}, e.g. \"[#{{id}}]\"")
        if v.strip() == "{id}":
            raise ValueError("ticket_token needs text around {id} so it is recognisable")
        return v


class SmtpSection(Strict):
    listen: str = "127.0.0.1:2525"
    hostname: str = "router.localhost"
    max_message_size: int = 25 * 1024 * 1024
    protocol: Literal["smtp", "lmtp"] = "smtp"
    enabled: bool = True
    # Processes accepting on the port together (SO_REUSEPORT): one event loop is one core.
    processes: int = Field(default=1, ge=1, le=16)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_hostport(v, "listen")
        return v

    @field_validator("max_message_size", mode="before")
    @classmethod
    def _size(cls, v: object) -> int:
        return parse_size(v)

    @property
    def host(self) -> str:
        return parse_hostport(self.listen, "listen")[0]

    @property
    def port(self) -> int:
        return parse_hostport(self.listen, "listen")[1]


class DatabaseSection(Strict):
    url: str = "sqlite:///router.db"


class RelaySection(Strict):
    host: str = "127.0.0.1"
    port: int = 25
    starttls: bool = False
    username: str = ""
    password_file: str = ""
    timeout: timedelta = timedelta(seconds=30)
    max_attempts: int = Field(default=8, ge=1, le=100)

    @field_validator("timeout", mode="before")
    @classmethod
    def _dur(cls, v: object) -> timedelta:
        return parse_duration(v)


class WebSection(Strict):
    listen: str = "127.0.0.1:8080"
    enabled: bool = False

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_hostport(v, "listen")
        return v


class PipelineSection(Strict):
    workers: int = Field(default=1, ge=0, le=16)   # 0: this instance only takes mail in
    # Messages parsed and classified before the write lock is taken: a larger batch lets a
    # worker prepare while another writes (up to 32 MB of mail in one batch).
    batch_size: int = Field(default=32, ge=1, le=1000)
    nice: int = Field(default=19, ge=0, le=19)     # intake's 250 comes before routing


class AckSection(Strict):
    enabled: bool = True
    grace_period: timedelta = timedelta(hours=24)
    daily_cap: int = Field(default=5, ge=0)
    quantile: float = Field(default=0.9, gt=0.5, lt=1.0)
    min_history: int = Field(default=20, ge=1)

    @field_validator("grace_period", mode="before")
    @classmethod
    def _dur(cls, v: object) -> timedelta:
        return parse_duration(v)


class Member(Strict):
    name: str
    email: str
    role: Literal["agent", "lead", "manager"] = "agent"

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        return check_address(v)


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")


def _parse_spans(text: str) -> list[tuple[time, time]]:
    text = text.strip().lower()
    if text in ("", "closed"):
        return []
    spans = []
    for chunk in text.split(","):
        m = _SPAN.match(chunk.strip())
        if not m:
            raise ValueError(
                f"\"{chunk.strip()}\" is not a time span; write \"09:00-17:00\", several as "
                "\"09:00-12:00, 13:00-17:00\", or \"closed\"")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise ValueError(f"\"{chunk.strip()}\" has an impossible time of day")
        start = time(h1, m1)
        end = time(23, 59, 59, 999999) if h2 == 24 else time(h2, m2)
        if end <= start:
            raise ValueError(f"\"{chunk.strip()}\" ends before it starts")
        spans.append((start, end))
    return sorted(spans)


def _day_keys(key: str) -> list[int]:
    key = key.lower()
    if key in _DAYS:
        return [_DAYS.index(key)]
    a, sep, b = key.partition("-")
    if sep and a in _DAYS and b in _DAYS and _DAYS.index(a) <= _DAYS.index(b):
        return list(range(_DAYS.index(a), _DAYS.index(b) + 1))
    raise ValueError(f"\"{key}\" is not a day; use mon, tue, wed, thu, fri, sat, sun or a "
                     "range such as mon-fri")


class SlaTargets(Strict):
    first_response: timedelta = timedelta(hours=4)
    next_response: timedelta = timedelta(hours=8)
    resolution: timedelta = timedelta(days=3)
    business_hours: bool = True

    @field_validator("first_response", "next_response", "resolution", mode="before")
    @classmethod
    def _dur(cls, v: object) -> timedelta:
        return parse_duration(v)


SLA_CLOCKS = ("first_response", "next_response", "resolution")
NOTIFY_ROLES = ("assignee", "lead", "manager", "team")
PRIORITIES = ("low", "normal", "high", "urgent")


class EscalationStep(Strict):
    """One rung of a team's escalation ladder (router.escalate): when it fires, on which SLA
    clock, and what it does. Checks that need the team or several fields live in
    `_escalation_problems`, so they report a path and a line like the other semantic checks."""

    after: timedelta | None = None
    before_breach: timedelta | None = None
    clock: Literal["first_response", "next_response", "resolution"] = "first_response"
    notify: list[str] = []
    set_priority: Literal["low", "normal", "high", "urgent"] | None = None
    reassign: str | None = None
    webhook: str | None = None

    @field_validator("after", "before_breach", mode="before")
    @classmethod
    def _dur(cls, v: object) -> timedelta | None:
        if v is None:
            return None
        td = parse_duration(v)
        if td <= timedelta(0):
            raise ValueError(f"\"{v}\" is zero; a step needs a positive duration such as 15m")
        return td

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"webhook \"{v}\" must be an http:// or https:// URL")
        return v

    @property
    def key(self) -> str:
        """Names the step in the fired-steps table; stable while the step's timing is."""
        if self.after is not None:
            return f"after={format_duration(self.after)}"
        return f"before_breach={format_duration(self.before_breach or timedelta(0))}"

    def offset(self, sla: SlaTargets) -> timedelta:
        """Clock time at which the step fires."""
        if self.after is not None:
            return self.after
        target: timedelta = getattr(sla, self.clock)
        return target - (self.before_breach or timedelta(0))


class Holidays(Strict):
    country: str | None = None
    subdivision: str | None = None
    extra: list[date] = []


class Team(Strict):
    name: str
    display_name: str = ""
    addresses: list[str]
    lead: str
    manager: str | None = None
    members: list[Member]
    timezone: str = "UTC"
    business_hours: str | dict[str, str] = "24/7"
    holidays: Holidays = Holidays()
    sla: SlaTargets = SlaTargets()
    ack_template: str | None = None
    escalation: list[EscalationStep] = []
    # Agent mail (router.agentmail) and assignment of new tickets (router.assign).
    notify_agents: bool = False
    assignment: Literal["manual", "round_robin", "least_loaded"] = "manual"
    max_open_per_agent: int = Field(default=0, ge=0)   # 0: no cap

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9_-]*$", v):
            raise ValueError(f"team name \"{v}\" must be lowercase letters, digits, - or _ "
                             "(it is used in commands and URLs)")
        return v

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a team needs at least one address")
        return [check_address(a) for a in v]

    @field_validator("lead", "manager")
    @classmethod
    def _lead(cls, v: str | None) -> str | None:
        return None if v is None else check_address(v)

    # "before", so a wrong type is explained here rather than as one pydantic error per
    # member of the union, with paths like business_hours.dict[str,str].
    @field_validator("business_hours", mode="before")
    @classmethod
    def _hours(cls, v: object) -> object:
        usage = "must be \"24/7\" or a table such as { mon-fri = \"09:00-17:00\" }"
        if isinstance(v, str):
            if v.strip().lower() not in ("24/7", "always"):
                raise ValueError(f"business_hours \"{v}\" {usage}")
            return v
        if not isinstance(v, dict):
            raise ValueError(f"business_hours {v!r} {usage}")
        for key, spans in v.items():
            _day_keys(key)
            if not isinstance(spans, str):
                raise ValueError(f"{key} = {spans!r}: hours are text such as \"09:00-17:00\"")
            _parse_spans(spans)
        return v

    @property
    def label(self) -> str:
        return self.display_name or self.name

    def weekly_hours(self) -> dict[int, list[tuple[time, time]]] | None:
        """Open spans per weekday (0=Monday); None means around the clock."""
        if isinstance(self.business_hours, str):
            return None
        week: dict[int, list[tuple[time, time]]] = {d: [] for d in range(7)}
        for key, spans in self.business_hours.items():
            for d in _day_keys(key):
                week[d] = _parse_spans(spans)
        return week

    def member(self, email: str) -> Member | None:
        email = email.lower()
        return next((m for m in self.members if m.email == email), None)


class ImapAccount(Strict):
    name: str
    host: str
    port: int = 993
    tls: Literal["ssl", "starttls", "none"] = "ssl"
    user: str
    password: str | None = None
    password_file: str | None = None
    folder: str = "INBOX"
    address: str
    after: Literal["move", "seen", "delete"] = "seen"
    move_to: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_address(v)


class Settings(Strict):
    router: RouterSection = RouterSection()
    smtp: SmtpSection = SmtpSection()
    database: DatabaseSection = DatabaseSection()
    relay: RelaySection = RelaySection()
    web: WebSection = WebSection()
    ack: AckSection = AckSection()
    pipeline: PipelineSection = PipelineSection()
    templates: str = "templates"
    team: list[Team]
    imap: list[ImapAccount] = []
    rule: list[RuleConfig] = []
    campaign: list[Campaign] = []
    vip: VipConfig = VipConfig()
    learn: LearnConfig = LearnConfig()

    # Filled by `load`; not part of the TOML.
    source: str = ""
    base_dir: str = "."
    digest: str = ""

    def team_by_name(self, name: str) -> Team | None:
        return next((t for t in self.team if t.name == name), None)

    @property
    def templates_dir(self) -> Path:
        return Path(self.base_dir) / self.templates

    @property
    def database_url(self) -> str:
        return resolve_database_url(self.database.url, Path(self.base_dir))

    def address_map(self) -> Mapping[str, str]:
        """Role address → team. Built once per config: SMTP asks it on every RCPT.
        Keyed by the team list itself, so a `model_copy(update={"team": ...})` never sees
        the map of the config it was copied from. Shared: callers must not change it."""
        cached = self.__dict__.get("_address_cache")
        if cached is None or cached[0] is not self.team:
            cached = (self.team, {a: t.name for t in self.team for a in t.addresses})
            self.__dict__["_address_cache"] = cached
        return cached[1]


def resolve_database_url(url: str, base: Path) -> str:
    """A relative SQLite path means "next to the config file", not "wherever we were started"."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////"):
        rel = url[len(prefix):]
        if rel and rel != ":memory:" and not rel.startswith("file:"):
            return prefix + str((base / rel).resolve())
    return url


# ---------------------------------------------------------------------------- problems

@dataclass(frozen=True)
class Problem:
    file: str
    path: str
    message: str
    line: int | None = None
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        field_part = f" {self.path}:" if self.path else ""
        return f"{where}: {self.severity}:{field_part} {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "path": self.path,
                "severity": self.severity, "message": self.message}


@dataclass
class ConfigError(Exception):
    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_for(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc`, to list its allowed keys."""
    model: Any = Settings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        f = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if f is None:
            return None
        ann = f.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
                   None)
        if nxt is None:
            return None
        model = nxt
    return model


def _explain(err: dict[str, Any]) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        model = _model_for(loc)
        allowed = sorted(k for k in (model.model_fields if model else {})
                         if k not in ("source", "base_dir", "digest"))
        near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean \"{near[0]}\"?)" if near else ""
        return (f"unknown key \"{loc[-1]}\"{hint}; allowed here: {', '.join(allowed)}"
                if allowed else f"unknown key \"{loc[-1]}\"")
    if kind == "missing":
        return f"required key \"{loc[-1]}\" is missing"
    if kind == "value_error":
        return str(err["ctx"].get("error", err["msg"])) if "ctx" in err else err["msg"]
    if kind in ("literal_error", "enum"):
        return f"{err['msg'].lower()}, got {err.get('input')!r}"
    return f"{err['msg']} (got {err.get('input')!r})"


# ---------------------------------------------------------------------------- loading

ENV_OVERRIDES = {
    "ROUTER_DATABASE_URL": ("database", "url"),
    "ROUTER_SMTP_LISTEN": ("smtp", "listen"),
    "ROUTER_WEB_LISTEN": ("web", "listen"),
}
_ENV_HOSTPORT = ("ROUTER_SMTP_LISTEN", "ROUTER_WEB_LISTEN")


def config_path(explicit: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(explicit or env.get(ENV_CONFIG) or DEFAULT_CONFIG)


def _apply_env(data: dict[str, Any], env: Mapping[str, str], problems: list[Problem]) -> None:
    for var, (section, key) in ENV_OVERRIDES.items():
        if var not in env:
            continue
        if var in _ENV_HOSTPORT:
            # Checked here so the problem names the variable; checked by the schema it would
            # point at the file's [section] line, whose value is not the one in use.
            try:
                parse_hostport(env[var], var)
            except ValueError as exc:
                problems.append(Problem("environment", var, str(exc)))
                continue
        data.setdefault(section, {})[key] = env[var]
    if "ROUTER_RELAY" in env:
        try:
            host, port = parse_hostport(env["ROUTER_RELAY"], "ROUTER_RELAY")
        except ValueError as exc:
            problems.append(Problem("environment", "ROUTER_RELAY", str(exc)))
        else:
            relay = data.setdefault("relay", {})
            relay["host"], relay["port"] = host, port


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
         text: str | None = None) -> Settings:
    """Load and check a config; raise ConfigError with every problem found."""
    settings, problems = check(path, env, text)
    if settings is None or any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return settings


def check(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
          text: str | None = None) -> tuple[Settings | None, list[Problem]]:
    env = os.environ if env is None else env
    file = config_path(path, env)
    fname = str(file)
    problems: list[Problem] = []
    if text is None:
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, [Problem(fname, "", "config file not found (set ROUTER_CONFIG or "
                                  "pass -c FILE)")]
        except (OSError, UnicodeDecodeError) as exc:
            return None, [Problem(fname, "", f"cannot read config: {exc}")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        return None, [Problem(fname, "", f"not valid TOML: {exc}",
                              int(m.group(1)) if m else None)]
    lines = key_lines(text)
    _apply_env(data, env, problems)
    data["source"] = fname
    data["base_dir"] = str(file.resolve().parent)
    data["digest"] = hashlib.sha256(text.encode()).hexdigest()
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            problems.append(Problem(fname, _dotted(loc), _explain(err), line_of(lines, loc)))
        return None, problems
    problems.extend(semantic_problems(settings, lines))
    return settings, problems


def semantic_problems(s: Settings, lines: dict[tuple[str | int, ...], int]) -> list[Problem]:
    """Checks that span fields: things pydantic's per-field validation cannot see."""
    out: list[Problem] = []

    def add(loc: tuple[str | int, ...], msg: str, severity: Literal["error", "warning"] = "error"
            ) -> None:
        out.append(Problem(s.source, _dotted(loc), msg, line_of(lines, loc), severity))

    seen_addr: dict[str, str] = {}
    seen_team: set[str] = set()
    zones = available_timezones()
    for ti, team in enumerate(s.team):
        if team.name in seen_team:
            add(("team", ti, "name"), f"team name \"{team.name}\" is used twice")
        seen_team.add(team.name)
        for ai, addr in enumerate(team.addresses):
            if addr in seen_addr and seen_addr[addr] != team.name:
                add(("team", ti, "addresses", ai),
                    f"address {addr} is already used by team \"{seen_addr[addr]}\"; an address "
                    "routes to exactly one team")
            seen_addr.setdefault(addr, team.name)
        if team.member(team.lead) is None:
            add(("team", ti, "lead"), f"lead {team.lead} is not one of the team's members; add "
                f"{{ name = \"...\", email = \"{team.lead}\" }} to members")
        if team.manager and team.member(team.manager) is None:
            add(("team", ti, "manager"), f"manager {team.manager} is not one of the team's "
                "members")
        emails = [m.email for m in team.members]
        for mi, m in enumerate(team.members):
            if emails.index(m.email) != mi:
                add(("team", ti, "members", mi), f"member {m.email} is listed twice")
        if team.timezone not in zones:
            try:
                ZoneInfo(team.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                near = difflib.get_close_matches(team.timezone, sorted(zones), n=1)
                hint = f" (did you mean \"{near[0]}\"?)" if near else ""
                add(("team", ti, "timezone"), f"time zone \"{team.timezone}\" does not exist"
                    f"{hint}; use an IANA name such as Europe/Berlin")
        if team.holidays.country:
            import holidays as holidays_lib

            try:
                holidays_lib.country_holidays(team.holidays.country,
                                              subdiv=team.holidays.subdivision)
            except NotImplementedError as exc:
                add(("team", ti, "holidays"), f"unknown holiday calendar: {exc}")
        if team.timezone in zones:
            from router.calendar import BusinessCalendar

            try:
                BusinessCalendar.for_team(team)
            except (ValueError, ZoneInfoNotFoundError) as exc:
                add(("team", ti, "business_hours"), str(exc))
        for loc, msg in _escalation_problems(s, ti, team):
            add(loc, msg)
        if team.ack_template is not None and not (s.templates_dir / team.ack_template).is_file():
            add(("team", ti, "ack_template"), f"template \"{team.ack_template}\" not found in "
                f"{s.templates_dir}")
    for ii, acct in enumerate(s.imap):
        if acct.address not in seen_addr:
            add(("imap", ii, "address"), f"{acct.address} is not an address of any team")
        if acct.password is None and acct.password_file is None:
            add(("imap", ii), "give password or password_file")
        if acct.after == "move" and not acct.move_to:
            add(("imap", ii, "move_to"), "after = \"move\" needs move_to = \"FOLDER\"")
    if not s.templates_dir.is_dir():
        add(("templates",), f"templates directory {s.templates_dir} does not exist")
    for loc, msg, severity in config_problems(s):  # rules, campaigns, learn (router.rules)
        add(loc, msg, severity)
    return out


def _escalation_problems(s: Settings, ti: int, team: Team
                         ) -> list[tuple[tuple[str | int, ...], str]]:
    """Ladder checks: steps that can fire, targets and teams that exist, listed in order."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    names = [t.name for t in s.team]
    last: dict[str, tuple[int, timedelta]] = {}
    for si, step in enumerate(team.escalation):
        loc: tuple[str | int, ...] = ("team", ti, "escalation", si)
        if (step.after is None) == (step.before_breach is None):
            out.append((loc, "a step needs exactly one of after = \"15m\" (counted from the "
                        "clock's start) or before_breach = \"10m\" (counted back from the "
                        "SLA target)"))
            continue
        if not (step.notify or step.set_priority or step.reassign or step.webhook):
            out.append((loc, "a step must do something: notify = [...], set_priority = "
                        "\"...\", reassign = \"TEAM\" or webhook = \"URL\""))
        for ni, target in enumerate(step.notify):
            if "@" in target:
                try:
                    check_address(target)
                except ValueError as exc:
                    out.append(((*loc, "notify", ni), str(exc)))
            elif target not in NOTIFY_ROLES:
                near = difflib.get_close_matches(target, NOTIFY_ROLES, n=1)
                hint = f" (did you mean \"{near[0]}\"?)" if near else ""
                out.append(((*loc, "notify", ni), f"unknown notify target \"{target}\"{hint}; "
                            f"use {', '.join(NOTIFY_ROLES)} or a mail address"))
            elif target == "manager" and not (
                    team.manager or any(m.role == "manager" for m in team.members)):
                out.append(((*loc, "notify", ni), f"notify \"manager\", but team "
                            f"\"{team.name}\" has no manager; set manager = \"...\" or give a "
                            "member role = \"manager\""))
        if step.reassign is not None:
            if step.reassign == team.name:
                out.append(((*loc, "reassign"), f"reassign to \"{step.reassign}\", the team's "
                            "own name; name another team"))
            elif step.reassign not in names:
                near = difflib.get_close_matches(step.reassign, names, n=1)
                hint = f" (did you mean \"{near[0]}\"?)" if near else ""
                out.append(((*loc, "reassign"), f"reassign to unknown team "
                            f"\"{step.reassign}\"{hint}; teams: {', '.join(names)}"))
        offset = step.offset(team.sla)
        if step.before_breach is not None and offset <= timedelta(0):
            target_td: timedelta = getattr(team.sla, step.clock)
            out.append(((*loc, "before_breach"), f"before_breach = "
                        f"\"{format_duration(step.before_breach)}\" is not shorter than the "
                        f"{step.clock} target ({format_duration(target_td)}), so the step "
                        "would fire the moment the clock starts"))
            continue
        prev = last.get(step.clock)
        if prev is not None and offset <= prev[1]:
            when = "at the same moment as" if offset == prev[1] else "before"
            out.append((loc, f"steps out of order: this step fires {when} step {prev[0] + 1} "
                        f"on the {step.clock} clock ({format_duration(offset)} vs "
                        f"{format_duration(prev[1])}); list a clock's steps in the order "
                        "they fire"))
        last[step.clock] = (si, offset)
    return out
