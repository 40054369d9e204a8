"""LLaVA-format data as a user holds it (JSON records + an image folder), and its real conversion.

Importable from any test (``from userdata import ...``; tests/ is on ``sys.path`` through
tests/conftest.py). :func:`write_user_llava` writes a small, deterministic data set with the
vocabulary of a real one ("What color is the square?" -> "red"): images of several sizes, aspect
ratios and formats in nested folders, single- and multi-turn dialogues, text-only records, a few
records the converter must skip, a held-out validation file and a held-out evaluation file in
LLaVA conversation format with one-word answers. :func:`convert_user_llava` runs the converter's
``main()`` with the README's commands on it; :func:`user_llava` does both.

For a session fixture, register ``user_llava_shards`` in a conftest or test module
(``user_llava_shards = userdata.user_llava_shards``), as tests/model/conftest.py does for
``tiny_batches``.

The small builders the data tests started with (:func:`llava_records`, :func:`write_llava_source`)
live here too; tests/data/data_llava_helpers.py re-exports them.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from avglab.data.convert import main as convert_main

LLAVA_IMAGE_SIZES = [(64, 128), (128, 64), (96, 128), (128, 128), (64, 192)]  # (height, width)

# The user data set's vocabulary: every answer is one word the question's image or fact determines.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle")
IMAGE_SIZES = [(50, 90), (128, 64), (200, 200), (64, 192), (300, 120), (90, 50), (77, 33)]  # (width, height)
IMAGE_FOLDERS = ("coco/train2017", "gqa/images")  # records name images relative to --images, as LLaVA's do
FACTS = [  # text-only exchanges
    ("What color is grass?", "green"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is snow?", "white"),
    ("What color is a ripe banana?", "yellow"),
    ("What color is coal?", "black"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("Is a circle round?", "yes"),
]
# The bad training records write_user_llava adds (id -> the reason the converter skips it under).
BAD_RECORDS = {
    "bad-missing-image": "image_file_missing",
    "bad-corrupt-image": "image_unreadable",
    "bad-empty-answer": "empty_answer",
    "bad-placeholder-without-image": "image_missing",
}


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


def write_records(path: Path, records: list, fmt: str = "json") -> Path:
    """Writes records as a JSON list (``fmt="json"``) or JSON lines (``"jsonl"``); returns ``path``."""
    if fmt == "json":
        path.write_text(json.dumps(records, indent=1))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_llava_source(folder: Path, records: list[dict], fmt: str = "json") -> Path:
    """Writes the records (JSON list or JSON lines) and a PNG for every ``imgs/<i>.png`` they name."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(records):
        if isinstance(record, dict) and record.get("image") == f"imgs/{i}.png":
            h, w = LLAVA_IMAGE_SIZES[i % len(LLAVA_IMAGE_SIZES)]
            Image.new("RGB", (w, h), (200, 10 * (i % 20), 30)).save(folder / record["image"])
    return write_records(folder / f"data.{fmt}", records, fmt)


@dataclass(frozen=True)
class Scene:
    """What one image shows: a shape of one color on a background of another, left or right."""

    shape: str
    color: str
    background: str
    side: str

    def questions(self) -> list[tuple[str, str]]:
        """Every question this image answers, with its one-word answer."""
        return [
            (f"What color is the {self.shape}?", self.color),
            ("What shape is in the image?", self.shape),
            ("What color is the background?", self.background),
            (f"Is the {self.shape} on the left or the right?", self.side),
        ]


@dataclass(frozen=True)
class UserLlava:
    """A written user data set (see :func:`write_user_llava`).

    Attributes:
        folder: where everything was written.
        images: the image folder (the converter's ``--images``).
        sources: the JSON file of each split: ``train`` and ``test`` always, ``val`` when written.
        records: the records of each split, as written.
        skips: per split, the id of every record the converter must skip -> its reason.
        later_turns: per split, ids of the multi-turn records (``--kind eval`` keeps their first exchange).
    """

    folder: Path
    images: Path
    sources: dict[str, Path]
    records: dict[str, list[dict]]
    skips: dict[str, dict[str, str]]
    later_turns: dict[str, list[str]]

    def skipped_by_reason(self, split: str) -> dict[str, int]:
        """The skip counts by reason the converter's manifest of ``split`` must show."""
        return dict(Counter(self.skips[split].values()))


@dataclass(frozen=True)
class UserShards:
    """A user data set converted by the real converter (see :func:`convert_user_llava`).

    Attributes:
        root: the shard folder (``train-*.tar``, ``val-*.tar``, ``test-*.tar`` and their manifests);
            use it as ``data.root`` of ``data=llava_instruct``.
        raw: the data set that was converted.
        manifests: the converter's manifest of each split.
        converted: samples written per split.
        skipped: skip counts by reason per split.
    """

    root: Path
    raw: UserLlava
    manifests: dict[str, dict]
    converted: dict[str, int]
    skipped: dict[str, dict[str, int]]


def write_user_llava(
    folder: str | Path,
    seed: int = 0,
    n_train: int = 80,
    n_val: int = 8,
    n_test: int = 16,
    bad: bool = True,
    fmt: str = "json",
    every_question: bool = False,
) -> UserLlava:
    """Writes a small LLaVA data set the way users hold one; everything follows from ``seed``.

    Training records (``train.json``): every third a dialogue of 2-3 exchanges, every tenth text
    only, the rest one question about the image; the placeholder sits before or after the first
    question, as in LLaVA's files. Images are PNG and JPEG of :data:`IMAGE_SIZES` under
    :data:`IMAGE_FOLDERS`. ``bad`` adds the :data:`BAD_RECORDS` among them: a missing image file,
    a truncated JPEG, an empty answer and an ``<image>`` placeholder in a record without image; with
    the default 80 good records that is 4.8% of the file, under the converter's default
    ``--max-skip-fraction`` (0.05). ``val.json`` holds held-out training-format records,
    ``test.json`` held-out LLaVA records to evaluate, each with a one-word answer (every fourth a
    dialogue whose later turns the eval conversion drops).

    Args:
        folder: output folder (created): ``train.json``, ``val.json``, ``test.json``, ``images/``.
        seed: picks sizes, formats, shapes, colors and questions.
        n_train: good training records (the bad ones come on top).
        n_val: held-out validation records (0: no ``val.json``).
        n_test: held-out evaluation records.
        bad: add the bad training records.
        fmt: ``json`` (a JSON list, LLaVA's format) or ``jsonl`` (JSON lines).
        every_question: every training and validation record with an image asks all of its image's
            questions, in a random order (a denser set: four answers per image instead of ~1.4).

    Returns:
        The written files and what the converter must make of them.
    """
    folder = Path(folder)
    images = folder / "images"
    rng = random.Random(seed)
    writer = _ImageWriter(images, rng)
    train = [_training_record(f"train-{i:05d}", i, rng, writer, every_question) for i in range(n_train)]
    skips: dict[str, dict[str, str]] = {"train": {}, "test": {}}
    if bad:
        for k, record in enumerate(_bad_records(rng, writer)):
            train.insert((k + 1) * len(train) // (len(BAD_RECORDS) + 1), record)  # spread through the file
        skips["train"] = dict(BAD_RECORDS)
    records = {"train": train}
    if n_val:
        records["val"] = [
            _training_record(f"val-{i:05d}", i, rng, writer, every_question) for i in range(n_val)
        ]
        skips["val"] = {}
    records["test"] = [_eval_record(f"test-{i:05d}", i, rng, writer) for i in range(n_test)]
    sources = {split: write_records(folder / f"{split}.{fmt}", rows, fmt) for split, rows in records.items()}
    later_turns = {
        split: [r["id"] for r in rows if len(r.get("conversations", ())) > 2]
        for split, rows in records.items()
    }
    return UserLlava(folder, images, sources, records, skips, later_turns)


def convert_user_llava(
    raw: UserLlava, root: str | Path | None = None, extra_args: tuple[str, ...] = ()
) -> UserShards:
    """Converts a written data set with the converter's ``main()``, as the README's commands do.

    ``train`` is ``python -m avglab.data.convert train.json --images <images> --out <root>``,
    ``val`` the same with ``--split val``, ``test`` with ``--kind eval --split test``.

    Args:
        raw: from :func:`write_user_llava`.
        root: shard folder (default: ``<raw.folder>/shards``).
        extra_args: more converter options for every split (e.g. ``--shard-samples 16``).

    Returns:
        The root, the manifests and the counts.

    Raises:
        SystemExit: the converter's error (e.g. more skips than ``--max-skip-fraction``).
    """
    root = Path(root) if root is not None else raw.folder / "shards"
    split_args = {"train": [], "val": ["--split", "val"], "test": ["--kind", "eval", "--split", "test"]}
    manifests = {}
    for split, source in raw.sources.items():
        argv = [str(source), "--images", str(raw.images), "--out", str(root), *split_args[split], *extra_args]
        manifests[split] = convert_main(argv)
    return UserShards(
        root,
        raw,
        manifests,
        converted={split: m["samples"] for split, m in manifests.items()},
        skipped={split: m["skipped_by_reason"] for split, m in manifests.items()},
    )


def user_llava(folder: str | Path, seed: int = 0, extra_args: tuple[str, ...] = (), **sizes) -> UserShards:
    """Writes the user data set into ``<folder>/raw`` and converts it into ``<folder>/shards``.

    Args:
        folder: output folder.
        seed: the data set's seed.
        extra_args: more converter options.
        **sizes: ``n_train``, ``n_val``, ``n_test``, ``bad``, ``fmt`` of :func:`write_user_llava`.
    """
    folder = Path(folder)
    raw = write_user_llava(folder / "raw", seed=seed, **sizes)
    return convert_user_llava(raw, folder / "shards", extra_args)


@pytest.fixture(scope="session")
def user_llava_shards(tmp_path_factory) -> UserShards:
    """The default user data set, written and converted once per session (small shards: 16 samples)."""
    return user_llava(
        tmp_path_factory.mktemp("user_llava"), extra_args=("--shard-samples", "16", "--no-progress")
    )


class _ImageWriter:
    """Draws scenes into the image folder, cycling sizes and alternating PNG and JPEG."""

    def __init__(self, folder: Path, rng: random.Random):
        self.folder, self.rng, self.count = folder, rng, 0

    def scene(self) -> Scene:
        color, background = self.rng.sample(sorted(COLORS), 2)
        return Scene(self.rng.choice(SHAPES), color, background, self.rng.choice(("left", "right")))

    def write(self, scene: Scene) -> str:
        """Saves the scene's image; returns its path relative to the image folder."""
        width, height = IMAGE_SIZES[self.count % len(IMAGE_SIZES)]
        ext = ("png", "jpg")[self.count % 2]
        name = f"{IMAGE_FOLDERS[self.count % len(IMAGE_FOLDERS)]}/{self.count:06d}.{ext}"
        self.count += 1
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _draw(scene, width, height).save(path, format="PNG" if ext == "png" else "JPEG", quality=90)
        return name


def _draw(scene: Scene, width: int, height: int) -> Image.Image:
    """The scene's shape, a third of the short side wide, centred in the left or right half."""
    image = Image.new("RGB", (width, height), COLORS[scene.background])
    r = max(2, min(width, height) // 6)
    cx = width // 4 if scene.side == "left" else 3 * width // 4
    cy = height // 2
    box = (cx - r, cy - r, cx + r, cy + r)
    draw, fill = ImageDraw.Draw(image), COLORS[scene.color]
    if scene.shape == "square":
        draw.rectangle(box, fill=fill)
    elif scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _with_placeholder(question: str, rng: random.Random) -> str:
    """LLaVA's files put ``<image>`` on its own line before the question, sometimes after it."""
    return f"<image>\n{question}" if rng.random() < 0.75 else f"{question}\n<image>"


def _dialogue(exchanges: list[tuple[str, str]]) -> list[dict]:
    return [
        turn for q, a in exchanges for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})
    ]


def _training_record(rid: str, i: int, rng: random.Random, writer: _ImageWriter, every: bool) -> dict:
    if i % 10 == 9:  # text only: no "image" key, no placeholder
        return {"id": rid, "conversations": _dialogue(rng.sample(FACTS, 1 + (i % 20 == 19)))}
    scene = writer.scene()
    questions = scene.questions()
    if every:
        asked = len(questions)
    else:
        asked = 2 + i % 2 if i % 3 == 1 else 1  # every third record a dialogue of 2-3 exchanges
    exchanges = rng.sample(questions, asked)
    exchanges[0] = (_with_placeholder(exchanges[0][0], rng), exchanges[0][1])
    return {"id": rid, "image": writer.write(scene), "conversations": _dialogue(exchanges)}


def _eval_record(rid: str, i: int, rng: random.Random, writer: _ImageWriter) -> dict:
    scene = writer.scene()
    exchanges = rng.sample(scene.questions(), 2 if i % 4 == 3 else 1)
    exchanges[0] = (f"<image>\n{exchanges[0][0]}", exchanges[0][1])
    return {"id": rid, "image": writer.write(scene), "conversations": _dialogue(exchanges)}


def _bad_records(rng: random.Random, writer: _ImageWriter) -> list[dict]:
    """The :data:`BAD_RECORDS`, in that order."""
    scene = writer.scene()
    question, answer = scene.questions()[0]
    asked = _dialogue([(f"<image>\n{question}", answer)])
    truncated = f"{IMAGE_FOLDERS[0]}/half-downloaded.jpg"  # a JPEG cut in the middle
    buffer = io.BytesIO()
    _draw(scene, 200, 200).save(buffer, format="JPEG")
    (writer.folder / truncated).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return [
        {
            "id": "bad-missing-image",
            "image": f"{IMAGE_FOLDERS[0]}/not-downloaded.jpg",
            "conversations": asked,
        },
        {"id": "bad-corrupt-image", "image": truncated, "conversations": asked},
        {
            "id": "bad-empty-answer",
            "image": writer.write(scene),
            "conversations": _dialogue([(f"<image>\n{question}", " ")]),
        },
        {"id": "bad-placeholder-without-image", "conversations": asked},
    ]
