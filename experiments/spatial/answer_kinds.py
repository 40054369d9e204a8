"""Accuracy per question kind of an evaluation, from its ``predictions.jsonl``.

- The embedded set's question types are glance / gaze, so its ``shape`` question ("what shape is the big
  object?") is split out by its answer (circle, square, triangle), with how often each shape was predicted;
  the rest are colour questions by type.
- The spatial set's types are its kinds (shape, count, position); for its named answers ("red blue left") the
  subject (every word but the last) and the value (the last word) are scored apart as well.

Usage: python answer_kinds.py <eval run>/predictions.jsonl [...]
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict

SHAPES = ("circle", "square", "triangle")
SPATIAL_KINDS = ("shape", "count", "position")


def percent(flags: list[bool]) -> tuple[int, float]:
    """(questions, % true)."""
    return len(flags), round(100 * sum(flags) / len(flags), 1)


def kinds(path: str) -> dict:
    """{kind: (questions, accuracy %)} of one predictions file.

    Spatial kinds also get "<kind> subject" / "<kind> value" rows; the embedded shape question a count of the
    predicted answers under "shape predicted".
    """
    scored, predicted = defaultdict(list), Counter()
    for line in open(path):
        record = json.loads(line)
        answer, prediction = record["answers"][0].split(), record["prediction"].split()
        if record["question_type"] in SPATIAL_KINDS:
            kind = record["question_type"]
            scored[f"{kind} subject"].append(prediction[:-1] == answer[:-1])
            scored[f"{kind} value"].append(prediction[-1:] == answer[-1:])
        elif record["answers"][0] in SHAPES:
            kind = "shape"
            predicted[record["prediction"]] += 1
        else:
            kind = f"{record['question_type']} colour"
        scored[kind].append(bool(record["correct"]))
    result = {k: percent(v) for k, v in sorted(scored.items())}
    if predicted:
        result["shape predicted"] = dict(predicted)
    return result


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg, kinds(arg))
