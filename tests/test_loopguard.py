"""The loop guard: every kind of automatic mail is recognised, ordinary mail is not."""

from __future__ import annotations

import pytest

from router.loopguard import automatic_reason
from router.mail import parse

OURS = {"support@acme.test", "billing@acme.test", "sam@acme.test"}


def message(*headers: str, sender: str = "Ann <ann@example.com>",
            subject: str = "Printer on fire", body: str = "It is on fire.\n") -> bytes:
    lines = [f"From: {sender}", "To: support@acme.test", f"Subject: {subject}",
             "Message-ID: <m1@example.com>", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def reason(raw: bytes, envelope_sender: str | None = "ann@example.com") -> str | None:
    return automatic_reason(parse(raw), our_addresses=OURS, envelope_sender=envelope_sender)


def test_ordinary_mail_may_be_answered() -> None:
    assert reason(message()) is None
    assert reason(message("Auto-Submitted: no")) is None
    assert reason(message("Precedence: first-class")) is None
    assert reason(message("X-Auto-Response-Suppress: DR, RN")) is None
    assert reason(message("X-Spam-Flag: NO", "X-Spam-Status: No, score=0.1")) is None
    assert reason(message(subject="Re: your automatic reply is broken")) is None


@pytest.mark.parametrize(("headers", "expected"), [
    (["Auto-Submitted: auto-replied"], "Auto-Submitted: auto-replied"),
    (["Auto-Submitted: auto-generated"], "Auto-Submitted: auto-generated"),
    (["Auto-Submitted: auto-notified; owner-email=x@y"], "Auto-Submitted: auto-notified"),
    (["Auto-Submitted: AUTO-REPLIED"], "Auto-Submitted: auto-replied"),
    (["Precedence: bulk"], "Precedence: bulk"),
    (["Precedence: junk"], "Precedence: junk"),
    (["Precedence: list"], "Precedence: list"),
    (["List-Id: <announce.example.com>"], "mailing list"),
    (["List-Unsubscribe: <mailto:leave@example.com>"], "mailing list"),
    (["X-Auto-Response-Suppress: All"], "X-Auto-Response-Suppress: all"),
    (["X-Auto-Response-Suppress: DR, OOF, AutoReply"], "X-Auto-Response-Suppress: autoreply"),
    (["X-Autoreply: yes"], "autoresponder header X-Autoreply"),
    (["X-Autorespond: on"], "autoresponder header X-Autorespond"),
    (["X-Spam-Flag: YES"], "spam"),
    (["X-Spam-Status: Yes, score=9.9 required=5.0"], "spam"),
    (["X-Mailer: Vacation 1.2"], "autoresponder"),
    (["X-Loop: support@acme.test"], "X-Loop"),
    (["MIME-Version: 1.0",
      'Content-Type: multipart/report; report-type=delivery-status; boundary="b"'],
     "delivery-status"),
    (["MIME-Version: 1.0",
      "Content-Type: multipart/report; report-type=disposition-notification; boundary=b"],
     "disposition-notification"),
])
def test_automatic_headers(headers: list[str], expected: str) -> None:
    got = reason(message(*headers))
    assert got is not None and expected in got


@pytest.mark.parametrize("sender", [
    "MAILER-DAEMON@mx.example.com", "Mail Delivery System <mailer-daemon@example.com>",
    "postmaster@example.com", "noreply@example.com", "no-reply@shop.example",
    "do-not-reply@bank.example", "DoNotReply@example.com", "noreply+eu@example.com",
    "announce-bounces@lists.example.com", "owner-announce@lists.example.com",
    "announce-request@lists.example.com",
])
def test_robot_senders(sender: str) -> None:
    got = reason(message(sender=sender))
    assert got is not None and "robot" in got


def test_robot_envelope_sender() -> None:
    got = reason(message(), envelope_sender="bounces+12345@mailer.example.com")
    assert got is not None and "envelope sender" in got


@pytest.mark.parametrize("envelope", ["", "<>", " <> "])
def test_null_envelope_sender(envelope: str) -> None:
    got = reason(message(), envelope_sender=envelope)
    assert got is not None and "empty envelope sender" in got


def test_no_envelope_uses_return_path() -> None:
    assert reason(message(), envelope_sender=None) is None
    got = reason(message("Return-Path: <>"), envelope_sender=None)
    assert got is not None and "empty envelope sender" in got


@pytest.mark.parametrize("sender", ["support@acme.test", "Support <SUPPORT@acme.test>",
                                    "support+spring@acme.test", "sam@acme.test"])
def test_our_own_addresses(sender: str) -> None:
    got = reason(message(sender=sender), envelope_sender=None)
    assert got is not None and "our own addresses" in got


def test_our_address_as_envelope_sender() -> None:
    got = reason(message(), envelope_sender="billing@acme.test")
    assert got is not None and "our addresses" in got


def test_missing_from() -> None:
    raw = b"To: support@acme.test\r\nSubject: hi\r\n\r\nhi\r\n"
    got = reason(raw)
    assert got is not None and "From" in got


@pytest.mark.parametrize("subject", ["Automatic reply: Printer on fire",
                                     "Out of Office: Printer", "Autoreply: x",
                                     "Otomatik yanıt: Yazıcı", "Abwesenheitsnotiz: Drucker"])
def test_autoreply_subjects_without_headers(subject: str) -> None:
    got = reason(message(subject=subject))
    assert got is not None and "automatic reply" in got
