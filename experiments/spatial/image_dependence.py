"""Does the LLM's answer depend on the image? Plumbing checks and a shuffled-image test, on the spatial set.

For a stage output (or a fresh model: ``--fresh``), reads the test split as ``stage=eval`` does and reports:

- plumbing: image sizes, tiles per image, visual tokens per level, the decoded first prompt (every question
  word must be a known word, not ``<unk>``), the answer words' token ids and how many ``<unk>`` ids the
  split holds;
- image dependence at the finest level: the answer's first-token accuracy restricted to the kind's answer
  words (``acc``), then the same with the images shuffled within the batch (``acc_shuf``), and the mean
  absolute change of the answer log-probability under the shuffle (``|dlogp|``). A model that ignores the
  image has ``acc == acc_shuf`` and ``|dlogp|`` near 0;
- the share of the answer position's attention that lands on visual tokens, per LLM layer (eager attention).

    python experiments/spatial/image_dependence.py <data dir> --model <stage output folder>
    python experiments/spatial/image_dependence.py <data dir> --fresh model=tiny
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from avglab.cli import CONFIG_DIR
from avglab.core.weights import load_core
from avglab.training.build import build_core, build_datamodule, saved_tokenizer

ANSWERS = {
    "shape": ["circle", "square", "triangle", "cross"],
    "count": ["one", "two", "three"],
    "position": ["left", "right", "above", "below"],
    "background": ["white", "gray"],
    "exists": ["yes", "no"],
    "half": ["left", "right", "top", "bottom"],
}


def load(model: Path | None, overrides: list[str], data: Path):
    """(config, core, image processor, tokenizer) of a stage output (None: fresh) on the data's shards."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data=shards", f"data.root={data}/shards", *overrides])
    OmegaConf.set_struct(cfg, False)
    if model is not None:
        cfg.model = OmegaConf.load(model / "config.yaml").model
    tokenizer = saved_tokenizer(cfg, model) if model else None
    tokenizer, processor, core = build_core(cfg, tokenizer)
    if model:
        load_core(core, model)
    return cfg, core.eval(), processor, tokenizer


def main() -> None:
    """Prints the plumbing, then accuracy with true and swapped images and the attention share."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--model", type=Path)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--level", type=int, default=-1, help="level index (default: the finest)")
    p.add_argument("--question-first", action="store_true", help="render as question_first.py does")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.question_first:
        import question_first  # noqa: F401  (patches the template)
    cfg, core, processor, tok = load(None if args.fresh else args.model, args.overrides, args.data)
    dm = build_datamodule(cfg, tok, processor, eval_batch_size=32)
    kinds = [r.get("question_type") for r in json.loads((args.data / "test.json").read_text())]
    answer_ids = {k: tok.convert_tokens_to_ids(v) for k, v in ANSWERS.items()}
    print("answer ids:", answer_ids, "unk id:", tok.unk_token_id)
    stats = defaultdict(lambda: defaultdict(float))
    attn_share = None
    seen = 0
    for b, batch in enumerate(dm.test_dataloader()):
        if b >= args.batches:
            break
        n = len(batch["input_ids"])
        if b == 0:
            ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
            print(
                "image_sizes[:4]:",
                batch["image_sizes"][:4].tolist(),
                "pixel_values:",
                tuple(batch["pixel_values"].shape),
            )
            print(
                "tokens per level (sample 0):",
                core.token_counts(batch["image_sizes"][:1], batch["has_image"][:1]).tolist(),
            )
            print("prompt 0:", tok.decode(ids))
            lab = batch["labels"][0]
            print(
                "label ids 0:",
                lab[lab != -100].tolist(),
                tok.convert_ids_to_tokens(lab[lab != -100].tolist()),
            )
            unk = int((batch["input_ids"] == tok.unk_token_id).sum())
            print("unk ids in batch 0:", unk)
        level = args.level % core.scaler.num_levels
        perm = torch.roll(torch.arange(n), 1)
        outs = {}
        with torch.no_grad():
            for name, order in (("true", torch.arange(n)), ("shuf", perm)):
                bb = dict(batch)
                bb["pixel_values"] = batch["pixel_values"][order]
                bb["image_sizes"] = batch["image_sizes"][order]
                out = core(bb, level=level, return_logits=True)
                sp = out.spliced
                labels = sp.labels
                first = []
                for i in range(n):
                    where = (labels[i, 1:] != -100).nonzero()[:, 0]
                    first.append((int(where[0]), int(labels[i, 1 + where[0]])))
                outs[name] = (out.logits, first, out.answer_logprob)
        for i in range(n):
            kind = kinds[seen + i]
            cand = answer_ids[kind]
            for name in ("true", "shuf"):
                logits, first, mean = outs[name]
                pos, target = first[i]
                sub = logits[i, pos, cand]
                pred = cand[int(sub.argmax())]
                stats[kind][f"acc_{name}"] += float(pred == target)
            stats[kind]["dlogp"] += float((outs["true"][2][i] - outs["shuf"][2][i]).abs())
            stats[kind]["n"] += 1
        seen += n
        if b == 0:  # attention share to visual tokens, eager attention, first sample set
            llm = core.llava.model.language_model
            llm.config._attn_implementation = "eager"
            for layer in llm.layers:
                layer.self_attn.config._attn_implementation = "eager"
            with torch.no_grad():
                bb = dict(batch)
                visual = core.pack(
                    core.encode(bb["pixel_values"], bb["image_sizes"], bb["has_image"]),
                    bb["image_sizes"],
                    torch.full((n,), level),
                )
                sp = core.splice(bb["input_ids"], bb["attention_mask"], visual, bb["labels"])
                o = llm(
                    inputs_embeds=sp.embeds,
                    attention_mask=sp.attention_mask,
                    output_attentions=True,
                    use_cache=False,
                )
                img_pos = (bb["input_ids"] == core.image_token_id).float().argmax(1)
                shares = []
                for att in o.attentions:  # (n, heads, S, S)
                    s = []
                    for i in range(n):
                        pos = outs["true"][1][i][0]
                        a = att[i, :, pos]  # heads, S
                        st = int(img_pos[i])
                        ln = len(visual[i])
                        s.append(float(a[:, st : st + ln].sum(-1).mean()))
                    shares.append(sum(s) / n)
                attn_share = shares
            llm.config._attn_implementation = "sdpa"
    print(
        "attention share on visual tokens at the answer position, per layer:",
        [round(x, 3) for x in attn_share or []],
    )
    for kind, s in sorted(stats.items()):
        n = s["n"]
        acc, shuf, dlogp = 100 * s["acc_true"] / n, 100 * s["acc_shuf"] / n, s["dlogp"] / n
        print(f"{kind:9s} n={int(n)} acc={acc:.1f} acc_shuf={shuf:.1f} |dlogp|={dlogp:.4f}")


if __name__ == "__main__":
    main()
