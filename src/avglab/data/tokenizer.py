"""A word-level tokenizer for the tiny model, saved in Hugging Face format.

Built with the ``tokenizers`` library from the data vocabulary and saved with ``save_pretrained``,
so the tiny model loads it through ``AutoTokenizer.from_pretrained`` exactly like a checkpoint's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

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
