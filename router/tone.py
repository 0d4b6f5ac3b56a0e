"""Urgency and tone of a customer's message, for rules ("a VIP writes angrily") and agents.

English tone is VADER (vaderSentiment: a lexicon and rules tuned for short social text; it
weighs capitals, "!!!", "but" and negation). Turkish has no VADER, so a small lexicon of our
own scores it the same way: negative and positive stems, matched at word starts because
Turkish adds suffixes (``rezalet`` → ``rezaletsiniz``), with a following ``değil`` flipping a
word's sign. Other languages get the English scorer, which still catches "!!!" and the
international words (``URGENT``, ``ASAP``).

Urgency is a keyword test in both languages (``urgent``, ``asap``, ``outage``; ``acil``,
``hemen``, ``çöktü``) plus shouting (``!!!`` or a subject in capitals).

The result is data: `Tone.as_dict()` goes into the decision record agents see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

MAX_CHARS = 4000          # the first screen of a mail says how it feels
NEGATIVE_BELOW = -0.35    # VADER compound (and our Turkish score) below this: negative
POSITIVE_ABOVE = 0.35

_EN_URGENT = (
    "urgent", "urgently", "asap", "immediately", "emergency", "critical", "outage",
    "right now", "as soon as possible", "time-sensitive", "time sensitive", "deadline",
    "site is down", "is down", "not working", "cannot log in", "can't log in", "production",
)
_TR_URGENT = (
    "acil", "acilen", "hemen", "derhal", "ivedi", "kritik", "bir an önce",
    "en kısa sürede", "çöktü", "çalışmıyor", "erişilemiyor", "açılmıyor", "son gün",
)
# Turkish stems; matched at the start of a word, so suffixes still match.
_TR_NEGATIVE = {
    "rezalet": -3.0, "berbat": -3.0, "skandal": -3.0, "dolandırıcı": -3.5, "kabul edilemez": -3.0,
    "saçma": -2.0, "şikayet": -1.5, "şikâyet": -1.5, "kızgın": -2.5, "sinir": -2.0,
    "öfke": -2.5, "bıktım": -2.5, "bıktık": -2.5, "hayal kırıklığı": -2.5, "mağdur": -2.0,
    "yanlış": -1.0, "hata": -1.0, "sorun": -1.0, "problem": -1.0, "maalesef": -1.0,
    "kötü": -2.0, "felaket": -3.0, "iade": -0.5, "hala": -0.5, "hâlâ": -0.5,
    "memnuniyetsiz": -2.0, "utanç": -2.5, "yazık": -1.5, "avukat": -2.0, "mahkeme": -2.0,
}
_TR_POSITIVE = {
    "teşekkür": 2.0, "sağol": 1.5, "sağ ol": 1.5, "harika": 3.0, "mükemmel": 3.0,
    "memnun": 2.0, "güzel": 2.0, "süper": 2.5, "iyi": 1.5, "başarılı": 2.0, "rica": 0.5,
}
_TR_NEGATION = re.compile(r"^(?:değil|değildi|değilim|değiliz|yok)$")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Tone:
    language: str                  # the scorer used: en | tr
    sentiment: float               # -1 (furious) .. +1 (delighted)
    label: str                     # negative | neutral | positive
    urgent: bool
    urgency_terms: list[str] = field(default_factory=list)
    tone_terms: list[str] = field(default_factory=list)
    method: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"language": self.language, "sentiment": round(self.sentiment, 3),
                "label": self.label, "urgent": self.urgent,
                "urgency_terms": self.urgency_terms, "tone_terms": self.tone_terms,
                "method": self.method}

    def describe(self) -> str:
        urgency = (f"urgent ({', '.join(self.urgency_terms)})" if self.urgent
                   else "not urgent")
        return f"tone {self.label} ({self.sentiment:+.2f}, {self.method}), {urgency}"


def tr_lower(text: str) -> str:
    """Lower case by Turkish rules: I → ı, İ → i (str.lower gets both wrong)."""
    return text.replace("I", "ı").replace("İ", "i").lower()


@lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _label(score: float) -> str:
    if score <= NEGATIVE_BELOW:
        return "negative"
    if score >= POSITIVE_ABOVE:
        return "positive"
    return "neutral"


def _phrases(text: str, terms: tuple[str, ...]) -> list[str]:
    return [t for t in terms if re.search(rf"(?<!\w){re.escape(t)}", text)]


def _shouting(subject: str, body: str) -> bool:
    letters = [c for c in subject if c.isalpha()]
    caps = len(letters) >= 8 and sum(c.isupper() for c in letters) / len(letters) > 0.8
    return caps or "!!!" in subject or body.count("!!!") >= 2


def _turkish_score(text: str) -> tuple[float, list[str]]:
    low = tr_lower(text)
    words = _WORD.findall(low)
    total = 0.0
    found: list[str] = []
    for i, word in enumerate(words):
        for lexicon in (_TR_NEGATIVE, _TR_POSITIVE):
            for stem, value in lexicon.items():
                if " " in stem:
                    continue
                if word.startswith(stem):
                    negated = i + 1 < len(words) and bool(_TR_NEGATION.match(words[i + 1]))
                    total += -value if negated else value
                    found.append(word + (" değil" if negated else ""))
    for stem, value in (*_TR_NEGATIVE.items(), *_TR_POSITIVE.items()):
        if " " in stem and stem in low:
            total += value
            found.append(stem)
    exclaim = min(text.count("!"), 4) * 0.3
    if total < 0:
        total -= exclaim
    # VADER's normalisation, so the thresholds mean the same in both languages.
    score = total / (total * total + 15) ** 0.5
    return score, found


# Sentences end at . ! ? or a blank line; single newlines are just the mail's line wrapping.
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
MAX_SENTENCES = 12        # the opening says how a mail feels; the cost stays bounded
MAX_WORDS = 25
# VADER costs ~1 ms per 100 words even per sentence; the subject and the opening carry the
# tone (urgency terms are still looked for in the first MAX_CHARS).
VADER_CHARS = 600


def _vader_score(text: str) -> float:
    """VADER per sentence, averaged. VADER is built for sentences, and on a whole mail its
    negation check lower-cases every word once per word (quadratic: 20 ms for 4,000
    characters, on the pipeline's hot path); per sentence the cost is linear."""
    sentences: list[str] = []
    for s in _SENTENCE.split(text):
        words = s.split()
        # A run-on "sentence" (no punctuation) would bring the quadratic cost back.
        sentences += [" ".join(words[i:i + MAX_WORDS]) for i in range(0, len(words), MAX_WORDS)]
    sentences = sentences[:MAX_SENTENCES]
    if not sentences:
        return 0.0
    vader = _vader()
    scores = [float(vader.polarity_scores(s)["compound"]) for s in sentences]
    scored = [s for s in scores if s != 0.0] or [0.0]
    return sum(scored) / len(scored)


def analyze(subject: str, text: str, language: str | None = None) -> Tone:
    body = text[:MAX_CHARS]
    whole = f"{subject}\n{body}"
    lang = (language or "en").lower()
    if lang == "tr":
        score, found = _turkish_score(whole)
        urgent_terms = _phrases(tr_lower(whole), _TR_URGENT)
        method = "turkish lexicon"
    else:
        lang = "en"
        score = _vader_score(whole[:VADER_CHARS])
        found = []
        urgent_terms = _phrases(whole.lower(), _EN_URGENT)
        method = "vader"
    if _shouting(subject, body):
        urgent_terms.append("shouting")
    return Tone(language=lang, sentiment=score, label=_label(score),
                urgent=bool(urgent_terms), urgency_terms=urgent_terms, tone_terms=found,
                method=method)
