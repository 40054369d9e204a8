"""What one synth image shows and how it is drawn: AnyRes-aware placement of the bars, rendering.

The bars are placed on the patch grid of one AnyRes local tile, so after ``LlavaNextImageProcessor``
each bar fills one patch and the two fill one window of the first (1x2) pooling
(``avglab.data.synth.generator`` says why). Everything is a function of a ``random.Random`` and the
``SynthConfig``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw
from transformers.image_processing_utils import select_best_resolution

from avglab.data.synth.config import SynthConfig

MARKER_GAP = 2  # free pixels between the marker and the big shape's box


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
