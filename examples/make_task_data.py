"""Write the quickstart's instruction task: name the type of a Python literal.

    python examples/make_task_data.py        # writes examples/data/task_{train,val,test}.jsonl

Alpaca-format JSONL rows, e.g.
    {"instruction": "Name the type of this Python value.", "input": "{'port': 8.5, \\"key\\": -3.25}",
     "output": "dict of str to float"}

Answers are `int`, `float`, `str`, `list of T`, `tuple of T`, `set of T` or `dict of K to V`
(22 distinct answers), computed from the value itself with `ast.literal_eval`, so every row is
correct by construction. The bundled base model (trained on the Python stdlib) knows these tokens
but cannot answer (exact match 0%); LoRA learns the task in a few hundred steps on a CPU.

Why this task: the base model is tiny and briefly trained, so it has no reliable copying or
digit-by-digit lookup (LoRA could not learn to spell numbers in words or even to repeat a number
within 400 steps, while a full fine-tune could); this answer depends on which brackets, colons,
quotes and number shapes the input contains, which LoRA picks up quickly.

Deterministic (fixed seed), standard library only; the splits have disjoint inputs.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
from pathlib import Path

INSTRUCTION = "Name the type of this Python value."
SEED = 0
SPLITS = {"train": 2000, "val": 200, "test": 200}
WORDS = ["alpha", "beta", "gamma", "delta", "name", "path", "key", "value", "data", "item", "node",
         "file", "line", "text", "user", "host", "port", "mode", "size", "code"]
CONTAINERS = {"list": "[{}]", "tuple": "({})", "set": "{{{}}}"}


def scalar_literal(rng: random.Random, kind: str) -> str:
    """Source text of one int, float, str or bool literal."""
    if kind == "int":
        return str(rng.choice([rng.randint(0, 9), rng.randint(10, 999), -rng.randint(1, 99)]))
    if kind == "float":
        return rng.choice([
            f"{rng.uniform(-99, 99):.{rng.randint(1, 3)}f}",
            f"{rng.randint(0, 9)}.0",
            f"{rng.randint(1, 9)}e-{rng.randint(1, 9)}",
        ])
    if kind == "str":
        quote = rng.choice("'\"")
        return quote + rng.choice(WORDS) + quote
    return rng.choice(["True", "False"])


def random_literal(rng: random.Random) -> str:
    """A scalar, or a homogeneous non-empty list, tuple, set or dict literal."""
    shape = rng.choice(["scalar", "list", "tuple", "set", "dict"])
    if shape == "scalar":  # no bool: only two inputs exist
        return scalar_literal(rng, rng.choice(["int", "float", "str"]))
    if shape == "dict":
        key, value = rng.choice(["int", "str"]), rng.choice(["int", "float", "str", "bool"])
        items = [f"{scalar_literal(rng, key)}: {scalar_literal(rng, value)}" for _ in range(rng.randint(1, 3))]
        return "{" + ", ".join(items) + "}"
    kinds = ["int", "float", "str"] if shape == "set" else ["int", "float", "str", "bool"]
    kind = rng.choice(kinds)
    items = [scalar_literal(rng, kind) for _ in range(rng.randint(2, 4))]
    return CONTAINERS[shape].format(", ".join(items))


def describe(value: object) -> str:
    """The answer for a value: `int`, `list of str`, `dict of int to bool`, ..."""
    if isinstance(value, dict):
        (key,) = {type(k).__name__ for k in value}
        (val,) = {type(v).__name__ for v in value.values()}
        return f"dict of {key} to {val}"
    if isinstance(value, (list, tuple, set)):
        (item,) = {type(v).__name__ for v in value}  # homogeneous by construction
        return f"{type(value).__name__} of {item}"
    return type(value).__name__


def make_splits(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits of distinct random literals, as alpaca rows."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < sum(SPLITS.values()):
        text = random_literal(rng)
        if text not in seen:
            seen.add(text)
            rows.append({"instruction": INSTRUCTION, "input": text, "output": describe(ast.literal_eval(text))})
    splits, start = {}, 0
    for name, size in SPLITS.items():
        splits[name] = rows[start : start + size]
        start += size
    return splits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in make_splits().items():
        path = args.out / f"task_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
