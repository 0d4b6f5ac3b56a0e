"""Rules an admin writes in router.toml (`[[rule]]`), one `ConfiguredRule` each.

Each condition returns whether it holds and why; the rule's `Hit` carries the reasons, so a
miss says which condition failed ("subject does not match /refund/") and a hit says what
matched. See router.rules.config for the keys and the stop/continue semantics.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import regex

from router.mail import ParsedMail, normalize_address
from router.rules import Context, Hit
from router.rules.config import (
    MAX_MATCH_CHARS,
    REGEX_TIMEOUT,
    RuleConfig,
    compile_pattern,
    domain_matches,
    keyword_pattern,
)
from router.rules.features import Features

Outcome = tuple[bool, str]


class TimedOut(Exception):
    """A regular expression ran out of time: the condition counts as not holding."""


def search(pattern: str | regex.Pattern[str], text: str) -> regex.Match[str] | None:
    pat = compile_pattern(pattern) if isinstance(pattern, str) else pattern
    try:
        return pat.search(text[:MAX_MATCH_CHARS], timeout=REGEX_TIMEOUT)
    except TimeoutError:
        raise TimedOut(f"/{pat.pattern}/ ran over {REGEX_TIMEOUT * 1000:g} ms") from None


def _snippet(m: regex.Match[str]) -> str:
    text = m.group(0)
    return text if len(text) <= 40 else text[:37] + "..."


class ConfiguredRule:
    def __init__(self, config: RuleConfig) -> None:
        self.config = config
        self.name = config.name
        self.description = config.description or f"rule {config.name} from router.toml"

    # ------------------------------------------------------------------ conditions

    def _conditions(self) -> list[tuple[str, Callable[[ParsedMail, Features], Outcome]]]:
        c = self.config
        out: list[tuple[str, Callable[[ParsedMail, Features], Outcome]]] = []
        if c.header:
            out.append(("header", self._header))
        if c.sender:
            out.append(("sender", self._sender))
        if c.sender_domain:
            out.append(("sender_domain", self._sender_domain))
        if c.recipient:
            out.append(("recipient", self._recipient))
        if c.subject is not None:
            out.append(("subject", self._subject))
        if c.body is not None:
            out.append(("body", self._body))
        if c.keywords:
            out.append(("keywords", self._keywords))
        if c.attachment is not None:
            out.append(("attachment", self._attachment))
        if c.attachment_type:
            out.append(("attachment_type", self._attachment_type))
        if c.language:
            out.append(("language", self._language))
        if c.vip is not None:
            out.append(("vip", self._vip))
        if c.outside_hours is not None:
            out.append(("outside_hours", self._outside_hours))
        if c.urgent is not None:
            out.append(("urgent", self._urgent))
        if c.tone:
            out.append(("tone", self._tone))
        return out

    def _header(self, m: ParsedMail, f: Features) -> Outcome:
        for name, pattern in self.config.header.items():
            values = m.header_all(name)
            if not values:
                return False, f"no {name} header"
            if pattern:
                found = None
                for v in values:
                    found = search(pattern, v)
                    if found:
                        break
                if found is None:
                    return False, f"{name} does not match /{pattern}/"
        return True, "header " + ", ".join(
            f"{n} matches /{p}/" if p else f"{n} present" for n, p in self.config.header.items())

    def _sender(self, m: ParsedMail, f: Features) -> Outcome:
        if f.sender in self.config.sender:
            return True, f"sender {f.sender}"
        return False, f"sender {f.sender or '(none)'} is not {', '.join(self.config.sender)}"

    def _sender_domain(self, m: ParsedMail, f: Features) -> Outcome:
        domain = f.sender.rpartition("@")[2]
        for d in self.config.sender_domain:
            if domain and domain_matches(domain, d):
                return True, f"sender domain {domain} matches {d}"
        return False, f"sender domain {domain or '(none)'} is not " + ", ".join(
            self.config.sender_domain)

    def _recipient(self, m: ParsedMail, f: Features) -> Outcome:
        named = [a for _, a in m.to] + [a for _, a in m.cc] + list(f.context.envelope_rcpts)
        norm = {normalize_address(a) for a in named if a}
        for want in self.config.recipient:
            if want in norm:
                return True, f"addressed to {want}"
        return False, f"not addressed to {', '.join(self.config.recipient)}"

    def _subject(self, m: ParsedMail, f: Features) -> Outcome:
        assert self.config.subject is not None
        found = search(self.config.subject, m.subject)
        if found:
            return True, f"subject matches /{self.config.subject}/ (\"{_snippet(found)}\")"
        return False, f"subject does not match /{self.config.subject}/"

    def _body(self, m: ParsedMail, f: Features) -> Outcome:
        assert self.config.body is not None
        found = search(self.config.body, m.text)
        if found:
            return True, f"body matches /{self.config.body}/ (\"{_snippet(found)}\")"
        return False, f"body does not match /{self.config.body}/"

    def _keywords(self, m: ParsedMail, f: Features) -> Outcome:
        pat = keyword_pattern(tuple(self.config.keywords))
        for where, text in (("subject", m.subject), ("body", m.text)):
            found = search(pat, text)
            if found:
                return True, f"keyword \"{found.group(0)}\" in the {where}"
        return False, f"none of the keywords {', '.join(self.config.keywords)}"

    def _attachment(self, m: ParsedMail, f: Features) -> Outcome:
        real = [a for a in m.attachments if not a.inline or a.filename]
        has = bool(real)
        want = self.config.attachment
        what = f"{len(real)} attachment(s)" if has else "no attachments"
        return has == want, what

    def _attachment_type(self, m: ParsedMail, f: Features) -> Outcome:
        for a in m.attachments:
            ctype = (a.content_type or "").lower()
            name = (a.filename or "").lower()
            for t in self.config.attachment_type:
                if (t.startswith(".") and name.endswith(t)) or (
                        not t.startswith(".") and fnmatch.fnmatchcase(ctype, t)):
                    return True, f"attachment {a.filename or '(unnamed)'} is {ctype} ({t})"
        return False, f"no attachment of type {', '.join(self.config.attachment_type)}"

    def _language(self, m: ParsedMail, f: Features) -> Outcome:
        lang = f.language
        if lang in self.config.language:
            return True, f"language {lang}"
        return False, f"language {lang or 'unknown'} is not {', '.join(self.config.language)}"

    def _vip(self, m: ParsedMail, f: Features) -> Outcome:
        why = f.vip
        if self.config.vip:
            return (True, f"VIP: {why}") if why else (False, f"{f.sender} is not a VIP")
        return (False, f"VIP: {why}") if why else (True, f"{f.sender} is not a VIP")

    def _outside_hours(self, m: ParsedMail, f: Features) -> Outcome:
        outside, why = f.hours
        if outside is None:
            return False, why
        return outside == self.config.outside_hours, why

    def _urgent(self, m: ParsedMail, f: Features) -> Outcome:
        tone = f.tone
        if tone.urgent:
            return bool(self.config.urgent), f"urgent ({', '.join(tone.urgency_terms)})"
        return not self.config.urgent, "not urgent"

    def _tone(self, m: ParsedMail, f: Features) -> Outcome:
        tone = f.tone
        text = f"tone {tone.label} ({tone.sentiment:+.2f}, {tone.method})"
        return tone.label in self.config.tone, text

    # ------------------------------------------------------------------ check

    def check(self, message: ParsedMail, context: Context) -> Hit:
        features: Features = context.features
        conditions = self._conditions()
        data: dict[str, Any] = {"configured": True}
        if not conditions:
            return Hit(self.name, True, "no conditions: matches every message", data)
        reasons: list[str] = []
        timed_out: list[str] = []
        any_mode = self.config.match == "any"
        for key, cond in conditions:
            try:
                ok, why = cond(message, features)
            except TimedOut as exc:
                timed_out.append(f"{key} {exc}")
                if any_mode:
                    continue
                data["timed_out"] = True
                return Hit(self.name, False, f"timed out: {key} {exc}", data)
            if any_mode and ok:
                return Hit(self.name, True, why, data)
            if not any_mode and not ok:
                return Hit(self.name, False, why, data)
            reasons.append(why)
        if any_mode:
            if timed_out:
                data["timed_out"] = True
                return Hit(self.name, False, "timed out: " + "; ".join(timed_out)
                           + (f"; {'; '.join(reasons)}" if reasons else ""), data)
            return Hit(self.name, False, "no condition holds: " + "; ".join(reasons), data)
        return Hit(self.name, True, "; ".join(reasons), data)
