"""Generates the bundled example: extracting customer orders into one fixed, exactly checkable line.

Each row is a short chat: the user pastes a customer's message after ``Extract the order:`` and the
assistant answers ``name=<full name>|qty=<digits>|item=<colour> <item, singular>|city=<city>``. The
base model does not know this format (nor that "three mugs" becomes ``qty=3|item=… mug``); a small
adapter learns it from a few hundred rows.

Run ``python training/examples/generate_orders.py`` to rewrite ``orders_train.jsonl`` (400 rows) and
``orders_test.jsonl`` (100 rows); the seed makes the files identical on every run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = [
    "Maria",
    "John",
    "Aiko",
    "Lars",
    "Fatima",
    "Pedro",
    "Chen",
    "Olga",
    "Kwame",
    "Sofia",
    "Ravi",
    "Emma",
    "Tomas",
    "Leila",
    "Noah",
    "Ines",
    "Yusuf",
    "Hana",
    "Marco",
    "Zoe",
]
LAST = [
    "Lopez",
    "Smith",
    "Tanaka",
    "Berg",
    "Khan",
    "Alves",
    "Wang",
    "Ivanova",
    "Mensah",
    "Rossi",
    "Patel",
    "Dubois",
    "Novak",
    "Haddad",
    "Miller",
    "Garcia",
    "Demir",
    "Kim",
    "Bianchi",
    "Weber",
]
COLOURS = ["blue", "red", "green", "black", "white", "yellow", "grey", "pink"]
ITEMS = {
    "mug": "mugs",
    "lamp": "lamps",
    "notebook": "notebooks",
    "backpack": "backpacks",
    "scarf": "scarves",
    "chair": "chairs",
    "kettle": "kettles",
    "umbrella": "umbrellas",
    "towel": "towels",
    "bottle": "bottles",
}
CITIES = [
    "Berlin",
    "Lisbon",
    "Osaka",
    "Nairobi",
    "Toronto",
    "Lyon",
    "Krakow",
    "Austin",
    "Porto",
    "Seoul",
    "Dublin",
    "Cairo",
    "Oslo",
    "Lima",
    "Perth",
]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
TEMPLATES = [
    "Hi, this is {name}. Please send {qty} {item} to {city}.",
    "{name} here - I'd like {qty} {item}, shipped to {city}.",
    "Ship {qty} {item} to {city}, thanks! {name}",
    "Hello! Could I order {qty} {item}? Deliver to {city}. Regards, {name}",
    "Order for {name}: {qty} {item}, delivery city {city}.",
    "Can you get {qty} {item} over to {city}? - {name}",
]


def make_row(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    qty = rng.randint(1, 12)
    colour, item = rng.choice(COLOURS), rng.choice(list(ITEMS))
    city = rng.choice(CITIES)
    qty_text = NUMBER_WORDS[qty] if qty in NUMBER_WORDS and rng.random() < 0.5 else str(qty)
    item_text = f"{colour} {item if qty == 1 else ITEMS[item]}"
    message = rng.choice(TEMPLATES).format(name=name, qty=qty_text, item=item_text, city=city)
    answer = f"name={name}|qty={qty}|item={colour} {item}|city={city}"
    return {
        "messages": [
            {"role": "user", "content": f"Extract the order: {message}"},
            {"role": "assistant", "content": answer},
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    write_splits(
        make_row, args.seed, args.out, {"orders_train.jsonl": args.train, "orders_test.jsonl": args.test}
    )


def write_splits(make_row, seed: int, out: Path, counts: dict[str, int]) -> None:
    """Writes ``counts[filename]`` rows of ``make_row(rng)`` into each file, in order, from one seeded rng."""
    rng = random.Random(seed)
    for filename, count in counts.items():
        with open(out / filename, "w") as f:
            for _ in range(count):
                f.write(json.dumps(make_row(rng)) + "\n")
        print(f"wrote {count} rows to {out / filename}")


if __name__ == "__main__":
    main()
