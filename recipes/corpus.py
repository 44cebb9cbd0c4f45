"""The embedded default corpus: a deterministic synthetic "ticket log" whose text can only be fully
predicted by a model that remembers what it read a few hundred bytes earlier.

Each record opens a ticket with a random 4-digit number and an owner, continues with several lines of
locally predictable chatter (templated sentences over small word lists), and closes the ticket by
repeating the number and the owner::

    ticket 4821 opened by kavi.
    the printer on floor two jams again.
    ...
    ticket 4821 closed by kavi.

Within a record the closing line is 120-300 bytes after the opening line. A model whose context is
shorter than that (e.g. 64 bytes without memory) must guess the number (log2(10^4) = 13.3 bits) and
the owner (log2(48) = 5.6 bits); a model that carries memory across segments can copy them. The
difference shows up in the overall bits per byte and, sharply, in the bits on the closing lines.

    python -m recipes.corpus --out data/ticket-log        # writes train.txt, valid.txt, test.txt

Generated from a fixed seed, so every machine gets the same bytes (no download, nothing shipped).
"""

import argparse
import random
from pathlib import Path

NAMES = (
    "kavi ada lin omar nia ravi sofia tomas yuki zara bram cleo dane elif farah gus hana ivo jade kai "
    "lena milo nora otto pia quin rosa sami tara uma vera wes xena yara zeno alba bo cyra dov enzo fenna "
    "gil hugo iris jon"
).split()
SUBJECTS = ["the printer", "the laptop", "the badge reader", "the coffee machine", "the vpn", "the projector",
            "the wifi", "the mail server", "the scanner", "the build farm"]  # fmt: skip
PLACES = ["on floor two", "in room nine", "at the front desk", "in the lab", "near the kitchen", "upstairs"]
PROBLEMS = ["jams again", "will not start", "is very slow", "keeps rebooting", "shows an error", "lost power",
            "needs an update", "makes a noise"]  # fmt: skip
ACTIONS = ["restarted it", "replaced the cable", "cleared the queue", "checked the logs", "called the vendor",
           "updated the driver", "swapped the unit", "reset the settings"]  # fmt: skip
OUTCOMES = ["it works now", "no change yet", "still waiting", "looks better", "it failed again", "all good"]


def chatter(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return f"{rng.choice(SUBJECTS)} {rng.choice(PLACES)} {rng.choice(PROBLEMS)}."
    if kind == 1:
        return f"we {rng.choice(ACTIONS)} and {rng.choice(OUTCOMES)}."
    return f"note: {rng.choice(SUBJECTS)} {rng.choice(PROBLEMS)}, {rng.choice(OUTCOMES)}."


def record(rng: random.Random) -> str:
    number, owner = rng.randrange(1000, 10000), rng.choice(NAMES)
    lines = [f"ticket {number} opened by {owner}."]
    lines += [chatter(rng) for _ in range(rng.randint(3, 6))]
    lines.append(f"ticket {number} closed by {owner}.")
    return "\n".join(lines) + "\n"


def generate(num_bytes: int, seed: int) -> str:
    rng, parts, size = random.Random(seed), [], 0
    while size < num_bytes:
        parts.append(record(rng))
        size += len(parts[-1])
    return "".join(parts)


SPLITS = {"train": (2_000_000, 1), "valid": (100_000, 2), "test": (100_000, 3)}  # bytes, seed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.txt, valid.txt, test.txt")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every split's size (e.g. 0.1 for tests)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, (size, seed) in SPLITS.items():
        (out / f"{split}.txt").write_text(generate(int(size * args.scale), seed))
        print(f"{out / split}.txt: {int(size * args.scale)} bytes")


if __name__ == "__main__":
    main()
