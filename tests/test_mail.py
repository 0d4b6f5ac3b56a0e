"""Tests for router.mail: parsing must never raise and must decode what real mail sends."""

from __future__ import annotations

import base64
import hashlib
import random
import sysconfig
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import mail
from router.mail import (
    ParsedMail,
    QuickHeaders,
    dedupe_key,
    msgid_list,
    msgid_normalize,
    normalize_address,
    parse,
    quick_headers,
    split_plus,
)

CASES = Path(__file__).parent / "mail_cases"
CORPUS = Path(sysconfig.get_path("stdlib")) / "test" / "test_email" / "data"


def case(name: str) -> ParsedMail:
    return parse((CASES / name).read_bytes())


def assert_sane(parsed: ParsedMail, raw: bytes) -> None:
    """Invariants every result must satisfy, whatever the input."""
    assert isinstance(parsed, ParsedMail)
    assert parsed.raw == raw
    strings = [parsed.subject, parsed.text, parsed.sender_name, *parsed.defects]
    strings += [value for pair in parsed.headers for value in pair]
    strings += [value for pair in parsed.to + parsed.cc for value in pair]
    if parsed.html is not None:
        strings.append(parsed.html)
    for text in strings:
        assert isinstance(text, str)
        assert "\x00" not in text  # PostgreSQL text columns reject NUL
        text.encode("utf-8")  # no lone surrogates leak out of the parser
    if parsed.date is not None:
        assert parsed.date.tzinfo is not None
    for att in parsed.attachments:
        assert att.size == len(att.data)
        assert att.sha256 == hashlib.sha256(att.data).hexdigest()
        assert att.filename is None or ("/" not in att.filename and "\\" not in att.filename)
    assert isinstance(parsed.malformed, bool)


# --------------------------------------------------------------------------- CPython corpus


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        pytest.fail(
            f"CPython's email test corpus is missing ({CORPUS}). Install the stdlib test "
            "suite, e.g. the Debian package libpython3.11-testsuite, to run these tests."
        )
    return sorted(CORPUS.glob("msg_*.txt"))


def corpus(name: str) -> ParsedMail:
    corpus_files()
    return parse((CORPUS / name).read_bytes())


def test_corpus_every_message_parses() -> None:
    files = corpus_files()
    assert len(files) >= 40, f"only {len(files)} msg_*.txt files in {CORPUS}"
    for path in files:
        raw = path.read_bytes()
        parsed = parse(raw)
        assert_sane(parsed, raw)
        assert not any(d.startswith("parser failed") for d in parsed.defects), path.name


def test_corpus_attachment_and_body() -> None:
    parsed = corpus("msg_07.txt")
    assert parsed.subject == "Here is your dingus fish"
    assert parsed.sender_email == "barry@digicool.com"
    assert parsed.sender_name == "Barry"
    assert parsed.to == [("Dingus Lovers", "cravindogs@cravindogs.com")]
    assert parsed.text == "Hi there,\n\nThis is the dingus fish."
    [gif] = parsed.attachments
    assert (gif.filename, gif.content_type, gif.inline) == ("dingusfish.gif", "image/gif", False)
    assert gif.data.startswith(b"GIF87a")
    assert parsed.date == datetime(2001, 4, 20, 19, 35, 2, tzinfo=timezone(timedelta(hours=-4)))
    assert not parsed.malformed


def test_corpus_facts() -> None:
    imap = corpus("msg_26.txt")
    assert imap.message_id == "<6df65d354b.father.time@rpc.wooster.local>"
    assert [(a.filename, a.content_type) for a in imap.attachments] == [
        ("clock.bmp", "application/riscos")
    ]
    assert imap.text == "Simple email with attachment."

    jpegs = corpus("msg_22.txt")
    assert [a.filename for a in jpegs.attachments] == ["wibble.JPG", "wibble2.JPG"]

    # A multipart/digest's parts default to message/rfc822.
    digest = corpus("msg_02.txt")
    assert digest.subject == "Ppp digest, Vol 1 #2 - 5 msgs"
    assert [a.content_type for a in digest.attachments] == ["message/rfc822"] * 5
    assert "Today's Topics:" in digest.text

    signed = corpus("msg_45.txt")
    assert signed.text == "This is the signed contents."
    assert [(a.filename, a.content_type) for a in signed.attachments] == [
        ("signature.asc", "application/pgp-signature")
    ]

    # Every transfer encoding in one message, including an HTML part in a mixed body.
    lyrics = corpus("msg_10.txt")
    assert "¡This is a Quoted Printable encoded message!" in lyrics.text
    assert lyrics.text.count("This is a Base64 encoded message.") == 2

    bounce = corpus("msg_16.txt")
    assert [a.content_type for a in bounce.attachments] == [
        "message/delivery-status",
        "message/rfc822",
    ]


def test_corpus_broken_messages() -> None:
    # multipart/alternative without a boundary: structurally broken, text still readable.
    no_boundary = corpus("msg_41.txt")
    assert no_boundary.malformed
    assert no_boundary.text == "Blah blah blah"
    assert any("NoBoundaryInMultipartDefect" in d for d in no_boundary.defects)

    # The null sender of a bounce is not an address but keeps its display name.
    daemon = corpus("msg_43.txt")
    assert daemon.sender_email is None
    assert daemon.sender_name == "MAILER DAEMON"
    assert daemon.message_id == "<edab.7804f5cb8070@python.org>"

    no_separator = corpus("msg_35.txt")
    assert no_separator.malformed
    assert no_separator.subject == "here's something interesting"
    assert any("MissingHeaderBodySeparatorDefect" in d for d in no_separator.defects)

    start_missing = corpus("msg_17.txt")
    assert start_missing.malformed
    assert start_missing.text.startswith("Hi there,")


# --------------------------------------------------------------------------- own cases


def test_plain_text() -> None:
    parsed = case("plain.eml")
    assert parsed.message_id == "<20240312091500.4242@Example.ORG>"
    assert parsed.sender_email == "Alice.Example@example.org"
    assert parsed.sender_name == "Alice Example"
    assert parsed.reply_to == "alice+replies@example.org"
    assert parsed.to == [("Support", "support@example.com"), ("", "billing+spring24@example.com")]
    assert parsed.cc == [("Doe, John", "john@example.net")]
    assert parsed.subject == "Cannot log in since yesterday"
    assert parsed.date == datetime(2024, 3, 12, 8, 15, tzinfo=UTC)
    assert parsed.text.startswith("Hello,\n\nI cannot log in since yesterday.")
    assert parsed.text.endswith("Thanks,\nAlice")
    assert parsed.html is None
    assert parsed.attachments == []
    assert parsed.defects == []
    assert not parsed.malformed
    assert parsed.header("received") is not None
    assert parsed.header("X-Missing") is None
    assert parsed.header_all("RECEIVED") == [parsed.header("Received")]
    assert [name for name, _ in parsed.headers][:3] == ["Return-Path", "Received", "Message-ID"]


def test_alternative_prefers_plain() -> None:
    parsed = case("alternative.eml")
    assert parsed.text == "Invoice 1234 was charged twice. Grüße, Bob"
    assert parsed.html is not None
    assert "<b>1234</b>" in parsed.html
    assert "Grüße" in parsed.html
    assert parsed.attachments == []
    assert parsed.defects == []


def test_html_only_is_converted() -> None:
    parsed = case("html_only.eml")
    assert parsed.html is not None and "<script" in parsed.html
    assert "<" not in parsed.text and ">" not in parsed.text
    assert "Order problem" in parsed.text
    assert "My order #77 arrived broken & late." in parsed.text
    assert "Item one" in parsed.text and "Item two" in parsed.text
    for hidden in ("stolen", "pwned", "tracking-pixel-code", "color: red", "secret-style"):
        assert hidden not in parsed.text


def test_attachments() -> None:
    parsed = case("attachments.eml")
    assert parsed.text == "See the logo and the invoice."
    logo, invoice, passwd, exe = parsed.attachments

    assert (logo.content_type, logo.inline, logo.filename) == ("image/png", True, None)
    assert logo.data.startswith(b"\x89PNG\r\n")
    assert logo.size == 33

    # RFC 2231 continuation with a UTF-8 charset.
    assert invoice.filename == "Rechnung März 2024.pdf"
    assert invoice.content_type == "application/pdf"
    assert invoice.data == b"%PDF-1.4\n% fake invoice for tests\n%%EOF\n"
    assert invoice.size == len(invoice.data)
    assert invoice.sha256 == hashlib.sha256(invoice.data).hexdigest()
    assert not invoice.inline

    # Path traversal, Unix and Windows style; a text/plain attachment stays an attachment.
    assert passwd.filename == "passwd"
    assert passwd.content_type == "text/plain"
    assert passwd.data == b"root:x:0:0:root:/root:/bin/bash\n"
    assert exe.filename == "evil.exe"
    assert exe.data == b"MZ\x90\x00"
    assert "root:x" not in parsed.text
    assert parsed.defects == []


@pytest.mark.parametrize(
    ("name", "subject", "sender_name"),
    [
        ("subject_utf8.eml", "Rückerstattung für Bestellung 42 ✔ — dringend", "Jürgen Müller"),
        ("subject_turkish.eml", "Şikayet: ödeme başarısız", "Ayşe Yılmaz"),
    ],
)
def test_encoded_word_subjects(name: str, subject: str, sender_name: str) -> None:
    parsed = case(name)
    assert parsed.subject == subject
    assert parsed.sender_name == sender_name
    assert parsed.defects == []
    assert parsed.header("Subject") == subject


def test_turkish_body_charset() -> None:
    assert case("subject_turkish.eml").text == "Ödeme başarısız oldu, lütfen yardım edin."


def test_unknown_charset() -> None:
    parsed = case("unknown_charset.eml")
    assert parsed.subject == "Café au lait"
    assert parsed.text == "Naïve café order."
    assert any("unknown charset 'x-unknown'" in d for d in parsed.defects)
    assert any("unknown charset 'x-klingon'" in d for d in parsed.defects)
    assert not parsed.malformed


def test_lying_charset() -> None:
    parsed = case("lying_charset.eml")
    assert parsed.subject == "Grüße aus Köln"
    assert parsed.text == "Vielen Dank für die schnelle Antwort."
    assert sum("declared charset 'us-ascii'" in d for d in parsed.defects) == 2


def test_raw_8bit_headers() -> None:
    parsed = case("raw_8bit_header.eml")
    assert parsed.subject == "Rückerstattung für Bestellung 42"
    assert parsed.sender_name == "Jürgen Müller"
    assert parsed.sender_email == "juergen@example.de"
    # Not valid UTF-8: falls back to cp1252.
    assert parsed.header("X-Legacy-Note") == "café crème"
    assert "X-Legacy-Note: raw 8-bit bytes in header; decoded as cp1252" in parsed.defects
    assert "Subject: raw 8-bit bytes in header; decoded as utf-8" in parsed.defects
    assert not parsed.malformed


def test_truncated_multipart() -> None:
    parsed = case("truncated.eml")
    assert parsed.malformed
    assert any("CloseBoundaryNotFoundDefect" in d for d in parsed.defects)
    assert parsed.text == "The export keeps failing, log attached."
    [log] = parsed.attachments
    assert log.filename == "log.txt"
    assert log.data.startswith(b"ERROR 1\nERROR 2")


def test_invalid_base64() -> None:
    parsed = case("bad_base64.eml")
    assert parsed.malformed
    # Missing padding alone is recoverable.
    assert parsed.text == "Hello, the base64 body is fine."
    broken, impossible = parsed.attachments
    assert broken.filename == "broken.bin"
    assert any(d.startswith("InvalidBase64CharactersDefect") for d in parsed.defects)
    # Undecodable base64 is kept as it came rather than dropped.
    assert impossible.data == b"QUJDR"
    assert any(d.startswith("InvalidBase64LengthDefect") for d in parsed.defects)


def test_quoted_printable_garbage() -> None:
    parsed = case("quoted_printable_garbage.eml")
    assert parsed.text == "Price = 10€, but =ZZ is not an escape and =4 neither.\nSoft break."
    assert any("invalid quoted-printable" in d for d in parsed.defects)


def test_no_headers() -> None:
    parsed = case("no_headers.eml")
    assert parsed.malformed
    assert parsed.headers == []
    assert parsed.message_id is None and parsed.sender_email is None
    assert parsed.subject == ""
    assert parsed.text == "hello, this message has no headers at all\njust two lines of text"
    assert "no headers at all" in parsed.defects


def test_empty_bytes() -> None:
    parsed = parse(b"")
    assert_sane(parsed, b"")
    assert parsed.malformed
    assert parsed.text == "" and parsed.subject == "" and parsed.headers == []
    assert parsed.message_id is None and parsed.date is None
    assert parsed.defects == ["empty message"]


def test_random_garbage() -> None:
    rng = random.Random(20240312)
    for _ in range(50):
        raw = rng.randbytes(rng.randrange(1, 4096))
        parsed = parse(raw)
        assert_sane(parsed, raw)
        assert parsed.malformed
    raw = random.Random(7).randbytes(2048) + b"\x00"
    parsed = parse(raw)
    assert parsed.headers == []
    assert "NUL bytes in message (garbage or binary data)" in parsed.defects
    assert "no headers at all" in parsed.defects
    # Everything is still readable text: one character per byte (latin-1 is the last
    # fallback) and the NUL replaced.
    assert len(parsed.text) == len(raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").strip(b"\n"))
    assert parsed.text.endswith("\ufffd")


def test_message_rfc822_attachment() -> None:
    parsed = case("rfc822_attachment.eml")
    assert parsed.text == "See the forwarded mail below."
    [fwd] = parsed.attachments
    assert fwd.content_type == "message/rfc822"
    assert fwd.filename == "original.eml"
    inner = parse(fwd.data)
    assert inner.message_id == "<fwd-inner@shop.example>"
    assert inner.subject == "Your order 77"
    assert inner.text == "Your order 77 has shipped."
    # The embedded message's headers must not leak into the outer ones.
    assert parsed.message_id == "<fwd-outer@example.org>"


def test_references_odd_formatting() -> None:
    parsed = case("references.eml")
    assert parsed.message_id == "<ref-3@example.org>"
    assert parsed.in_reply_to == ["<ref-2@example.org>"]
    assert parsed.references == [
        "<ref-0@example.org>",
        "<ref-1@Example.org>",
        "<ref-2@example.org>",
        "<no-at-sign>",
    ]
    # "-0000" means UTC with unknown local zone; still an aware datetime.
    assert parsed.date == datetime(2024, 3, 23, 12, 0, tzinfo=UTC)


def test_base64_encoded_embedded_message() -> None:
    inner = b"Subject: inner\n\nbody\n"
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\n"
        b"Content-Type: text/plain\n\nouter\n--b\n"
        b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(inner)
        + b"--b--\n"
    )
    parsed = parse(raw)
    assert parsed.text == "outer"
    [att] = parsed.attachments
    assert att.data == inner
    assert any("base64-encoded embedded message" in d for d in parsed.defects)


def test_deep_nesting_does_not_raise() -> None:
    depth = 3000
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(depth)
    )
    raw = b"Subject: deep\n" + head + b"Content-Type: text/plain\n\nbottom\n"
    parsed = parse(raw)
    assert_sane(parsed, raw)
    assert parsed.malformed
    # The stdlib feedparser itself recurses per nesting level; we land in the fallback,
    # which still recovers the cheap headers and the raw text.
    assert parsed.defects == ["parser failed: RecursionError: maximum recursion depth exceeded"]
    assert parsed.subject == "deep"
    assert parsed.text.endswith("bottom\n")


def test_moderate_nesting_reads_innermost_text() -> None:
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(50)
    )
    parsed = parse(head + b"Content-Type: text/plain\n\nbottom\n")
    assert parsed.text == "bottom"
    assert parsed.malformed  # no closing boundaries anywhere


def test_internal_failure_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(raw: bytes) -> ParsedMail:
        raise RuntimeError("simulated parser bug")

    monkeypatch.setattr(mail, "_parse", boom)
    raw = (CASES / "subject_turkish.eml").read_bytes()
    parsed = parse(raw)
    assert parsed.raw == raw
    assert parsed.malformed
    assert parsed.defects == ["parser failed: RuntimeError: simulated parser bug"]
    # What the cheap header parse recovers is still there.
    assert parsed.message_id == "<tr-1@example.com.tr>"
    assert parsed.subject == "Şikayet: ödeme başarısız"
    assert "Subject:" in parsed.text


def test_rfc2231_charset_with_8bit_body() -> None:
    # Message.get_payload() raises TypeError on exactly this (charset given as an RFC 2231
    # tuple, 8-bit body); found by fuzzing.
    raw = b"Subject: x\nContent-Type: text/plain; charset*=utf-8''utf-8\n\nGr\xc3\xbc\xc3\x9fe\n"
    parsed = parse(raw)
    assert parsed.text == "Grüße"
    assert parsed.defects == []


def test_hostile_encoded_word_header_is_linear() -> None:
    raw = b"Subject: " + b"=?a?q?" * 100_000 + b"\n\nx\n"
    parsed = parse(raw)
    assert parsed.subject == "=?a?q?" * 100_000
    assert parsed.text == "x"


def test_nul_bytes_do_not_leak() -> None:
    raw = b"Subject: a\x00b\nFrom: x@y.z\n\nbody\x00text\n"
    parsed = parse(raw)
    assert_sane(parsed, raw)
    assert parsed.subject == "a\ufffdb"
    assert parsed.text == "body\ufffdtext"
    assert parsed.malformed


# --------------------------------------------------------------------------- quick path / dedupe


def test_quick_headers() -> None:
    raw = (CASES / "subject_turkish.eml").read_bytes()
    quick = quick_headers(raw)
    assert quick == QuickHeaders(
        message_id="<tr-1@example.com.tr>",
        from_header="=?ISO-8859-9?Q?Ay=FEe_Y=FDlmaz?= <ayse@example.com.tr>",
        subject="Şikayet: ödeme başarısız",
    )
    assert quick_headers(b"") == QuickHeaders(message_id=None, from_header="", subject="")
    raw8 = quick_headers((CASES / "raw_8bit_header.eml").read_bytes())
    assert raw8.subject == "Rückerstattung für Bestellung 42"
    assert raw8.from_header == "Jürgen Müller <juergen@example.de>"


def _crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_dedupe_same_message() -> None:
    raw = (CASES / "plain.eml").read_bytes()
    key = dedupe_key(raw)
    assert len(key) == 64
    assert dedupe_key(raw, quick_headers(raw)) == key
    assert dedupe_key(_crlf(raw)) == key
    imap_copy = (
        b"Delivered-To: support@example.com\r\n"
        b"Received: from mail.example.com by imap.example.com; Tue, 12 Mar 2024 09:16:00 +0100\r\n"
        + _crlf(raw).replace(b"Return-Path: <alice@example.org>", b"Return-Path: <bounce@x>")
    )
    assert dedupe_key(imap_copy) == key
    # An MTA that strips trailing blanks or adds a final newline does not change the key.
    assert dedupe_key(raw.replace(b"yesterday.   \n", b"yesterday.\n") + b"\n\n") == key


def test_dedupe_different_messages() -> None:
    raw = (CASES / "plain.eml").read_bytes()
    key = dedupe_key(raw)
    # A sender reusing someone else's Message-ID does not get their mail swallowed.
    assert dedupe_key(raw.replace(b"account locked", b"account closed")) != key
    assert dedupe_key(raw.replace(b"4242@Example.ORG", b"4243@Example.ORG")) != key
    assert dedupe_key(raw.replace(b"Alice.Example@", b"Mallory@")) != key
    assert dedupe_key(b"") != key
    assert dedupe_key(b"Message-ID: <a@b>\n\nx\n") != dedupe_key(b"Message-ID: <a@b>\n\ny\n")


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("billing+spring24@x.com", ("billing@x.com", "spring24")),
        ("billing@x.com", ("billing@x.com", None)),
        ("a+b+c@x.com", ("a@x.com", "b+c")),
        ("billing+@x.com", ("billing@x.com", None)),
        ("+tag@x.com", ("+tag@x.com", None)),
        ("no-domain+tag", ("no-domain+tag", None)),
        ('"odd+quoted"@x.com', ('"odd+quoted"@x.com', None)),
        (" Billing+Spring@X.com ", ("Billing@X.com", "Spring")),
        ("", ("", None)),
    ],
)
def test_split_plus(addr: str, expected: tuple[str, str | None]) -> None:
    assert split_plus(addr) == expected


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("  <Alice.Example@Example.ORG> ", "alice.example@example.org"),
        ('"Alice" <Alice@Example.org>', "alice@example.org"),
        ("mailto:Bob@X.com", "bob@x.com"),
        ("bob@example.com.", "bob@example.com"),
        ("Bob @ Example.com", "bob@example.com"),
        ("", ""),
        ("<>", ""),
    ],
)
def test_normalize_address(addr: str, expected: str) -> None:
    assert normalize_address(addr) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("", []),
        ("<a@b> <c@d>", ["<a@b>", "<c@d>"]),
        ("<a@b><c@d>,<a@b>", ["<a@b>", "<c@d>"]),
        ("<a@\r\n b>", ["<a@b>"]),
        ("a@b", ["<a@b>"]),
        ("<a@b", ["<a@b>"]),
        ("(comment <x@y>) <a@b> (more)", ["<a@b>"]),
        ("garbage words only", []),
        ("<>  < >", []),
        ("<@b> <a@>", []),
        ("joe@x.com's message <a@b>", ["<a@b>"]),
    ],
)
def test_msgid_list(value: str | None, expected: list[str]) -> None:
    assert msgid_list(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  <X@Y> ", "<X@Y>"),
        ("<X@Y> (added by relay)", "<X@Y>"),
        ("abc@def", "<abc@def>"),
        ("", None),
        ("<>", None),
        ("no id here", None),
        ("<a b@c>", "<ab@c>"),
    ],
)
def test_msgid_normalize(value: str, expected: str | None) -> None:
    assert msgid_normalize(value) == expected


# --------------------------------------------------------------------------- properties

_HEADER_NAMES = st.sampled_from(
    [
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "X-Whatever",
    ]
)
_HEADER_VALUES = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "multipart/mixed; boundary=b",
            "multipart/alternative",
            "text/html; charset=x-unknown",
            "text/plain; charset=base64",
            "text/plain; charset*=utf-8''utf-8",
            "message/rfc822",
            "base64",
            "quoted-printable",
            "attachment; filename*0*=utf-8''%C3%A4; filename*1=../x",
            "=?utf-8?b?w6Q?= =?x-bad?q?=FF?= =?utf-8?b?!!!?=",
            "<a@b> <c@",
            "Mon, 99 Foo 2024 25:61:00 +9999",
        ]
    ),
)
_BODIES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"--b\nContent-Type: text/plain\n\nhi\n", b"--b\n\n--b--\n", b"=ZZ=\n"]),
)


@st.composite
def header_ish(draw: st.DrawFn) -> bytes:
    lines = []
    for name, value in draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=8)):
        lines.append(f"{name}: {value}".encode("utf-8", "surrogatepass"))
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    return sep.join(lines) + sep + sep + draw(_BODIES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_parse_never_raises_on_bytes(raw: bytes) -> None:
    parsed = parse(raw)
    assert_sane(parsed, raw)
    assert isinstance(dedupe_key(raw), str)
    assert isinstance(quick_headers(raw), QuickHeaders)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_ish())
def test_parse_never_raises_on_header_ish(raw: bytes) -> None:
    parsed = parse(raw)
    assert_sane(parsed, raw)
    assert not any(d.startswith("parser failed") for d in parsed.defects)
    assert dedupe_key(raw) == dedupe_key(_crlf(raw))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_helpers_never_raise(value: str) -> None:
    assert isinstance(msgid_list(value), list)
    normalize_address(value)
    _base, tag = split_plus(value)
    assert tag is None or tag
    result = msgid_normalize(value)
    assert result is None or (result.startswith("<") and result.endswith(">"))


# Header values of the usual shapes, which `mail._getaddresses` reads by a regular expression,
# and near misses, which it leaves to the email package.
_USUAL_ADDRESSES = [
    "support@acme.example", "<support@acme.example>", "Ann Example <ann@example.net>",
    "Ann<ann@example.net>", "Ann   Example   <ann@example.net>", '"Doe, John" <j@x.org>',
    '"  spaced  " <a@b.c>', '"" <a@b.c>', "O'Brien <o.brien@ie.example>",
    "=?utf-8?q?J=C3=B6rg?= <joerg@de.example>", "=?utf-8?b?SsO2cmc=?= <j+tag@de.example>",
    "a@b.c, d@e.f", ' a@b.c ,"Q, R" <q@r.s>,T U <t@u.v> ', "x-y_z!#$%&'*+/=?^`{|}~@a-b.c",
    "Odd Domain <x@a_b!c.d{e}>",
]
_UNUSUAL_ADDRESSES = [
    "", " ", "Ann Example", "Ann Example <>", "John Q. Public <jqp@x.org>",
    "ann@example.net (Ann Example)", "(comment) <a@b.c>", '"a\\"b" <a@b.c>', '"a\\b" <a@b.c>',
    '"quoted local"@x.org', "a@[192.0.2.1]", "a@b.", ".a@b.c", "a..b@c.d",
    "undisclosed-recipients:;", "group: a@b.c, d@e.f;", "<@relay.example:a@b.c>",
    "Jörg <joerg@de.example>", "joerg@dé.example", "Ann\tExample <a@b.c>", "a@b.c,, d@e.f",
    "a@b.c,", ",a@b.c", "<a@b.c> trailing", "Ann <a@b.c", "Ann a@b.c>", "a@b@c.d",
    '"unterminated <a@b.c>', "Ann <a@b.c> <d@e.f>", "a b@c.d",
]


@pytest.mark.parametrize("value", _USUAL_ADDRESSES + _UNUSUAL_ADDRESSES)
def test_address_lists_are_read_as_the_email_package_reads_them(value: str) -> None:
    from email.utils import getaddresses

    assert (mail._MAILBOX_LIST_RE.fullmatch(value) is not None) == (value in _USUAL_ADDRESSES)
    assert mail._getaddresses(value) == getaddresses([value])


def _pieces(usual: list[str], unusual: list[str]) -> st.SearchStrategy[str]:
    # Usual pieces six times as likely: the regular expression must be tried often.
    return st.lists(st.sampled_from(usual * 6 + unusual), min_size=1, max_size=4).map("".join)


# Mailboxes mostly of the usual shapes, with now and then a character that makes them not.
_WORDS = _pieces(["ann", "Ex", "x-y", "O'B", "=?utf-8?q?J=C3=B6rg?=", " ", "  "],
                 [".", "\t", "ö", "(", ")", "@", ",", '"', "\\", ":", "<"])
_ADDR = st.builds("{}@{}".format, _pieces(["a", "b.c", "+t"], [".", '"', " ", "ö", "@"]),
                  _pieces(["ex", ".org", "-b"], [".", "[1.2.3.4]", "é", " "]))
_MAILBOXES = st.one_of(
    _ADDR, _ADDR.map("<{}>".format), st.builds("{} <{}>".format, _WORDS, _ADDR),
    st.builds('"{}" <{}>'.format, _WORDS, _ADDR), st.builds("{}<{}>".format, _WORDS, _ADDR))
_ADDRESS_LISTS = st.lists(
    st.tuples(_MAILBOXES, st.sampled_from([",", " , ", ", ", ",", ",,", ";", " "])),
    min_size=1, max_size=3).map(lambda pairs: "".join(box + sep for box, sep in pairs)[:-1])


@settings(max_examples=500, deadline=None)
@given(_ADDRESS_LISTS)
def test_address_lists_read_by_either_way_agree(value: str) -> None:
    from email.utils import getaddresses

    assert mail._getaddresses(value) == getaddresses([value])
