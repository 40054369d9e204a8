"""Writes the example LLaVA-format set the own-data walk-through was timed on (README, this folder).

It stands in for a user's own file: ``train.json`` / ``val.json`` / ``test.json`` of LLaVA records
(multi-turn, text-only, a few bad records) and an ``images/`` folder of PNG and JPEG images of
several sizes, written by the tests' generator (``tests/userdata.py``) from a seed.

    python experiments/own_data/write_example_set.py /tmp/my_set --train 1000 --test 200
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from userdata import write_user_llava  # noqa: E402 - the tests' generator, importable from tests/


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=1000, help="good training records")
    parser.add_argument("--val", type=int, default=64, help="validation records")
    parser.add_argument("--test", type=int, default=200, help="evaluation records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--every-question",
        action="store_true",
        help="ask each training and validation image all four of its questions",
    )
    args = parser.parse_args()
    raw = write_user_llava(
        args.out,
        seed=args.seed,
        n_train=args.train,
        n_val=args.val,
        n_test=args.test,
        every_question=args.every_question,
    )
    print(f"wrote {', '.join(f'{s}: {p}' for s, p in raw.sources.items())}; images under {raw.images}")


if __name__ == "__main__":
    main()
