"""The customer's language, so the acknowledgement speaks it and rules can test it.

Declared languages win (Content-Language, then Accept-Language). Otherwise py3langid (a
modernised langid.py: a naive Bayes model over byte n-grams for 97 languages, shipped inside
the package, loaded once per process, nothing downloaded) names the language of the subject
and the first 2,000 characters of the text when it is at least `MIN_CONFIDENCE` sure. When
it is not (very short mail), a letter-and-stopword test still recognises Turkish; anything
else returns None and the team's default applies.

py3langid scores with the model as it ships; `router.langid_vector` computes the same
scores with whole-array operations (the library's byte-at-a-time walk in Python cost a
pipeline worker a tenth of its time). Both are imported on first use: numpy and the model
have no business in `router ingest`'s start-up.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from router.mail import ParsedMail

MIN_CONFIDENCE = 0.5
MAX_CHARS = 2000

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


@lru_cache(maxsize=1)
def _identifier() -> Any:
    from router.langid_vector import load

    return load()


def identify(text: str) -> tuple[str, float] | None:
    """(language, probability) by py3langid, or None for text without letters."""
    if not any(c.isalpha() for c in text):
        return None
    lang, prob = _identifier().classify(text[:MAX_CHARS])
    return str(lang), float(prob)


def _turkish_hint(text: str) -> bool:
    words = [w.lower() for w in _WORD.findall(text)]
    tr_words = sum(1 for w in words if w in _TR_WORDS)
    return len(_TR_LETTERS.findall(text)) >= 2 or tr_words >= 2


def detect_language(parsed: ParsedMail) -> str | None:
    declared = _declared(parsed)
    if declared:
        return declared
    text = f"{parsed.subject}\n{parsed.text[:MAX_CHARS]}".strip()
    found = identify(text)
    if found is not None and found[1] >= MIN_CONFIDENCE:
        return found[0]
    if _turkish_hint(text):
        return "tr"
    return None
