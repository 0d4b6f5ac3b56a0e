"""Learning from agents: a team classifier trained on routed and corrected tickets.

Examples are the first customer message of every ticket (subject and text), labelled with the
team the ticket ended in: an agent's ``router tickets move ID TEAM`` records a "reroute"
decision and moves the ticket, so a correction is a training example. The model is TF-IDF
over word uni- and bigrams plus character 2–5-grams within words (Turkish and German
morphology: ``faturam``, ``faturamı`` share ``fatur``) into a logistic regression, whose
probability is the confidence compared with ``[learn] apply_threshold``.

`train` measures held-out accuracy (a stratified split, per team) before it fits the final
model on every example; `router train` stores it in ``classifier_model``. The stored blob is
a pickle written by this module into our own database: load it only from there.
"""

from __future__ import annotations

import io
import pickle
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from router.models import (
    T_ARTICLE,
    T_CLASSIFIER_MODEL,
    T_DECISION,
    T_EVENT,
    T_TICKET,
    ArticleKind,
)
from router.rules import Suggestion

TEXT_CHARS = 5000
HOLDOUT = 0.2


@dataclass
class Example:
    text: str
    team: str
    corrected: bool = False


def build_model(seed: int = 0) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    features = FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1,
                                  strip_accents=None, lowercase=True)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True,
                                  min_df=1, lowercase=True)),
    ])
    return Pipeline([("features", features),
                     ("clf", LogisticRegression(C=10.0, max_iter=2000, random_state=seed))])


def evaluate(examples: list[Example], *, seed: int = 0, holdout: float = HOLDOUT
             ) -> dict[str, Any]:
    """Held-out accuracy, overall and per team. Teams with fewer than two examples stay in
    training only (a split cannot test them)."""
    from sklearn.model_selection import train_test_split

    counts = Counter(e.team for e in examples)
    testable = [e for e in examples if counts[e.team] >= 2]
    rest = [e for e in examples if counts[e.team] < 2]
    labels = [e.team for e in testable]
    n_test = max(len(set(labels)), round(len(testable) * holdout))
    if len(set(labels)) < 2 or n_test >= len(testable):
        return {"examples": len(examples), "held_out": 0, "accuracy": None, "per_team": {},
                "note": "too few examples to hold any out"}
    train, test = train_test_split(testable, test_size=n_test, random_state=seed,
                                   stratify=labels)
    train = list(train) + rest
    model = build_model(seed)
    model.fit([e.text for e in train], [e.team for e in train])
    predicted = model.predict([e.text for e in test])
    per: dict[str, dict[str, Any]] = {}
    for e, p in zip(test, predicted, strict=True):
        row = per.setdefault(e.team, {"held_out": 0, "correct": 0})
        row["held_out"] += 1
        row["correct"] += int(p == e.team)
    for row in per.values():
        row["accuracy"] = row["correct"] / row["held_out"]
    correct = sum(r["correct"] for r in per.values())
    return {"examples": len(examples), "train": len(train), "held_out": len(test),
            "accuracy": correct / len(test), "per_team": dict(sorted(per.items()))}


def fit(examples: list[Example], *, seed: int = 0) -> Any:
    model = build_model(seed)
    model.fit([e.text for e in examples], [e.team for e in examples])
    return model


def predict(model: Any, text: str) -> tuple[str, float]:
    proba = model.predict_proba([text[:TEXT_CHARS]])[0]
    best = int(proba.argmax())
    return str(model.classes_[best]), float(proba[best])


# ---------------------------------------------------------------------------- the database

def training_examples(conn: Connection) -> list[Example]:
    """One example per ticket: its first customer message, labelled with its current team
    (an agent's move updates the team and records the reroute)."""
    first = (select(T_ARTICLE.c.ticket_id, func.min(T_ARTICLE.c.id).label("aid"))
             .where(T_ARTICLE.c.kind == ArticleKind.IN).group_by(T_ARTICLE.c.ticket_id)
             .subquery())
    rows = conn.execute(
        select(T_TICKET.c.id, T_TICKET.c.team, T_ARTICLE.c.subject, T_ARTICLE.c.body_text)
        .join(first, first.c.ticket_id == T_TICKET.c.id)
        .join(T_ARTICLE, T_ARTICLE.c.id == first.c.aid)
        .order_by(T_TICKET.c.id)).all()
    moved = {r.ticket_id for r in conn.execute(
        select(T_DECISION.c.ticket_id).where(T_DECISION.c.kind == "reroute"))}
    return [Example(f"{r.subject}\n{(r.body_text or '')[:TEXT_CHARS]}", r.team, r.id in moved)
            for r in rows]


def train_and_store(engine: Engine, now: datetime, *, min_examples: int = 20, seed: int = 0
                    ) -> tuple[int | None, dict[str, Any]]:
    """Train on the database's tickets and store the model; (model id, metrics)."""
    with engine.connect() as conn:
        examples = training_examples(conn)
    teams = Counter(e.team for e in examples)
    metrics: dict[str, Any] = {"teams": dict(sorted(teams.items())),
                               "corrections": sum(e.corrected for e in examples)}
    if len(examples) < min_examples or len(teams) < 2:
        metrics.update(examples=len(examples), accuracy=None,
                       note=f"need at least {min_examples} tickets of two or more teams to "
                            f"train; have {len(examples)} of {len(teams)}")
        return None, metrics
    metrics.update(evaluate(examples, seed=seed))
    model = fit(examples, seed=seed)
    buf = io.BytesIO()
    pickle.dump(model, buf, protocol=pickle.HIGHEST_PROTOCOL)
    with engine.begin() as conn:
        model_id = conn.execute(T_CLASSIFIER_MODEL.insert().returning(T_CLASSIFIER_MODEL.c.id), {
            "created_at": now, "examples": len(examples), "metrics": metrics,
            "blob": buf.getvalue()}).scalar_one()
    return int(model_id), metrics


_cache: dict[str, tuple[int, Any]] = {}


def latest_model(conn: Connection) -> tuple[int, Any] | None:
    """The newest stored model, unpickled once per process and model id."""
    key = str(conn.engine.url)
    model_id = conn.execute(select(func.max(T_CLASSIFIER_MODEL.c.id))).scalar()
    if model_id is None:
        return None
    cached = _cache.get(key)
    if cached is not None and cached[0] == model_id:
        return cached
    blob = conn.execute(select(T_CLASSIFIER_MODEL.c.blob)
                        .where(T_CLASSIFIER_MODEL.c.id == model_id)).scalar_one()
    loaded = (int(model_id), pickle.loads(blob))  # our own table (see the docstring)
    _cache[key] = loaded
    return loaded


def suggester(conn: Connection) -> Any:
    """A `Context.suggest` callable reading the newest model through `conn`, lazily."""

    def suggest(text: str) -> Suggestion | None:
        found = latest_model(conn)
        if found is None:
            return None
        model_id, model = found
        team, confidence = predict(model, text)
        return Suggestion(team, confidence, model_id)

    return suggest


def format_metrics(model_id: int | None, metrics: dict[str, Any]) -> str:
    lines = []
    if model_id is None:
        lines.append(f"not trained: {metrics.get('note', 'too few examples')}")
    else:
        lines.append(f"model {model_id}: {metrics['examples']} tickets "
                     f"({metrics['corrections']} corrected by agents)")
    acc = metrics.get("accuracy")
    if acc is not None:
        lines.append(f"held-out accuracy {acc:.1%} on {metrics['held_out']} tickets")
        for team, row in metrics["per_team"].items():
            lines.append(f"  {team:<16} {row['accuracy']:6.1%}  ({row['correct']}/"
                         f"{row['held_out']})")
    elif model_id is not None:
        lines.append(f"held-out accuracy not measured: {metrics.get('note', '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- corrections

def move_ticket(engine: Engine, ticket_id: int, team: str, now: datetime, *,
                by: str | None = None) -> dict[str, Any]:
    """An agent's correction: move the ticket to `team` and record a "reroute" decision,
    which the next `router train` learns from. Raises LookupError for an unknown ticket."""
    with engine.begin() as conn:
        row = conn.execute(select(T_TICKET.c.id, T_TICKET.c.team, T_TICKET.c.priority,
                                  T_TICKET.c.address, T_TICKET.c.tag)
                           .where(T_TICKET.c.id == ticket_id)).first()
        if row is None:
            raise LookupError(f"no ticket {ticket_id}")
        if row.team == team:
            return {"ticket": ticket_id, "team": team, "moved": False,
                    "reason": f"ticket {ticket_id} is already with team {team}"}
        who = by or "an agent"
        reason = f"moved from {row.team} to {team} by {who}"
        conn.execute(T_TICKET.update().where(T_TICKET.c.id == ticket_id)
                     .values(team=team, updated_at=now))
        conn.execute(T_DECISION.insert(), {
            "ticket_id": ticket_id, "inbound_id": None, "kind": "reroute", "team": team,
            "priority": row.priority, "address": row.address, "tag": row.tag,
            "reason": reason,
            "hits": [{"rule": "agent", "matched": True, "reason": reason, "from": row.team,
                      "to": team, "by": by}],
            "config_version": None, "created_at": now})
        conn.execute(T_EVENT.insert(), {"at": now, "ticket_id": ticket_id, "kind": "moved",
                                        "data": {"from": row.team, "to": team, "by": by}})
    return {"ticket": ticket_id, "team": team, "from": row.team, "moved": True,
            "reason": reason}
