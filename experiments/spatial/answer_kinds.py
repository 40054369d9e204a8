"""Accuracy per question kind of an embedded-set evaluation, told apart by the answer word.

The embedded set's question types are glance / gaze, so its ``shape`` question ("what shape is the big
object?") is split out by its answer (circle, square, triangle); the rest are colour questions by type.

Usage: python answer_kinds.py <eval run>/predictions.jsonl [...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

SHAPES = ("circle", "square", "triangle")


def kinds(path: str) -> dict[str, tuple[int, float]]:
    """{kind: (questions, accuracy %)}, plus how often each shape was predicted for the shape questions."""
    correct = defaultdict(list)
    for line in open(path):
        record = json.loads(line)
        kind = "shape" if record["answers"][0] in SHAPES else f"{record['question_type']} colour"
        correct[kind].append(bool(record["correct"]))
        if kind == "shape":
            correct[f"shape predicted {record['prediction']}"].append(True)
    return {k: (len(v), round(100 * sum(v) / len(v), 1)) for k, v in sorted(correct.items())}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg, kinds(arg))
