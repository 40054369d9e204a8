"""One LLaVA-format record plus its image -> model tensors (ids, labels, instruction mask, AnyRes tiles).

The prompt is tokenized piece by piece (``add_special_tokens=False``), so the label and
instruction masks are exact for any tokenizer: no re-tokenization and no offset arithmetic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import LlavaNextImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from avglab.data.anyres import count_visual_tokens
from avglab.data.templates import ChatTemplate, Piece, Role, Turn, get_template

IMAGE_PLACEHOLDER = "<image>"  # what LLaVA records write, whatever the tokenizer calls it
IGNORE_INDEX = -100
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class RecordError(ValueError):
    """A record that cannot become a sample; ``reason`` is the short key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def build_image_processor(
    tile_size: int, grid_pinpoints: Sequence[Sequence[int]]
) -> LlavaNextImageProcessorPil:
    """LLaVA-NeXT's own AnyRes image processor at a given tile size.

    Configured like the llava-hf checkpoints (shortest edge = crop = tile size, CLIP mean/std,
    bicubic), so the tiny model and real checkpoints share one class and one code path.

    Args:
        tile_size: side S of a tile (the vision tower's input size).
        grid_pinpoints: AnyRes resolutions as [height, width] pairs.

    Returns:
        A processor whose output is ``pixel_values`` (1, T, 3, S, S) and ``image_sizes`` (1, 2).
    """
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": tile_size},
        crop_size={"height": tile_size, "width": tile_size},
        image_grid_pinpoints=[list(p) for p in grid_pinpoints],
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def tile_size_of(image_processor) -> int:
    """Side S of the tiles an image processor produces."""
    return int(image_processor.crop_size["height"])


def check_text(name: str, where: str, text: str) -> None:
    """Raises ``RecordError("non_utf8_text")`` for text that is not valid Unicode.

    JSON read with ``errors="surrogateescape"`` (the converter) or with ``udcxx`` escapes keeps
    undecodable bytes as lone surrogates; no tokenizer can encode them.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exn:
        near = text[max(0, exn.start - 20) : exn.end]
        raise RecordError(
            "non_utf8_text",
            f"record {name}: {where} has bytes that are not UTF-8 near {near!r}; re-encode it as UTF-8",
        ) from None


def parse_conversation(record: dict, has_image: bool) -> tuple[list[Turn], int]:
    """Turns of a LLaVA record, the ``<image>`` placeholder removed, and the index of its turn.

    Like LLaVA's ``preprocess_multimodal`` the image is moved to the start of the turn that had
    the placeholder (the first turn when an image comes without one). Like LLaVA-NeXT's data code,
    one image takes exactly one placeholder.

    Raises:
        RecordError: on a malformed conversation, saying what to fix.
    """
    name = record.get("id", "<no id>")
    conversation = record.get("conversations")
    if (
        not isinstance(conversation, list)
        or not conversation
        or not all(isinstance(t, dict) for t in conversation)
    ):
        raise RecordError(
            "no_conversation",
            f"record {name}: 'conversations' must be a non-empty list of {{'from', 'value'}}",
        )
    roles = [str(turn.get("from", "")) for turn in conversation]
    expected_ok = all(role in (USER_ROLES if i % 2 == 0 else ASSISTANT_ROLES) for i, role in enumerate(roles))
    if not expected_ok:
        raise RecordError(
            "bad_roles", f"record {name}: turns must alternate human/gpt starting with human, got {roles}"
        )
    values = [turn.get("value") for turn in conversation]
    if not all(isinstance(v, str) for v in values):
        kinds = [type(v).__name__ for v in values]
        raise RecordError("bad_turn", f"record {name}: every turn's 'value' must be a string, got {kinds}")
    for i, value in enumerate(values):
        check_text(name, f"turn {i}", value)
    user_values = values[0::2]
    placeholders = [i for i, v in enumerate(user_values) for _ in range(v.count(IMAGE_PLACEHOLDER))]
    if len(placeholders) > 1:
        raise RecordError(
            "several_images", f"record {name}: {len(placeholders)} <image> placeholders, one is supported"
        )
    if placeholders and not has_image:
        raise RecordError(
            "image_missing",
            f"record {name} has an <image> placeholder but no image: "
            "add the image to the shard or drop the placeholder",
        )
    questions = [v.replace(IMAGE_PLACEHOLDER, "").strip() for v in user_values]
    answers: list[str | None] = [v.strip() for v in values[1::2]]
    empty = [i for i, a in enumerate(answers) if not a]
    if empty:
        raise RecordError(
            "empty_answer", f"record {name}: answer {empty[0]} is empty; drop the turn pair or the record"
        )
    answers += [None] * (len(questions) - len(answers))  # a trailing question is a generation prompt
    turns = [Turn(q, a) for q, a in zip(questions, answers, strict=True)]
    return turns, (placeholders[0] if placeholders else 0)


def check_template(template: ChatTemplate, record: dict, turns: list[Turn], has_image: bool) -> None:
    """Raises a ``RecordError`` for a conversation the template cannot render (``plain``: one caption)."""
    name = record.get("id", "<no id>")
    if template.max_turns is not None and len(turns) > template.max_turns:
        raise RecordError(
            "too_many_turns",
            f"record {name}: the {template.name} template takes {template.max_turns} question/answer "
            f"pair(s), got {len(turns)}; use data.template=vicuna_v1 for dialogues",
        )
    if template.needs_image and not has_image:
        raise RecordError(
            "no_image", f"record {name}: the {template.name} template captions an image; this record has none"
        )


class SampleProcessor:
    """Turns a LLaVA-format record and its image into the tensors of one sample.

    Args:
        tokenizer: a Hugging Face tokenizer that has the image token (``<image>``) as one token.
        image_processor: ``LlavaNextImageProcessorPil`` (see :func:`build_image_processor`).
        template: chat template name or object (see ``avglab.data.templates``).
        max_length: longest sequence the LLM reads, in tokens: the text plus the image's visual
            tokens spliced in at the finest level (global view + unpadded local map + newlines,
            the most any granularity or route gives), as LLaVA cuts after splicing. Without
            ``grid`` only text tokens count (the image placeholder as one).
        grid: tokens per tile side at full resolution (tile size / patch size of the vision
            tower), to count the visual tokens; None when the geometry is unknown.
        skipped: counter of skip reasons, shared with the caller; a new one if not given.
        unknown: counter of ``<unk>`` ids in kept samples (``"tokens"``, ``"samples"``), shared
            with the caller; only a word-level tokenizer produces them (byte fallback never does).

    Raises:
        ValueError: if the tokenizer has no single-token image placeholder.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        template: str | ChatTemplate = "vicuna_v1",
        max_length: int = 2048,
        skipped: Counter | None = None,
        grid: int | None = None,
        unknown: Counter | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = get_template(template)
        self.max_length = max_length
        self.grid = grid
        self.skipped = Counter() if skipped is None else skipped
        self.unknown = Counter() if unknown is None else unknown
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_PLACEHOLDER
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"tokenizer has no {self.image_token!r} token: add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{self.image_token!r}]}})"
            )
        self.tile_size = tile_size_of(image_processor)
        self.grid_pinpoints = [list(p) for p in getattr(image_processor, "image_grid_pinpoints", None) or []]

    def __call__(self, record: dict, image: Image.Image | None) -> dict | None:
        """Processes one sample.

        Args:
            record: ``{"id", "conversations", "question_type"?, "answers"?}`` in LLaVA format.
            image: the sample's image, or ``None`` for a text-only sample.

        Returns:
            ``input_ids``, ``labels`` (L,) long, ``instruction_mask`` (L,) bool, ``prompt_len`` int,
            ``pixel_values`` (T, 3, S, S) float (T = 0 without image), ``image_size`` (2,) long
            (height, width; (S, S) without image), ``has_image`` bool, ``id``, ``question_type``,
            ``answers`` (list[str]); or ``None`` when truncation to ``max_length`` would cut every
            answer token or the image placeholder (counted in ``skipped``).

        Raises:
            RecordError: on a malformed record, or ``visual_tokens_over_max_length`` when the
                image's visual tokens alone exceed ``max_length``.
        """
        turns, image_turn = parse_conversation(record, image is not None)
        check_template(self.template, record, turns, image is not None)
        pieces = self.template.render(turns, self.image_token if image is not None else None, image_turn)
        ids, labels, instruction, prompt_len = self.tokenize(pieces)
        pixel_values, image_size = self.process_image(image)
        visual = self.visual_tokens(image_size) if image is not None else 0
        if visual > self.max_length:
            raise RecordError(
                "visual_tokens_over_max_length",
                f"record {record.get('id', '<no id>')}: its {tuple(image_size.tolist())} image gives "
                f"{visual} visual tokens at the finest level, more than data.max_length={self.max_length}; "
                "raise data.max_length (up to the LLM's max_position_embeddings)",
            )
        limit = self.max_length - max(visual - 1, 0)  # text ids; the placeholder becomes the visual tokens
        if len(ids) > limit:
            had_answer = any(label != IGNORE_INDEX for label in labels)
            ids, labels, instruction = (x[:limit] for x in (ids, labels, instruction))
            if had_answer and all(label == IGNORE_INDEX for label in labels):
                self.skipped["truncated_answer"] += 1
                return None
            if image is not None and self.image_token_id not in ids:
                self.skipped["truncated_image"] += 1
                return None
            prompt_len = min(prompt_len, limit)
        self.count_unknown(ids)
        answers = record.get("answers") or [t.answer for t in turns[-1:] if t.answer is not None]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "instruction_mask": torch.tensor(instruction, dtype=torch.bool),
            "prompt_len": prompt_len,
            "pixel_values": pixel_values,
            "image_size": image_size,
            "has_image": image is not None,
            "id": str(record.get("id", "")),
            "question_type": str(record.get("question_type", "unknown")),
            "answers": [answers] if isinstance(answers, str) else [str(a) for a in answers],
        }

    def visual_tokens(self, image_size: torch.Tensor) -> int:
        """Tokens the model splices in for an image of ``image_size`` (height, width) at the finest level.

        Without ``grid`` the geometry is unknown and the placeholder counts as one token.
        """
        if self.grid is None:
            return 1
        return count_visual_tokens(image_size.tolist(), self.grid_pinpoints, self.tile_size, self.grid)

    def count_unknown(self, ids: list[int]) -> None:
        """Counts the ``<unk>`` ids of a kept sample (words a word-level tokenizer does not know)."""
        unk = self.tokenizer.unk_token_id
        found = ids.count(unk) if unk is not None else 0
        if found:
            self.unknown["tokens"] += found
            self.unknown["samples"] += 1

    def tokenize(self, pieces: list[Piece]) -> tuple[list[int], list[int], list[bool], int]:
        """Token ids, labels and instruction flags of rendered pieces, and the generation-prompt length.

        The prompt ends where the last answer starts (right after the last "ASSISTANT:"), or at
        the end when the conversation ends with a question.
        """
        bos = self.tokenizer.bos_token_id if self.template.add_bos else None
        ids: list[int] = [] if bos is None else [bos]
        labels = [IGNORE_INDEX] * len(ids)
        instruction = [False] * len(ids)
        prompt_len = None
        for piece in pieces:
            if piece.role is Role.IMAGE:
                tokens = [self.image_token_id]  # one placeholder; the model expands it to visual tokens
            else:
                tokens = self.tokenizer.encode(piece.text, add_special_tokens=False)
            if piece.role is Role.ANSWER:
                prompt_len = len(ids)
            ids += tokens
            labels += tokens if piece.role is Role.ANSWER else [IGNORE_INDEX] * len(tokens)
            instruction += [piece.role is Role.INSTRUCTION] * len(tokens)
        ends_with_answer = pieces[-1].role is Role.ANSWER
        return ids, labels, instruction, (prompt_len if ends_with_answer else len(ids))

    def process_image(self, image: Image.Image | None) -> tuple[torch.Tensor, torch.Tensor]:
        """AnyRes tiles (global view first) and (height, width) of an image.

        Returns:
            pixel_values (T, 3, S, S) float, T = 0 for ``None``; image_size (2,) long.
        """
        if image is None:
            side = self.tile_size
            return torch.zeros(0, 3, side, side), torch.tensor([side, side])
        out = self.image_processor(image, return_tensors="pt")
        return out["pixel_values"][0], out["image_sizes"][0].long()
