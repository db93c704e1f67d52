"""Write the smoke run's tiny tasks as jsonl beside this script (deterministic: rerunning gives
byte-identical files).

Each task is a character-level transformation a tiny random model trained for a few steps can
start to learn: reverse a short word, uppercase it, copy a string of digits. Distinct prompt
prefixes let a model trained on their mix tell the tasks apart.

    python jobs/data/make_smoke_data.py [--rows 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 6)))


TASKS = {
    "reverse": lambda rng: (lambda w: (f"reverse: {w}", w[::-1]))(_word(rng)),
    "upper": lambda rng: (lambda w: (f"upper: {w}", w.upper()))(_word(rng)),
    "digits": lambda rng: (lambda d: (f"copy: {d}", d))(_digits(rng)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for seed, (name, make) in enumerate(TASKS.items()):
        rng = random.Random(seed)
        path = args.out / f"{name}.jsonl"
        with open(path, "w") as f:
            for _ in range(args.rows):
                question, answer = make(rng)
                f.write(json.dumps({"question": question, "answer": answer}) + "\n")
        print(f"wrote {path} ({args.rows} rows)")


if __name__ == "__main__":
    main()
