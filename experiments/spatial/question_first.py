r"""``python -m avglab`` with the question rendered BEFORE the image in the turn that carries it (probe only).

LLaVA (and ``avglab.data.templates.ChatTemplate.render``) puts the image at the start of its turn, so under
causal attention no visual token can see the question: the LLM must find the asked object by a lookup from
the text positions. Here the first turn becomes ``USER: <question> <image>\\n ASSISTANT:`` so that every
visual token can attend to the question. Only this process is changed (a monkeypatch); the data and the
shards are the same.

    python experiments/spatial/question_first.py stage=pretrain model=tiny data=shards data.root=...
"""

from avglab.data import templates
from avglab.data.templates import Piece, Role, _merge


def render(self, turns, image_token, image_turn=0):
    """``ChatTemplate.render`` with the image after the question in its turn."""
    pieces = [Piece(self.system, Role.CONTEXT)]
    for i, turn in enumerate(turns):
        pieces.append(Piece(self.user, Role.CONTEXT))
        question = turn.question if self.keep_question else ""
        if image_token is not None and i == image_turn:
            pieces += [
                Piece(question, Role.INSTRUCTION),
                Piece(" ", Role.CONTEXT),
                Piece(image_token, Role.IMAGE),
                Piece(self.image_sep, Role.CONTEXT),
            ]
        else:
            pieces.append(Piece(question, Role.INSTRUCTION))
        pieces.append(Piece(self.assistant, Role.CONTEXT))
        if turn.answer is not None:
            pieces.append(Piece(self.answer_prefix + turn.answer + self.turn_end, Role.ANSWER))
    return _merge(pieces)


templates.ChatTemplate.render = render

if __name__ == "__main__":
    from avglab.cli import main

    main()
