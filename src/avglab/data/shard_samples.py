"""What one shard sample becomes (record and image through the processor) and which shards a rank reads."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

from PIL import Image

from avglab.data.processor import RecordError, SampleProcessor

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def split_by_rank(shards: Iterable, rank: int, world_size: int) -> Iterator:
    """Every ``world_size``-th shard starting at ``rank`` (an explicit ``split_by_node``)."""
    yield from islice(shards, rank, None, world_size)


def to_model_sample(sample: dict, processor: SampleProcessor) -> dict | None:
    """A decoded shard sample (``json`` record and optional image) -> processed tensors or None."""
    if "json" not in sample:
        raise KeyError(f"shard sample {sample.get('__key__')!r} has no .json record")
    if not isinstance(sample["json"], dict):
        raise RecordError("bad_record", f"shard sample {sample.get('__key__')!r}: .json is not an object")
    record = dict(sample["json"])
    record.setdefault("id", sample.get("__key__", ""))
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is not None and not isinstance(image, Image.Image):
        raise ValueError(
            f"shard sample {record['id']!r}: image was not decoded to PIL ({type(image).__name__})"
        )
    return processor(record, image)
