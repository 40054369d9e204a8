"""Settings of the embedded glance/gaze VQA set (``data.synth``): colours, shapes, questions, sizes.

Its own module so that the scene (``scene.py``) and the generator (``generator.py``) both read it
without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

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
        train_questions: questions each training dialogue asks about its image, each a turn of
            its own: the first drawn as above, the rest other kinds of ``question_kinds`` in a random
            order (at most one per kind). Val and test records ask one. The default 1 is the demo's
            set; more answers per image is what lets the tiny model learn the big shape's kind.
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
    train_questions: int = 1
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
        if not 1 <= self.train_questions <= len(self.question_kinds):
            problems.append(
                f"train_questions must be in [1, len(question_kinds)={len(self.question_kinds)}], "
                f"got {self.train_questions}"
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
