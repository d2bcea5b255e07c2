"""Arithmetic word problems with known answers, made locally for the demo (no outside data).

Each record is GSM8K-shaped: ``{"id", "question", "answer": "worked solution\\n#### N"}``, so every
kd command that reads GSM8K reads these too, and answers verify exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira", "Leo", "Mia", "Noah"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "add_mul", "share"])
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        q = f"{name} has {a} {item}. {other} gives {name} {b} more {item}. How many {item} does {name} have now?"
        return q, f"{name} has {a} + {b} = {a + b} {item}.", a + b
    if kind == "sub":
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?"
        return q, f"{name} has {a} - {b} = {a - b} {item} left.", a - b
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy?"
        return q, f"{name} buys {a} * {b} = {a * b} {item}.", a * b
    if kind == "add_mul":
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
        q = (
            f"{name} packs {a} bags with {b} {item} each, then finds {c} more {item}. "
            f"How many {item} does {name} have in total?"
        )
        return q, f"The bags hold {a} * {b} = {a * b} {item}. Then {a * b} + {c} = {a * b + c}.", a * b + c
    per, n = rng.randint(2, 12), rng.randint(2, 8)
    q = f"{name} shares {per * n} {item} equally among {n} friends. How many {item} does each friend get?"
    return q, f"Each friend gets {per * n} / {n} = {per} {item}.", per


def make_problems(count: int, seed: int) -> list[dict]:
    """`count` distinct problems; the same seed always gives the same list."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < count:
        question, work, answer = _problem(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append({"id": f"p{seed}-{len(out)}", "question": question, "answer": f"{work}\n#### {answer}"})
    return out


def write_problems(path: Path, count: int, seed: int) -> Path:
    """Write problems as JSONL atomically (a rerun with the same args rewrites the same bytes)."""
    from kd.cache.manifest import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in make_problems(count, seed)))
    return path
