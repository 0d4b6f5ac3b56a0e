"""How accurate is router.learn's classifier on a public labelled data set?

Data: the ChatterBot corpus (PyPI package ``chatterbot-corpus``, BSD-3-Clause,
https://github.com/gunthercox/chatterbot-corpus), which ships dialogs as YAML files, one file
per category (``tech_support``, ``money``, ``health`` ...), in several languages. Each
dialog's first utterance is a user's message; its file's category is the label, the way a
role address or an agent's correction labels a ticket. Utterances that appear under more
than one category, or twice, are dropped so no text is both trained on and tested.

The classifier is exactly router.learn's (`learn.evaluate`: the same TF-IDF + logistic
regression, a stratified 20% hold-out, fixed seed). Nothing is downloaded at run time.

    python bench/learn_accuracy.py [--language english|turkish|...] [--seed N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from router import learn


def corpus_dir() -> Path:
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).parent / "data"


def load(language: str, min_per_category: int = 10) -> list[learn.Example]:
    import yaml

    seen: dict[str, set[str]] = {}
    for path in sorted((corpus_dir() / language).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        category = path.stem
        for dialog in data.get("conversations") or []:
            if not dialog or not isinstance(dialog[0], str):
                continue
            text = " ".join(dialog[0].split())
            if text:
                seen.setdefault(text.lower(), set()).add(category)
    examples = [learn.Example(text, next(iter(cats))) for text, cats in seen.items()
                if len(cats) == 1]
    counts = Counter(e.team for e in examples)
    return [e for e in examples if counts[e.team] >= min_per_category]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--language", default="english")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    examples = load(args.language)
    metrics = learn.evaluate(examples, seed=args.seed)
    counts = Counter(e.team for e in examples)
    majority = max(counts.values()) / len(examples)
    metrics["majority_baseline"] = majority
    metrics["categories"] = len(counts)
    per = metrics["per_team"].values()
    metrics["macro_accuracy"] = sum(r["accuracy"] for r in per) / max(1, len(per))
    if args.json:
        json.dump(metrics, sys.stdout, indent=2)
        print()
        return 0
    print(f"chatterbot-corpus/{args.language}: {len(examples)} messages, {len(counts)} "
          f"categories; held out {metrics['held_out']}")
    print(f"held-out accuracy {metrics['accuracy']:.1%}, mean per category "
          f"{metrics['macro_accuracy']:.1%} (majority class {majority:.1%})")
    for team, row in metrics["per_team"].items():
        print(f"  {team:<16} {row['accuracy']:6.1%}  ({row['correct']}/{row['held_out']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
