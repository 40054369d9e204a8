"""Exports a trained stage as a Hugging Face-style folder and loads it back, bit for bit.

    python -m avglab.tools.export <stage output | run dir | stage name> <out folder> [--overwrite]

The folder holds, as safetensors and JSON only:
- ``config.json`` + ``model.safetensors``: the LLaVA-NeXT model, loadable by transformers alone
  (``LlavaNextForConditionalGeneration.from_pretrained(out)``);
- tokenizer and ``processor_config.json`` (``AutoProcessor.from_pretrained(out)``);
- ``avglab.safetensors``: every weight outside LLaVA-NeXT (the router / sampler);
- ``avglab.json``: format version, granularities, the router and focus configs, the source.

:func:`load_pretrained` restores the avglab core from that folder alone; Hydra runs use it with
``model=llava_next_vicuna_7b model.path=<out> model.router_from=<out>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaNextProcessor

from avglab.core.weights import EXTRA_WEIGHTS, WEIGHTS, full_core_state, load_core

FORMAT, VERSION = "avglab-export", 1
META = "avglab.json"
CONFIG = "config.yaml"  # the resolved run config a stage output keeps next to core.safetensors


def export_core(
    core: nn.Module, tokenizer, image_processor, cfg: DictConfig, out: Path, source: str | None = None
) -> Path:
    """Writes ``core`` (built from ``cfg``) with its tokenizer and image processor to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llava = core.llava
    llava.save_pretrained(out)  # safetensors: transformers 5 writes no other weight format
    vision = llava.config.vision_config
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        image_token=getattr(tokenizer, "image_token", None) or "<image>",
        num_additional_image_tokens=1 if llava.config.vision_feature_select_strategy == "default" else 0,
    ).save_pretrained(out)
    extra = {k: v for k, v in full_core_state(core).items() if not k.startswith("llava.")}
    if extra:
        save_file(extra, str(out / EXTRA_WEIGHTS))
    sections = {
        k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "router", "focus") if k in cfg
    }
    meta = {"format": FORMAT, "version": VERSION, "config": sections, "seed": cfg.get("seed", 0)}
    meta.update(source=source, granularities=list(core.scaler.granularities), extra_weights=sorted(extra))
    (out / META).write_text(json.dumps(meta, indent=2))
    return out


def export_config(folder: str | Path, dtype: str = "auto") -> DictConfig:
    """The config that rebuilds an exported core from ``folder`` (pretrained builder, router from it).

    Raises:
        FileNotFoundError: ``folder`` has no ``avglab.json``.
        ValueError: it was written by an unknown export format version.
    """
    folder = Path(folder)
    if not (folder / META).exists():
        raise FileNotFoundError(f"{folder} has no {META}: write it with `python -m avglab.tools.export`")
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{folder / META}: format {meta.get('format')} v{meta.get('version')}, "
            f"this avglab reads {FORMAT} v{VERSION}"
        )
    cfg = OmegaConf.create({**meta["config"], "seed": meta.get("seed", 0), "stage": {"name": "eval"}})
    cfg.model.merge_with({"builder": "pretrained", "path": str(folder), "dtype": dtype, "router_from": None})
    return cfg


def load_pretrained(folder: str | Path, dtype: str = "auto"):
    """Tokenizer, image processor and core restored from an export folder (safetensors only).

    Args:
        folder: written by :func:`export_core` / ``python -m avglab.tools.export``.
        dtype: ``auto`` keeps the stored dtype (bit-exact), or e.g. ``bfloat16``.

    Returns:
        (tokenizer, image_processor, core), the core in eval mode.

    Raises:
        ValueError: the non-LLaVA weights do not fit the rebuilt core.
    """
    from avglab.training.build import build_core  # late: build imports the data pipeline

    folder = Path(folder)
    tokenizer, image_processor, core = build_core(export_config(folder, dtype))
    extra_path = folder / EXTRA_WEIGHTS
    extra = load_file(str(extra_path)) if extra_path.exists() else {}
    own = {k for k in core.state_dict() if not k.startswith("llava.")}
    if set(extra) != own:
        raise ValueError(
            f"{folder}: avglab weights {sorted(set(extra) ^ own)[:4]} do not fit the rebuilt core"
        )
    core.load_state_dict(extra, strict=False)
    return tokenizer, image_processor, core.eval()


def resolve_source(source: str) -> Path:
    """A stage output folder from a folder, a run dir, or a stage name in ``$AVGLAB_WORKSPACE``.

    Raises:
        FileNotFoundError: nothing with ``core.safetensors`` was found, listing what was tried.
    """
    path = Path(source)
    workspace = Path(os.environ.get("AVGLAB_WORKSPACE", "workspace"))
    pointer = workspace / "stages" / f"{source}.json"
    candidates = [path, path / "model"]
    if pointer.exists():
        candidates.append(Path(json.loads(pointer.read_text())["path"]))
    for folder in candidates:
        if (folder / WEIGHTS).exists():
            return folder
    raise FileNotFoundError(
        f"{source}: no {WEIGHTS} in {[str(c) for c in candidates]}; give a stage output (<run dir>/model), "
        f"a run dir, or a stage name finished in workspace {workspace}"
    )


def export_stage(source: str, out: Path, overwrite: bool = False) -> Path:
    """Rebuilds the core a stage output was trained with, loads its weights and exports it.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
        FileNotFoundError: the stage output has no ``config.yaml`` (nor ``../.hydra/config.yaml``).
        ValueError: the model has a tower transformers cannot load (``model.vision_stem=conv``).
    """
    from avglab.training.build import build_core, saved_tokenizer

    folder = resolve_source(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite or choose another folder")
        shutil.rmtree(out)
    config = next((p for p in (folder / CONFIG, folder.parent / ".hydra" / CONFIG) if p.exists()), None)
    if config is None:
        raise FileNotFoundError(f"{folder}: no {CONFIG} (nor ../.hydra/{CONFIG}) to rebuild the model from")
    cfg = OmegaConf.load(config)
    if cfg.model.get("vision_stem", "patch") != "patch":
        raise ValueError(
            f"{folder} was trained with model.vision_stem={cfg.model.vision_stem}, which transformers' CLIP "
            "cannot load: use its stage output with avglab (stage.previous / init_from) instead of an export"
        )
    tokenizer, image_processor, core = build_core(cfg, saved_tokenizer(cfg, folder))
    load_core(core, folder)
    return export_core(core, tokenizer, image_processor, cfg, out, source=str(folder.resolve()))


def main(argv: list[str] | None = None) -> None:
    """``python -m avglab.tools.export SOURCE OUT [--overwrite]``."""
    parser = argparse.ArgumentParser(description="Export a trained avglab stage as a from_pretrained folder.")
    parser.add_argument("source", help="stage output folder (<run dir>/model), run dir, or stage name")
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    args = parser.parse_args(argv)
    print(export_stage(args.source, args.out, args.overwrite))


if __name__ == "__main__":
    main()
