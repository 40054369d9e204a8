"""What the vision tower's output tokens know: linear probes per patch token, on the spatial set.

For a stage output (or a fresh model: ``--fresh``), runs the vision tower on the scale-1 tiles of the spatial
set's images (so every patch is an 8x8 pixel square of the image): the 4 local tiles of a 128x128 image
(``--layout anyres``), or the global view of a 64x64 one (the laptop layout, the default), and fits a
linear classifier on the tokens LLaVA-NeXT feeds the projector (``vision_feature_layer``, CLS dropped)
for these labels:

- ``colour``: the colour under the patch centre (background or an object's): what one patch shows;
- ``position``: the patch's own place in its tile (64 classes): what the position embedding gives;
- ``shape``: the shape of the object under the patch centre, on object patches only: needs the
  neighbouring patches for every patch inside an object (inside a circle and a square look the same);
- ``shape_inner``: the same on the patches that lie wholly inside their object (one flat colour), where
  nothing of the patch itself tells the shape;
- ``object_shape``: the shape of each object from the mean of its patch tokens (what attention over the
  object's tokens could read).

Fitted on ``--fit`` training images, scored on ``--score`` test images (chance = the majority share).

    python experiments/spatial/feature_probe.py <data dir> --model <stage output folder>
    python experiments/spatial/feature_probe.py <data dir> --fresh model=tiny   # the random init
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from avglab.cli import CONFIG_DIR
from avglab.core.weights import load_core
from avglab.training.build import build_core, saved_tokenizer

SHAPES = ("circle", "square", "triangle", "cross")


def compose_config(model: Path | None, overrides: list[str], data: Path):
    """The run config on the set's shards: a stage output's model settings, then ``model.*`` overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data=shards", f"data.root={data}/shards", *overrides])
    if model is not None:  # the model settings the stage output was trained with
        OmegaConf.set_struct(cfg, False)
        again = OmegaConf.from_dotlist([o for o in overrides if o.startswith("model.")])
        cfg.model = OmegaConf.merge(OmegaConf.load(model / "config.yaml").model, again.get("model", {}))
    return cfg


def load(model: Path | None, overrides: list[str], data: Path):
    """The core (random from the config, or a stage output's weights), its image processor and tokenizer."""
    cfg = compose_config(model, overrides, data)
    tokenizer = saved_tokenizer(cfg, model) if model else None
    tokenizer, processor, core = build_core(cfg, tokenizer)
    if model:
        load_core(core, model)
    return core.eval(), processor, tokenizer


def patch_labels(record: dict, image: np.ndarray) -> list[dict]:
    """Labels of every patch of the image's 64-px tiles (tile-major, row-major), from scene and pixels."""
    things = record["scene"]["things"]
    out = []
    owner = np.full(image.shape[:2], -1)
    for k, t in enumerate(things):
        x0, y0, x1, y1 = t["box"]
        region = image[y0:y1, x0:x1]
        ref = image[(y0 + y1) // 2, (x0 + x1) // 2]  # every shape covers its box centre
        owner[y0:y1, x0:x1][np.all(region == ref, axis=-1)] = k
    side = image.shape[0] // 64  # 128 px: 2x2 local tiles; 64 px: the image is its one tile
    for tile in range(side * side):
        ty, tx = 64 * (tile // side), 64 * (tile % side)
        for r in range(8):
            for c in range(8):
                y, x = ty + 8 * r + 4, tx + 8 * c + 4
                k = owner[y, x]
                block = owner[y - 4 : y + 4, x - 4 : x + 4]  # the patch's own pixels
                label = {"position": r * 8 + c, "colour": tuple(int(v) for v in image[y, x])}
                if k >= 0:
                    label["owner"] = int(k)
                    label["shape"] = SHAPES.index(things[k]["shape"])
                    if bool((block == k).all()):
                        label["shape_inner"] = label["shape"]
                out.append(label)
    return out


@torch.no_grad()
def features(core, processor, data: Path, split: str, limit: int) -> tuple[torch.Tensor, list[dict]]:
    """(P, D) projector inputs of the scale-1 tiles' patches of ``limit`` images, and their labels.

    128x128 images (anyres layout): the 4 local tiles; 64x64 (laptop layout): the global view, which is the
    image itself (its local tiles are half AnyRes padding).
    """
    records = json.loads((data / f"{split}.json").read_text())
    feats, labels = [], []
    vision = core.llava.model.vision_tower
    layer = core.config.vision_feature_layer
    for record in records:
        image = Image.open(data / "images" / record["image"]).convert("RGB")
        if image.size not in ((128, 128), (64, 64)):
            continue
        views = slice(1, 5) if image.size == (128, 128) else slice(0, 1)
        pixels = processor(images=image, return_tensors="pt")["pixel_values"][0, views]
        out = vision(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]  # (tiles, 64, D)
        feats.append(out.reshape(-1, out.shape[-1]))
        labels += [lab | {"image": len(feats)} for lab in patch_labels(record, np.asarray(image))]
        if len(feats) == limit:
            break
    return torch.cat(feats), labels


def linear_probe(x_fit, y_fit, x_score, y_score, steps: int = 300) -> float:
    """Test accuracy of a multinomial logistic regression (standardised inputs, Adam, light L2)."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_score = (x_fit - mean) / std, (x_score - mean) / std
    classes = int(max(y_fit.max(), y_score.max())) + 1
    head = torch.nn.Linear(x_fit.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x_fit), y_fit).backward()
        opt.step()
    with torch.no_grad():
        return float((head(x_score).argmax(-1) == y_score).float().mean())


def probe(core, processor, data: Path, n_fit: int, n_score: int) -> dict:
    """Probe accuracy and chance per label."""
    torch.manual_seed(0)
    x_fit, l_fit = features(core, processor, data, "train", n_fit)
    x_score, l_score = features(core, processor, data, "test", n_score)
    palette = sorted({lab["colour"] for lab in l_fit + l_score})
    result = {}

    def pick(name, x, labels):
        rows = [i for i, lab in enumerate(labels) if name in lab]
        ys = [palette.index(lab[name]) if name == "colour" else lab[name] for lab in labels if name in lab]
        return x[rows], torch.tensor(ys)

    def objects(x, labels):  # each object's mean token (its patches in the local tiles) and its shape
        groups: dict[tuple[int, int], list[int]] = {}
        for i, lab in enumerate(labels):
            if "owner" in lab:
                groups.setdefault((lab["image"], lab["owner"]), []).append(i)
        means = torch.stack([x[rows].mean(0) for rows in groups.values()])
        return means, [{"object_shape": labels[rows[0]]["shape"]} for rows in groups.values()]

    (xo_fit, lo_fit), (xo_score, lo_score) = objects(x_fit, l_fit), objects(x_score, l_score)
    for name in ("colour", "position", "shape", "shape_inner", "object_shape"):
        if name == "object_shape":
            (xf, yf), (xs, ys) = pick(name, xo_fit, lo_fit), pick(name, xo_score, lo_score)
        else:
            (xf, yf), (xs, ys) = pick(name, x_fit, l_fit), pick(name, x_score, l_score)
        chance = Counter(ys.tolist()).most_common(1)[0][1] / len(ys)
        result[name] = {"accuracy": linear_probe(xf, yf, xs, ys), "chance": chance, "patches": len(ys)}
    return result


def main() -> None:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "data", type=Path, help="the spatial set's folder (train.json, test.json, images/, shards/)"
    )
    p.add_argument("--model", type=Path, help="a stage output folder (<run dir>/model)")
    p.add_argument("--fresh", action="store_true", help="the random initial weights of the configured model")
    p.add_argument("--fit", type=int, default=150, help="training images to fit on")
    p.add_argument("--score", type=int, default=150, help="test images to score on")
    p.add_argument("overrides", nargs="*", help="config overrides (e.g. model.vision_layers=4)")
    args = p.parse_intermixed_args()
    torch.set_num_threads(1)
    model = None if args.fresh else args.model
    core, processor, _ = load(model, list(args.overrides), args.data)
    result = probe(core, processor, args.data, args.fit, args.score)
    for name, r in result.items():
        print(
            f"{name:12s} accuracy {100 * r['accuracy']:5.1f}%  chance {100 * r['chance']:5.1f}%"
            f"  ({r['patches']} patches)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
