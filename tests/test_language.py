"""Language identification: the vectorised identifier scores exactly as py3langid's own walk,
and a customer's mail is named in its language."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from py3langid.langid import MODEL_FILE, LanguageIdentifier

from router import mail
from router.langid_vector import VectorIdentifier, load
from router.language import detect_language

SAMPLES = {
    "en": "Hello, my order from last week still has not arrived and nobody answers the "
          "phone. Could you please tell me where my parcel is? Thank you.",
    "de": "Guten Tag, meine Bestellung von letzter Woche ist immer noch nicht angekommen. "
          "Können Sie mir bitte sagen, wo mein Paket bleibt? Vielen Dank.",
    "fr": "Bonjour, ma commande de la semaine dernière n'est toujours pas arrivée. Pouvez-vous "
          "me dire où se trouve mon colis ? Merci beaucoup.",
    "es": "Hola, mi pedido de la semana pasada todavía no ha llegado. ¿Podrían decirme dónde "
          "está mi paquete? Muchas gracias.",
    "it": "Buongiorno, il mio ordine della settimana scorsa non è ancora arrivato. Potete dirmi "
          "dove si trova il mio pacco? Grazie mille.",
    "nl": "Goedendag, mijn bestelling van vorige week is nog steeds niet aangekomen. Kunt u mij "
          "vertellen waar mijn pakket is? Hartelijk dank.",
    "pt": "Olá, a minha encomenda da semana passada ainda não chegou. Podem dizer-me onde está "
          "o meu pacote? Muito obrigado.",
    "tr": "Merhaba, geçen hafta verdiğim sipariş hâlâ gelmedi. Paketimin nerede olduğunu "
          "söyleyebilir misiniz? Çok teşekkürler.",
    "ru": "Здравствуйте, мой заказ с прошлой недели до сих пор не пришёл. Подскажите, "
          "пожалуйста, где моя посылка? Спасибо.",
    "pl": "Dzień dobry, moje zamówienie z zeszłego tygodnia wciąż nie dotarło. Czy mogą mi "
          "Państwo powiedzieć, gdzie jest moja paczka? Dziękuję.",
    "ja": "こんにちは。先週注文した商品がまだ届いていません。"
          "荷物がどこにあるか教えていただけますか。",
}


def _texts() -> list[str]:
    """Support mail in several scripts, every short length up to past the automaton's
    depth, mixed-script noise, and the bodies of CPython's email test corpus."""
    rng = random.Random(7)
    out = list(SAMPLES.values())
    out += [s[:n] for s in SAMPLES.values() for n in range(0, 9)]
    out += ["", " ", "1234 5678", "ÄÖÜ", "x" * 3000, "PLEASE HELP, MY ACCOUNT IS LOCKED"]
    alphabet = "abcdefghijklmnopqrstuvwxyzäöüßçğışéèêàñ АБВгде日本語中文한국어 .,!?\n\t0123456789"
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400)))
            for _ in range(150)]
    corpus = Path(__file__).parent / "mail_cases"
    for path in sorted(corpus.rglob("*"))[:80]:
        if path.is_file():
            parsed = mail.parse(path.read_bytes())
            out.append(f"{parsed.subject}\n{parsed.text[:2000]}")
    return out


@pytest.fixture(scope="module")
def pair() -> tuple[LanguageIdentifier, VectorIdentifier]:
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True), load()


def test_scores_match_the_library_walk(pair: tuple[LanguageIdentifier,
                                                   VectorIdentifier]) -> None:
    library, vector = pair
    texts = _texts()
    assert len(texts) > 250
    for text in texts:
        data = library._encode(text)
        expected = library._raw_score(data)
        got = vector._raw_score(data)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3, err_msg=repr(text))
        assert vector.classify(text)[0] == library.classify(text)[0], repr(text)


def test_the_automaton_depth_is_found_not_assumed(pair: tuple[LanguageIdentifier,
                                                              VectorIdentifier]) -> None:
    """A depth too small would give wrong states for n-grams longer than it; the texts
    above would catch that, and this names the cause."""
    _, vector = pair
    assert vector._depth >= 4  # the model holds n-grams of up to four bytes at least


def test_restricted_languages_still_match() -> None:
    restricted_library = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    restricted = load()
    for who in (restricted_library, restricted):
        who.set_languages(["de", "nl", "en"])
    for text in list(SAMPLES.values()) + _texts()[-40:]:
        got, expected = restricted.classify(text), restricted_library.classify(text)
        assert got[0] == expected[0]
        assert got[1] == pytest.approx(expected[1], rel=1e-4, abs=1e-6)


def _mail(body: str, subject: str = "Order", extra: str = "") -> mail.ParsedMail:
    raw = (f"From: c@example.net\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
           f"{extra}Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()
    return mail.parse(raw)


@pytest.mark.parametrize("lang", sorted(SAMPLES))
def test_a_customers_language_is_named(lang: str) -> None:
    assert detect_language(_mail(SAMPLES[lang])) == lang


def test_a_declared_language_wins() -> None:
    assert detect_language(_mail(SAMPLES["en"], extra="Content-Language: de-AT\r\n")) == "de"


def test_mail_without_letters_has_no_language() -> None:
    assert detect_language(_mail("1234 5678 !!!", subject="42")) is None
