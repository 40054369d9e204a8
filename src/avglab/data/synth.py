"""The embedded glance/gaze VQA set: generated from a seed, written once as WebDataset shards.

Each image has coarse content (background colour, one big shape and its colour) that survives
the coarsest pooling, and fine content: two small bars of equal area and different colours, a flat
one and an upright one, each inside its own patch, together exactly one window of the first (1x2)
pooling (sides at random). ``glance`` questions ask about the coarse content; the ``gaze`` question
asks for the colour of the flat bar. The finest level sees each bar in its own token; every pooled
level averages the two into one token whose colour mixture is symmetric in the two colours, so it
tells the pair, not which one is flat. The right granularity thus depends on the instruction. Samples are
stored as ``__key__``/``png``/``json`` with the LLaVA-format record the real-data converter
writes, so one datamodule reads both. Scene placement and drawing live in ``avglab.data.synth_scene``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds
from tokenizers import normalizers, pre_tokenizers

from avglab.data.synth_scene import draw_scene, sample_scene
from avglab.data.templates import get_template
from avglab.data.tokenizer import SPECIAL_TOKENS

GENERATOR_VERSION = 3  # bump when the drawing (synth_scene) or the records change: old shards are redone
SPLITS = ("train", "val", "test")
SHAPES = ["circle", "square", "triangle"]
COLORS = {  # far apart in RGB; no black, which is the AnyRes padding colour
    "red": [220, 30, 30],
    "green": [30, 170, 50],
    "blue": [40, 70, 230],
    "yellow": [240, 215, 30],
    "white": [245, 245, 245],
}


@dataclass(frozen=True)
class Question:
    """A question the generator asks: its kind (what it asks about), type and wording."""

    kind: str
    question_type: str
    text: str


QUESTIONS = (
    Question("background_color", "glance", "what color is the background?"),
    Question("shape", "glance", "what shape is the big object?"),
    Question("shape_color", "glance", "what color is the big shape?"),
    Question("marker_color", "gaze", "what color is the flat bar?"),
)


@dataclass
class SynthConfig:
    """Generator settings (``data.synth`` in the config). Every sample is a function of these.

    Attributes:
        seed: base seed; sample i of a split uses its own RNG, so splits never share a stream.
        n_train, n_val, n_test: samples per split.
        image_sizes: (height, width) choices; the defaults give AnyRes 2-4 local tiles.
        tile_size: AnyRes tile side S of the model (the marker is placed inside one local tile).
        grid_pinpoints: the model's AnyRes resolutions [height, width].
        patch_size: the model's patch side P, in tile pixels (the bars are aligned to its grid).
        marker_size: side of the square cell each bar is drawn in (a bar is that long and half as
            wide), in tile pixels; at most ``patch_size``, so no bar spans two patches.
        shape_fraction: side of the big shape's box as a fraction of the image's short side.
        gaze_fraction: share of gaze questions in the val and test splits (spread evenly over
            the indices); the default 1/3 asks each of the three default question kinds equally.
        train_gaze_fraction: the same for the train split (None: ``gaze_fraction``). The default
            0.5 oversamples the bar question, which the tiny model learns slowest.
        samples_per_shard: samples per tar shard (keep >= 1 shard per rank and worker).
        colors: colour name -> RGB.
        background_palette, shape_palette, marker_palette: colour names each part draws from;
            the shape and bar colours are drawn independently, each distinct from the background,
            and the two bars differ.
        shapes: big shape kinds (circle, square, triangle).
    """

    seed: int = 0
    n_train: int = 4000
    n_val: int = 200
    n_test: int = 400
    image_sizes: list[tuple[int, int]] = field(
        default_factory=lambda: [(64, 128), (128, 64), (128, 128), (96, 128), (128, 96)]
    )
    tile_size: int = 64
    grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]
    )
    patch_size: int = 8
    marker_size: int = 8
    shape_fraction: float = 0.7
    gaze_fraction: float = 1 / 3
    train_gaze_fraction: float | None = 0.5
    samples_per_shard: int = 50
    colors: dict[str, list[int]] = field(default_factory=lambda: {k: list(v) for k, v in COLORS.items()})
    background_palette: list[str] = field(default_factory=lambda: list(COLORS))
    shape_palette: list[str] = field(default_factory=lambda: list(COLORS))
    marker_palette: list[str] = field(default_factory=lambda: list(COLORS))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    # "shape" (the big shape's kind) is off by default: the tiny model learns it slowly and at the
    # coarsest pooling it is not reliably answerable, so it would blur the glance/gaze contrast.
    question_kinds: list[str] = field(
        default_factory=lambda: ["background_color", "shape_color", "marker_color"]
    )

    def __post_init__(self):
        self.image_sizes = [tuple(int(x) for x in size) for size in self.image_sizes]
        self.grid_pinpoints = [[int(x) for x in p] for p in self.grid_pinpoints]
        problems = []
        if min(self.n_train, self.n_val, self.n_test) < 0:
            problems.append("n_train/n_val/n_test must be >= 0")
        if not self.image_sizes or any(len(s) != 2 or min(s) < 1 for s in self.image_sizes):
            problems.append(f"image_sizes must be positive (height, width) pairs, got {self.image_sizes}")
        if self.patch_size < 1 or self.tile_size % (2 * self.patch_size):
            problems.append(
                f"tile_size ({self.tile_size}) must be a multiple of 2 x patch_size ({self.patch_size})"
            )
        if not 1 <= self.marker_size <= self.patch_size:
            problems.append(
                f"marker_size must be in [1, patch_size={self.patch_size}], got {self.marker_size}"
            )
        if self.samples_per_shard < 1:
            problems.append("samples_per_shard must be >= 1")
        if not 0.0 < self.shape_fraction < 1.0:
            problems.append("shape_fraction must be in (0, 1)")
        for name in ("gaze_fraction", "train_gaze_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {value}")
        for name in ("background_palette", "shape_palette", "marker_palette"):
            unknown = sorted(set(getattr(self, name)) - set(self.colors))
            if unknown or not getattr(self, name):
                problems.append(f"{name} must be a non-empty list of names in colors, unknown: {unknown}")
        for palette, needed in (("shape_palette", 1), ("marker_palette", 2)):
            if any(len(set(getattr(self, palette)) - {bg}) < needed for bg in self.background_palette):
                problems.append(f"{palette} needs {needed} colour(s) other than each background colour")
        unknown_shapes = sorted(set(self.shapes) - set(SHAPES))
        if unknown_shapes or not self.shapes:
            problems.append(f"shapes must be a non-empty subset of {SHAPES}, unknown: {unknown_shapes}")
        kinds = {q.kind: q.question_type for q in QUESTIONS}
        unknown_kinds = sorted(set(self.question_kinds) - set(kinds))
        chosen_types = {kinds.get(k) for k in self.question_kinds}
        if unknown_kinds or not {"glance", "gaze"} <= chosen_types:
            problems.append(
                f"question_kinds must be names from {sorted(kinds)} covering glance and gaze, "
                f"got {self.question_kinds}"
            )
        if problems:
            raise ValueError("invalid SynthConfig: " + "; ".join(problems))

    def split_gaze_fraction(self, split: str) -> float:
        """Share of gaze questions in ``split``."""
        if split == "train" and self.train_gaze_fraction is not None:
            return self.train_gaze_fraction
        return self.gaze_fraction

    def digest(self) -> str:
        """Short hash of the config and generator version, naming the shard folder."""
        blob = json.dumps({"generator_version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_sample(cfg: SynthConfig, split: str, index: int) -> dict:
    """Sample ``index`` of ``split`` as a WebDataset sample (``__key__``, ``png`` bytes, ``json`` dict)."""
    rng = random.Random(f"avglab-synth/{cfg.seed}/{split}/{index}")  # str seeds hash stably across runs
    scene = sample_scene(rng, cfg)
    # Low-discrepancy split: exactly floor(n * fraction) gaze questions, evenly spread.
    fraction = cfg.split_gaze_fraction(split)
    is_gaze = math.floor((index + 1) * fraction) > math.floor(index * fraction)
    question_type = "gaze" if is_gaze else "glance"
    asked = [q for q in QUESTIONS if q.question_type == question_type and q.kind in cfg.question_kinds]
    question = rng.choice(asked)
    answer = {
        "background_color": scene.background,
        "shape": scene.shape,
        "shape_color": scene.shape_color,
        "marker_color": scene.marker_color,
    }[question.kind]
    key = f"synth-{split}-{index:06d}"
    record = {
        "id": key,
        "image": f"{key}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question.text}"},
            {"from": "gpt", "value": answer},
        ],
        "question_type": question_type,
        "answers": [answer],
        "synth": {"question": question.kind, **asdict(scene)},
    }
    buffer = io.BytesIO()
    draw_scene(scene, cfg).save(buffer, format="PNG")
    return {"__key__": key, "png": buffer.getvalue(), "json": record}


def write_split(cfg: SynthConfig, split: str, count: int, folder: Path) -> dict:
    """Writes one split as ``folder/<split>-%05d.tar``; returns its manifest entry."""
    by_type: Counter = Counter()
    by_question: Counter = Counter()
    pattern = str(folder / f"{split}-%05d.tar")
    # mtime fixed: the same config gives byte-identical tar files.
    with wds.ShardWriter(pattern, maxcount=cfg.samples_per_shard, verbose=0, mtime=0.0) as sink:
        for index in range(count):
            sample = make_sample(cfg, split, index)
            by_type[sample["json"]["question_type"]] += 1
            by_question[sample["json"]["synth"]["question"]] += 1
            sample["json"] = json.dumps(sample["json"], sort_keys=True).encode()
            sink.write(sample)
    shards = sorted(p.name for p in folder.glob(f"{split}-*.tar"))
    return {"samples": count, "shards": shards, "question_type": dict(by_type), "question": dict(by_question)}


def ensure_synth_shards(cfg: SynthConfig, root: str | Path) -> dict[str, list[str]]:
    """Shard paths per split, generating ``root/synth-<digest>/`` first if it is not complete.

    The set is written to a temporary folder that is renamed when complete (with its
    ``manifest.json``), so an interrupted write is redone and concurrent ranks agree.

    Args:
        cfg: generator settings.
        root: folder that holds generated sets.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` absolute shard paths (empty for a
        split of 0 samples).
    """
    folder = Path(root).resolve() / f"synth-{cfg.digest()}"
    if not (folder / "manifest.json").is_file():
        _generate(cfg, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    return {split: [str(folder / name) for name in manifest["splits"][split]["shards"]] for split in SPLITS}


def _generate(cfg: SynthConfig, folder: Path) -> None:
    """Writes every split and the manifest into a temporary folder, then renames it to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        counts = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
        splits = {split: write_split(cfg, split, counts[split], tmp) for split in SPLITS}
        manifest = {"generator_version": GENERATOR_VERSION, "config": asdict(cfg), "splits": splits}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if folder.exists() and not (folder / "manifest.json").is_file():
            shutil.rmtree(folder)  # an incomplete set from an older layout: redo it
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same set first; its shards are identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def synth_vocabulary(cfg: SynthConfig, template: str = "vicuna_v1") -> list[str]:
    """Every word the generator and the chat template can emit, as the word tokenizer splits them.

    Args:
        cfg: generator settings (colour names and shapes come from it).
        template: chat template whose fixed strings are included.

    Returns:
        Sorted lowercase words and punctuation runs (special tokens excluded).
    """
    texts = [*get_template(template).fixed_texts(), *(q.text for q in QUESTIONS), *cfg.colors, *cfg.shapes]
    normalizer, splitter = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = set()
    for text in texts:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, " ")
        words.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    return sorted(words)
