"""How far counting every object goes on the spatial set's count questions, and whether a model does that.

For a set folder (``test.json`` with each record's ``scene``): the accuracy of the best guess of the count
from the number of objects alone (the most common count for each number of objects; chance is 1/3). For the
``predictions.jsonl`` of an evaluation with ``router=none`` (the finest level) as well: the count confusion
(true -> predicted) with the mean number of objects of the images behind each cell. A model that counts
every object shows the predicted count rising with that mean whatever the true count.

    python experiments/spatial/count_shortcut.py <set dir> [<eval run>/predictions.jsonl]
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

COUNTS = ("one", "two", "three")


def count_records(folder: Path) -> dict[str, tuple[int, str]]:
    """{record id: (objects in the image, true count word)} of the test split's count questions."""
    records = json.loads((folder / "test.json").read_text())
    return {
        r["id"]: (len(r["scene"]["things"]), r["conversations"][1]["value"].split()[-1])
        for r in records
        if r["question_type"] == "count"
    }


def object_count_guess(counts: dict[str, tuple[int, str]]) -> float:
    """Accuracy of answering each count question with the most common count for its number of objects."""
    by_objects: dict[int, Counter] = defaultdict(Counter)
    for objects, answer in counts.values():
        by_objects[objects][answer] += 1
    return sum(max(c.values()) for c in by_objects.values()) / len(counts)


def main() -> None:
    """Command line entry point (see the module docstring)."""
    counts = count_records(Path(sys.argv[1]))
    print(f"object-count guess: {100 * object_count_guess(counts):.1f}% of {len(counts)} count questions")
    if len(sys.argv) < 3:
        return
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for line in Path(sys.argv[2]).open():
        p = json.loads(line)
        if p["id"] in counts:
            objects, true = counts[p["id"]]
            cells[(true, p["prediction"].split()[-1])].append(objects)
    print("true -> predicted one / two / three (mean objects in those images)")
    for true in COUNTS:
        row = [
            f"{len(cells[(true, p)])} ({mean(cells[(true, p)]):.2f})" if cells[(true, p)] else "0"
            for p in COUNTS
        ]
        print(f"{true:6s} " + " / ".join(row))


if __name__ == "__main__":
    main()
