"""Checks LLaVA records and evaluation records and reads their images, for the converter.

The rules are the training-time rules (:func:`~avglab.data.processor.parse_conversation`), run
once at conversion so that a bad record is skipped and listed in the manifest instead of being
met at every epoch. Every failure is a :class:`~avglab.data.processor.RecordError` whose reason
the manifest counts.
"""

from __future__ import annotations

import io
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from avglab.data.jsonstream import find_bad_text
from avglab.data.processor import (
    ASSISTANT_ROLES,
    IMAGE_PLACEHOLDER,
    USER_ROLES,
    RecordError,
    check_text,
    parse_conversation,
)

# Formats webdataset's decoder and LLaVA read as they are; anything else PIL opens is stored as PNG.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_IMAGE_BYTES = 64 << 20  # --max-image-mb: larger files are skipped unread (image_too_large)
CONVERSATIONS = "conversations"  # LLaVA's dialogue key: an eval record may hold its question there


@dataclass(frozen=True)
class Prepared:
    """A checked record, ready to be written once its image is read.

    Attributes:
        index: position in the input; the shard key is derived from it (ids repeat in LLaVA data).
        id: the record's id (for the manifest and the predictions).
        record: the LLaVA-format record stored as the sample's ``.json``.
        image: absolute image path, or None for a text-only record.
    """

    index: int
    id: str
    record: dict
    image: Path | None


@dataclass(frozen=True)
class EvalFields:
    """Keys of an evaluation record; each field takes the first key present.

    Defaults cover common layouts: avglab's own, LLaVA's eval jsonl (``question_id``, ``text``,
    ``category``) and VQA-style answer lists (strings or ``{"answer": ...}`` dicts).
    """

    id: tuple[str, ...] = ("id", "question_id")
    question: tuple[str, ...] = ("question", "text", "prompt")
    answers: tuple[str, ...] = ("answers", "answer", "gt_answer", "label")
    question_type: tuple[str, ...] = ("question_type", "category", "type")
    image: tuple[str, ...] = ("image",)


def record_name(value: Any, index: int, keys: tuple[str, ...] = ("id",)) -> str:
    """The record's id for messages and the manifest (its input index when it has none)."""
    if isinstance(value, dict):
        for key in keys:
            if value.get(key) is not None:
                return str(value[key])
    return f"#{index}"


def check_record(value: Any, index: int) -> dict:
    """The value as a record dict, or a RecordError (not an object, undecodable text)."""
    if not isinstance(value, dict):
        raise RecordError("bad_record", f"record #{index} is a JSON {type(value).__name__}, not an object")
    bad = find_bad_text(value)
    if bad is not None:
        check_text(record_name(value, index), "a field", bad)  # raises non_utf8_text with the place
    return value


def image_path(record: dict, key: str, image_root: Path, name: str) -> Path | None:
    """The record's image file, which must lie under ``image_root`` (None without one).

    The path is resolved, symlinks included, before it is compared: ``../x``, an absolute path
    elsewhere and a symlink inside the root that points out of it are all refused, so a record
    never makes the converter read (and copy into shards) a file outside ``--images``.

    Raises:
        RecordError: ``several_images`` for a list of images (LLaVA-NeXT's interleaved format),
            ``bad_image_field`` for a value that is not a usable path, ``image_outside_root`` for
            one that resolves outside ``image_root``.
    """
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None or value == "":
        return None
    if isinstance(value, list):
        raise RecordError(
            "several_images", f"record {name}: {len(value)} images; one image a sample is supported"
        )
    if not isinstance(value, str):
        raise RecordError(
            "bad_image_field", f"record {name}: '{key}' must be a path, got {type(value).__name__}"
        )
    if "\0" in value:
        raise RecordError("bad_image_field", f"record {name}: '{key}' holds a NUL byte: {value!r}")
    root = image_root.resolve()
    try:
        path = (root / value).resolve()
    except (OSError, RuntimeError) as exn:  # a symlink loop (RuntimeError before Python 3.13)
        raise RecordError("image_unreadable", f"record {name}: {value!r}: {exn}") from None
    if not path.is_relative_to(root):
        raise RecordError(
            "image_outside_root",
            f"record {name}: {value!r} resolves to {path}, outside the image folder {root} (--images)",
        )
    return path


def prepare_instruct(value: Any, index: int, image_root: Path) -> Prepared:
    """Checks a LLaVA conversation record (``id``, optional ``image``, ``conversations``).

    Raises:
        RecordError: for anything LLaVA-NeXT could not train on, saying what to fix.
    """
    record = check_record(value, index)
    name = record_name(record, index)
    image = image_path(record, "image", image_root, name)
    parse_conversation(record, has_image=image is not None)
    return Prepared(index, name, record, image)


def prepare_eval(
    value: Any, index: int, image_root: Path, fields: EvalFields = EvalFields(), prompt_suffix: str = ""
) -> Prepared:
    """Turns an evaluation record into a LLaVA record with its reference answers.

    The question (``<image>`` placeholders removed; one is put first when there is an image, as
    LLaVA does) plus ``prompt_suffix`` is the human turn; the most frequent reference answer is
    the gpt turn (for validation losses); all answers are kept in ``answers`` for the metrics.

    A LLaVA conversation record (``conversations`` and no question key, e.g. a held-out part of
    the training file) is evaluated on its first exchange: the first human turn is the question,
    the gpt turn right after it the reference answer (unless the record names answers under
    ``fields.answers``). Later turns are dropped by design, since one question is scored per
    record; split a dialogue into several records to evaluate every turn.

    Raises:
        RecordError: ``no_question``, ``no_answer``, ``no_exchange`` (a conversation without a
            human turn followed by a gpt turn), ``image_missing`` (a conversation with an
            ``<image>`` placeholder but no image) or the image and text errors.
    """
    record = check_record(value, index)
    name = record_name(record, index, fields.id)
    question = _first(record, fields.question)
    exchange = None
    if question is None and record.get(CONVERSATIONS) is not None:
        exchange = first_exchange(record, name)
        question = exchange[0]
    if not isinstance(question, str) or not question.replace(IMAGE_PLACEHOLDER, "").strip():
        keys = [*fields.question, CONVERSATIONS]
        raise RecordError("no_question", f"record {name}: no question under any of {keys}")
    answers = reference_answers(_first(record, fields.answers))
    if not answers and exchange is not None:
        answers = reference_answers(exchange[1])
    if not answers:
        where = f"any of {list(fields.answers)}" + (" nor its first gpt turn" if exchange is not None else "")
        raise RecordError("no_answer", f"record {name}: no reference answer under {where}")
    image_key = next((k for k in fields.image if record.get(k) is not None), fields.image[0])
    image = image_path(record, image_key, image_root, name)
    raw_image = record.get(image_key)
    if exchange is not None and image is None and exchange[2]:
        # As for training records: the dialogue is about an image the record does not have.
        raise RecordError(
            "image_missing",
            f"record {name} has an <image> placeholder but no image: add the image or drop the placeholder",
        )
    text = question.replace(IMAGE_PLACEHOLDER, "").strip() + prompt_suffix
    qtype = _first(record, fields.question_type)
    out = {
        "id": name,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{text}" if image is not None else text},
            {"from": "gpt", "value": Counter(answers).most_common(1)[0][0]},
        ],
        "answers": answers,
        "question_type": str(qtype) if qtype is not None else "unknown",
    }
    if image is not None:
        out["image"] = str(raw_image[0] if isinstance(raw_image, list) else raw_image)
    parse_conversation(out, has_image=image is not None)
    return Prepared(index, name, out, image)


def first_exchange(record: dict, name: str) -> tuple[str, str, bool]:
    """The first question and answer of a LLaVA conversation, and whether it mentions an image.

    Returns the first human turn's value, the value of the gpt turn right after it, and whether
    any human turn holds an ``<image>`` placeholder (LLaVA moves the image to the first turn
    whichever turn holds it). Turns before the first human turn are passed over, as LLaVA's
    preprocessing drops a leading non-human turn; later exchanges are not evaluated.

    Raises:
        RecordError: ``no_exchange`` when the conversation has no human turn followed by a gpt turn.
    """
    turns = record.get(CONVERSATIONS)
    turns = [t for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
    roles = [str(t.get("from", "")) for t in turns]
    first = next((i for i, role in enumerate(roles) if role in USER_ROLES), None)
    if first is None or first + 1 >= len(turns) or roles[first + 1] not in ASSISTANT_ROLES:
        raise RecordError(
            "no_exchange",
            f"record {name}: '{CONVERSATIONS}' has no human turn followed by a gpt turn (roles: {roles})",
        )
    question, answer = turns[first].get("value"), turns[first + 1].get("value")
    asked = [str(t.get("value", "")) for t in turns if str(t.get("from", "")) in USER_ROLES]
    return question, answer, any(IMAGE_PLACEHOLDER in value for value in asked)


def reference_answers(value: Any) -> list[str]:
    """Reference answers as strings: a string, a number, or a list of them or of ``{"answer": ...}``."""
    items = value if isinstance(value, list) else [value]
    answers = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("answer")
        if isinstance(item, str | int | float | bool) and str(item).strip():
            answers.append(str(item).strip())
    return answers


def read_image(path: Path, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[str, bytes]:
    """The image file's bytes and the shard extension to store them under.

    Only a regular file of at most ``max_bytes`` is read (checked before reading, so a device such as
    ``/dev/zero``, a FIFO or a huge file never fills memory or blocks). The image is fully decoded once
    (a truncated JPEG only fails there); JPEG, PNG and WebP are stored byte for byte, any other format
    PIL reads (GIF, BMP, ...) as lossless PNG of what LLaVA would load (``convert("RGB")``).

    Raises:
        RecordError: ``image_file_missing``, ``image_not_a_file``, ``image_too_large`` or
            ``image_unreadable``, naming the file.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise RecordError("image_not_a_file", f"{path} is not a regular file (a folder or device?)")
        if info.st_size > max_bytes:
            raise RecordError(
                "image_too_large",
                f"{path}: {info.st_size / 2**20:.3g} MB > --max-image-mb={max_bytes / 2**20:.3g}",
            )
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except FileNotFoundError:
        raise RecordError(
            "image_file_missing", f"{path} does not exist; check --images and the record"
        ) from None
    except OSError as exn:
        raise RecordError("image_unreadable", f"{path}: {exn}") from None
    if len(data) > max_bytes:
        raise RecordError("image_too_large", f"{path}: more than --max-image-mb={max_bytes / 2**20:.3g} MB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            ext = STORED_FORMATS.get(image.format or "")
            if ext is None:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                ext, data = "png", buffer.getvalue()
    except Exception as exn:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise RecordError("image_unreadable", f"{path}: cannot decode the image ({exn!r})") from None
    return ext, data


def _first(record: dict, keys: tuple[str, ...]) -> Any:
    """The value of the first key present (not None) in ``record``."""
    return next((record[k] for k in keys if record.get(k) is not None), None)
