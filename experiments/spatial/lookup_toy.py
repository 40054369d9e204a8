"""How fast does the tiny LLM learn a lookup keyed by a question word? A seconds-long toy, no images.

The tiny model's LLM (LLaMA, width 128, 2 layers, 4 heads) reads 64 "visual tokens": a frozen random map of
each cell's colour (one-hot of 9, background included) and place (one-hot of 64), standing in for the random
vision tower whose colour and place are linearly readable per patch (feature_probe.py: 92% / 87%), plus a
trainable projector (as the tiny model's: Linear-GELU-Linear). Objects fill 2x2 cells. Questions:

- exists_red: "is there a red object ?" always (a fixed key) -> yes / no
- exists: "is there a red object ?" -> yes / no (balanced)
- half: "is the red object left or right ?" -> left / right (object wholly in one half)
- position: "is the red object left or right of the blue object ?" -> left / right

With ``--named-key`` the answer says the question's colour word(s) first and the value right after ("red yes",
"red blue left"; ``--separator ":"`` puts words between); every word is supervised, and held-out accuracy is
greedy decoding of the whole answer (the value after the model's own copy of the key).

Usage: python lookup_toy.py --task exists --steps 600 [--init 0.1] [--question-first] [--key-last]
    [--named-key [--separator ":"]] [--word-cells] [--word-warmup 600] [--projector-norm] [--echo 1]
    [--lr 5e-4] [--layers 2] [--width 128] [--heads 4] [--grid 8 --object 2]
Prints the held-out accuracy every ``--every`` steps and the steps to reach 90%. Results: README.md.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]
WORDS = ["<pad>", "<s>", "user", "assistant", ":", "is", "there", "a", "object", "?", "the", "of"]
WORDS += ["yes", "no", "left", "right"] + COLOURS
ID = {w: i for i, w in enumerate(WORDS)}
ID["or"] = len(ID)  # within the 4 spare ids of the vocabulary (the figures were measured so)
GRID = 8  # default cells per side (--grid); objects fill OBJ x OBJ cells (--object)
OBJ = 2


def scene(rng: torch.Generator, n_objects: int, grid: int, obj: int) -> tuple[torch.Tensor, dict]:
    """(64,) colour index per cell (0 = background) and {colour: (row, col) of the object's corner}."""
    cells = torch.zeros(grid, grid, dtype=torch.long)
    colours = torch.randperm(len(COLOURS), generator=rng)[:n_objects].tolist()
    placed = {}
    for c in colours:
        for _ in range(50):
            r, k = (int(x) for x in torch.randint(0, grid - obj + 1, (2,), generator=rng))
            if (cells[max(r - 1, 0) : r + obj + 1, max(k - 1, 0) : k + obj + 1] == 0).all():
                cells[r : r + obj, k : k + obj] = c + 1
                placed[c] = (r, k)
                break
    return cells.flatten(), placed


def sample(
    rng: torch.Generator, task: str, grid: int = GRID, obj: int = OBJ
) -> tuple[torch.Tensor, list[str], str] | None:
    """One (cells, question words, answer) or None when the scene does not fit the task."""
    cells, placed = scene(rng, int(torch.randint(2, 5, (1,), generator=rng)), grid, obj)
    names = list(placed)
    if len(names) < 2:
        return None
    if task == "exists_red":  # a fixed key: "is there a red object?" only (a global read, no lookup)
        answer = "yes" if 0 in placed else "no"
        if answer == "no" and bool(torch.rand(1, generator=rng) < 0.4):
            return None  # balance yes / no
        return cells, ["is", "there", "a", "red", "object", "?"], answer
    if task == "exists":
        if bool(torch.rand(1, generator=rng) < 0.5):
            c, answer = names[0], "yes"
        else:
            absent = [c for c in range(len(COLOURS)) if c not in placed]
            c, answer = absent[int(torch.randint(len(absent), (1,), generator=rng))], "no"
        return cells, ["is", "there", "a", COLOURS[c], "object", "?"], answer
    if task == "half":
        c = names[0]
        col = placed[c][1]
        if col < grid / 2 < col + obj:  # straddles the middle
            return None
        return (
            cells,
            ["is", "the", COLOURS[c], "object", "left", "or", "right", "?"],
            ("left" if col < grid / 2 else "right"),
        )
    a, b = names[0], names[1]
    if abs(placed[a][1] - placed[b][1]) < obj:
        return None
    answer = "left" if placed[a][1] < placed[b][1] else "right"
    words = ["is", "the", COLOURS[a], "object", "left", "or", "right", "of", "the", COLOURS[b], "object", "?"]
    return cells, words, answer


class Toy(nn.Module):
    """Frozen random 'tower', trainable projector, tiny LLaMA from random weights."""

    def __init__(self, args):
        super().__init__()
        g = torch.Generator().manual_seed(args.seed)
        self.grid = args.grid
        self.tower = nn.Parameter(torch.randn(9 + self.grid**2, 64, generator=g) / 4, requires_grad=False)
        self.offset = nn.Parameter(torch.randn(64, generator=g) * args.offset, requires_grad=False)
        width = args.width
        self.projector = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width) if args.projector_norm else nn.Identity()
        if args.projector_norm:  # start at the text embeddings' scale (std 0.02 per channel)
            nn.init.constant_(self.norm.weight, 0.02)
        config = LlamaConfig(
            vocab_size=len(WORDS) + 4,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            initializer_range=args.init,
            max_position_embeddings=512,
        )
        self.llm = LlamaForCausalLM(config)
        self.echo = nn.Linear(width, config.vocab_size)
        self.question_first, self.key_last, self.word_cells = (
            args.question_first,
            args.key_last,
            args.word_cells,
        )

    def forward(
        self, cells: torch.Tensor, questions: torch.Tensor, said: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, vocab) answer logits for (B, 64) cells and (B, Q) question ids (right-aligned, no padding).

        ``said`` (B, S): words the answer already said after "assistant :" (the named-key answers); with it
        the logits are (B, S + 1, vocab), one prediction per position from "assistant :" on.
        """
        onehot = torch.cat(
            [nn.functional.one_hot(cells, 9).float(), torch.eye(self.grid**2).expand(len(cells), -1, -1)], -1
        )
        visual = self.norm(self.projector(onehot @ self.tower + self.offset))  # (B, 64, width)
        embed = self.llm.get_input_embeddings()
        if self.word_cells:  # the cells as words: background -> "a", colour c -> its colour word
            visual = embed(torch.tensor([ID["a"]] + [ID[c] for c in COLOURS])[cells])
        ids = lambda words: torch.tensor([ID[w] for w in words]).expand(len(cells), -1)  # noqa: E731
        head, tail = embed(ids(["<s>", "user", ":"])), embed(ids(["assistant", ":"]))
        if self.key_last:  # the asked colour word is the position the answer is read at
            return self.llm(inputs_embeds=torch.cat([head, visual, embed(questions)], 1)).logits[:, -1]
        q = embed(questions)
        parts = [head, q, visual, tail] if self.question_first else [head, visual, q, tail]
        if said is not None:
            out = self.llm(inputs_embeds=torch.cat([*parts, embed(said)], 1))
            return out.logits[:, -said.shape[1] - 1 :]
        out = self.llm(inputs_embeds=torch.cat(parts, 1), output_hidden_states=True)
        # the question's words read back from the answer position after layer 1 (the echo objective)
        self.echo_logits = self.echo(out.hidden_states[1][:, -1])
        return out.logits[:, -1]


def batches(task: str, n: int, seed: int, key_last: bool = False, grid: int = GRID, obj: int = OBJ):
    """Draws n samples as (cells, question ids, answer ids), grouped by question length."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        s = sample(rng, task, grid, obj)
        if s is not None:
            out.append(s)
    cells = torch.stack([c for c, _, _ in out])
    questions = torch.tensor([[ID.get(w, 0) for w in q] for _, q, _ in out])
    if key_last:  # only the asked colour word
        questions = torch.tensor([[ID[w] for w in q if w in COLOURS][:1] for _, q, _ in out])
    answers = torch.tensor([ID[a] for _, _, a in out])
    return cells, questions, answers


def named_keys(questions: torch.Tensor, separator: str = "") -> torch.Tensor:
    """(B, K) the question's colour words in order, then ``separator``'s words.

    What a named-key answer says before its answer word.
    """
    colour_ids = torch.tensor([ID[c] for c in COLOURS])
    keys = torch.stack([q[torch.isin(q, colour_ids)] for q in questions])
    after = torch.tensor([ID[w] for w in separator.split()], dtype=torch.long).expand(len(keys), -1)
    return torch.cat([keys, after], 1)


def named_key_accuracy(model: Toy, cells, questions, answers, separator: str = "") -> tuple[float, float]:
    """Greedy decoding of "<keys> <answer>": (% answers right, % keys copied right)."""
    keys = named_keys(questions, separator)
    said = torch.zeros(len(cells), 0, dtype=torch.long)
    for _ in range(keys.shape[1]):
        logits = model(cells, questions, said if said.shape[1] else None)
        nxt = (logits[:, -1] if said.shape[1] else logits).argmax(-1)
        said = torch.cat([said, nxt[:, None]], 1)
    answer = model(cells, questions, said)[:, -1].argmax(-1)
    return float((answer == answers).float().mean()) * 100, float((said == keys).all(1).float().mean()) * 100


def main() -> None:
    """Trains the toy and prints held-out accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="exists", choices=["exists_red", "exists", "half", "position"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--init", type=float, default=0.02, help="LLaMA initializer_range")
    parser.add_argument("--offset", type=float, default=0.0, help="shared direction scale")
    parser.add_argument("--question-first", action="store_true")
    parser.add_argument("--projector-norm", action="store_true")
    parser.add_argument("--echo", type=float, default=0.0, help="weight of the question-echo objective")
    parser.add_argument(
        "--key-last", action="store_true", help="question = the colour word alone, answer read there"
    )
    parser.add_argument(
        "--word-cells", action="store_true", help="cells as word embeddings instead of features"
    )
    parser.add_argument("--word-warmup", type=int, default=0, help="steps on colour-word cells first")
    parser.add_argument(
        "--named-key", action="store_true", help='answers say the asked colour(s) first: "red yes"'
    )
    parser.add_argument("--separator", default="", help='words between the keys and the answer, e.g. ":"')
    parser.add_argument("--grid", type=int, default=GRID, help="cells per side (visual tokens = grid^2)")
    parser.add_argument("--object", type=int, default=OBJ, help="an object's side in cells")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = Toy(args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    test = batches(args.task, 512, 10_000 + args.seed, args.key_last, args.grid, args.object)
    train_rng_seed, reached, start = args.seed, None, time.time()
    for step in range(1, args.steps + 1):
        if args.word_warmup:  # the first steps read the cells as words, then the projected features
            model.word_cells = step <= args.word_warmup
        seed = train_rng_seed * 100_000 + step
        cells, questions, answers = batches(
            args.task, args.batch, seed, args.key_last, args.grid, args.object
        )
        warm = min(1.0, step / 10)
        for group in optim.param_groups:
            group["lr"] = args.lr * warm
        if args.named_key:  # teacher-forced "<keys> <answer>", every word of it supervised
            keys = named_keys(questions, args.separator)
            logits = model(cells, questions, keys)
            targets = torch.cat([keys, answers[:, None]], 1)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        else:
            loss = nn.functional.cross_entropy(model(cells, questions), answers)
        if args.echo:
            words = torch.zeros_like(model.echo_logits).scatter(1, questions, 1.0)
            echo = nn.functional.binary_cross_entropy_with_logits(model.echo_logits, words, reduction="sum")
            loss = loss + args.echo * echo / len(words)
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % args.every == 0 or step == args.steps:
            copied = ""
            with torch.no_grad():
                if args.named_key:
                    acc, keys_right = named_key_accuracy(model, *test, args.separator)
                    copied = f" keys copied {keys_right:5.1f}"
                else:
                    acc = float((model(test[0], test[1]).argmax(-1) == test[2]).float().mean()) * 100
            if reached is None and acc >= 90:
                reached = step
            took = time.time() - start
            line = f"step {step:5d} loss {loss.item():.3f} test acc {acc:5.1f}{copied}  ({took:.0f} s)"
            print(line, flush=True)
    print(f"steps to 90%: {reached}")


if __name__ == "__main__":
    main()
