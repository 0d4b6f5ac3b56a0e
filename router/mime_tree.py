"""The `email.message.Message` tree of a well-formed mail, built by cutting its bodies at
the MIME boundaries (found with `str.find`) instead of the stdlib feed parser's Python loop
over every line.

A 150 KB attachment is about 2,000 base64 lines; `email.feedparser` reads, matches against
the boundary pattern and appends each one separately, and ends every part with a regex
search that scans the whole payload: most of a 6 ms parse. Here each part's header block
still goes through the stdlib parser (headers only), so header handling is the stdlib's
own; only the split of a body into preamble, parts and epilogue is done here, by the
stdlib's rules (RFC 2046; `feedparser._parsegen`).

Lines end in CRLF, CR or LF, as for the stdlib. The fast path takes only mail the stdlib
would parse without a defect. Anything else (a defect, a missing boundary, a `message/*`
part, repeated boundary lines) is declined, and `message_from_bytes` hands the whole mail
to the stdlib parser, so the result is always the stdlib's. `tests/test_mime_tree.py`
checks the trees are identical on CPython's email corpus, our cases, the benchmark's mail
and random MIME.
"""

from __future__ import annotations

import re
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import Policy
from itertools import pairwise

# Parts nested deeper than this go to the stdlib parser (which has no such limit).
_MAX_DEPTH = 20
_MULTIPART_CTE = ("7bit", "8bit", "binary")


class _Declined(Exception):
    """The mail has something the fast path does not reproduce exactly."""


def message_from_bytes(raw: bytes, policy: Policy) -> Message:
    """What `BytesParser(policy=policy).parsebytes(raw)` returns, faster for clean mail."""
    tree = fast_tree(raw, policy)
    if tree is not None:
        return tree
    return BytesParser(policy=policy).parsebytes(raw)


def fast_tree(raw: bytes, policy: Policy) -> Message | None:
    """The tree built by splitting, or None when the mail must go to the stdlib parser."""
    # The stdlib's BytesParser decodes the same way before it parses.
    text = raw.decode("ascii", "surrogateescape")
    try:
        return _part(text, policy, 0, None)
    except _Declined:
        return None


def _head_end(text: str) -> int:
    """Where the header block ends: after the first empty line, or at the end. Lines end
    in CRLF, CR or LF, as for the stdlib; an empty line starts right after a line end,
    so it is the second character of "\n\r", "\n\n" or "\r\r" (a CR followed by LF
    is one line end), or the very first character."""
    if text[:1] in ("\r", "\n"):
        at = 0
    else:
        at = len(text)
        for pair in ("\n\r", "\n\n", "\r\r"):
            found = text.find(pair, 0, at)
            if found >= 0:
                at = found + 1
        if at == len(text):
            return at
    return at + (2 if text.startswith("\r\n", at) else 1)


def _strip_eol(text: str) -> str:
    """Without its last line end: the line end before a boundary belongs to the boundary."""
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith(("\r", "\n")):
        return text[:-1]
    return text


def _part(text: str, policy: Policy, depth: int, parent: Message | None) -> Message:
    """One message or body part: `text` is all its lines, boundary lines excluded."""
    cut = _head_end(text)
    msg = HeaderParser(policy=policy).parsestr(text[:cut])
    # A defect, or header-like lines left over as body (a "From " line last), is the
    # stdlib's to handle.
    if msg.defects or msg.get_payload():
        raise _Declined
    if parent is not None:
        parent.attach(msg)
    maintype = msg.get_content_maintype()
    if maintype == "message" or msg.get_content_type() == "multipart/digest":
        raise _Declined  # nested messages, and digests' default part type: stdlib
    if maintype == "multipart":
        msg.set_payload(None)  # the headers-only parse left "", and parts are attached
        _multipart(msg, text[cut:], policy, depth)
    else:
        msg.set_payload(text[cut:])
    return msg


def _boundaries(body: str, boundary: str) -> list[re.Match[str]]:
    """The stdlib's boundary lines: at a line start, "--" boundary, "--" if closing,
    blanks, then the line's end. Found with `str.find`: a regex search with "^" would try
    every position of a 200 KB attachment."""
    marker = "--" + boundary
    rest = re.compile(re.escape(marker) + r"(--)?[ \t]*(?:\r\n|\r|\n|\Z)")
    found: list[re.Match[str]] = []
    at = body.find(marker)
    while at >= 0:
        if at == 0 or body[at - 1] in "\r\n":
            match = rest.match(body, at)
            if match:
                found.append(match)
        at = body.find(marker, at + 1)
    return found


def _multipart(msg: Message, body: str, policy: Policy, depth: int) -> None:
    boundary = msg.get_boundary()
    if boundary is None or depth >= _MAX_DEPTH:
        raise _Declined
    if str(msg.get("content-transfer-encoding", "8bit")).lower() not in _MULTIPART_CTE:
        raise _Declined
    found = _boundaries(body, boundary)
    if not found or found[0].group(1):
        raise _Declined  # no opening boundary
    if not found[-1].group(1) or any(m.group(1) for m in found[:-1]):
        # No closing boundary, or boundary lines after it: the stdlib reads the latter
        # as epilogue after consuming them as parts' ends in ways not reproduced here.
        raise _Declined
    if found[0].start():
        msg.preamble = _strip_eol(body[:found[0].start()])
    for opening, ending in pairwise(found):
        chunk = body[opening.end():ending.start()]
        if not chunk:
            raise _Declined  # repeated boundary lines
        child = _part(chunk, policy, depth + 1, msg)
        if child.is_multipart():
            if child.epilogue == "":
                child.epilogue = None
            elif child.epilogue is not None:
                child.epilogue = _strip_eol(child.epilogue)
        else:
            child.set_payload(_strip_eol(child.get_payload()))
    # After the closing line, the rest is epilogue as it stands ("" if nothing).
    msg.epilogue = body[found[-1].end():]
