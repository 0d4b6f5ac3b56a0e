"""py3langid's language identifier with the library's scores, computed with whole-array
operations instead of a Python loop over every byte of the text."""

from __future__ import annotations

from typing import Any

import numpy as np
from py3langid.langid import MODEL_FILE, LanguageIdentifier


def load() -> VectorIdentifier:
    """The identifier for the model py3langid ships, with probabilities (`norm_probs`)."""
    return VectorIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class VectorIdentifier(LanguageIdentifier):  # type: ignore[misc]
    """py3langid's identifier with the same scores, computed with whole-array operations.

    The model's automaton is Aho-Corasick over byte n-grams: its state after a byte stands
    for the longest suffix of the text so far that begins some n-gram, so it depends only on
    the last `depth` bytes (the deepest state's distance from the start). Every position's state
    is therefore `depth` table look-ups from the start state, done for all positions at
    once, rather than one look-up per byte in a Python loop. The model's table is float16,
    which numpy neither multiplies nor converts quickly (250 µs for the 600 rows a mail
    uses), so the rows are read from a float32 copy made at load: 57 MB in each process
    that identifies languages, for half the time per mail.
    `tests/test_language.py` checks the scores against the library's own walk, so a
    py3langid release that changes its model's layout fails there, not in production.
    """

    __slots__ = ("_depth", "_next", "_out", "_ptc32", "_rows")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next = np.frombuffer(self.tk_nextmove, dtype=np.uint32)
        self._rows = np.asarray(self._rowbase, dtype=np.int64)
        self._out = np.asarray(self.tk_output, dtype=np.int64)
        self._ptc32 = np.ascontiguousarray(self.nb_ptc, dtype=np.float32)
        self._depth = self._deepest_state()

    def _deepest_state(self) -> int:
        """Breadth-first over the automaton: how many bytes reach its farthest state."""
        seen = np.zeros(len(self._rows), dtype=bool)
        seen[0] = True
        frontier, depth = np.zeros(1, dtype=np.int64), 0
        byte = np.arange(256, dtype=np.int64)
        while True:
            reached = np.zeros_like(seen)
            for start in range(0, len(frontier), 4096):  # 8 MB of indices at a time
                rows = self._rows[frontier[start:start + 4096]]
                reached[self._next[(rows[:, None] + byte).ravel()]] = True
            reached &= ~seen
            if not reached.any():
                return depth
            seen |= reached
            frontier = np.flatnonzero(reached)
            depth += 1

    def _raw_score(self, text: bytes) -> Any:
        data = np.frombuffer(text, dtype=np.uint8)
        depth = self._depth
        # The first depth-1 positions have fewer bytes behind them than `depth`.
        head, state = [], 0
        for byte in text[:depth - 1]:
            state = self.tk_nextmove[self._rowbase[state] + byte]
            head.append(state)
        states = np.asarray(head, dtype=np.int64)
        if len(data) >= depth:
            span = len(data) - depth + 1
            tail = np.zeros(span, dtype=np.int64)
            for k in range(depth):
                tail = self._next[self._rows[tail] + data[k:k + span]]
            states = np.concatenate((states, tail))
        features = self._out[states]
        features = features[features >= 0]
        if not len(features):
            return super()._raw_score(b"")  # the library's answer for "no features"
        index, counts = np.unique(features, return_counts=True)
        if self.nb_ptc is self._full_model[0]:
            rows = self._ptc32[index]
        else:  # restricted with set_languages: the library's sliced table
            rows = self.nb_ptc[index].astype(np.float32)
        return np.log1p(counts.astype(np.float32)) @ rows + self.nb_pc
