r"""``python -m avglab.data.convert``: LLaVA data or an evaluation set -> resumable WebDataset shards.

Examples::

    # stage-1 captions (LLaVA-Pretrain) and the instruction mix (stages 2-4)
    python -m avglab.data.convert blip_laion_cc_sbu_558k.json --images LLaVA-Pretrain/images \
        --out $AVGLAB_DATA/llava_pretrain
    python -m avglab.data.convert llava_v1_5_mix665k.json --images llava_images \
        --out $AVGLAB_DATA/llava_instruct
    # an evaluation set: question, reference answer(s), optional question type / category, image
    python -m avglab.data.convert textvqa_val.jsonl --kind eval --split test \
        --images textvqa/train_images --out $AVGLAB_DATA/eval/textvqa \
        --prompt-suffix $'\nAnswer the question using a single word or phrase.'
    # a held-out part of LLaVA data: each record's first human/gpt exchange is its question/answer
    python -m avglab.data.convert llava_heldout.json --kind eval --split test \
        --images llava_images --out $AVGLAB_DATA/llava_instruct

The input is read as a stream (a JSON list or JSON lines), images are read and fully decoded by
a thread pool, and every record that cannot be trained on is skipped with its reason and listed
in ``<out>/<split>.manifest.json``. Re-running the same command after an interruption keeps the
finished shards and continues after them.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from avglab.data.jsonstream import Entry, file_sha256, iter_records
from avglab.data.processor import RecordError
from avglab.data.records import (
    MAX_IMAGE_BYTES,
    EvalFields,
    prepare_eval,
    prepare_instruct,
    read_image,
    record_name,
)
from avglab.data.shardset import ShardSetWriter, Skip
from avglab.data.skips import SkipLimitError

log = logging.getLogger(__name__)
KINDS = ("instruct", "eval")
MIN_RECORDS_FOR_LIMIT = 1000  # before this many records only the end of the input is judged


def convert(
    source: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    split: str = "train",
    kind: str = "instruct",
    samples_per_shard: int = 1000,
    shard_bytes: int = 1 << 30,
    workers: int = 8,
    max_skip_fraction: float = 0.05,
    overwrite: bool = False,
    fields: EvalFields | None = None,
    prompt_suffix: str = "",
    progress: bool = True,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> dict:
    """Converts one input file into the shards of one split and returns the manifest.

    Args:
        source: JSON list or JSON-lines file of records.
        out: output folder (``<split>-%05d.tar``, ``<split>.manifest.json``).
        images: folder the records' ``image`` paths are relative to (default: the source's folder).
        split: split name the datamodule looks for (train, val or test).
        kind: ``instruct`` (LLaVA conversations) or ``eval`` (question, answers, type, image; a
            LLaVA conversation record counts as its first human/gpt exchange, later turns dropped).
        samples_per_shard: most samples a shard holds.
        shard_bytes: a shard is closed once its files hold this many bytes.
        workers: image-reading threads.
        max_skip_fraction: stop with an error when more records than this are skipped.
        overwrite: convert again from scratch instead of resuming.
        fields: record keys of an eval set (default: :class:`EvalFields`).
        prompt_suffix: text appended to every eval question (a benchmark's answer-format prompt).
        progress: show a progress bar (on stderr).
        max_image_bytes: image files larger than this are skipped unread (``image_too_large``).

    Raises:
        FileNotFoundError: for a missing source or image folder.
        ValueError: for a broken JSON list or an output folder holding another conversion.
        SkipLimitError: above ``max_skip_fraction``; finished shards are kept for a re-run.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}")
    source = Path(source).resolve()
    if not source.is_file():
        raise FileNotFoundError(f"no input file {source}")
    images = Path(images).resolve() if images is not None else source.parent
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist (--images)")
    fields = fields or EvalFields()
    if max_image_bytes < 1:
        raise ValueError(f"--max-image-mb must be > 0, got {max_image_bytes / 2**20:g}")
    options = {"samples_per_shard": samples_per_shard, "shard_bytes": shard_bytes}
    if max_image_bytes != MAX_IMAGE_BYTES:  # the default keeps resuming conversions started without it
        options["max_image_bytes"] = max_image_bytes
    if kind == "eval":
        options |= {"fields": {k: list(v) for k, v in vars(fields).items()}, "prompt_suffix": prompt_suffix}
    digest = file_sha256(source)
    header = {"kind": kind, "source_sha256": digest, "options": options}
    writer = ShardSetWriter(out, split, header, samples_per_shard, shard_bytes, overwrite)
    if writer.resume_from:
        log.info("resuming %s after %d finished shard(s)", split, len(writer.done))
    if kind == "instruct":
        prepare = partial(prepare_instruct, image_root=images)
    else:
        prepare = partial(prepare_eval, image_root=images, fields=fields, prompt_suffix=prompt_suffix)
    load = partial(load_sample, prepare=prepare, id_keys=fields.id, max_image_bytes=max_image_bytes)
    records = _write_all(source, writer, load, workers, max_skip_fraction, progress)
    writer.finish(records)
    _check_limit(writer, max_skip_fraction, final=True)
    extra = {
        "source": {"path": str(source), "sha256": digest, "bytes": source.stat().st_size},
        "images": str(images),
        "avglab_version": version("avglab"),
    }
    return writer.write_manifest(extra)


def _write_all(
    source: Path,
    writer: ShardSetWriter,
    load: Callable[[Entry], dict | Skip],
    workers: int,
    max_skip_fraction: float,
    progress: bool,
) -> int:
    """Streams the input through the thread pool into the writer, in input order; returns #records."""
    records = 0
    pending: deque[Future] = deque()
    bar = tqdm(
        total=source.stat().st_size, unit="B", unit_scale=True, desc=writer.split, disable=not progress
    )
    with ThreadPoolExecutor(max(1, workers)) as pool, bar:
        for entry in iter_records(source):
            bar.update(entry.offset - bar.n)
            records = entry.index + 1
            if entry.index < writer.resume_from:
                continue  # inside a finished shard
            pending.append(pool.submit(load, entry))
            while len(pending) > 4 * max(1, workers):  # bounded look-ahead: memory stays flat
                _store(pending.popleft().result(), writer, max_skip_fraction, bar)
        while pending:
            _store(pending.popleft().result(), writer, max_skip_fraction, bar)
    return records


def load_sample(
    entry: Entry,
    prepare: Callable[[Any, int], Any],
    id_keys: tuple[str, ...],
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> dict | Skip:
    """One input entry -> a shard sample (``__key__``, ``json``, image bytes) or the reason it is skipped.

    Every failure of one record is a skip: a :class:`RecordError` under its reason, anything else
    (a case the checks do not know yet) under ``unexpected_error``, logged with the record's id, so
    one odd record never stops a conversion of millions.
    """
    if entry.error is not None:
        return Skip(entry.index, f"#{entry.index}", "bad_json", entry.error)
    try:
        prepared = prepare(entry.value, entry.index)
        record = json.dumps(prepared.record, ensure_ascii=False).encode("utf-8")
        sample = {"__key__": f"{entry.index:09d}", "json": record}  # ids repeat in LLaVA data; indices don't
        if prepared.image is not None:
            ext, data = read_image(prepared.image, max_image_bytes)
            sample[ext] = data
        return sample
    except RecordError as exn:
        return Skip(entry.index, record_name(entry.value, entry.index, id_keys), exn.reason, exn.message)
    except Exception as exn:  # one record's failure must not abort the conversion
        name = _safe_name(entry, id_keys)
        log.warning("skipped record %s (unexpected_error): %r", name, exn)
        return Skip(entry.index, name, "unexpected_error", f"{type(exn).__name__}: {exn}")


def _safe_name(entry: Entry, id_keys: tuple[str, ...]) -> str:
    """The record's id for a message, or its index when even that fails."""
    try:
        return record_name(entry.value, entry.index, id_keys)
    except Exception:  # e.g. an id whose str() fails
        return f"#{entry.index}"


def _store(item: dict | Skip, writer: ShardSetWriter, max_skip_fraction: float, bar: tqdm) -> None:
    if isinstance(item, Skip):
        writer.skip(item)
        log.debug("skipped record %s (%s): %s", item.id, item.reason, item.detail)
        _check_limit(writer, max_skip_fraction, final=False)
    else:
        writer.write(int(item["__key__"]), item)
    if (writer.samples + writer.skipped) % 256 == 0:
        bar.set_postfix(samples=writer.samples, skipped=writer.skipped, refresh=False)


def _check_limit(writer: ShardSetWriter, max_fraction: float, final: bool) -> None:
    """Raises :class:`SkipLimitError` when too many records were skipped."""
    total = writer.samples + writer.skipped
    if not total or (not final and total < MIN_RECORDS_FOR_LIMIT) or writer.skipped / total <= max_fraction:
        return
    skips = writer.all_skips()
    reasons = dict(Counter(s.reason for s in skips).most_common())
    examples = "; ".join(f"{s.id}: {s.detail}" for s in skips[:3])
    raise SkipLimitError(
        f"{writer.skipped} of {total} records skipped ({writer.skipped / total:.1%} > "
        f"--max-skip-fraction={max_fraction}); reasons: {reasons}; e.g. {examples}. Fix the data "
        f"(every skip is listed in {writer.progress}), or re-run with a higher --max-skip-fraction: "
        "finished shards are kept and the conversion continues after them"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m avglab.data.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="JSON list or JSON-lines file of records")
    p.add_argument("--out", required=True, help="output folder for <split>-%%05d.tar and the manifest")
    p.add_argument("--images", help="folder the records' image paths are relative to (default: source's)")
    p.add_argument("--split", default="train", help="split name: train, val or test (default: train)")
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="instruct",
        help="instruct: LLaVA conversations; eval: QA records, or LLaVA records (their first exchange)",
    )
    p.add_argument("--shard-samples", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--shard-mb", type=float, default=1024, help="close a shard at this size (default 1024)")
    p.add_argument("--workers", type=int, default=8, help="image-reading threads (default 8)")
    p.add_argument("--max-skip-fraction", type=float, default=0.05, help="stop above this (default 0.05)")
    p.add_argument(
        "--max-image-mb",
        type=float,
        default=MAX_IMAGE_BYTES / 2**20,
        help=f"skip image files larger than this, unread (default {MAX_IMAGE_BYTES >> 20})",
    )
    p.add_argument("--overwrite", action="store_true", help="convert again instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="log every skipped record")
    eval_group = p.add_argument_group("evaluation sets (--kind eval)")
    eval_group.add_argument("--prompt-suffix", default="", help="appended to every question")
    for name, keys in vars(EvalFields()).items():
        label = name.replace("_", " ")
        eval_group.add_argument(
            f"--{name.replace('_', '-')}-key",
            dest=f"{name}_key",
            help=f"record key of the {label} (default: the first present of {', '.join(keys)})",
        )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the converter from the command line; exits with the error message on bad input."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    chosen = {
        name: (getattr(args, f"{name}_key"),) for name in vars(EvalFields()) if getattr(args, f"{name}_key")
    }
    try:
        manifest = convert(
            args.source,
            args.out,
            images=args.images,
            split=args.split,
            kind=args.kind,
            samples_per_shard=args.shard_samples,
            shard_bytes=int(args.shard_mb * (1 << 20)),
            workers=args.workers,
            max_skip_fraction=args.max_skip_fraction,
            overwrite=args.overwrite,
            fields=EvalFields(**chosen),
            prompt_suffix=args.prompt_suffix,
            progress=not args.no_progress,
            max_image_bytes=int(args.max_image_mb * (1 << 20)),
        )
    except (FileNotFoundError, ValueError, SkipLimitError) as exn:
        raise SystemExit(f"avglab.data.convert: {exn}") from None
    log.info(
        "%s: %d samples in %d shard(s) in %s; skipped %d %s",
        args.split,
        manifest["samples"],
        len(manifest["shards"]),
        args.out,
        manifest["skipped_total"],
        manifest["skipped_by_reason"],
    )
    return manifest


if __name__ == "__main__":
    main()
