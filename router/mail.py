"""Parsing of inbound mail that never raises, whatever bytes arrive.

Everything downstream (threading, rules, the console) works from a :class:`ParsedMail`,
so this module absorbs the mess of real mail: raw 8-bit headers, lying or unknown
charsets, broken MIME structure, undecodable transfer encodings.  Problems are recorded
in ``defects`` (and ``malformed`` for structural breakage) instead of being raised, so a
message is never lost because it is ugly.

The MIME tree is parsed with the stdlib ``email`` package under ``policy.compat32``:
its header access returns plain strings instead of building header objects, which under
``policy.default`` can raise on malformed input, and it is several times cheaper.  Header
values are decoded here, from the raw source, by code that cannot raise.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import html as html_lib
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import utils as email_utils
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from io import BytesIO
from itertools import groupby
from operator import itemgetter

from inscriptis import get_text

from router.mime_tree import message_from_bytes

__all__ = [
    "Attachment",
    "ParsedMail",
    "QuickHeaders",
    "dedupe_key",
    "msgid_list",
    "msgid_normalize",
    "normalize_address",
    "parse",
    "quick_headers",
    "split_plus",
]

# Generous bounds: legitimate mail never comes close, hostile input must not make us
# recurse until the interpreter gives up or accumulate unbounded defect lists.
_MAX_DEPTH = 60
_MAX_DEFECTS = 200
_MAX_MSGID_LEN = 900

_PARSE_POLICY = compat32.clone(raise_on_defect=False)
# max_line_length=0: re-serialising an embedded message must not refold its headers.
_GEN_POLICY = compat32.clone(max_line_length=0)

# Defects that mean the MIME structure itself cannot be trusted (as opposed to cosmetic
# problems such as missing padding).
_STRUCTURAL_DEFECTS = frozenset(
    {
        "NoBoundaryInMultipartDefect",
        "StartBoundaryNotFoundDefect",
        "CloseBoundaryNotFoundDefect",
        "MultipartInvariantViolationDefect",
        "MissingHeaderBodySeparatorDefect",
        "InvalidBase64CharactersDefect",
        "InvalidBase64LengthDefect",
    }
)

_DEFECT_TEXT = {
    "NoBoundaryInMultipartDefect": "multipart without a boundary parameter",
    "StartBoundaryNotFoundDefect": "multipart start boundary never found",
    "CloseBoundaryNotFoundDefect": "multipart closing boundary missing (truncated message?)",
    "FirstHeaderLineIsContinuationDefect": "first header line is a continuation line",
    "MisplacedEnvelopeHeaderDefect": "'From ' envelope line in the middle of the headers",
    "MissingHeaderBodySeparatorDefect": "no blank line between headers and body",
    "MultipartInvariantViolationDefect": "multipart content type but no parts",
    "InvalidMultipartContentTransferEncodingDefect": (
        "multipart with a content-transfer-encoding other than 7bit/8bit/binary"
    ),
    "UndecodableBytesDefect": "undecodable bytes",
    "InvalidBase64PaddingDefect": "base64 with bad padding",
    "InvalidBase64CharactersDefect": "base64 containing invalid characters",
    "InvalidBase64LengthDefect": "base64 of impossible length (left undecoded)",
    "InvalidHeaderDefect": "invalid header",
    "HeaderMissingRequiredValue": "header missing a required value",
    "NonPrintableDefect": "non-printable characters in header",
    "ObsoleteHeaderDefect": "obsolete header syntax",
    "NonASCIILocalPartDefect": "non-ASCII local part",
}


@dataclass(frozen=True)
class Attachment:
    filename: str | None
    content_type: str
    size: int
    sha256: str
    data: bytes
    inline: bool


@dataclass
class ParsedMail:
    raw: bytes
    message_id: str | None
    in_reply_to: list[str]
    references: list[str]
    sender_email: str | None
    sender_name: str
    reply_to: str | None
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    subject: str
    date: datetime | None
    text: str
    html: str | None
    attachments: list[Attachment]
    headers: list[tuple[str, str]]
    defects: list[str]
    malformed: bool

    def header(self, name: str) -> str | None:
        """First header called ``name`` (case-insensitive), decoded; None if absent."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        """Every header called ``name`` (case-insensitive), in message order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


@dataclass(frozen=True)
class QuickHeaders:
    message_id: str | None
    from_header: str
    subject: str


# --------------------------------------------------------------------------- defects


@dataclass
class _Defects:
    items: list[str] = field(default_factory=list)
    malformed: bool = False

    def add(self, text: str, *, structural: bool = False) -> None:
        if structural:
            self.malformed = True
        if text in self.items:
            return
        if len(self.items) < _MAX_DEFECTS:
            self.items.append(text)
        elif len(self.items) == _MAX_DEFECTS:
            self.items.append("too many defects; further ones not recorded")

    def add_email_defect(self, defect: object, where: str) -> None:
        name = type(defect).__name__
        readable = _DEFECT_TEXT.get(name) or str(defect) or name
        self.add(f"{name}: {readable} ({where})", structural=name in _STRUCTURAL_DEFECTS)


# --------------------------------------------------------------------------- text decoding

# Labels mail software uses that Python does not know, or knows as a strict subset of
# what senders actually mean (WHATWG encoding rules: latin-1/ascii labels mean cp1252).
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-8859-8-i": "iso-8859-8",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "x-sjis": "cp932",
    "shift_jis": "cp932",
    "x-mac-roman": "mac-roman",
    "unicode-1-1-utf-7": "utf-7",
    "utf8": "utf-8",
}
_ASCII_LABELS = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968", "iso646-us", "us"})
_UNKNOWN_LABELS = frozenset({"unknown-8bit", "x-unknown", "unknown", "x-user-defined"})


def _fallback_decode(data: bytes) -> tuple[str, str]:
    """utf-8 if it is valid, else cp1252 (latin-1 for its five undefined bytes)."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def _lookup_charset(label: str | None) -> str | None:
    """Python codec name for a MIME charset label, or None if unknown/not a text codec."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    if not label or label in _UNKNOWN_LABELS:
        return None
    label = _CHARSET_ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError, TypeError):
        return None
    # base64_codec, rot_13 and friends are not text encodings; decoding with them would
    # either fail or, worse, succeed and return nonsense.
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _decode_bytes(data: bytes, charset: str | None, where: str, defects: _Defects) -> str:
    """Decode ``data`` with the declared charset, falling back without raising."""
    label = (charset or "").strip().strip("\"'").lower()
    codec = _lookup_charset(label)
    if codec is not None:
        try:
            return data.decode(codec)
        except Exception:
            pass
        if label in _ASCII_LABELS:
            reason = f"declared charset {label!r} but contains 8-bit bytes"
        else:
            reason = f"bytes invalid in declared charset {label!r}"
    elif label and label not in _ASCII_LABELS:
        reason = f"unknown charset {label!r}"
    else:
        if data.isascii():
            return data.decode("ascii")
        reason = "no charset declared but contains 8-bit bytes"
    text, used = _fallback_decode(data)
    defects.add(f"{where}: {reason}; decoded as {used}")
    return text


def _clean(text: str) -> str:
    """Make a string safe to store: no NULs (PostgreSQL rejects them), no lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _source_bytes(value: object) -> bytes:
    """Original bytes of a header value the compat32 parser surrogate-escaped."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


def _decode_raw_header(value: object, where: str, defects: _Defects) -> str:
    """Decode a raw header value (8-bit bytes smuggled as surrogates) to str."""
    data = _source_bytes(value)
    if data.isascii():
        return data.decode("ascii")
    text, used = _fallback_decode(data)
    defects.add(f"{where}: raw 8-bit bytes in header; decoded as {used}")
    return text


_SURROGATE_RE = re.compile("[\udc80-\udcff]")
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])")
_WS_RE = re.compile(r"\s+")


def _unfold(value: str) -> str:
    return _FOLD_RE.sub("", value).replace("\r", "").replace("\n", " ").strip()


def _collapse_ws(value: str) -> str:
    return _WS_RE.sub(" ", value).strip()


# Encoded text cannot contain "?" (RFC 2047); excluding it also keeps matching linear on
# hostile headers full of unterminated "=?".
_ENCODED_WORD_RE = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")
_QP_ESCAPE_RE = re.compile(rb"=([0-9A-Fa-f]{2})")


def _decode_word_payload(kind: str, text: str) -> bytes | None:
    raw = text.encode("utf-8", "surrogateescape")
    if kind in "Qq":
        raw = raw.replace(b"_", b" ")
        return _QP_ESCAPE_RE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    raw = re.sub(rb"\s+", b"", raw)
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=False)
    except (binascii.Error, ValueError):
        return None


def _decode_encoded_words(value: str, where: str, defects: _Defects) -> str:
    """RFC 2047 decoding that tolerates unknown/lying charsets and broken base64.

    Adjacent encoded words in the same charset are decoded together because senders
    routinely split a multi-byte character across two words.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending: list[tuple[str, bytes]] = []  # (charset, bytes) of adjacent encoded words

    def flush() -> None:
        for charset, group in groupby(pending, key=itemgetter(0)):
            chunk = b"".join(data for _, data in group)
            out.append(_decode_bytes(chunk, charset, f"{where} encoded word", defects))
        pending.clear()

    pos = 0
    for match in _ENCODED_WORD_RE.finditer(value):
        between = value[pos : match.start()]
        charset = match.group(1).split("*", 1)[0].lower()  # drop RFC 2231 language
        payload = _decode_word_payload(match.group(2), match.group(3))
        if payload is None:
            defects.add(f"{where}: undecodable base64 in encoded word; kept literally")
            flush()
            out.append(between)
            out.append(match.group(0))
        else:
            # Whitespace between two encoded words is not part of the text (RFC 2047 6.2).
            if not (pending and between.strip() == ""):
                flush()
                out.append(between)
            pending.append((charset, payload))
        pos = match.end()
    flush()
    out.append(value[pos:])
    return "".join(out)


def _decode_header_value(value: object, where: str, defects: _Defects) -> str:
    text = _decode_raw_header(value, where, defects)
    return _clean(_decode_encoded_words(_unfold(text), where, defects))


# --------------------------------------------------------------------------- message ids

_COMMENT_RE = re.compile(r"\([^()]*\)")
_BRACKETED_RE = re.compile(r"<([^<>]*)>")
_BARE_TOKEN_RE = re.compile(r"[^\s<>,;()\"]+")


def _valid_msgid_body(body: str, *, bracketed: bool) -> str | None:
    body = re.sub(r"\s+", "", body).strip("\"'")
    if not body or len(body) > _MAX_MSGID_LEN:
        return None
    if any(ord(ch) < 0x21 or ch in "<>" for ch in body):
        return None
    if "@" in body:
        local, _, domain = body.rpartition("@")
        if not local or not domain:
            return None
    elif not bracketed:
        # Without brackets only something shaped like local@domain is clearly an id.
        return None
    return f"<{body}>"


def msgid_normalize(value: str) -> str | None:
    """Normalise one Message-ID to ``<local@domain>``; None if absent or garbage.

    Whitespace (folding) inside the brackets and comments around them are removed.  Case
    is kept: ids are opaque and other mail clients compare them exactly.  A bracketed id
    without ``@`` is accepted (broken but unambiguous software exists); an unbracketed one
    must look like ``local@domain``.
    """
    ids = msgid_list(value)
    return ids[0] if ids else None


def msgid_list(value: str | None) -> list[str]:
    """All message ids in a References/In-Reply-To value, in order, without duplicates.

    Bracketed ids win: ``In-Reply-To: <a@b> (Joe's message of 1 May)`` or
    ``Your message of ... <a@b>`` yields just ``<a@b>``.  Only when no bracketed id is
    present are bare ``local@domain`` tokens taken, which recovers ids from clients that
    drop the brackets or lose the closing one.
    """
    if not value:
        return []
    try:
        text = _clean(str(value))
        # Comments can nest only pathologically; strip the simple ones repeatedly.
        for _ in range(5):
            stripped = _COMMENT_RE.sub(" ", text)
            if stripped == text:
                break
            text = stripped
        found: list[str] = []
        for match in _BRACKETED_RE.finditer(text):
            norm = _valid_msgid_body(match.group(1), bracketed=True)
            if norm is not None:
                found.append(norm)
        if not found:
            for match in _BARE_TOKEN_RE.finditer(text):
                norm = _valid_msgid_body(match.group(0), bracketed=False)
                if norm is not None:
                    found.append(norm)
        return list(dict.fromkeys(found))
    except Exception:
        return []


# --------------------------------------------------------------------------- addresses


def normalize_address(addr: str) -> str:
    """Canonical form of an email address for comparisons and lookups.

    Takes the part inside ``<...>`` when a display form is given, strips whitespace,
    brackets, a ``mailto:`` prefix and a trailing dot on the domain, and lowercases the
    whole address: we treat local parts case-insensitively, as every real mail system
    does, although RFC 5321 allows otherwise.
    """
    text = str(addr).strip()
    if "<" in text:
        inner = text[text.rfind("<") + 1 :]
        text = inner.split(">", 1)[0]
    text = text.strip().strip("<>").strip()
    if text.lower().startswith("mailto:"):
        text = text[len("mailto:") :]
    text = "".join(text.split())
    local, at, domain = text.rpartition("@")
    if at:
        text = f"{local}@{domain.rstrip('.')}"
    return text.lower()


def split_plus(addr: str) -> tuple[str, str | None]:
    """Split a sub-address tag off: ``billing+spring24@x.com`` -> (``billing@x.com``, ``spring24``).

    The split is at the first ``+`` (as Postfix's recipient_delimiter does), so
    ``a+b+c@x`` gives tag ``b+c``.  An address without a tag, with an empty tag
    (``billing+@x``), with nothing before the ``+``, or with a quoted local part is
    returned unchanged with tag None.  Case is preserved; normalise separately.
    """
    text = str(addr).strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or local.startswith('"'):
        return text, None
    base, plus, tag = local.partition("+")
    if not plus or not base:
        return text, None
    if not tag:
        return f"{base}@{domain}", None
    return f"{base}@{domain}", tag


def _mailbox(addr: str) -> str | None:
    """Address as given with the domain lowercased; None unless it looks like local@domain."""
    addr = addr.strip().strip("<>").strip()
    local, at, domain = addr.rpartition("@")
    domain = domain.rstrip(".")
    if not at or not local or not domain or any(ch.isspace() for ch in addr):
        return None
    return f"{local}@{domain.lower()}"


# One mailbox of the usual shapes, of dot-atoms: `local@domain`, `<local@domain>`, `Display
# Name <local@domain>` (atoms apart by spaces, which are read as one; encoded words are
# atoms) or `"Display Name" <local@domain>`. Anything else (comments, groups, quoted pairs, a
# dot in an unquoted name, tabs, non-ASCII) is left to the email package.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext, ASCII
DOT_ATOM_ADDR = rf"{_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*"  # also SMTP intake's
_MAILBOX = (rf'(?:(?P<atoms>{_ATEXT}(?: +{_ATEXT})*) *|"(?P<quoted>[^"\\\x00-\x1f\x7f]*)" *)?'
            rf"<(?P<angled>{DOT_ATOM_ADDR})>|(?P<bare>{DOT_ATOM_ADDR})")
_MAILBOX_RE = re.compile(_MAILBOX)
_UNNAMED = re.sub(r"\?P<\w+>", "?:", _MAILBOX)
_MAILBOX_LIST_RE = re.compile(rf" *(?:{_UNNAMED})(?: *, *(?:{_UNNAMED}))* *")


def _getaddresses(value: str) -> list[tuple[str, str]]:
    """`email.utils.getaddresses([value])`, read by a regular expression when `value` is a
    list of mailboxes of the usual shapes: 2 us a header here, the email package 10 us."""
    if _MAILBOX_LIST_RE.fullmatch(value) is None:
        return email_utils.getaddresses([value])
    return [(" ".join(m["atoms"].split()) if m["atoms"] else m["quoted"] or "",
             m["angled"] or m["bare"]) for m in _MAILBOX_RE.finditer(value)]


def _addresses(value: str, where: str, defects: _Defects) -> list[tuple[str, str]]:
    """(display name, address) pairs; names decoded, unusable entries dropped."""
    try:
        pairs = _getaddresses(value)
    except Exception as exc:
        defects.add(f"{where}: unparseable address list ({type(exc).__name__})")
        return []
    result: list[tuple[str, str]] = []
    for name, addr in pairs:
        mailbox = _mailbox(addr)
        if mailbox is None:
            # A bare display name with the null address ("MAILER DAEMON <>") is how
            # bounces legitimately look; only report addresses that are actually bad.
            if addr:
                defects.add(f"{where}: unusable address {_clean(addr or name)!r}")
            continue
        decoded = _collapse_ws(_decode_encoded_words(name, where, defects))
        result.append((_clean(decoded), _clean(mailbox)))
    return result


# --------------------------------------------------------------------------- quick path

_HEADER_LINE_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_BLANK_LINE_RE = re.compile(rb"\n\r?\n")


def _split_head_body(raw: bytes) -> tuple[bytes, bytes]:
    """Split at the first blank line, or where header-shaped lines stop.

    Mirrors the email package's notion of the header block, without parsing it.
    """
    if raw.startswith((b"\n", b"\r\n")):
        return b"", raw[1:] if raw.startswith(b"\n") else raw[2:]
    match = _BLANK_LINE_RE.search(raw)
    if match is not None:
        return raw[: match.start() + 1], raw[match.end() :]
    pos = 0
    first = True
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end + 1
        line = raw[pos:end]
        is_header = (
            _HEADER_LINE_RE.match(line) is not None
            or (not first and line[:1] in (b" ", b"\t"))
            or (first and line.startswith(b"From "))
        )
        if not is_header:
            return raw[:pos], raw[pos:]
        first = False
        pos = end
    return raw, b""


def quick_headers(raw: bytes, *, subject: bool = True) -> QuickHeaders:
    """Message-ID, From and Subject for SMTP intake, at a fraction of a full parse's cost.

    Only the header block is handed to ``BytesHeaderParser`` under compat32 (PERF-NOTES:
    ~38 µs against ~310 µs for a full ``policy.default`` parse).  ``from_header`` is the
    unfolded header with 8-bit bytes decoded but encoded words left alone, so it still
    parses as an address list; ``subject`` is fully decoded, or "" with ``subject=False``
    (intake needs only the other two, and decoding is most of the cost).  Never raises.
    """
    try:
        head, _ = _split_head_body(bytes(raw))
        msg = BytesHeaderParser(policy=_PARSE_POLICY).parsebytes(head)
        sink = _Defects()
        values: dict[str, object] = {}
        for name, value in msg.raw_items():
            values.setdefault(str(name).lower(), value)
        msgid_raw = values.get("message-id")
        message_id = (
            msgid_normalize(_decode_raw_header(msgid_raw, "Message-ID", sink))
            if msgid_raw is not None
            else None
        )
        from_raw = values.get("from")
        from_header = (
            _clean(_unfold(_decode_raw_header(from_raw, "From", sink)))
            if from_raw is not None
            else ""
        )
        subject_raw = values.get("subject") if subject else None
        return QuickHeaders(
            message_id=message_id, from_header=from_header,
            subject=_collapse_ws(_decode_header_value(subject_raw, "Subject", sink))
            if subject_raw is not None else "")
    except Exception:
        return QuickHeaders(message_id=None, from_header="", subject="")


def _canonical_body(body: bytes) -> bytes:
    lines = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"\n".join([line.rstrip(b" \t") for line in lines]).rstrip(b"\n")


def dedupe_key(raw: bytes, quick: QuickHeaders | None = None) -> str:
    """Key under which two deliveries of the same message collide, and nothing else does.

    The same message may reach us more than once: an MTA retry after a lost ``250``, one
    message addressed to several of our role addresses and delivered once per address,
    or the same mail fetched by IMAP and also received by SMTP.  Copies differ in their
    trace headers (Received, Return-Path, Delivered-To, X-Original-To ...) and possibly in
    line endings (CRLF from SMTP, LF from a Maildir), so the key ignores those and is::

        sha256_hex( normalized Message-ID or ""  + "\\0"
                  + From header (unfolded, whitespace collapsed) + "\\0"
                  + body )

    where *body* is everything after the first blank line (or after the last
    header-shaped line if there is no blank line), with CRLF/CR turned into LF, trailing
    spaces and tabs removed from every line and trailing empty lines dropped.

    The body is part of the key because a Message-ID is chosen by the sender: a malicious
    or buggy sender reusing another message's id must not get their mail discarded as a
    duplicate.  No MIME parsing is done; pass ``quick`` if it is already at hand.
    Never raises.
    """
    try:
        data = bytes(raw)
        if quick is None:
            quick = quick_headers(data)
        _, body = _split_head_body(data)
        digest = hashlib.sha256()
        digest.update((quick.message_id or "").encode("utf-8", "replace"))
        digest.update(b"\0")
        digest.update(_collapse_ws(quick.from_header).encode("utf-8", "replace"))
        digest.update(b"\0")
        digest.update(_canonical_body(body))
        return digest.hexdigest()
    except Exception:
        return hashlib.sha256(b"\0\0" + bytes(raw or b"")).hexdigest()


# --------------------------------------------------------------------------- full parse


def _part_label(path: str, content_type: str) -> str:
    return f"part {path} {content_type}" if path else content_type


def _content_type(part: Message) -> str:
    try:
        ctype = str(part.get_content_type()).lower()
    except Exception:
        return "text/plain"
    return _clean(ctype)


def _disposition(part: Message) -> str | None:
    try:
        value = part.get("content-disposition")
        if value is None:
            return None
        token = str(value).split(";", 1)[0].strip().lower()
        return token or None
    except Exception:
        return None


def _param(part: Message, name: str, header: str = "content-type") -> str | None:
    try:
        value = part.get_param(name, None, header)
    except Exception:
        return None
    if value is None:
        return None
    if isinstance(value, tuple):
        try:
            return str(email_utils.collapse_rfc2231_value(value))
        except Exception:
            return str(value[2])
    return str(email_utils.unquote(str(value)))


def _filename(part: Message, where: str, defects: _Defects) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if name is None:
        return None
    # RFC 2231 values come back already decoded; only a raw 8-bit filename still
    # carries the parser's surrogate escapes.
    label = f"{where} filename"
    if _SURROGATE_RE.search(name):
        name = _decode_raw_header(name, label, defects)
    return _sanitize_filename(_clean(_decode_encoded_words(_unfold(name), label, defects)))


def _sanitize_filename(name: str) -> str | None:
    """Last path component, without control characters; None if nothing usable is left.

    Filenames come from the sender; anything that saves attachments to disk must not be
    steered into another directory by ``../`` or absolute paths.
    """
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if not name.strip("."):
        return None
    return name


def _raw_payload(part: Message) -> object:
    """The payload exactly as parsed: a list of parts, or str with 8-bit bytes escaped.

    ``Message.get_payload()`` without decode=True re-decodes 8-bit payloads with the
    declared charset, which loses the original bytes and raises TypeError when the
    charset is an RFC 2231 tuple (seen in fuzzing), so it is never used here.
    """
    return getattr(part, "_payload", None)


def _payload_bytes(part: Message, where: str, defects: _Defects) -> bytes:
    """Transfer-decoded payload; the email package records decoding defects on the part."""
    try:
        cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    except Exception:
        cte = ""
    try:
        data = part.get_payload(decode=True)
    except Exception as exc:
        defects.add(f"{where}: payload could not be decoded ({type(exc).__name__})")
        data = None
    if data is None:
        raw_payload = _raw_payload(part)
        data = _source_bytes(raw_payload) if isinstance(raw_payload, str) else b""
    if cte == "quoted-printable":
        payload = _raw_payload(part)
        source = _source_bytes(payload) if isinstance(payload, str) else b""
        if re.search(rb"=(?![0-9A-Fa-f]{2}|\r?\n|[ \t]*$)", source, re.MULTILINE):
            defects.add(f"{where}: invalid quoted-printable escapes; kept literally")
    elif (
        cte
        and cte not in {"7bit", "8bit", "binary", "base64", "quoted-printable"}
        and not (cte.startswith(("x-uuencode", "uuencode", "x-uue", "uue")))
    ):
        defects.add(f"{where}: unknown content-transfer-encoding {_clean(cte)!r}; left as is")
    return bytes(data)


def _message_bytes(part: Message) -> bytes:
    """Serialized bytes of a message/* part's content (the embedded message)."""
    payload = _raw_payload(part)
    if isinstance(payload, list):
        chunks: list[bytes] = []
        for sub in payload:
            if not isinstance(sub, Message):
                continue
            buf = BytesIO()
            try:
                BytesGenerator(buf, mangle_from_=False, policy=_GEN_POLICY).flatten(sub)
            except Exception:
                buf = BytesIO()
                for name, value in sub.raw_items():
                    buf.write(_source_bytes(name) + b": " + _source_bytes(value) + b"\n")
                buf.write(b"\n")
                inner = _raw_payload(sub)
                if isinstance(inner, str):
                    buf.write(_source_bytes(inner))
            chunks.append(buf.getvalue())
        return b"\n".join(chunks)
    if isinstance(payload, str):
        return _source_bytes(payload)
    return b""


def _embedded_message(part: Message, where: str, defects: _Defects) -> bytes:
    data = _message_bytes(part)
    try:
        cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    except Exception:
        cte = ""
    # RFC 2046 forbids encoding message/rfc822, but some clients base64 it anyway; the
    # email package then "parses" the base64 text as a header-less message.
    if cte == "base64":
        defects.add(f"{where}: base64-encoded embedded message (not allowed by RFC 2046)")
        body = _split_head_body(data)[1] if not data.startswith(b"\n") else data[1:]
        compact = re.sub(rb"\s+", b"", body)
        try:
            return base64.b64decode(compact + b"=" * (-len(compact) % 4))
        except (binascii.Error, ValueError):
            defects.add(f"{where}: undecodable base64 in embedded message", structural=True)
    elif cte == "quoted-printable":
        defects.add(f"{where}: quoted-printable embedded message (not allowed by RFC 2046)")
        return quopri.decodestring(data)
    return data


def _sniff_html_charset(data: bytes) -> str | None:
    match = re.search(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", data[:4096], re.I)
    return match.group(1).decode("ascii") if match else None


def _html_to_text(markup: str, where: str, defects: _Defects) -> str:
    try:
        return str(get_text(markup))
    except Exception as exc:
        defects.add(f"{where}: HTML conversion failed ({type(exc).__name__}); tags stripped")
        stripped = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", markup)
        return html_lib.unescape(re.sub(r"(?s)<[^>]*>", " ", stripped))


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass
class _Leaf:
    part: Message
    path: str
    content_type: str
    disposition: str | None
    in_related: bool


class _Walker:
    """One pass over the MIME tree: body units in reading order, plus attachments."""

    def __init__(self, defects: _Defects) -> None:
        self.defects = defects
        self.attachments: list[Attachment] = []
        self.html: str | None = None
        self._text_cache: dict[int, str] = {}

    # Body ----------------------------------------------------------------------------

    @staticmethod
    def _is_attachment(content_type: str, disposition: str | None) -> bool:
        # Other text types (calendar, csv, vcard, rfc822-headers ...) are files, not prose.
        return disposition == "attachment" or content_type not in ("text/plain", "text/html")

    def _decoded_text(self, leaf: _Leaf) -> str:
        key = id(leaf.part)
        if key not in self._text_cache:
            where = _part_label(leaf.path, leaf.content_type)
            data = _payload_bytes(leaf.part, where, self.defects)
            charset = _param(leaf.part, "charset")
            if charset is None and leaf.content_type == "text/html":
                charset = _sniff_html_charset(data)
            self._text_cache[key] = _clean(
                _normalize_newlines(_decode_bytes(data, charset, where, self.defects))
            )
        return self._text_cache[key]

    def body_units(
        self, part: Message, path: str, depth: int, in_related: bool
    ) -> list[tuple[str, _Leaf]]:
        """("plain"|"html", leaf) units making up the readable body, in order."""
        if depth > _MAX_DEPTH:
            self.defects.add(f"MIME nesting deeper than {_MAX_DEPTH}; ignored", structural=True)
            return []
        content_type = _content_type(part)
        children = _raw_payload(part) if part.is_multipart() else None
        if isinstance(children, list):
            subs = [c for c in children if isinstance(c, Message)]
            if content_type.startswith("message/"):
                return []
            related = in_related or content_type == "multipart/related"
            per_child = [
                self.body_units(c, f"{path}.{i}" if path else str(i), depth + 1, related)
                for i, c in enumerate(subs, 1)
            ]
            if content_type == "multipart/alternative":
                for units in per_child:
                    if units and all(kind == "plain" for kind, _ in units):
                        return units
                for units in per_child:
                    if any(kind == "plain" for kind, _ in units):
                        return units
                for units in reversed(per_child):
                    if units:
                        return units
                return []
            return [unit for units in per_child for unit in units]
        disposition = _disposition(part)
        if content_type.startswith("multipart/"):
            # A multipart whose boundary is missing is left as one undivided text blob;
            # its content is still the best body we have.
            leaf = _Leaf(part, path, "text/plain", disposition, in_related)
            return [("plain", leaf)]
        if self._is_attachment(content_type, disposition):
            return []
        leaf = _Leaf(part, path, content_type, disposition, in_related)
        return [("html" if content_type == "text/html" else "plain", leaf)]

    def render(self, units: list[tuple[str, _Leaf]]) -> str:
        texts: list[str] = []
        for kind, leaf in units:
            decoded = self._decoded_text(leaf)
            if kind == "html":
                where = _part_label(leaf.path, leaf.content_type)
                decoded = _clean(_html_to_text(decoded, where, self.defects))
            decoded = decoded.strip("\n")
            if decoded.strip():
                texts.append(decoded)
        return "\n\n".join(texts)

    # Attachments and HTML --------------------------------------------------------------

    def collect(self, root: Message) -> None:
        stack: list[tuple[Message, str, int, bool]] = [(root, "", 0, False)]
        while stack:
            part, path, depth, in_related = stack.pop()
            if depth > _MAX_DEPTH:
                continue
            content_type = _content_type(part)
            payload = _raw_payload(part)
            if isinstance(payload, list) and not content_type.startswith("message/"):
                related = in_related or content_type == "multipart/related"
                subs = [c for c in payload if isinstance(c, Message)]
                for i, child in reversed(list(enumerate(subs, 1))):
                    stack.append((child, f"{path}.{i}" if path else str(i), depth + 1, related))
                continue
            disposition = _disposition(part)
            if content_type.startswith("multipart/"):
                continue
            leaf = _Leaf(part, path, content_type, disposition, in_related)
            if not self._is_attachment(content_type, disposition):
                if content_type == "text/html" and self.html is None:
                    self.html = self._decoded_text(leaf)
                continue
            self.attachments.append(self._attachment(leaf))

    def _attachment(self, leaf: _Leaf) -> Attachment:
        where = _part_label(leaf.path, leaf.content_type)
        if leaf.content_type.startswith("message/") and leaf.part.is_multipart():
            try:
                data = _embedded_message(leaf.part, where, self.defects)
            except Exception as exc:
                self.defects.add(f"{where}: embedded message not serializable ({exc!r})")
                data = b""
        else:
            data = _payload_bytes(leaf.part, where, self.defects)
        try:
            has_cid = leaf.part.get("content-id") is not None
        except Exception:
            has_cid = False
        inline = leaf.disposition == "inline" or (
            has_cid and leaf.in_related and leaf.content_type.startswith("image/")
        )
        return Attachment(
            filename=_filename(leaf.part, where, self.defects),
            content_type=leaf.content_type,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            data=data,
            inline=inline,
        )


def _iter_parts(root: Message) -> Iterator[tuple[Message, str]]:
    """Every part of the outer message (not inside embedded messages), iteratively."""
    stack: list[tuple[Message, str, int]] = [(root, "", 0)]
    while stack:
        part, path, depth = stack.pop()
        yield part, path
        payload = _raw_payload(part)
        if depth >= _MAX_DEPTH or not isinstance(payload, list):
            continue
        if _content_type(part).startswith("message/"):
            continue
        subs = [c for c in payload if isinstance(c, Message)]
        for i, child in reversed(list(enumerate(subs, 1))):
            stack.append((child, f"{path}.{i}" if path else str(i), depth + 1))


def _first(headers: Iterable[tuple[str, object]], name: str) -> object | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _parse_date(value: str | None, defects: _Defects) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email_utils.parsedate_to_datetime(value)
    except Exception:
        parsed = None
    if parsed is None:
        defects.add(f"Date: unparseable date {value[:80]!r}")
        return None
    if parsed.tzinfo is None:
        # "-0000" means "UTC, local zone unknown" (RFC 5322 3.3).
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _parse(raw: bytes) -> ParsedMail:
    return _parse_tree(raw, message_from_bytes(raw, _PARSE_POLICY))


def _parse_tree(raw: bytes, msg: Message) -> ParsedMail:
    defects = _Defects()
    if not raw.strip():
        defects.add("empty message", structural=True)
    if b"\x00" in raw:
        defects.add("NUL bytes in message (garbage or binary data)", structural=True)

    raw_headers = [(str(name), value) for name, value in msg.raw_items()]
    if not raw_headers and raw.strip():
        defects.add("no headers at all", structural=True)

    headers: list[tuple[str, str]] = []
    for name, value in raw_headers:
        clean_name = _clean(_decode_raw_header(name, "header name", defects))
        headers.append((clean_name, _decode_header_value(value, clean_name, defects)))

    # Structured fields are parsed from the raw value (8-bit decoded, unfolded) so that
    # decoded display names containing "," or "<" cannot corrupt the address syntax.
    lowered = [(name.lower(), value) for name, value in raw_headers]

    def raw_value(name: str) -> str | None:
        value = _first(lowered, name)
        if value is None:
            return None
        # The loop above already recorded any decoding defect for this header.
        return _clean(_unfold(_decode_raw_header(value, name, _Defects())))

    message_id = None
    msgid_value = raw_value("message-id")
    if msgid_value is not None:
        message_id = msgid_normalize(msgid_value)
        if message_id is None:
            defects.add(f"Message-ID: unusable value {msgid_value[:80]!r}")

    sender_email: str | None = None
    sender_name = ""
    from_value = raw_value("from")
    if from_value is not None:
        senders = _addresses(from_value, "From", defects)
        if senders:
            sender_name, sender_email = senders[0]
        elif "<" in from_value:
            name_only = from_value.split("<", 1)[0].strip().strip('"')
            sender_name = _clean(_collapse_ws(_decode_encoded_words(name_only, "From", defects)))

    reply_to_value = raw_value("reply-to")
    reply_list = _addresses(reply_to_value, "Reply-To", defects) if reply_to_value else []
    to_value = raw_value("to")
    cc_value = raw_value("cc")
    subject_value = next((v for n, v in headers if n.lower() == "subject"), None)

    walker = _Walker(defects)
    text = ""
    try:
        text = walker.render(walker.body_units(msg, "", 0, False))
    except RecursionError:
        defects.add("MIME structure too deeply nested to read the body", structural=True)
    walker.collect(msg)

    for part, path in _iter_parts(msg):
        where = _part_label(path, _content_type(part)) if path else "message"
        for defect in getattr(part, "defects", []):
            defects.add_email_defect(defect, where)

    return ParsedMail(
        raw=raw,
        message_id=message_id,
        in_reply_to=msgid_list(raw_value("in-reply-to")),
        references=msgid_list(" ".join(v for n, v in headers if n.lower() == "references")),
        sender_email=sender_email,
        sender_name=sender_name,
        reply_to=reply_list[0][1] if reply_list else None,
        to=_addresses(to_value, "To", defects) if to_value else [],
        cc=_addresses(cc_value, "Cc", defects) if cc_value else [],
        subject=_collapse_ws(subject_value) if subject_value is not None else "",
        date=_parse_date(raw_value("date"), defects),
        text=text,
        html=walker.html,
        attachments=walker.attachments,
        headers=headers,
        defects=defects.items,
        malformed=defects.malformed,
    )


def _crashed(raw: bytes, exc: BaseException) -> ParsedMail:
    """What we can still say about a message that made the parser fail."""
    text, _ = _fallback_decode(raw)
    quick = quick_headers(raw)
    return ParsedMail(
        raw=raw,
        message_id=quick.message_id,
        in_reply_to=[],
        references=[],
        sender_email=None,
        sender_name="",
        reply_to=None,
        to=[],
        cc=[],
        subject=quick.subject,
        date=None,
        text=_clean(_normalize_newlines(text)),
        html=None,
        attachments=[],
        headers=[],
        defects=[f"parser failed: {type(exc).__name__}: {_clean(str(exc))[:200]}"],
        malformed=True,
    )


def parse(raw: bytes) -> ParsedMail:
    """Parse a whole message; never raises.

    On a failure of the parser itself the result still carries the raw bytes, the
    best-effort decoded text, whatever the cheap header parse recovers, ``malformed=True``
    and a defect naming the exception.
    """
    try:
        data = raw if isinstance(raw, bytes) else bytes(raw)
    except Exception:
        data = str(raw).encode("utf-8", "surrogateescape")
    try:
        return _parse(data)
    except Exception as exc:
        try:
            return _crashed(data, exc)
        except Exception:
            return ParsedMail(
                raw=data,
                message_id=None,
                in_reply_to=[],
                references=[],
                sender_email=None,
                sender_name="",
                reply_to=None,
                to=[],
                cc=[],
                subject="",
                date=None,
                text=data.decode("latin-1").replace("\x00", "\ufffd"),
                html=None,
                attachments=[],
                headers=[],
                defects=[f"parser failed: {type(exc).__name__}"],
                malformed=True,
            )
