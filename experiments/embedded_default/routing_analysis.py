"""Routing per synth question, and the level the cached RGLF feedback prefers as the token cost grows.

    python experiments/embedded_default/routing_analysis.py [--workspace DIR] [--eval-dir DIR] [--cache DIR]

1. Per question kind (background colour, shape colour, bar colour): how many test samples the router sent to
   each granularity, from the evaluation's ``predictions.jsonl`` joined with the test shards' records
   (default: the workspace's latest timestamped ``runs/eval/<time>/``).
2. Per question kind: the mean cached feedback r (Eq. 4, mean answer log-probability) at each level on the
   stage-4 training cache, and the level that maximises the mean priced feedback as the cost grows, for
   both ``router.token_cost_scale`` values (default: the train cache scored by the evaluated model's
   stage-3 weights).
3. Per question kind: quantiles of the per-sample feedback gap r_i - r_j between every two levels (the means
   of 2. hide how many samples tie), and the router preference that Eq. 9 settles on when one score vector
   serves every sample of the kind (what an instruction-only router converges to) at ``--cost`` per doubling
   and ``--alpha``.
"""

from __future__ import annotations

import argparse
import glob
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load_file

from avglab.avg.losses import apply_token_cost, rglf_loss
from avglab.core.provenance import tensors_sha256


def question_kinds(workspace: Path, split: str) -> dict[str, str]:
    """Sample id -> synth question kind, read from the generated shards of ``split``."""
    urls = sorted(glob.glob(str(workspace / "data" / "synth-*" / f"{split}-*.tar")))
    return {
        s["json"]["id"]: s["json"]["synth"]["question"]
        for u in urls
        for s in wds.WebDataset(u, shardshuffle=False).decode()
    }


def routing_by_question(eval_dir: Path, kinds: dict[str, str]) -> dict[str, Counter]:
    """Question kind -> Counter of chosen granularity (tokens per tile)."""
    routed: dict[str, Counter] = defaultdict(Counter)
    for line in (eval_dir / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        routed[kinds[record["id"]]][record["granularity"]] += 1
    return routed


def best_level_by_cost(feedback: torch.Tensor, tokens: torch.Tensor, scale: str, max_cost: float) -> list:
    """(cost, level) where argmax_l mean(r_l - price_l) changes, from cost 0 to ``max_cost``.

    ``price_l`` is ``router.token_cost_scale``'s: cost * tokens (linear) or cost * log2(tokens) (log2).
    """
    changes, last = [], None
    for cost in np.linspace(0.0, max_cost, 301):
        level = int(apply_token_cost(feedback, tokens, float(cost), scale).mean(0).argmax())
        if level != last:
            changes.append((round(float(cost), 6), level))
            last = level
    return changes


def per_kind_optimum(feedback: torch.Tensor, alpha: float, steps: int = 400) -> list[float]:
    """Softmax of the single (N,) score vector minimising Eq. 9 over these samples' (S, N) feedback."""
    logits = torch.zeros(feedback.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        loss = rglf_loss(logits.expand(len(feedback), -1), feedback, alpha=alpha).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [round(float(p), 3) for p in torch.softmax(logits.detach(), 0)]


def train_cache_of(workspace: Path, metrics: dict) -> Path:
    """The stage-4 train cache scored by the evaluated model's base (stage-3) weights at its granularities.

    Caches record ``llava_sha256`` (``avglab.core.provenance.state_sha256`` of the LLaVA-NeXT part); the
    evaluation records its base checkpoint's folder, whose ``core.safetensors`` gives the same hash.
    """
    base = Path(metrics["fingerprint"]["base_checkpoint"]["path"])
    state = load_file(str(base / "core.safetensors"))
    wanted = tensors_sha256({k.removeprefix("llava."): v for k, v in state.items() if k.startswith("llava.")})
    for spec_file in sorted((workspace / "cache" / "feedback").glob("*/spec.json")):
        spec = json.loads(spec_file.read_text())
        if (spec["split"], spec["llava_sha256"], spec["granularities"]) == (
            "train",
            wanted,
            metrics["granularities"],
        ):
            return spec_file.parent
    raise SystemExit(
        f"no train feedback cache of {base} under {workspace}/cache/feedback; run stage=rglf_cached"
    )


def main() -> None:
    """Prints both tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace"))
    parser.add_argument("--eval-dir", type=Path, default=None)
    parser.add_argument(
        "--cache", type=Path, default=None, help="a feedback cache folder (cache/feedback/<key>)"
    )
    parser.add_argument("--cost", type=float, default=0.035, help="per-doubling price for the optimum")
    parser.add_argument("--alpha", type=float, default=0.1, help="Eq. 9's CE weight for the optimum")
    args = parser.parse_args()
    ws = args.workspace
    eval_dir = args.eval_dir or Path(sorted(glob.glob(str(ws / "runs" / "eval" / "2*")))[-1])
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    levels = metrics["granularities"]
    print(f"routing per question ({eval_dir}), tokens per tile {levels}:")
    for kind, counts in sorted(routing_by_question(eval_dir, question_kinds(ws, "test")).items()):
        print(f"  {kind} ({sum(counts.values())}):", [counts.get(g, 0) for g in levels])
    if args.cache is None:
        args.cache = train_cache_of(ws, metrics)
    tensors = load_file(str(args.cache / "cache.safetensors"))
    ids = json.loads((args.cache / "meta.json").read_text())["ids"]
    kinds = question_kinds(ws, "train")
    per_sample = np.array([kinds[i] for i in ids])
    print(
        f"mean feedback r per level, best level as the token cost grows ({args.cache}, {len(ids)} samples):"
    )
    for kind in sorted(set(per_sample)):
        rows = torch.from_numpy(per_sample == kind)
        r, t = tensors["feedback"][rows], tensors["tokens"][rows]
        mean_r = [round(float(x), 3) for x in r.mean(0)]
        print(f"  {kind}: r {mean_r}")
        for scale, max_cost in (("linear", 3e-3), ("log2", 0.15)):
            changes = best_level_by_cost(r, t, scale, max_cost)
            print(f"    {scale} cost -> (cost, best level index): {changes}")
    print(
        f"per-sample gaps r_i - r_j (quantiles 10/25/50/75/90%) and the Eq. 9 optimum per kind "
        f"(one score vector per kind; {args.cost} per doubling, alpha {args.alpha}):"
    )
    for kind in sorted(set(per_sample)):
        rows = torch.from_numpy(per_sample == kind)
        r, t = tensors["feedback"][rows], tensors["tokens"][rows]
        print(f"  {kind}:")
        for i in range(len(levels) - 1, 0, -1):
            for j in range(i - 1, -1, -1):
                gap = (r[:, i] - r[:, j]).numpy()
                quantiles = np.quantile(gap, [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist()
                print(f"    r{levels[i]} - r{levels[j]}: {quantiles}")
        optimum = per_kind_optimum(apply_token_cost(r, t, args.cost, "log2"), args.alpha)
        print(f"    Eq. 9 optimum, probability per level {levels}: {optimum}")


if __name__ == "__main__":
    main()
