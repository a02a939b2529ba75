"""Generates the second bundled task: extracting product returns, to continue the orders adapter on.

Same customers, items and cities as ``generate_orders.py`` but another request and answer:
``Extract the return: …`` → ``name=<full name>|item=<colour> <item, singular>|reason=<reason>``. Close
enough to orders that continuing an orders adapter on it interferes with what it learnt (the
forgetting that ``python -m training.continual_compare`` measures), different enough to be a new task.

Run ``python training/examples/generate_returns.py`` to rewrite ``returns_train.jsonl`` (200 rows) and
``returns_test.jsonl`` (100 rows); the seed makes the files identical on every run.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generate_orders import CITIES, COLOURS, FIRST, ITEMS, LAST, write_splits  # noqa: E402

REASONS = {  # how customers say it -> the answer's reason
    "damaged": ["it arrived broken", "it came damaged", "it was cracked when it arrived"],
    "wrong item": ["you sent the wrong one", "it is not what I ordered", "I got a different item"],
    "too small": ["it is too small", "it turned out smaller than I thought"],
    "changed mind": ["I changed my mind", "I no longer need it", "I do not want it any more"],
}
TEMPLATES = [
    "Hi, {name} here. I want to return the {item} I got in {city}: {why}.",
    "Return please - the {item}, {why}. {name}, {city}",
    "{name} from {city}: {why}, so I am sending back the {item}.",
    "Hello, the {item} has to go back because {why}. Thanks, {name} ({city})",
]


def make_row(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    item = f"{rng.choice(COLOURS)} {rng.choice(list(ITEMS))}"
    reason = rng.choice(list(REASONS))
    message = rng.choice(TEMPLATES).format(
        name=name, item=item, city=rng.choice(CITIES), why=rng.choice(REASONS[reason])
    )
    return {
        "messages": [
            {"role": "user", "content": f"Extract the return: {message}"},
            {"role": "assistant", "content": f"name={name}|item={item}|reason={reason}"},
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args()
    counts = {"returns_train.jsonl": args.train, "returns_test.jsonl": args.test}
    write_splits(make_row, args.seed, args.out, counts)


if __name__ == "__main__":
    main()
