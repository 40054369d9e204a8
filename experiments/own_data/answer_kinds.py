"""Accuracy per kind of question of an evaluation on the example set, joined to its questions by record id.

The example set's records carry no question type, so the kind is read from the question's words: the
shape's colour, the shape, the background's colour, or the side the shape is on.

Usage: python answer_kinds.py <set>/test.json <eval run>/predictions.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

KINDS = (  # first match wins
    ("background", "color is the background"),
    ("colour", "what color is the"),
    ("shape", "what shape"),
    ("side", "left or the right"),
)


def kind_of(question: str) -> str:
    """The kind of a question, by its words ("other" when none matches)."""
    text = question.lower()
    return next((kind for kind, words in KINDS if words in text), "other")


def accuracy_by_kind(test_json: str, predictions: str) -> dict[str, tuple[int, float]]:
    """{kind: (questions, exact-match accuracy %)}, from the eval's own ``correct`` flags."""
    questions = {r["id"]: r["conversations"][0]["value"] for r in json.load(open(test_json))}
    flags = defaultdict(list)
    for line in open(predictions):
        p = json.loads(line)
        flags[kind_of(questions[p["id"]])].append(bool(p["correct"]))
    return {k: (len(v), round(100 * sum(v) / len(v), 1)) for k, v in sorted(flags.items())}


if __name__ == "__main__":
    print(accuracy_by_kind(*sys.argv[1:3]))
