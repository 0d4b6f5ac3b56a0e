"""Rules from router.toml: each condition, each action, the order and stop semantics, the
time limit on regular expressions, and how `router check` reports a bad one."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from router import settings as config
from router.classify import Decision, Unroutable, classify
from router.mail import parse
from router.rules import Context
from router.rules.config import REGEX_TIMEOUT
from tests.conftest import write_config
from tests.daemon import make_mail, run_cli

# A Tuesday, 10:00 in Istanbul (billing is open 09:00-18:00 there, mon-fri).
TUESDAY_OPEN = datetime(2026, 3, 3, 7, 0, tzinfo=UTC)
SATURDAY = datetime(2026, 3, 7, 12, 0, tzinfo=UTC)


def settings_with(tmp_path: Path, extra: str) -> config.Settings:
    return config.load(write_config(tmp_path / "etc", extra=extra))


def decide(settings: config.Settings, raw: bytes, *, rcpts: list[str] | None = None,
           now: datetime = TUESDAY_OPEN, vip: bool = False,
           attributes: dict[str, object] | None = None) -> Decision:
    parsed = parse(raw)
    ctx = Context(settings=settings, envelope_rcpts=rcpts or [], envelope_sender="",
                  now=now, customer_vip=vip, customer_attributes=attributes or {})
    return classify(parsed, ctx)


def hit(d: Decision, name: str) -> dict[str, object]:
    return next(h for h in d.hits_json() if h["rule"] == name)


def rule(name: str, body: str) -> str:
    return f'\n[[rule]]\nname = "{name}"\n{body}\n'


# ---------------------------------------------------------------------------- conditions


def test_header_condition(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("prio", 'header = { "X-Priority" = "^1" }\n'
                                             'priority = "high"'))
    d = decide(s, make_mail(headers={"X-Priority": "1 (Highest)"}))
    assert d.priority == "high" and hit(d, "prio")["matched"]
    d = decide(s, make_mail(headers={"X-Priority": "3"}))
    assert d.priority == "normal"
    assert hit(d, "prio")["reason"] == "X-Priority does not match /^1/"
    assert hit(decide(s, make_mail()), "prio")["reason"] == "no X-Priority header"


def test_sender_and_domain_conditions(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("boss", 'sender = ["Boss@Example.org"]\ntags = ["boss"]')
                      + rule("partner", 'sender_domain = ["partner.test"]\ntags = ["partner"]'))
    assert decide(s, make_mail(frm="B <boss@example.org>")).tags == ["boss"]
    assert decide(s, make_mail(frm="x@eu.partner.test")).tags == ["partner"]
    d = decide(s, make_mail(frm="x@notpartner.test"))
    assert d.tags == []
    assert "sender domain notpartner.test is not partner.test" in str(hit(d, "partner")["reason"])


def test_recipient_condition(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("sales", 'recipient = ["sales@acme.test"]\n'
                                              'tags = ["sales"]'))
    assert decide(s, make_mail(to="sales@acme.test")).tags == ["sales"]
    assert decide(s, make_mail(to="support@acme.test")).tags == []


def test_subject_body_and_keywords(tmp_path: Path) -> None:
    s = settings_with(tmp_path,
                      rule("refund", r'subject = "\\brefund|iade"' + '\ntags = ["refund"]')
                      + rule("legal", 'body = "lawyer|avukat"\ntags = ["legal"]')
                      + rule("kw", 'keywords = ["invoice", "fatura"]\ntags = ["invoice"]'))
    d = decide(s, make_mail(subject="REFUND please", body="My lawyer says hi. Invoice 42."))
    assert d.tags == ["refund", "legal", "invoice"]
    assert 'subject matches /\\brefund|iade/ ("REFUND")' in str(hit(d, "refund")["reason"])
    # Keywords are whole words: "invoices" is not "invoice".
    d = decide(s, make_mail(subject="hello", body="about my invoices"))
    assert d.tags == []
    assert hit(d, "kw")["reason"] == "none of the keywords invoice, fatura"


def _with_attachment(ctype: str, filename: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg["To"] = "support@acme.test"
    msg["Subject"] = "see attached"
    msg.set_content("attached")
    main, sub = ctype.split("/")
    msg.add_attachment(b"%PDF-1.4 data", maintype=main, subtype=sub, filename=filename)
    return msg.as_bytes()


def test_attachment_conditions(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("any-att", 'attachment = true\ntags = ["att"]')
                      + rule("pdf", 'attachment_type = ["application/pdf"]\ntags = ["pdf"]')
                      + rule("img", 'attachment_type = ["image/*", ".heic"]\ntags = ["img"]'))
    assert decide(s, _with_attachment("application/pdf", "x.pdf")).tags == ["att", "pdf"]
    assert decide(s, _with_attachment("image/png", "x.png")).tags == ["att", "img"]
    assert decide(s, _with_attachment("application/octet-stream", "a.HEIC")).tags == [
        "att", "img"]
    d = decide(s, make_mail())
    assert d.tags == [] and hit(d, "any-att")["reason"] == "no attachments"


def test_language_condition(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("tr", 'language = ["tr"]\ntags = ["turkish"]'))
    d = decide(s, make_mail(subject="Fatura hakkında",
                            body="Merhaba, geçen ayın faturası yanlış geldi. Lütfen kontrol "
                                 "eder misiniz? Teşekkürler."))
    assert d.tags == ["turkish"] and d.language == "tr"
    d = decide(s, make_mail(subject="About my invoice",
                            body="Hello, last month's invoice is wrong, could you check it?"))
    assert d.tags == [] and d.language == "en"
    assert hit(d, "tr")["reason"] == "language en is not tr"


def test_vip_from_config_and_customer_record(tmp_path: Path) -> None:
    s = settings_with(tmp_path, '\n[vip]\naddresses = ["ceo@bigco.test"]\n'
                                'domains = ["vip.test"]\n'
                      + rule("vip", 'vip = true\npriority = "high"'))
    assert decide(s, make_mail(frm="ceo@bigco.test")).priority == "high"
    assert decide(s, make_mail(frm="x@mail.vip.test")).priority == "high"
    d = decide(s, make_mail(frm="nobody@example.org"))
    assert d.priority == "normal" and "is not a VIP" in str(hit(d, "vip")["reason"])
    d = decide(s, make_mail(frm="nobody@example.org"), vip=True)
    assert d.priority == "high" and "customer record" in str(hit(d, "vip")["reason"])
    d = decide(s, make_mail(frm="nobody@example.org"), attributes={"vip": True})
    assert d.priority == "high" and "attribute" in str(hit(d, "vip")["reason"])


def test_outside_business_hours_of_the_addressed_team(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("night", 'outside_hours = true\ntags = ["after-hours"]'))
    billing = make_mail(to="billing@acme.test")
    assert decide(s, billing, now=TUESDAY_OPEN).tags == []
    d = decide(s, billing, now=SATURDAY)
    assert d.tags == ["after-hours"]
    assert "outside billing's business hours" in str(hit(d, "night")["reason"])
    # support is 24/7 in the test config: never outside.
    assert decide(s, make_mail(to="support@acme.test"), now=SATURDAY).tags == []


def test_urgency_and_tone_in_english_and_turkish(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("urgent", 'urgent = true\npriority = "urgent"')
                      + rule("angry", 'tone = ["negative"]\ntags = ["angry"]'))
    d = decide(s, make_mail(subject="Site down",
                            body="This is terrible, we are losing money. Fix it immediately!"))
    assert (d.priority, d.tags) == ("urgent", ["angry"])
    assert d.tone is not None and d.tone.method == "vader" and d.tone.urgent
    d = decide(s, make_mail(subject="Rezalet", body="Siparişim hala gelmedi, bu kabul "
                            "edilemez! Acil dönüş bekliyorum, çok kızgınım."))
    assert (d.priority, d.tags) == ("urgent", ["angry"])
    assert d.tone is not None and d.tone.language == "tr" and "acil" in d.tone.urgency_terms
    d = decide(s, make_mail(subject="Teşekkürler", body="Merhaba, her şey harika, çok "
                            "memnunum. İyi günler."))
    assert (d.priority, d.tags) == ("normal", [])
    assert d.tone is not None and d.tone.label == "positive"
    # The tone is part of the stored record, for agents.
    assert hit(d, "decision")["tone"]["label"] == "positive"


def test_match_any(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("either", 'match = "any"\nsubject = "outage"\n'
                                               'keywords = ["down"]\ntags = ["ops"]'))
    assert decide(s, make_mail(subject="it is down")).tags == ["ops"]
    d = decide(s, make_mail(subject="hello"))
    assert d.tags == [] and str(hit(d, "either")["reason"]).startswith("no condition holds")


# ---------------------------------------------------------------------------- actions


def test_route_to_team_and_stop_by_default(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("invoices", 'keywords = ["invoice"]\nteam = "billing"')
                      + rule("later", 'keywords = ["invoice"]\ntags = ["never"]'))
    d = decide(s, make_mail(to="support@acme.test", subject="my invoice"))
    assert (d.team, d.address, d.routed_by) == ("billing", "support@acme.test",
                                                "rule invoices")
    assert d.tags == []
    later = hit(d, "later")
    assert later["matched"] is False and later["evaluated"] is False
    assert later["reason"] == "not evaluated: rule invoices stopped the chain"


def test_stop_false_lets_a_later_rule_route(tmp_path: Path) -> None:
    s = settings_with(tmp_path,
                      rule("first", 'keywords = ["invoice"]\nteam = "billing"\nstop = false')
                      + rule("second", 'keywords = ["invoice"]\nteam = "ops"'))
    d = decide(s, make_mail(subject="invoice"))
    assert d.team == "ops" and hit(d, "first")["matched"] and hit(d, "second")["matched"]


def test_non_routing_rules_continue_and_compose(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("a", 'keywords = ["help"]\npriority = "high"\n'
                                          'tags = ["x"]')
                      + rule("b", 'keywords = ["help"]\npriority = "low"\ntags = ["y", "x"]')
                      + rule("c", 'keywords = ["help"]\nstop = true\ntags = ["z"]')
                      + rule("d", 'keywords = ["help"]\ntags = ["never"]'))
    d = decide(s, make_mail(subject="help"))
    # The highest priority wins; tags accumulate without duplicates; "c" stops the chain.
    assert (d.priority, d.tags, d.team) == ("high", ["x", "y", "z"], "support")
    assert hit(d, "d")["evaluated"] is False


def test_rule_routes_mail_to_no_role_address(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("partner", 'sender_domain = ["partner.test"]\n'
                                                'team = "ops"'))
    d = decide(s, make_mail(to="random@elsewhere.test", frm="p@partner.test"),
               rcpts=["random@elsewhere.test"])
    assert (d.team, d.address) == ("ops", "oops@acme.test")
    with pytest.raises(Unroutable):
        decide(s, make_mail(to="random@elsewhere.test"), rcpts=["random@elsewhere.test"])


def test_alert_resolves_lead_of_the_final_team(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("angry-vip", 'vip = true\ntone = ["negative"]\n'
                                                  'alert = ["lead", "boss@acme.test"]'))
    d = decide(s, make_mail(to="billing@acme.test", subject="Awful",
                            body="This is awful and unacceptable, I am furious."), vip=True)
    [a] = d.alerts
    assert a.to == ["lead-billing@acme.test", "boss@acme.test"] and a.rule == "angry-vip"


def test_suppress_ack_and_spam(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("quiet", 'sender_domain = ["partner.test"]\n'
                                              'suppress_ack = true')
                      + rule("junk", r'subject = "viagra|crypto\\s+giveaway"' + "\nspam = true\n"
                             'alert = ["lead"]'))
    d = decide(s, make_mail(frm="x@partner.test"))
    assert d.suppress_ack == "rule quiet suppresses the acknowledgement" and d.spam is None
    d = decide(s, make_mail(subject="Crypto   giveaway!"))
    assert d.spam is not None and d.spam.startswith("rule junk") and d.alerts == []


# ---------------------------------------------------------------------------- time limit


def test_pathological_regex_times_out_as_a_miss(tmp_path: Path) -> None:
    s = settings_with(tmp_path, rule("evil", 'body = "^(a|aa)+$"\ntags = ["evil"]')
                      + rule("after", 'keywords = ["hello"]\ntags = ["ok"]'))
    raw = make_mail(subject="hello", body="a" * 40 + "!")
    started = datetime.now(UTC)
    d = decide(s, raw)
    elapsed = (datetime.now(UTC) - started).total_seconds()
    evil = hit(d, "evil")
    assert evil["matched"] is False and evil["timed_out"] is True
    assert str(evil["reason"]).startswith("timed out")
    assert d.tags == ["ok"]           # the chain goes on
    assert elapsed < 20 * REGEX_TIMEOUT + 2


# ---------------------------------------------------------------------------- config checks


def test_bad_regex_is_rejected_by_check_with_line_and_column(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", extra=rule("ok", 'keywords = ["x"]\ntags = ["x"]')
                        + rule("broken", 'subject = "refund(s|z"\ntags = ["r"]'))
    res = run_cli("check", "-c", str(path), "--json")
    assert res.returncode == 1
    [problem] = json.loads(res.stdout)["problems"]
    text = path.read_text().splitlines()
    assert problem["path"] == "rule[1].subject"
    assert text[problem["line"] - 1].startswith('subject = "refund(s|z"')
    assert "bad regular expression 'refund(s|z' at column 11: missing )" in problem["message"]
    res = run_cli("check", "-c", str(path))
    assert f"router.toml:{problem['line']}: error: rule[1].subject: bad regular expression" \
        in res.stderr.decode()


def test_semantic_problems(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", extra=(
        rule("a", 'team = "nosuch"') + rule("a", 'tags = ["x"]')
        + '\n[[campaign]]\nname = "c"\naddress = "promo@elsewhere.test"\n'
        + '\n[learn]\ngeneric_addresses = ["info@acme.test"]\n'))
    _settings, problems = config.check(path)
    paths = {p.path: p.message for p in problems if p.severity == "error"}
    assert "does not exist" in paths["rule[0].team"]
    assert "used twice" in paths["rule[1].name"]
    assert "not a role address" in paths["campaign[0].address"]
    assert "not a role address" in paths["learn.generic_addresses[0]"]


def test_rule_without_action_and_unknown_key(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", extra=rule("idle", 'keywords = ["x"]')
                        + rule("typo", 'keyword = ["x"]\ntags = ["x"]'))
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    messages = {p.path: p.message for p in err.value.problems}
    assert "has no action" in messages["rule[0]"]
    assert 'did you mean "keywords"' in messages["rule[1].keyword"]
