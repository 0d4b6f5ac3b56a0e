"""router.mime_tree builds exactly the tree the stdlib parser builds, or declines."""

from __future__ import annotations

import random
import sys
import sysconfig
from email.message import Message
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import mail
from router.mime_tree import fast_tree, message_from_bytes

CASES = Path(__file__).parent / "mail_cases"
CORPUS = Path(sysconfig.get_path("stdlib")) / "test" / "test_email" / "data"
POLICY = mail._PARSE_POLICY


def dump(msg: Message) -> object:
    """Everything the stdlib parser decides about a message, recursively."""
    payload = msg.get_payload()
    body = [dump(p) for p in payload] if isinstance(payload, list) else payload
    return (type(msg).__name__, msg.get_unixfrom(), list(msg.raw_items()), msg.preamble,
            msg.epilogue, [type(d).__name__ for d in msg.defects], msg.get_default_type(),
            body)


def stdlib(raw: bytes) -> Message:
    return BytesParser(policy=POLICY).parsebytes(raw)


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def bench_mail() -> list[bytes]:
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    try:
        from intake import make_messages  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    return [m[2] for m in make_messages(400, 7)]


def corpus() -> list[bytes]:
    files = sorted(CORPUS.glob("msg_*.txt"))
    if len(files) < 40:
        pytest.fail(f"CPython's email test corpus is missing from {CORPUS}")
    return [p.read_bytes() for p in files] + [p.read_bytes() for p in sorted(CASES.iterdir())]


MP = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="XX"\r\n\r\n'
TEXT = b"Content-Type: text/plain\r\n\r\n"
# (name, raw, must the fast path take it?)
HANDMADE: list[tuple[str, bytes, bool]] = [
    ("plain", b"Subject: hi\r\n\r\nhello\r\n", True),
    ("no body", b"Subject: hi\r\n", True),
    ("no headers", b"\r\njust a body\r\n", True),
    ("LF only", b"Subject: hi\n\nhello\n", True),
    ("mixed endings", b"Subject: hi\r\n\nhello\r\n", True),
    ("bare CR", b"Subject: hi\r\n\r\nhel\rlo\r\n", True),
    ("CR only", b"Subject: hi\rTo: a@b\r\rhello\r", True),
    ("blank line after a bare CR", b"Subject: hi\r\r\nhello\r\n", True),
    ("blank line after LF", b"Subject: hi\n\r\nhello\r\n", True),
    ("boundary after a bare CR",
     MP + b"--XX\r\n" + TEXT + b"one\r--XX\r\n" + TEXT + b"two\r\n--XX--\r\n", True),
    ("boundary ended by a bare CR",
     MP + b"--XX\r" + TEXT + b"one\r\n--XX\r" + TEXT + b"two\r\n--XX--\r\n", True),
    ("part starting with a non-header line",
     MP + b"--XX\r\n" + TEXT + b"one\r\n--XX\r\ntwo\r\n--XX--\r\n", False),
    ("boundaries in LF inside CRLF",
     MP + b"--XX\n" + TEXT + b"one\n--XX\r\n" + TEXT + b"two\r--XX--\n\nend\r", True),
    ("boundary glued to text", MP + b"--XX\r\n" + TEXT + b"a--XX\r\n--XX--\r\n", True),
    ("multipart", MP + b"--XX\r\n" + TEXT + b"one\r\n--XX\r\n" + TEXT + b"two\r\n--XX--\r\n",
     True),
    ("preamble and epilogue",
     MP + b"This is MIME.\r\n\r\n--XX\r\n" + TEXT + b"one\r\n\r\n--XX--\r\nbye\r\n\r\n", True),
    ("blank preamble", MP + b"\r\n--XX\r\n" + TEXT + b"one\r\n--XX--", True),
    ("close without line end", MP + b"--XX\r\n" + TEXT + b"one\r\n--XX--", True),
    ("blanks after boundaries",
     MP + b"--XX \t\r\n" + TEXT + b"one\r\n--XX-- \r\n", True),
    ("part without headers", MP + b"--XX\r\n\r\nbare\r\n--XX--\r\n", True),
    ("part of headers only", MP + b"--XX\r\nContent-Type: text/plain\r\n--XX--\r\n", True),
    ("boundary look-alikes",
     MP + b"--XX\r\n" + TEXT + b"--XXY\r\n--XX--x\r\n --XX\r\n--XX\r\n" + TEXT
     + b"two\r\n--XX--\r\n", True),
    ("nested",
     MP + b"--XX\r\nContent-Type: multipart/alternative; boundary=YY\r\n\r\npre\r\n"
     b"--YY\r\n" + TEXT + b"a\r\n--YY\r\nContent-Type: text/html\r\n\r\n<p>a</p>\r\n"
     b"--YY--\r\ninner epilogue\r\n\r\n--XX\r\n" + TEXT + b"b\r\n--XX--\r\n", True),
    ("nested, empty inner epilogue",
     MP + b"--XX\r\nContent-Type: multipart/alternative; boundary=YY\r\n\r\n"
     b"--YY\r\n" + TEXT + b"a\r\n--YY--\r\n--XX--\r\n", True),
    ("no closing boundary", MP + b"--XX\r\n" + TEXT + b"one\r\n", False),
    ("no opening boundary", MP + b"nothing here\r\n", False),
    ("closing first", MP + b"--XX--\r\n" + TEXT + b"one\r\n", False),
    ("repeated boundary", MP + b"--XX\r\n--XX\r\n" + TEXT + b"one\r\n--XX--\r\n", False),
    ("boundary after the close",
     MP + b"--XX\r\n" + TEXT + b"one\r\n--XX--\r\n--XX\r\nmore\r\n", False),
    ("a part-like boundary after the close",
     MP + b"--XX\r\n" + TEXT + b"one\r\n--XX--\r\n\r\nafter\r\n--XX\r\nmore\r\n", False),
    ("inner without close",
     MP + b"--XX\r\nContent-Type: multipart/alternative; boundary=YY\r\n\r\n"
     b"--YY\r\n" + TEXT + b"a\r\n--XX--\r\n", False),
    ("no boundary parameter",
     b"Content-Type: multipart/mixed\r\n\r\n--XX\r\n\r\na\r\n--XX--\r\n", False),
    ("base64 multipart", MP.replace(b"\r\n\r\n", b"\r\nContent-Transfer-Encoding: base64"
                                    b"\r\n\r\n") + b"--XX\r\n\r\na\r\n--XX--\r\n", False),
    ("message/rfc822 part",
     MP + b"--XX\r\nContent-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\nx\r\n--XX--\r\n",
     False),
    ("digest", MP.replace(b"mixed", b"digest") + b"--XX\r\n\r\nSubject: a\r\n\r\nx\r\n"
     b"--XX--\r\n", False),
    ("header line without colon", b"Subject: hi\r\nnot a header\r\n\r\nbody\r\n", False),
    ("continuation first", b" folded\r\nSubject: hi\r\n\r\nbody\r\n", False),
    ("unix from", b"From someone Sat Nov 21 2026\r\nSubject: hi\r\n\r\nbody\r\n", True),
    ("From line last in head", b"Subject: hi\r\nFrom nobody\r\n\r\nbody\r\n", False),
    ("8-bit and NUL", b"Subject: caf\xc3\xa9\r\n\r\n\xff\x00\xfe\r\n", True),
]


@pytest.mark.parametrize(("raw", "taken"), [pytest.param(r, t, id=n) for n, r, t in HANDMADE])
def test_handmade_mail_gives_the_stdlib_tree(raw: bytes, taken: bool) -> None:
    fast = fast_tree(raw, POLICY)
    assert (fast is not None) == taken
    if fast is not None:
        assert dump(fast) == dump(stdlib(raw))
    assert dump(message_from_bytes(raw, POLICY)) == dump(stdlib(raw))


def test_corpus_and_bench_mail_give_the_stdlib_tree() -> None:
    mails = corpus()
    mails += [crlf(m) for m in mails] + [m.replace(b"\n", b"\r") for m in mails]
    mails += bench_mail()
    taken = 0
    for raw in mails:
        fast = fast_tree(raw, POLICY)
        if fast is not None:
            taken += 1
            assert dump(fast) == dump(stdlib(raw)), raw[:300]
    # Most of the corpus is clean mail: a fast path that declined everything would pass
    # the comparison above while doing nothing.
    assert taken > len(mails) // 2, f"fast path took only {taken} of {len(mails)}"


def test_bench_mail_all_takes_the_fast_path() -> None:
    assert all(fast_tree(raw, POLICY) is not None for raw in bench_mail())


def test_parse_is_unchanged_by_the_fast_path() -> None:
    """`mail.parse` on the fast tree and on the stdlib's gives the same ParsedMail."""
    mails = corpus()
    for raw in [*mails, *(crlf(m) for m in mails), *(m.replace(b"\n", b"\r") for m in mails)]:
        slow = mail._parse_tree(raw, stdlib(raw))
        assert mail._parse(raw) == slow


_PIECES = [
    "Content-Type: multipart/mixed; boundary=XX", "Content-Type: multipart/alternative;",
    " boundary=\"YY\"", "Content-Type: text/plain", "Content-Type: message/rfc822",
    "Content-Transfer-Encoding: base64", "Subject: hi", "From x", "--XX", "--XX--",
    "--XX \t", "--YY", "--YY--", "--XXYY", " --XX", "", "", "", "text", "a--XX", "more: text",
]
_EOLS = ["\r\n", "\r\n", "\r\n", "\n", "\r"]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_PIECES), st.sampled_from(_EOLS)), max_size=40),
       st.booleans())
def test_any_line_soup_gives_the_stdlib_tree(lines: list[tuple[str, str]],
                                             cut_last: bool) -> None:
    text = "".join(line + eol for line, eol in lines)
    if cut_last and text:
        text = text.rstrip("\r\n")
    raw = ("Content-Type: multipart/mixed; boundary=XX\r\n\r\n" + text).encode()
    assert dump(message_from_bytes(raw, POLICY)) == dump(stdlib(raw))


def _random_part(rng: random.Random, depth: int, used: str) -> str:
    """A MIME part in random shape: line ends, blanks after boundaries, preambles,
    epilogues and bodies full of lines that look like boundaries without being ones."""
    def eol() -> str:
        return rng.choice(_EOLS)

    def lines(n: int) -> str:
        words = ["text", "", "a--XX", "--XXYY", " --XX", "--", "more: text", "--YY-"]
        return "".join(rng.choice(words) + eol() for _ in range(rng.randrange(n)))

    headers = rng.sample(["Content-Transfer-Encoding: 7bit", "X-Note: a", "Subject: s"],
                         rng.randrange(3))
    if depth < 3 and rng.random() < 0.6:
        boundary = rng.choice([b for b in ("XX", "YY", "Z'z", "XX.1") if b not in used])
        head = [f'Content-Type: multipart/mixed; boundary="{boundary}"', *headers]
        out = "".join(h + eol() for h in head) + eol() + lines(3)
        for _ in range(rng.randrange(1, 4)):
            out += f"--{boundary}" + rng.choice(["", " ", "\t "]) + eol()
            out += _random_part(rng, depth + 1, used + boundary) + eol()
        out += f"--{boundary}--" + rng.choice(["", " "])
        return out + rng.choice(["", eol() + lines(3)])
    head = [rng.choice(["Content-Type: text/plain", "Content-Type: application/pdf"]),
            *headers]
    if rng.random() < 0.1:
        return "".join(h + eol() for h in head)  # headers only
    return "".join(h + eol() for h in head) + eol() + lines(6).rstrip("\r\n")


def test_random_mime_gives_the_stdlib_tree() -> None:
    rng = random.Random(2026)
    taken = 0
    for _ in range(3000):
        raw = _random_part(rng, 0, "").encode()
        fast = fast_tree(raw, POLICY)
        if fast is not None:
            taken += 1
            assert dump(fast) == dump(stdlib(raw)), raw
    assert taken > 1500, f"fast path took only {taken} of 3000"
