"""Other questions about the spatial set's images, for telling which lookups the tiny model can learn.

Reads a folder written by ``python -m avglab.data.spatial`` (its JSON keeps every scene) and writes, next
to the same images, LLaVA JSON asking other questions, then converts it like ``--convert`` does:

- ``background``: "what colour is the background?" (white / gray): global, no lookup;
- ``exists``: "is there a red object?" (yes / no, balanced): one lookup by the colour word;
- ``half``: "is the red object on the left or on the right?" / "... at the top or at the bottom?"
  (left / right / top / bottom, the object's centre at least 8 px off the image's middle): one lookup by
  colour, then the place of the found tokens;
- ``position``: the original relative question (two lookups and a comparison), kept from the source.

Training records ask every chosen kind once (one dialogue); val/test records one question each.

    python experiments/spatial/variant_set.py /tmp/sp/data /tmp/sp/half --kinds half
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from avglab.data.spatial import COLORS, convert_spatial


def question(kind: str, record: dict, rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) of ``kind`` about the record's scene, or None when the scene has none."""
    scene = record["scene"]
    things = scene["things"]
    if kind == "background":
        return "what colour is the background?", scene["background"]
    if kind == "exists":
        present = [t["color"] for t in things]
        if rng.random() < 0.5:
            return f"is there a {rng.choice(present)} object?", "yes"
        return f"is there a {rng.choice([c for c in sorted(COLORS) if c not in present])} object?", "no"
    if kind == "half":
        height, width = record["size"]  # read from the image by main()
        options = []
        for t in things:
            x0, y0, x1, y1 = t["box"]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if abs(cx - width / 2) >= 8:
                options.append(
                    (
                        f"is the {t['color']} object on the left or on the right?",
                        "left" if cx < width / 2 else "right",
                    )
                )
            if abs(cy - height / 2) >= 8:
                options.append(
                    (
                        f"is the {t['color']} object at the top or at the bottom?",
                        "top" if cy < height / 2 else "bottom",
                    )
                )
        return rng.choice(options) if options else None
    if kind == "position" and record.get("fresh"):  # another pair (training dialogues with --repeat)
        height, width = record["size"]
        sep = 24 * min(height, width) / 128
        pairs = [(a, b) for a in things for b in things if a is not b]
        options = []
        for a, b in pairs:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
            dx, dy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
            if abs(dx) >= sep:
                options.append(
                    (
                        f"is the {a['color']} object left or right of the {b['color']} object?",
                        "left" if dx < 0 else "right",
                    )
                )
            if abs(dy) >= sep:
                options.append(
                    (
                        f"is the {a['color']} object above or below the {b['color']} object?",
                        "above" if dy < 0 else "below",
                    )
                )
        return rng.choice(options) if options else None
    if kind == "position":
        turns = record["conversations"]
        for q, a in zip(turns[0::2], turns[1::2], strict=True):
            text = q["value"].replace("<image>\n", "")
            if " of the " in text or "above or below" in text:
                return text, a["value"]
        return None
    raise ValueError(kind)


def main() -> None:
    """Writes the variant set's LLaVA JSON beside the source images and converts it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--kinds", default="half")
    p.add_argument("--repeat", type=int, default=1, help="training questions per kind and image (distinct)")
    args = p.parse_args()
    kinds = args.kinds.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    paths = {}
    for split in ("train", "val", "test"):
        records = json.loads((args.src / f"{split}.json").read_text())
        out = []
        for index, record in enumerate(records):
            rng = random.Random(f"variant/{split}/{index}")
            with Image.open(args.src / "images" / record["image"]) as im:
                record["size"] = (im.height, im.width)
            asked = kinds * args.repeat if split == "train" else [kinds[index % len(kinds)]]
            turns = []
            done = set()
            for j, k in enumerate(asked):
                record["fresh"] = j >= len(kinds)
                qa = None
                for _ in range(10):
                    qa = question(k, record, rng)
                    if qa is None or qa[0] not in done:
                        break
                if qa is None or qa[0] in done:
                    continue
                done.add(qa[0])
                turns += [
                    {"from": "human", "value": qa[0] if turns else f"<image>\n{qa[0]}"},
                    {"from": "gpt", "value": qa[1]},
                ]
            if not turns:
                continue
            record.pop("fresh", None)
            new = {
                "id": record["id"],
                "image": record["image"],
                "conversations": turns,
                "scene": record["scene"],
            }
            if split != "train":
                new["question_type"] = asked[0]
            out.append(new)
        paths[split] = args.out / f"{split}.json"
        paths[split].write_text(json.dumps(out))
    convert_spatial(paths, args.src / "images", args.out / "shards")
    print({s: len(json.loads(p.read_text())) for s, p in paths.items()})


if __name__ == "__main__":
    main()
