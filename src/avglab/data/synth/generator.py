"""The embedded glance/gaze VQA set: generated from a seed, written once as WebDataset shards.

Each image has coarse content (background colour, one big shape and its colour) that survives
the coarsest pooling, and fine content: two small bars of equal area and different colours, a flat
one and an upright one, each inside its own patch, together exactly one window of the first (1x2)
pooling (sides at random). ``glance`` questions ask about the coarse content; the ``gaze`` question
asks for the colour of the flat bar. The finest level sees each bar in its own token; every pooled
level averages the two into one token whose colour mixture is symmetric in the two colours, so it
tells the pair, not which one is flat. The right granularity thus depends on the instruction. Samples are
stored as ``__key__``/``png``/``json`` with the LLaVA-format record the real-data converter
writes, so one datamodule reads both. Scene placement and drawing live in ``avglab.data.synth.scene``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import shutil
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import webdataset as wds
from tokenizers import normalizers, pre_tokenizers

from avglab.data.shardset import describe_shard, write_split_manifest
from avglab.data.synth.config import GENERATOR_VERSION, QUESTIONS, SPLITS, Question, SynthConfig
from avglab.data.synth.scene import Scene, draw_scene, sample_scene
from avglab.data.templates import get_template
from avglab.data.tokenizer import SPECIAL_TOKENS

log = logging.getLogger(__name__)


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
    answer = _answer(scene, question.kind)
    key = f"synth-{split}-{index:06d}"
    record = {
        "id": key,
        "image": f"{key}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question.text}"},
            {"from": "gpt", "value": answer},
            *(_more_turns(rng, cfg, scene, question) if split == "train" else []),
        ],
        "question_type": question_type,
        "answers": [answer],
        "synth": {"question": question.kind, **asdict(scene)},
    }
    buffer = io.BytesIO()
    draw_scene(scene, cfg).save(buffer, format="PNG")
    return {"__key__": key, "png": buffer.getvalue(), "json": record}


def _answer(scene: Scene, kind: str) -> str:
    """The true answer to a question of ``kind`` about ``scene``."""
    return {
        "background_color": scene.background,
        "shape": scene.shape,
        "shape_color": scene.shape_color,
        "marker_color": scene.marker_color,
    }[kind]


def _more_turns(rng: random.Random, cfg: SynthConfig, scene: Scene, first: Question) -> list[dict]:
    """``cfg.train_questions - 1`` further turns about other kinds, drawn after everything else.

    Drawn last from ``rng``, so the image and the first question stay those of a one-question set.
    """
    others = [q for q in QUESTIONS if q.kind in cfg.question_kinds and q.kind != first.kind]
    turns = []
    for question in rng.sample(others, cfg.train_questions - 1):
        turns += [
            {"from": "human", "value": question.text},
            {"from": "gpt", "value": _answer(scene, question.kind)},
        ]
    return turns


def write_split(cfg: SynthConfig, split: str, count: int, folder: Path) -> dict:
    """Writes one split as ``folder/<split>-%05d.tar`` and its ``<split>.manifest.json``; returns its entry.

    The split manifest holds the samples of every shard, as the converter's does, so a reader counts
    exactly what a truncated shard lost.
    """
    by_type: Counter = Counter()
    by_question: Counter = Counter()
    per_shard: Counter = Counter()
    pattern = str(folder / f"{split}-%05d.tar")
    # mtime fixed: the same config gives byte-identical tar files.
    with wds.ShardWriter(pattern, maxcount=cfg.samples_per_shard, verbose=0, mtime=0.0) as sink:
        for index in range(count):
            sample = make_sample(cfg, split, index)
            by_type[sample["json"]["question_type"]] += 1
            by_question[sample["json"]["synth"]["question"]] += 1
            sample["json"] = json.dumps(sample["json"], sort_keys=True).encode()
            sink.write(sample)
            per_shard[Path(sink.fname).name] += 1
    shards = sorted(p.name for p in folder.glob(f"{split}-*.tar"))
    _write_counts(folder, split, [per_shard[name] for name in shards], shards)
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
    for split in SPLITS:
        if not (folder / f"{split}.manifest.json").is_file():  # a set generated before per-shard counts
            _add_counts(cfg, folder, split, manifest["splits"][split])
    return {split: [str(folder / name) for name in manifest["splits"][split]["shards"]] for split in SPLITS}


def _write_counts(folder: Path, split: str, counts: list[int], shards: list[str]) -> None:
    """The split's ``<split>.manifest.json``: samples per shard (with size and checksum)."""
    entries, start = [], 0
    for name, samples in zip(shards, counts, strict=True):
        entries.append(describe_shard(folder / name, samples, start))
        start += samples
    write_split_manifest(
        folder, split, entries, {"generator": "avglab.data.synth", "version": GENERATOR_VERSION}
    )


def _add_counts(cfg: SynthConfig, folder: Path, split: str, entry: dict) -> None:
    """Adds the per-shard counts to a set generated without them, when its layout determines them.

    The writer fills every shard to ``samples_per_shard`` before the next, so the shards listed must
    be exactly ``ceil(samples / samples_per_shard)`` (one empty shard for an empty split); otherwise
    the counts stay unknown and readers say so.
    """
    shards, total, size = entry["shards"], entry["samples"], cfg.samples_per_shard
    counts = [min(size, total - i * size) for i in range(len(shards))] if total else [0] * len(shards)
    if len(shards) != max(1, math.ceil(total / size)):
        log.warning("%s: %s shards do not match the generator's layout: counts unknown", folder, split)
        return
    try:
        _write_counts(folder, split, counts, shards)
    except OSError as exn:  # a shard gone or a read-only folder: readers count what they can
        log.warning("%s: cannot add the %s per-shard counts (%s): counts unknown", folder, split, exn)


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
