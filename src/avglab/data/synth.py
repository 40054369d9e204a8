"""The embedded glance/gaze VQA set: generated from a seed, written once as WebDataset shards.

Each image has coarse content (background colour, one big shape and its colour) that survives
the coarsest pooling, and fine content: two small bars of equal area and different colours, a flat
one and an upright one, each inside its own patch, together exactly one window of the first (1x2)
pooling (sides at random). ``glance`` questions ask about the coarse content; the ``gaze`` question
asks for the colour of the flat bar. The finest level sees each bar in its own token; every pooled
level averages the two into one token whose colour mixture is symmetric in the two colours, so it
tells the pair, not which one is flat. The right granularity thus depends on the instruction. Samples are
stored as ``__key__``/``png``/``json`` with the LLaVA-format record the real-data converter
writes, so one datamodule reads both.
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
from PIL import Image, ImageDraw
from tokenizers import normalizers, pre_tokenizers
from transformers.image_processing_utils import select_best_resolution

from avglab.data.templates import get_template
from avglab.data.tokenizer import SPECIAL_TOKENS

GENERATOR_VERSION = 3  # bump when the drawing or the records change, so old shards are not reused
SPLITS = ("train", "val", "test")
SHAPES = ["circle", "square", "triangle"]
COLORS = {  # far apart in RGB; no black, which is the AnyRes padding colour
    "red": [220, 30, 30],
    "green": [30, 170, 50],
    "blue": [40, 70, 230],
    "yellow": [240, 215, 30],
    "white": [245, 245, 245],
}
MARKER_GAP = 2  # free pixels between the marker and the big shape's box


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


@dataclass
class Scene:
    """What one image shows; boxes are (x0, y0, x1, y1) in pixels, end-exclusive."""

    height: int
    width: int
    background: str
    shape: str
    shape_color: str
    shape_box: tuple[int, int, int, int]
    marker_color: str  # the flat bar's (the gaze answer)
    upright_color: str
    marker_box: tuple[int, int, int, int]  # the two bars' (1x2) pooling window
    marker_tile: int
    flat_left: bool


def anyres_layout(
    height: int, width: int, tile_size: int, grid_pinpoints: list[list[int]]
) -> tuple[float, list[tuple[float, float]]]:
    """How ``LlavaNextImageProcessor`` lays an image out.

    Best pinpoint, aspect-preserving resize, centred padding, S x S tiles.

    Returns:
        The resize scale and each local tile's unclipped top-left corner in image coordinates
        (row-major; negative where the tile starts in the padding).
    """
    target_h, target_w = select_best_resolution((height, width), grid_pinpoints)
    scale = min(target_w / width, target_h / height)
    new_w, new_h = min(math.ceil(width * scale), target_w), min(math.ceil(height * scale), target_h)
    pad_x, pad_y = (target_w - new_w) // 2, (target_h - new_h) // 2
    origins = [
        ((col * tile_size - pad_x) / scale, (row * tile_size - pad_y) / scale)
        for row in range(target_h // tile_size)
        for col in range(target_w // tile_size)
    ]
    return scale, origins


def local_tile_boxes(
    height: int, width: int, tile_size: int, grid_pinpoints: list[list[int]]
) -> list[tuple[float, float, float, float]]:
    """Where AnyRes puts each local tile, in image coordinates (row-major, clipped to the image).

    A tile that is only padding gets an empty box.
    """
    scale, origins = anyres_layout(height, width, tile_size, grid_pinpoints)
    side = tile_size / scale
    return [(max(x, 0.0), max(y, 0.0), min(x + side, width), min(y + side, height)) for x, y in origins]


def _place_marker(
    rng: random.Random, scene_size: tuple[int, int], shape_box: tuple[int, ...], cfg: SynthConfig
) -> tuple[tuple[int, int, int, int], int] | None:
    """A bar box on the pooling grid of one local tile, clear of the shape's box, or None.

    The bar's top-left corner sits on a 2P x P grid in tile pixels, so after AnyRes each half
    fills one patch and the bar fills one window of the (1, 2) pooling (exact when the resize
    scale is 1, as for every default image size).
    """
    height, width = scene_size
    scale, origins = anyres_layout(height, width, cfg.tile_size, cfg.grid_pinpoints)
    bar_w, bar_h = round(2 * cfg.marker_size / scale), round(cfg.marker_size / scale)
    step_x, step_y = 2 * cfg.patch_size / scale, cfg.patch_size / scale
    sx0, sy0, sx1, sy1 = shape_box
    spots = []
    for tile, (ox, oy) in enumerate(origins):
        for i in range(cfg.tile_size // (2 * cfg.patch_size)):
            for j in range(cfg.tile_size // cfg.patch_size):
                x, y = round(ox + i * step_x), round(oy + j * step_y)
                inside = x >= 0 and y >= 0 and x + bar_w <= width and y + bar_h <= height
                clear = (
                    x + bar_w + MARKER_GAP <= sx0
                    or x >= sx1 + MARKER_GAP
                    or y + bar_h + MARKER_GAP <= sy0
                    or y >= sy1 + MARKER_GAP
                )
                if inside and clear:
                    spots.append(((x, y, x + bar_w, y + bar_h), tile))
    return rng.choice(spots) if spots else None


def sample_scene(rng: random.Random, cfg: SynthConfig) -> Scene:
    """Draws the content of one image from ``rng``.

    Raises:
        RuntimeError: if no marker position is free, naming the settings to change.
    """
    height, width = rng.choice(cfg.image_sizes)
    background = rng.choice(cfg.background_palette)
    shape = rng.choice(cfg.shapes)
    shape_color = rng.choice([c for c in cfg.shape_palette if c != background])
    marker_color = rng.choice([c for c in cfg.marker_palette if c != background])
    upright_color = rng.choice([c for c in cfg.marker_palette if c not in (background, marker_color)])
    side = max(1, round(cfg.shape_fraction * min(height, width)))
    for _ in range(50):
        x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
        shape_box = (x0, y0, x0 + side, y0 + side)
        placed = _place_marker(rng, (height, width), shape_box, cfg)
        if placed is not None:
            colors = (background, shape, shape_color, shape_box, marker_color, upright_color)
            return Scene(height, width, *colors, *placed, flat_left=rng.random() < 0.5)
    raise RuntimeError(
        f"no room for a {cfg.marker_size}px marker beside a {side}px shape in a {height}x{width} image; "
        "lower synth.shape_fraction or synth.marker_size"
    )


def bar_boxes(scene: Scene) -> list[tuple[tuple[int, int, int, int], str]]:
    """The flat and the upright bar as (box, colour), each centred in its half of ``marker_box``."""
    mx0, my0, mx1, my1 = scene.marker_box
    cell = (mx1 - mx0) // 2
    quarter = cell // 4
    flat_x, up_x = (mx0, mx0 + cell) if scene.flat_left else (mx0 + cell, mx0)
    flat = (flat_x, my0 + quarter, flat_x + cell, my1 - quarter)
    upright = (up_x + quarter, my0, up_x + cell - quarter, my1)
    return [(flat, scene.marker_color), (upright, scene.upright_color)]


def draw_scene(scene: Scene, cfg: SynthConfig) -> Image.Image:
    """Renders a scene as an RGB image of size (width, height)."""
    image = Image.new("RGB", (scene.width, scene.height), tuple(cfg.colors[scene.background]))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = scene.shape_box
    fill = tuple(cfg.colors[scene.shape_color])
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    for (x0, y0, x1, y1), color in bar_boxes(scene):
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=tuple(cfg.colors[color]))
    return image


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
