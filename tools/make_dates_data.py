#!/usr/bin/env python3
"""Writes the demo task's data: convert a written-out date to ISO 8601 (YYYY-MM-DD).

Deterministic (fixed seed); the outputs are committed under data/dates/. The base
SmolLM2-135M-Instruct answers such requests in a sentence or gets the digits wrong, so exact-match
accuracy measures whether fine-tuning taught it the task. Train and eval dates never overlap.
"""
import json
import os
import random

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def example(rng):
    y = rng.randint(1950, 2049)
    m = rng.randint(1, 12)
    d = rng.randint(1, DAYS[m - 1])
    written = f"{MONTHS[m - 1]} {d}, {y}" if rng.random() < 0.5 else f"{d} {MONTHS[m - 1]} {y}"
    question = f"Convert this date to ISO format (YYYY-MM-DD): {written}"
    return (y, m, d), {"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": f"{y:04d}-{m:02d}-{d:02d}"}]}


def main():
    rng = random.Random(2024)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "dates")
    os.makedirs(out, exist_ok=True)
    seen, sets = set(), {"train": [], "eval": []}
    for name, n in [("train", 400), ("eval", 50)]:
        while len(sets[name]) < n:
            key, ex = example(rng)
            if key in seen:
                continue
            seen.add(key)
            sets[name].append(ex)
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for ex in sets[name]:
                f.write(json.dumps(ex) + "\n")
    print({k: len(v) for k, v in sets.items()})


if __name__ == "__main__":
    main()
