"""The tiny model's vocabulary from the data it reads: the text of converted shards and the chat template.

A word-level tokenizer maps every word it never saw to ``<unk>``, so ``model=tiny`` on converted
shards builds its vocabulary from every split the data config names: the conversation turns of
each sample's ``.json`` (LLaVA records; evaluation records hold the question and the most frequent
answer as a human/gpt pair) plus the reference ``answers``, and the template's own strings
(system prompt, role tags, separators). Words are split exactly as the word tokenizer splits them
(see :func:`avglab.data.tokenizer.build_word_tokenizer`). :func:`shard_digest` names the result by
the shards' content, so a second run reuses the tokenizer and a changed data set gets a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import webdataset as wds
from tokenizers import normalizers, pre_tokenizers

from avglab.data.jsonstream import file_sha256
from avglab.data.shardset import manifest_entries
from avglab.data.templates import ChatTemplate, get_template
from avglab.data.tokenizer import SPECIAL_TOKENS

log = logging.getLogger(__name__)

BUILDER_VERSION = 1  # bump when the words taken from a sample change: cached tokenizers are rebuilt


def text_words(texts: Iterable[str]) -> set[str]:
    r"""Lowercase words and punctuation runs (``\w+|[^\w\s]+``) of ``texts``, special tokens removed.

    The word tokenizer's own normalizer and pre-tokenizer split the texts, so the words are exactly
    the pieces it will look up. Text that is not valid Unicode (lone surrogates) is left out: the
    loader skips such samples as ``non_utf8_text``.
    """
    normalizer, splitter = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in texts:
        for special in SPECIAL_TOKENS:  # matched whole by the tokenizer, never split into words
            text = text.replace(special, " ")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            continue
        words.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    return words


def record_texts(record: object) -> Iterator[str]:
    """The strings of a shard sample's record that the processor tokenizes or the metrics compare.

    Args:
        record: the sample's ``.json``: ``{"conversations": [{"from", "value"}, ...], "answers"?}``.

    Yields:
        Every turn's ``value`` and every reference answer; malformed parts yield nothing (the
        loader counts the sample under its skip reason).
    """
    if not isinstance(record, dict):
        return
    turns = record.get("conversations")
    for turn in turns if isinstance(turns, list) else ():
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            yield turn["value"]
    answers = record.get("answers")
    for answer in answers if isinstance(answers, list) else [answers]:
        if isinstance(answer, str):
            yield answer


def shard_records(urls: Sequence[str]) -> Iterator[object]:
    """The ``.json`` record of every sample of the shards, in shard order.

    Webdataset's tar reader with a file filter: image members are skipped without being copied.
    An unreadable member or a truncated shard is passed over (the loader counts those samples).
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.tarfile_to_samples(handler=wds.ignore_and_continue, select_files=_is_json),
    )
    for sample in pipeline:
        data = sample.get("json")
        if data is None:
            continue
        try:
            yield json.loads(data.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            continue


def _is_json(name: str) -> bool:
    """Whether a tar member is a sample's record (the only member the vocabulary needs)."""
    return name.endswith(".json")


def shard_vocabulary(
    urls: Mapping[str, Sequence[str]], template: str | ChatTemplate, name: str = ""
) -> list[str]:
    """Every word of the shards of every split and of the chat template, as the word tokenizer splits them.

    Args:
        urls: shard paths per split.
        template: the chat template the data is rendered with.
        name: what to call the data set in the log line (e.g. ``data.root``).

    Returns:
        Sorted lowercase words and punctuation runs (special tokens excluded).
    """
    shards = sorted({u for split in urls.values() for u in split})
    log.info("tiny tokenizer: reading the text of %d shard(s) of %s", len(shards), name or "the data")
    words = text_words(get_template(template).fixed_texts())
    samples = 0
    for record in shard_records(shards):
        samples += 1
        words |= text_words(record_texts(record))
    log.info("tiny tokenizer: %d words from %d samples of %s", len(words), samples, name or "the data")
    return sorted(words)


def shard_digest(urls: Mapping[str, Sequence[str]], template: str | ChatTemplate) -> str:
    """A 12-hex digest of what :func:`shard_vocabulary` reads: shard contents, template strings, builder.

    A shard's SHA-256 comes from the converter's manifest next to it; a shard no manifest lists is
    hashed here (read once per call).
    """
    shards = sorted({u for split in urls.values() for u in split})
    listed = manifest_entries(shards)
    checksums = sorted(listed[u]["sha256"] if u in listed else file_sha256(u) for u in shards)
    chat = get_template(template)
    key = {"builder": BUILDER_VERSION, "template": [chat.name, *chat.fixed_texts()], "shards": checksums}
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
