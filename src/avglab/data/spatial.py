r"""``python -m avglab.data.spatial``: a generated VQA set about where things are, in LLaVA format.

Every image holds 3-4 objects (circle, square, triangle, cross) of distinct colours on a light
background, each 2-3 patches wide in the tiny model's 64-px local tile (``--layout anyres``: 3-5
objects, 2.5-4 patches wide, in 128-px images cut into 4 tiles), placed apart. The questions need more
than one patch's colour; answers name their subject, then the value (``--answers bare``: the value):

- ``shape``: "what shape is the red object?" -> "red circle" (circle / square / triangle / cross),
- ``count``: "how many circles are there?" -> "circles two" (one / two / three; the other objects are
  distractors of other shapes, their number drawn apart from the count: counting all objects is no help),
- ``position``: "is the red object left or right of the blue object?" or "... above or below ..."
  -> "red blue left" (left / right / above / below; the centres ``min_separation`` px apart on that axis).

Answers are balanced within each kind (the shape and the count are drawn first, the scene is built
around them), so no answer is right more often than chance without looking. Training records are
dialogues asking every kind in random order (one vision pass; up to ``questions_per_kind``, default 2,
questions of each kind: about distinct objects, pairs, and for count the distractors' shapes too, whose
counts lean to "one"); the first question of each kind is the balanced one. Validation and test records
ask one question each with its kind (``question_type``), so ``stage=eval`` splits accuracy by kind.

The output is what a user brings (README, "Real data"): ``train.json``, ``val.json``, ``test.json``
and ``images/``, which the converter turns into shards::

    python -m avglab.data.spatial /data/spatial                  # raw LLaVA JSON + images
    python -m avglab.data.spatial /data/spatial --convert        # ... and shards in /data/spatial/shards
    python -m avglab stage=pretrain model=tiny data=shards data.root=/data/spatial/shards

``--convert`` runs the converter exactly as the README's commands do (train, ``--split val``,
``--kind eval --split test``). Everything is a function of ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {  # far apart in RGB; none near the light backgrounds or AnyRes' black padding
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 230),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (190, 190, 190)}
COUNT_WORDS = ("one", "two", "three")
KINDS = ("shape", "count", "position")
ANSWER_STYLES = ("named", "bare")
# Image and object sizes. "laptop": a 64-px image is the tiny model's global view plus one local tile (136
# visual tokens at the finest level), objects 18-24 px (2-3 of its 8-px patches); "anyres": 128-px images in
# 4 local tiles (316-336 tokens), objects 20-32 px. Sizes are pixels at the largest short side listed.
LAYOUTS = {
    "laptop": {
        "image_sizes": [(64, 64)],
        "min_size": 18,
        "max_size": 24,
        "max_objects": 4,
        "gap": 2,
        "min_separation": 12,
    },
    "anyres": {
        "image_sizes": [(128, 128), (112, 128), (128, 112)],
        "min_size": 20,
        "max_size": 32,
        "max_objects": 5,
        "gap": 4,
        "min_separation": 24,
    },
}


@dataclass(frozen=True)
class Thing:
    """One object: its shape, colour and box (x0, y0, x1, y1), end-exclusive pixels."""

    shape: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """The box centre (x, y) in pixels."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class SpatialConfig:
    """Generator settings (defaults: the "laptop" layout of ``LAYOUTS``).

    Sizes are pixels of an image whose short side is the largest of ``image_sizes``; smaller ones scale them.

    Attributes:
        seed: base seed; image i of a split has its own RNG.
        n_train, n_val, n_test: images (train) or questions (val, test) per split.
        min_size, max_size: an object's side.
        min_objects, max_objects: objects per image (the counted shape 1-3 times, the rest distractors), at
            least 3, so the number of objects says nothing about the count (experiments/spatial/README.md).
        gap: free pixels between two objects' boxes.
        min_separation: the least distance of the two centres along the asked axis (position).
        kinds: question kinds asked (training dialogues ask each, in random order).
        questions_per_kind: questions of each kind per training dialogue, where the scene has them (shape:
            distinct objects, position: ordered pairs, count: distractor shapes too); more answers per image.
        image_sizes: (height, width) choices.
        answer_style: ``named`` answers say what they are about, then the value, with the value right after
            the question's key word(s): "red circle", "circles three", "red blue left"; ``bare`` answers are
            the value alone ("circle"). With the key word at the position the value is read at, no circuit
            has to fetch it from the question: a toy of the tiny LLM learns the named form in hundreds of
            steps and the bare one not in thousands; on ``model=tiny_spatial`` it is what makes the
            two-object position question learnable (experiments/spatial/README.md).
    """

    seed: int = 0
    n_train: int = 4000
    n_val: int = 200
    n_test: int = 600
    min_size: int = LAYOUTS["laptop"]["min_size"]
    max_size: int = LAYOUTS["laptop"]["max_size"]
    min_objects: int = 3
    max_objects: int = LAYOUTS["laptop"]["max_objects"]
    gap: int = LAYOUTS["laptop"]["gap"]
    min_separation: int = LAYOUTS["laptop"]["min_separation"]
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    image_sizes: list[tuple[int, int]] = field(default_factory=lambda: list(LAYOUTS["laptop"]["image_sizes"]))
    answer_style: str = "named"
    questions_per_kind: int = 2

    def scale(self, height: int, width: int) -> float:
        """How an image of this size scales the configured pixel sizes (1 at the largest short side)."""
        return min(height, width) / max(min(size) for size in self.image_sizes)

    def __post_init__(self):
        self.image_sizes = [tuple(int(x) for x in s) for s in self.image_sizes]
        problems = []
        if not set(self.kinds) <= set(KINDS) or not self.kinds:
            problems.append(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if not 1 <= self.min_size <= self.max_size:
            problems.append("need 1 <= min_size <= max_size")
        if not len(COUNT_WORDS) <= self.min_objects <= self.max_objects <= len(COLORS):
            n = len(COUNT_WORDS)
            problems.append(
                f"need {n} <= min_objects <= max_objects <= {len(COLORS)} (any count, one colour each)"
            )
        if self.questions_per_kind < 1:
            problems.append("questions_per_kind must be >= 1")
        if self.answer_style not in ANSWER_STYLES:
            problems.append(f"answer_style must be one of {ANSWER_STYLES}, got {self.answer_style!r}")
        if min(self.n_train, self.n_val, self.n_test) < 0:
            problems.append("n_train/n_val/n_test must be >= 0")
        if problems:
            raise ValueError("invalid SpatialConfig: " + "; ".join(problems))


@dataclass
class SpatialScene:
    """What one image shows, and the question each kind asks about it (with its answer)."""

    height: int
    width: int
    background: str
    things: list[Thing]
    questions: dict[str, tuple[str, str]]  # kind -> (question, answer)
    more: list[tuple[str, str, str]] = field(default_factory=list)  # training only: (kind, question, answer)


def _place(rng: random.Random, height: int, width: int, sizes: list[int], gap: int) -> list[tuple] | None:
    """Non-overlapping square boxes of the given sides (``gap`` apart), or None after many tries."""
    boxes: list[tuple[int, int, int, int]] = []
    for side in sizes:
        for _ in range(200):
            x0, y0 = rng.randint(1, width - side - 1), rng.randint(1, height - side - 1)
            box = (x0, y0, x0 + side, y0 + side)
            if all(
                box[2] + gap <= b[0] or b[2] + gap <= box[0] or box[3] + gap <= b[1] or b[3] + gap <= box[1]
                for b in boxes
            ):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _position_questions(
    rng: random.Random, things: list[Thing], min_sep: float, named: bool
) -> list[tuple[str, str]]:
    """Left/right or above/below questions about pairs far enough apart on that axis.

    The first question is the scene's (the axis drawn first, then any pair); the others (other ordered pairs,
    so a pair may come back the other way round, then the other axis) are the extra training questions of
    ``questions_per_kind``.
    """
    pairs = [(a, b) for a in things for b in things if a is not b]
    rng.shuffle(pairs)
    axes = ["x", "y"]
    rng.shuffle(axes)
    found = []
    for axis in axes:
        for a, b in pairs:
            d = a.center[0] - b.center[0] if axis == "x" else a.center[1] - b.center[1]
            if abs(d) < min_sep:
                continue
            before, after = ("left", "right") if axis == "x" else ("above", "below")
            relation = f"{before} or {after}" + (" of" if axis == "x" else "")
            subject = f"{a.color} {b.color} " if named else ""
            question = f"is the {a.color} object {relation} the {b.color} object?"
            found.append((question, subject + (before if d < 0 else after)))
    return found


def _shape_question(thing: Thing, named: bool) -> tuple[str, str]:
    return f"what shape is the {thing.color} object?", f"{thing.color} " * named + thing.shape


def _count_question(shape: str, count: int, named: bool) -> tuple[str, str]:
    return f"how many {PLURALS[shape]} are there?", f"{PLURALS[shape]} " * named + COUNT_WORDS[count - 1]


def sample_scene(rng: random.Random, cfg: SpatialConfig) -> SpatialScene:
    """Draws one scene: a counted shape (1-3 of it), distractors of other shapes, the three questions."""
    named = cfg.answer_style == "named"
    for _ in range(1000):
        height, width = rng.choice(cfg.image_sizes)
        scale = cfg.scale(height, width)
        counted = rng.choice(SHAPES)
        count = rng.randint(1, len(COUNT_WORDS))
        # the number of objects is drawn apart from the count, so that it does not give the count away
        total = rng.randint(cfg.min_objects, cfg.max_objects)
        others = [s for s in SHAPES if s != counted]
        shapes = [counted] * count + [rng.choice(others) for _ in range(total - count)]
        rng.shuffle(shapes)
        sizes = [max(1, round(rng.randint(cfg.min_size, cfg.max_size) * scale)) for _ in shapes]
        boxes = _place(rng, height, width, sizes, max(1, round(cfg.gap * scale)))
        if boxes is None:
            continue
        colors = rng.sample(sorted(COLORS), total)
        things = [Thing(s, c, b) for s, c, b in zip(shapes, colors, boxes, strict=True)]
        positions = _position_questions(rng, things, cfg.min_separation * scale, named)
        if not positions:
            continue
        asked = rng.choice(things)  # symmetric in the shapes, so shape answers are balanced
        questions = {
            "shape": _shape_question(asked, named),
            "count": _count_question(counted, count, named),
            "position": positions[0],
        }
        extra = cfg.questions_per_kind - 1  # more questions about other objects, pairs, shapes (no RNG drawn)
        more = [("shape", *_shape_question(t, named)) for t in things if t is not asked][:extra]
        more += [("position", *q) for q in positions[1:]][:extra]
        present = sorted({t.shape for t in things} - {counted}, key=SHAPES.index)  # counts of the distractors
        more += [("count", *_count_question(s, shapes.count(s), named)) for s in present][:extra]
        return SpatialScene(height, width, rng.choice(sorted(BACKGROUNDS)), things, questions, more)
    raise RuntimeError("no scene fits: lower max_objects, max_size or min_separation, or use larger images")


def draw_scene(scene: SpatialScene) -> Image.Image:
    """Renders a scene as an RGB image of size (width, height)."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        x0, y0, x1, y1 = thing.box
        fill = COLORS[thing.color]
        if thing.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif thing.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif thing.shape == "triangle":
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        else:  # cross: two bars a third of the side thick
            t0, t1 = x0 + (x1 - x0) // 3, x1 - (x1 - x0) // 3
            u0, u1 = y0 + (y1 - y0) // 3, y1 - (y1 - y0) // 3
            draw.rectangle((t0, y0, t1 - 1, y1 - 1), fill=fill)
            draw.rectangle((x0, u0, x1 - 1, u1 - 1), fill=fill)
    return image


def _scene_json(scene: SpatialScene) -> dict:
    return {"background": scene.background, "things": [asdict(t) for t in scene.things]}


def write_split(cfg: SpatialConfig, split: str, count: int, out: Path) -> Path:
    """Writes ``out/<split>.json`` and its images under ``out/images/<split>/``; returns the JSON path.

    Train records are dialogues asking every kind once (random order, the image placeholder in the first
    turn); val and test records ask one question each, the kinds in turn, with ``question_type``.
    """
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        rng = random.Random(f"avglab-spatial/{cfg.seed}/{split}/{index}")
        scene = sample_scene(rng, cfg)
        name = f"{split}/{index:06d}.png"
        draw_scene(scene).save(out / "images" / name)
        rid = f"spatial-{split}-{index:06d}"
        if split == "train":
            asked = [(kind, *scene.questions[kind]) for kind in cfg.kinds]
            asked += [q for q in scene.more if q[0] in cfg.kinds]
            rng.shuffle(asked)
            turns = []
            for k, (_, question, answer) in enumerate(asked):
                turns += [
                    {"from": "human", "value": f"<image>\n{question}" if k == 0 else question},
                    {"from": "gpt", "value": answer},
                ]
            records.append({"id": rid, "image": name, "conversations": turns, "scene": _scene_json(scene)})
        else:
            kind = cfg.kinds[index % len(cfg.kinds)]
            question, answer = scene.questions[kind]
            turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
            records.append(
                {
                    "id": rid,
                    "image": name,
                    "conversations": turns,
                    "question_type": kind,
                    "scene": _scene_json(scene),
                }
            )
    path = out / f"{split}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_spatial(out: str | Path, cfg: SpatialConfig | None = None) -> dict[str, Path]:
    """Writes every non-empty split as LLaVA JSON + images into ``out``; returns the JSON paths by split."""
    cfg = cfg or SpatialConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    paths = {split: write_split(cfg, split, n, out) for split, n in counts.items() if n}
    (out / "spatial_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return paths


def convert_spatial(paths: dict[str, Path], images: Path, shards: Path, samples_per_shard: int = 500) -> dict:
    """Runs the converter on the written splits as the README does; returns the manifests by split."""
    from avglab.data.convert import convert

    options = {"train": {}, "val": {"split": "val"}, "test": {"kind": "eval", "split": "test"}}
    return {
        split: convert(
            path, shards, images=images, samples_per_shard=samples_per_shard, progress=False, **options[split]
        )
        for split, path in paths.items()
    }


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m avglab.data.spatial", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for train.json, val.json, test.json and images/")
    p.add_argument("--train", type=int, default=SpatialConfig.n_train, help="training images (dialogues)")
    p.add_argument("--val", type=int, default=SpatialConfig.n_val, help="validation questions")
    p.add_argument("--test", type=int, default=SpatialConfig.n_test, help="test questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="laptop", help="image and object sizes")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument(
        "--answers", choices=ANSWER_STYLES, default="named", help='"red circle" (named) or "circle" (bare)'
    )
    p.add_argument(
        "--questions-per-kind",
        type=int,
        default=SpatialConfig.questions_per_kind,
        help="training: up to N questions of each kind (distinct objects, pairs, the other shapes' counts)",
    )
    p.add_argument("--convert", action="store_true", help="also convert into <out>/shards (train, val, test)")
    p.add_argument("--shard-samples", type=int, default=500, help="samples per shard when converting")
    args = p.parse_args(argv)
    cfg = SpatialConfig(
        seed=args.seed,
        n_train=args.train,
        n_val=args.val,
        n_test=args.test,
        kinds=args.kinds.split(","),
        answer_style=args.answers,
        questions_per_kind=args.questions_per_kind,
        **LAYOUTS[args.layout],
    )
    paths = write_spatial(args.out, cfg)
    print(
        "wrote " + ", ".join(f"{s}: {p}" for s, p in paths.items()) + f"; images under {args.out / 'images'}"
    )
    if args.convert:
        manifests = convert_spatial(paths, args.out / "images", args.out / "shards", args.shard_samples)
        counts = ", ".join(f"{s}: {m['samples']}" for s, m in manifests.items())
        print(f"converted into {args.out / 'shards'} ({counts})")
    return paths


if __name__ == "__main__":
    main()
