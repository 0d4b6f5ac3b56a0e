"""Campaign addresses and plus-tags: carried by the ticket, described to agents, expired
outside their dates but still routed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from router import settings as config
from router.campaigns import find_campaign
from router.classify import classify
from router.mail import parse
from router.rules import Context
from router.rules.address import resolve_address
from tests.conftest import write_config
from tests.daemon import make_mail

CAMPAIGNS = """
[[team]]
name = "promo"
addresses = ["spring@acme.test"]
lead = "lead-support@acme.test"
members = [{ name = "Sue", email = "lead-support@acme.test" }]

[[campaign]]
name = "spring26"
tag = "spring26"
description = "Spring 2026 sale"
valid_from = 2026-03-01
valid_until = 2026-05-31

[[campaign]]
name = "launch"
address = "spring@acme.test"
description = "Launch mailing: customers answer the product launch"
valid_until = 2026-01-31
"""


@pytest.fixture
def settings(tmp_path: Path) -> config.Settings:
    return config.load(write_config(tmp_path / "etc", extra=CAMPAIGNS))


def at(y: int, m: int, d: int) -> datetime:
    return datetime(y, m, d, 12, tzinfo=UTC)


def test_plus_tag_within_dates(settings: config.Settings) -> None:
    res = resolve_address(settings, "billing+spring26@acme.test")
    match = find_campaign(settings, ["billing+spring26@acme.test"], res, at(2026, 4, 1))
    assert match is not None and match.campaign.name == "spring26"
    assert match.expired is False and match.via == "+spring26"


def test_before_and_after_validity(settings: config.Settings) -> None:
    res = resolve_address(settings, "billing+Spring26@acme.test")
    early = find_campaign(settings, ["billing+spring26@acme.test"], res, at(2026, 2, 1))
    late = find_campaign(settings, ["billing+spring26@acme.test"], res, at(2026, 6, 1))
    assert early is not None and early.expired and "not yet valid" in early.reason
    assert late is not None and late.expired and "expired on 2026-05-31" in late.reason


def test_campaign_address_and_unknown_tag(settings: config.Settings) -> None:
    res = resolve_address(settings, "spring@acme.test")
    match = find_campaign(settings, ["spring@acme.test"], res, at(2026, 3, 1))
    assert match is not None and match.campaign.name == "launch" and match.expired
    res = resolve_address(settings, "billing+other@acme.test")
    assert find_campaign(settings, ["billing+other@acme.test"], res, at(2026, 3, 1)) is None


def test_expired_campaign_is_still_routed(settings: config.Settings) -> None:
    parsed = parse(make_mail(to="billing+spring26@acme.test"))
    d = classify(parsed, Context(settings=settings, envelope_rcpts=[], envelope_sender="",
                                 now=at(2027, 1, 1)))
    assert d.team == "billing" and d.campaign is not None and d.campaign.expired
    summary = d.summary()["campaign"]
    assert summary["description"] == "Spring 2026 sale" and summary["expired"] is True


def test_campaign_needs_address_or_tag(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", extra='\n[[campaign]]\nname = "x"\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert "exactly one of address or tag" in str(err.value)
