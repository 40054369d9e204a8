"""Chat templates, rendered as role-tagged text pieces so label and instruction masks stay exact.

A template never tokenizes: it returns the prompt as a list of :class:`Piece` whose concatenated
text is the exact prompt string, and the processor tokenizes piece by piece. New templates
are new :class:`ChatTemplate` values in ``TEMPLATES``: ``vicuna_v1`` (LLaVA-NeXT Vicuna), ``plain``
(stage-1 captions) and ``llama_3`` (LLaVA-NeXT Llama-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    """What a piece of the prompt is, which decides its label and instruction mask."""

    CONTEXT = "context"  # system prompt, role tags, separators: no loss, not instruction
    IMAGE = "image"  # the single <image> placeholder
    INSTRUCTION = "instruction"  # the user's words: the router reads only these
    ANSWER = "answer"  # assistant words and the turn end: the only supervised tokens


@dataclass(frozen=True)
class Piece:
    """A span of prompt text with one role."""

    text: str
    role: Role


@dataclass(frozen=True)
class Turn:
    """One user question and the assistant's answer (``None`` for a generation prompt)."""

    question: str
    answer: str | None


@dataclass(frozen=True)
class ChatTemplate:
    """A single- or multi-turn chat format described by its fixed strings.

    Rendered text: ``system + user + [image + image_sep] + question + assistant + answer_prefix +
    answer + turn_end``, then ``user + question + ...`` for later turns.

    Attributes:
        name: registry name.
        system: text before the first turn, separator included ("" for none).
        user: opens every user turn.
        image_sep: between the image placeholder and the question.
        assistant: closes a user turn; a generation prompt ends right after it.
        answer_prefix: text before the answer words (vicuna: the space after "ASSISTANT:").
        turn_end: ends every assistant turn; supervised like the answer so the model learns to stop.
        add_bos: whether the sequence starts with the tokenizer's BOS token.
        keep_question: whether the user's words are rendered (``plain`` drops them, like LLaVA).
        max_turns: most question/answer pairs a conversation may have (None = any).
        needs_image: whether every sample must have an image.
    """

    name: str
    system: str
    user: str
    image_sep: str
    assistant: str
    answer_prefix: str
    turn_end: str
    add_bos: bool = True
    keep_question: bool = True
    max_turns: int | None = None
    needs_image: bool = False

    def render(self, turns: Sequence[Turn], image_token: str | None, image_turn: int = 0) -> list[Piece]:
        """Renders a conversation as role-tagged pieces.

        Adjacent pieces with the same role are merged, so a tokenizer sees the longest spans
        that share a mask (closest to tokenizing the whole string at once).

        Args:
            turns: the conversation; only the last turn may have ``answer=None``.
            image_token: placeholder text, or ``None`` for a text-only sample.
            image_turn: index of the user turn that carries the image.

        Returns:
            Pieces whose texts concatenate to the full prompt.
        """
        pieces = [Piece(self.system, Role.CONTEXT)]
        for i, turn in enumerate(turns):
            pieces.append(Piece(self.user, Role.CONTEXT))
            if image_token is not None and i == image_turn:
                pieces += [Piece(image_token, Role.IMAGE), Piece(self.image_sep, Role.CONTEXT)]
            question = turn.question if self.keep_question else ""
            pieces += [Piece(question, Role.INSTRUCTION), Piece(self.assistant, Role.CONTEXT)]
            if turn.answer is not None:
                pieces.append(Piece(self.answer_prefix + turn.answer + self.turn_end, Role.ANSWER))
        return _merge(pieces)

    def fixed_texts(self) -> list[str]:
        """Every string the template itself adds (for building vocabularies)."""
        return [self.system, self.user, self.image_sep, self.assistant, self.answer_prefix, self.turn_end]


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Drops empty pieces and joins neighbours of the same role (never two image pieces)."""
    merged: list[Piece] = []
    for piece in pieces:
        if not piece.text:
            continue
        if merged and merged[-1].role == piece.role and piece.role != Role.IMAGE:
            merged[-1] = Piece(merged[-1].text + piece.text, piece.role)
        else:
            merged.append(piece)
    return merged


VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# LLaVA-NeXT Vicuna (llava/conversation.py conv_vicuna_v1: sep " ", sep2 "</s>").
VICUNA_V1 = ChatTemplate(
    name="vicuna_v1",
    system=VICUNA_SYSTEM + " ",
    user="USER: ",
    image_sep="\n",
    assistant=" ASSISTANT:",
    answer_prefix=" ",
    turn_end="</s>",
)

# LLaVA stage-1 pretraining (conv_llava_plain, preprocess_plain): "<image>" + caption + "\n". The
# human turn's words are dropped and only the caption and its "\n" are supervised.
PLAIN = ChatTemplate(
    name="plain",
    system="",
    user="",
    image_sep="",
    assistant="",
    answer_prefix="",
    turn_end="\n",
    keep_question=False,
    max_turns=1,
    needs_image=True,
)

LLAMA_3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

# LLaVA-NeXT Llama-3 (conv_llava_llama_3): the Llama-3-Instruct chat format. BOS is
# <|begin_of_text|>; only the answer and its <|eot_id|> are supervised.
LLAMA_3 = ChatTemplate(
    name="llama_3",
    system=f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA_3_SYSTEM}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n",
    image_sep="\n",
    assistant="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    answer_prefix="",
    turn_end="<|eot_id|>",
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (VICUNA_V1, PLAIN, LLAMA_3)}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """Looks a template up by name (a :class:`ChatTemplate` passes through).

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    if isinstance(name, ChatTemplate):
        return name
    if name not in TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
