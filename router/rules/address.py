"""The first classifier: which role address the customer wrote to."""

from __future__ import annotations

from dataclasses import dataclass

from router.mail import ParsedMail, normalize_address, split_plus
from router.rules import Context, Hit
from router.settings import Settings


@dataclass(frozen=True)
class Resolved:
    team: str
    address: str          # the configured role address it matched
    tag: str | None       # plus-address tag, e.g. "spring24" of billing+spring24@


def resolve_address(settings: Settings, addr: str) -> Resolved | None:
    """An address as written (maybe with a +tag) → the team that owns it.

    A plus-address configured explicitly (``sales+partners@``) wins over its base address;
    otherwise the tag is split off and kept."""
    if not addr:
        return None
    addr = normalize_address(addr)
    owners = settings.address_map()
    if addr in owners:
        return Resolved(owners[addr], addr, None)
    base, tag = split_plus(addr)
    if tag is not None and base in owners:
        return Resolved(owners[base], base, tag)
    return None


class AddressRule:
    """Route by role address. When one mail names several role addresses, the first one in
    the To header wins, then Cc, then the envelope recipients in the order given: the headers
    are the same in every copy of a mail, so each delivery of it reaches the same team."""

    name = "address"
    description = "route to the team that owns the role address the customer wrote to"

    def candidates(self, message: ParsedMail, context: Context) -> list[tuple[str, str]]:
        out = [("To", a) for _, a in message.to] + [("Cc", a) for _, a in message.cc]
        out += [("envelope", a) for a in context.envelope_rcpts]
        return out

    def check(self, message: ParsedMail, context: Context) -> Hit:
        found: list[tuple[str, str, Resolved]] = []
        for where, addr in self.candidates(message, context):
            res = resolve_address(context.settings, addr)
            if res is not None and all(r != res for _, _, r in found):
                found.append((where, addr, res))
        if not found:
            return Hit(self.name, False, "no recipient is a role address of any team")
        where, addr, res = found[0]
        tag = f" (plus tag \"{res.tag}\")" if res.tag else ""
        reason = f"{where} {addr} is a role address of team {res.team}{tag}"
        others = sorted({r.team for _, _, r in found[1:] if r.team != res.team})
        if others:
            reason += f"; also addressed: {', '.join(others)} (first address wins)"
        return Hit(self.name, True, reason, {
            "team": res.team, "address": res.address, "tag": res.tag, "via": where,
            "named": [r.address + (f"+{r.tag}" if r.tag else "") for _, _, r in found]})
