"""Can the tiny vision tower learn shape at all? The tower alone, trained on the spatial set's patches.

No LLM: the tower of a freshly built model (``model=...`` overrides; ``AVGLAB_PROBE_POS`` as in
``probe_run.py``) runs on the 4 local tiles of 128x128 training images and trains for ``--steps``
with one of two objectives, then a linear probe (``feature_probe.py``) scores what its tokens know:

- ``--objective shape``: an oracle: a linear head names the shape under every patch (or background),
  cross-entropy; how fast the tower *can* learn shape when told directly, patch by patch;
- ``--objective context``: the label-free neighbourhood painting of ``avglab.stages.context``.

    python experiments/spatial/vision_probe.py /tmp/spatial --objective shape --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from feature_probe import load, patch_labels, probe
from PIL import Image

import avglab.training.build as build
from avglab.core.weights import save_core
from avglab.stages.context import context_targets

if os.environ.get("AVGLAB_PROBE_POS"):
    import probe_run

    build.tiny_llava = probe_run.patched


def tiles_and_labels(processor, data: Path, limit: int):
    """(N, 4, 3, 64, 64) local tiles of ``limit`` 128x128 training images; (N, 256) shape labels (4: none)."""
    tiles, labels = [], []
    for record in json.loads((data / "train.json").read_text()):
        image = Image.open(data / "images" / record["image"]).convert("RGB")
        if image.size != (128, 128):
            continue
        tiles.append(processor(images=image, return_tensors="pt")["pixel_values"][0, 1:5])
        labels.append([lab.get("shape", 4) for lab in patch_labels(record, np.asarray(image))])
        if len(tiles) == limit:
            break
    return torch.stack(tiles), torch.tensor(labels)


def main() -> None:
    """Trains the tower, then probes it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--objective", choices=("shape", "context"), default="shape")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32, help="images per step (4 tiles each)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--radius", type=int, default=2, help="context: neighbourhood radius in patches")
    p.add_argument("--cell", type=int, default=4, help="context: pooled cell side in pixels")
    p.add_argument(
        "--save", type=Path, help="write the core (trained tower, random rest) here, for init_from="
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    core, processor, tokenizer = load(None, list(args.overrides), args.data)
    tower = core.llava.model.vision_tower
    layer = core.config.vision_feature_layer
    tiles, labels = tiles_and_labels(processor, args.data, args.images)
    vision = core.config.vision_config
    width = (2 * args.radius + 1) * vision.patch_size // args.cell
    head = torch.nn.Linear(vision.hidden_size, 5 if args.objective == "shape" else 3 * width * width)
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    tower.train()
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(len(tiles), (args.batch,))
        pixels = tiles[idx].flatten(0, 1)
        tokens = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        if args.objective == "shape":
            loss = F.cross_entropy(head(tokens).flatten(0, 1), labels[idx].flatten())
        else:
            targets, mask = context_targets(pixels, vision.patch_size, args.radius, args.cell)
            error = (head(tokens) - targets).pow(2).unflatten(-1, (3, -1)) * mask.unsqueeze(2)
            loss = error.sum() / (mask.sum() * 3 * len(targets))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    tower.eval()
    if args.save:
        save_core(core, args.save, {"vision_probe": {k: str(v) for k, v in vars(args).items()}})
        tokenizer.save_pretrained(str(args.save))
    result = probe(core, processor, args.data, 150, 150)
    for name, r in result.items():
        print(f"{name:12s} accuracy {100 * r['accuracy']:5.1f}%  chance {100 * r['chance']:5.1f}%")
    print(json.dumps({"args": vars(args), "probe": result}, default=str))


if __name__ == "__main__":
    main()
