"""A word-level tokenizer for the tiny model, saved in Hugging Face format.

Built with the ``tokenizers`` library from the data vocabulary and saved with ``save_pretrained``,
so the tiny model loads it through ``AutoTokenizer.from_pretrained`` exactly like a checkpoint's.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE]  # ids 0..4 in this order


def build_word_tokenizer(words: Iterable[str], out_dir: str | Path) -> PreTrainedTokenizerFast:
    r"""Builds a lowercase word-level tokenizer over ``words``, saves it and returns it.

    ``words`` may be words or whole texts: each is lowercased and split by the tokenizer's own
    normalizer and pre-tokenizer (``\w+|[^\w\s]+``), so the vocabulary covers exactly the pieces
    the tokenizer will see. Ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, ``<image>`` 4, then
    the words in alphabetical order (deterministic). Like LLaMA tokenizers it prepends ``<s>``
    when called with ``add_special_tokens=True``; ``tokenizer.image_token`` is ``"<image>"``.

    Args:
        words: words or texts to cover; unseen words map to ``<unk>``.
        out_dir: folder for ``save_pretrained`` (created if missing).

    Returns:
        The tokenizer; ``AutoTokenizer.from_pretrained(out_dir)`` returns an equal one.
    """
    core = Tokenizer(models.WordLevel(unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # Deduplicated input gives every word count 1, so the trainer orders them alphabetically.
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=0, show_progress=False)
    core.train_from_iterator(sorted(set(words)), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    # WordPiece joins tokens with spaces and removes the space before punctuation ("color ?" ->
    # "color?"); its prefix is a space, which no token can start with, so it never glues sub-words.
    core.decoder = decoders.WordPiece(prefix=" ", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        clean_up_tokenization_spaces=False,  # the decoder already did it
        padding_side="right",
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def cached_word_tokenizer(folder: str | Path, words: Callable[[], Iterable[str]]) -> PreTrainedTokenizerFast:
    """The word tokenizer saved in ``folder``, built there from ``words()`` first if it is missing.

    ``words`` is only called when the tokenizer has to be built (gathering them may read a whole
    data set). The tokenizer is written to a temporary folder that is renamed into place, so
    ranks building it at the same time, or an interrupted build, never leave a half-written one.

    Args:
        folder: the cache folder, named by a digest of what ``words`` depends on.
        words: gives the words or texts to cover (see :func:`build_word_tokenizer`).

    Returns:
        The tokenizer, loaded with ``AutoTokenizer.from_pretrained(folder)``.
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            build_word_tokenizer(words(), tmp)
            if folder.exists() and not (folder / "tokenizer.json").exists():
                shutil.rmtree(folder)  # a build interrupted before this code wrote atomically: redo it
            try:
                tmp.rename(folder)
            except OSError:
                if not (folder / "tokenizer.json").exists():
                    raise  # not another process that finished first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(folder)
