"""The customer's language, so the acknowledgement speaks it.

Declared languages win (Content-Language, then Accept-Language). Otherwise a small
letter-and-stopword test tells Turkish from English, the two languages we ship templates for;
anything else returns None and the team's default applies.
"""

from __future__ import annotations

import re

from router.mail import ParsedMail

_TR_LETTERS = re.compile(r"[ğĞşŞıİ]")
_TR_WORDS = frozenset((
    "ve", "bir", "bu", "da", "de", "için", "ile", "ama", "çok", "merhaba", "teşekkürler",
    "lütfen", "sipariş", "fatura", "ödeme", "hesabım", "neden", "nasıl", "değil", "var",
    "yok", "iyi", "günler", "rica", "ederim"))
_WORD = re.compile(r"\w+", re.UNICODE)


def _declared(parsed: ParsedMail) -> str | None:
    for name in ("Content-Language", "Accept-Language"):
        value = parsed.header(name)
        if value:
            tag = value.split(",")[0].split(";")[0].strip().lower()
            primary = tag.split("-")[0]
            if re.fullmatch(r"[a-z]{2,3}", primary):
                return primary
    return None


def detect_language(parsed: ParsedMail) -> str | None:
    declared = _declared(parsed)
    if declared:
        return declared
    text = f"{parsed.subject}\n{parsed.text[:4000]}"
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return None
    tr_words = sum(1 for w in words if w in _TR_WORDS)
    tr_letters = len(_TR_LETTERS.findall(text))
    if tr_letters >= 2 or tr_words >= 2:
        return "tr"
    return None
