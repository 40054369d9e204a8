"""Where the LLM looks when it answers: attention on the visual tokens at each answer's value word.

For a stage output, runs validation batches of the spatial set at the finest level with eager attention and
prints, per question kind and LLM layer, the share of the attention (mean over heads) that the position
predicting the value word (the answer's last word) puts on the visual tokens; for shape questions also the
asked object's share of the global view's part of it (the first 64 visual tokens; the object's patches from
the scene, as in ``feature_probe.py``).

    python experiments/spatial/attention_share.py <set dir> <run>/model [--batches N]   # default: all
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from feature_probe import compose_config, load, patch_labels  # noqa: E402

from avglab.training.build import build_datamodule  # noqa: E402


def main() -> None:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("model", type=Path)
    p.add_argument("--batches", type=int, default=0, help="validation batches to read (0: all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    core, processor, tokenizer = load(args.model, ["model.attn_implementation=eager"], args.data)
    weights: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(core.llava.model.language_model.layers):
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: weights.__setitem__(i, o[1]))
    cfg = compose_config(args.model, ["model.attn_implementation=eager"], args.data)
    datamodule = build_datamodule(cfg, tokenizer, processor)
    datamodule.setup("validate")
    records = {r["id"]: r for r in json.loads((args.data / "val.json").read_text())}
    mass: dict[str, list[list[float]]] = {}
    share: list[list[float]] = []
    for b, batch in enumerate(datamodule.val_dataloader()):
        if b == args.batches > 0:
            break
        with torch.no_grad():
            out = core(batch, level=-1)
        for e, rid in enumerate(batch["ids"]):
            record = records[rid]
            start = int((batch["input_ids"][e] == core.image_token_id).nonzero()[0])
            visual = slice(start, start + int(out.visual_tokens[e]))
            answer = (out.spliced.labels[e] != -100).nonzero().flatten()
            query = int(answer[-2]) - 1  # predicts the value word (the last before </s>)
            rows = [weights[i][e, :, query, visual] for i in sorted(weights)]  # (H, visual) per layer
            mass.setdefault(record["question_type"], []).append([float(r.sum(-1).mean()) for r in rows])
            if record["question_type"] == "shape":
                colour = record["conversations"][0]["value"].split("the ")[1].split()[0]
                image = np.asarray(Image.open(args.data / "images" / record["image"]).convert("RGB"))
                owner = [t["color"] for t in record["scene"]["things"]].index(colour)
                labels = patch_labels(record, image)
                on_object = torch.tensor([lab.get("owner", -1) == owner for lab in labels])
                shares = []
                for r in rows:
                    glance = r.sum(0)[:64]
                    shares.append(float(glance[on_object].sum() / glance.sum().clamp(min=1e-9)))
                share.append(shares)
    for kind, values in mass.items():
        print(f"{kind}: {len(values)} questions, on visual tokens per layer", np.mean(values, 0).round(3))
    if share:
        print("shape: the asked object's share of the global view's per layer", np.mean(share, 0).round(3))


if __name__ == "__main__":
    main()
