"""Can the tiny vision tower learn shape at all? The tower alone, trained on the spatial set's patches.

No LLM: the tower of a freshly built model (``model=...`` overrides; ``AVGLAB_PROBE_POS`` as in
``probe_run.py``) runs on the scale-1 tiles of the training images (``feature_probe.py``) and trains for
``--steps`` with one of these objectives, then a linear probe (``feature_probe.py``) scores what its
tokens know:

- ``--objective shape``: an oracle: a linear head names the shape under every patch (or background),
  cross-entropy; how fast the tower *can* learn shape when told directly, patch by patch;
- ``--objective context``: the label-free neighbourhood painting of ``avglab.stages.context``;
- ``--objective masked``: its masked form (``--mask`` of the patches blanked, their tokens paint them);
- ``--objective words``: weak labels from the paired text: a linear head on the image's mean token
  predicts which words its answers use (multi-label, bag of words).

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
from feature_probe import SHAPES, load, patch_labels, probe
from PIL import Image

import avglab.training.build as build
from avglab.core.weights import save_core
from avglab.stages.context import blank_patches, context_targets

if os.environ.get("AVGLAB_PROBE_POS"):
    import probe_run

    build.tiny_llava = probe_run.patched


def tiles_and_labels(processor, data: Path, limit: int):
    """(N, T, 3, 64, 64) scale-1 tiles of ``limit`` training images; (N, 64 T) shape labels (4: none).

    T = 4 local tiles of a 128x128 image (anyres layout), or 1, the global view of a 64x64 one (laptop).
    """
    tiles, labels, words, owners = [], [], [], []
    for record in json.loads((data / "train.json").read_text()):
        image = Image.open(data / "images" / record["image"]).convert("RGB")
        if image.size not in ((128, 128), (64, 64)):
            continue
        views = slice(1, 5) if image.size == (128, 128) else slice(0, 1)
        tiles.append(processor(images=image, return_tensors="pt")["pixel_values"][0, views])
        patches = patch_labels(record, np.asarray(image))
        answers = [t["value"].split() for t in record["conversations"][1::2]]
        asked = {a[0] for a in answers if a[-1] in SHAPES}  # the objects the shape questions name
        colours = [t["color"] for t in record["scene"]["things"]]
        labels.append([lab.get("shape", 4) for lab in patches])
        # the patch's object if a shape question asks about it, else -1
        owners.append(
            [lab.get("owner", -1) if colours[lab.get("owner", 0)] in asked else -1 for lab in patches]
        )
        words.append({w for turn in record["conversations"][1::2] for w in turn["value"].split()})
        if len(tiles) == limit:
            break
    vocab = sorted(set().union(*words))
    bags = torch.tensor([[float(w in ws) for w in vocab] for ws in words])
    return torch.stack(tiles), torch.tensor(labels), bags, torch.tensor(owners)


def main() -> None:
    """Trains the tower, then probes it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--objective", choices=("shape", "context", "masked", "words", "object"), default="shape")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32, help="images per step (4 tiles each)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--radius", type=int, default=2, help="context: neighbourhood radius in patches")
    p.add_argument("--cell", type=int, default=4, help="context: pooled cell side in pixels")
    p.add_argument("--pool", choices=("mean", "max"), default="mean", help="words: pooling over tokens")
    p.add_argument("--mask", type=float, default=0.5, help="masked: share of patches blanked")
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
    tiles, labels, bags, owners = tiles_and_labels(processor, args.data, args.images)
    vision = core.config.vision_config
    width = (2 * args.radius + 1) * vision.patch_size // args.cell
    outputs = {"shape": 5, "object": 5, "words": bags.shape[1]}.get(args.objective, 3 * width * width)
    head = torch.nn.Linear(vision.hidden_size, outputs)
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    tower.train()
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(len(tiles), (args.batch,))
        pixels = tiles[idx].flatten(0, 1)
        scored = 1.0
        if args.objective == "masked":  # blank patches, score only their tokens (as stages.context does)
            blanked, hidden = blank_patches(pixels, vision.patch_size, args.mask)
            tokens = tower(blanked, output_hidden_states=True).hidden_states[layer][:, 1:]
            scored = hidden.unsqueeze(-1)
        else:
            tokens = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        if args.objective == "object":  # each asked object's mean token names its shape (the scene's masks)
            own, lab = owners[idx].flatten(), labels[idx].flatten()
            flat = tokens.flatten(0, 1)
            key = torch.arange(len(idx)).repeat_interleave(owners.shape[1]) * 16 + own
            rows = own >= 0
            groups, inverse = torch.unique(key[rows], return_inverse=True)
            means = torch.zeros(len(groups), flat.shape[-1]).index_add(0, inverse, flat[rows])
            means = means / torch.bincount(inverse).unsqueeze(1)
            target = torch.zeros(len(groups), dtype=torch.long).scatter(0, inverse, lab[rows])
            loss = F.cross_entropy(head(means), target)
        elif args.objective == "words":  # the image's answer words (bag of words) from its tokens, pooled
            per_token = head(tokens).unflatten(0, (len(idx), -1)).flatten(1, 2)  # (B, T*64, V)
            pooled = per_token.amax(1) if args.pool == "max" else per_token.mean(1)
            loss = F.binary_cross_entropy_with_logits(pooled, bags[idx])
        elif args.objective == "shape":
            loss = F.cross_entropy(head(tokens).flatten(0, 1), labels[idx].flatten())
        else:
            targets, mask = context_targets(pixels, vision.patch_size, args.radius, args.cell)
            cells = mask * scored
            error = (head(tokens) - targets).pow(2).unflatten(-1, (3, -1)) * cells.unsqueeze(2)
            loss = error.sum() / (cells.expand_as(targets[..., : cells.shape[-1]]).sum() * 3)
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
