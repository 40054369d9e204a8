"""Builders of tiny LLaVA-format sources for the real-data tests (JSON records and an image folder)."""

import json

from PIL import Image

LLAVA_IMAGE_SIZES = [(64, 128), (128, 64), (96, 128), (128, 128), (64, 192)]  # (height, width)


def llava_records(n: int) -> list[dict]:
    """``n`` LLaVA records: single-turn, multi-turn, placeholder at the end, every 7th text-only."""
    records = []
    for i in range(n):
        if i % 7 == 6:
            convo = [{"from": "human", "value": "what is red?"}, {"from": "gpt", "value": "red"}]
            records.append({"id": f"rec{i}", "conversations": convo})
            continue
        convo = [
            {"from": "human", "value": "what color is the background?\n<image>"},
            {"from": "gpt", "value": "red"},
        ]
        if i % 3 == 1:
            convo += [
                {"from": "human", "value": "what shape is the big object?"},
                {"from": "gpt", "value": "circle"},
            ]
        records.append({"id": f"rec{i}", "image": f"imgs/{i}.png", "conversations": convo})
    return records


def write_llava_source(folder, records: list[dict], fmt: str = "json"):
    """Writes the records (JSON list or JSON lines) and a PNG for every ``imgs/<i>.png`` they name."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(records):
        if isinstance(record, dict) and record.get("image") == f"imgs/{i}.png":
            h, w = LLAVA_IMAGE_SIZES[i % len(LLAVA_IMAGE_SIZES)]
            Image.new("RGB", (w, h), (200, 10 * (i % 20), 30)).save(folder / record["image"])
    path = folder / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
