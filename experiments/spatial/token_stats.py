"""Norms and spread of the visual tokens at the LLM input (one test batch of 32, finest level).

python experiments/spatial/token_stats.py <data dir> <stage output folder | fresh>
"""

import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from pathlib import Path

from image_dependence import load

from avglab.training.build import build_datamodule

data = Path(sys.argv[1])
model = None if sys.argv[2] == "fresh" else Path(sys.argv[2])
cfg, core, proc, tok = load(model, ["model=tiny"] if model is None else [], data)
dm = build_datamodule(cfg, tok, proc, eval_batch_size=32)
batch = next(iter(dm.test_dataloader()))
with torch.no_grad():
    n = len(batch["input_ids"])
    vis = core.pack(
        core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"]),
        batch["image_sizes"],
        torch.full((n,), 4),
    )
    V = torch.cat(vis)  # all visual tokens
    T = core.llava.get_input_embeddings()(batch["input_ids"][batch["attention_mask"].bool()])
    mu = V.mean(0)
    print(f"visual token norm {V.norm(dim=-1).mean():.3f}  text token norm {T.norm(dim=-1).mean():.3f}")
    deviation = (V - mu).norm(dim=-1).mean()
    ratio = deviation / V.norm(dim=-1).mean()
    print(f"norm of the mean visual token {mu.norm():.3f}; deviation {deviation:.3f} (ratio {ratio:.3f})")
    # after the first layer's input RMSNorm
    ln = core.llava.model.language_model.layers[0].input_layernorm
    Vn = ln(V)
    Tn = ln(T)
    mun = Vn.mean(0)
    ratio = (Vn - mun).norm(dim=-1).mean() / Vn.norm(dim=-1).mean()
    visual, text = Vn.norm(dim=-1).mean(), Tn.norm(dim=-1).mean()
    print(f"after RMSNorm: visual {visual:.3f} text {text:.3f} dev/norm {ratio:.3f}")
    # mean over each image's visual tokens: how much differs between images
    M = torch.stack([v.mean(0) for v in vis])
    print(
        "per-image mean visual token: between-image spread / norm %.4f"
        % ((M - M.mean(0)).norm(dim=-1).mean() / M.norm(dim=-1).mean())
    )
