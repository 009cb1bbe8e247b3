"""Built-in sequence-to-sequence tasks that need no download (`data.task`), each a deterministic
function of (number of examples, seed): the same arguments give the same examples everywhere.

  addition  "4821+397" → "5218": operands of 1–4 digits (digit counts drawn uniformly, so short
            and long operands are equally common); the answer needs carries across the source.
  sort      "k 42 07 r 93 p 15" → "07 15 42 93": 4–10 two-digit numbers among 1–4 distractor
            letters; the target keeps the numbers, ascending, and drops the letters.
  docsig    the first paragraph of a docstring of a function of the running Python's standard
            library → that function's signature, e.g. "Return the number of items." →
            "def count(self, value)". From the same files as the quickstart corpus (pystdlib);
            the val split is the functions of a tenth of the files (by a hash of the file
            name), so no val function's module was seen in training.

A task returns (train, val) lists of {"source": …, "target": …} records. Addition and sort hold
out a tenth of all possible sources (by a hash of the source), so no val source occurs in train;
train examples are drawn as the task's distribution draws them (short sums recur).
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Callable

import numpy as np

from gpt_jax.data import corpora

Record = dict[str, str]


def addition(num_train: int, num_val: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Sums of two numbers of 1–4 digits."""
    rng = np.random.default_rng((seed, 1))

    def draw() -> tuple[str, str]:
        a, b = (int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10**d))
                for d in rng.integers(1, 5, size=2))
        return f"{a}+{b}", str(a + b)

    return _distinct(draw, num_train, num_val)


def sort(num_train: int, num_val: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Two-digit numbers among distractor letters → the numbers, sorted."""
    rng = np.random.default_rng((seed, 2))
    letters = "abcdefghijklmnopqrstuvwxyz"

    def draw() -> tuple[str, str]:
        numbers = [f"{n:02d}" for n in rng.integers(0, 100, size=int(rng.integers(4, 11)))]
        noise = [letters[i] for i in rng.integers(0, 26, size=int(rng.integers(1, 5)))]
        items = numbers + noise
        order = rng.permutation(len(items))
        return " ".join(items[i] for i in order), " ".join(sorted(numbers))

    return _distinct(draw, num_train, num_val)


def _held_out(source: str) -> bool:
    """A tenth of all possible sources validate, chosen by a hash of the source: the split does
    not depend on what was drawn, so easy (short) problems are held out in the same proportion
    as hard ones."""
    return hashlib.sha256(source.encode()).digest()[0] < 26


def _distinct(draw: Callable[[], tuple[str, str]], num_train: int, num_val: int
              ) -> tuple[list[Record], list[Record]]:
    """Draws until there are `num_train` train examples (as drawn: frequent sources recur, as in
    the task's distribution) and `num_val` distinct held-out ones."""
    val: dict[str, str] = {}
    train: list[Record] = []
    tries = 0
    while len(val) < num_val or len(train) < num_train:
        source, target = draw()
        if _held_out(source):
            if len(val) < num_val:
                val.setdefault(source, target)
        elif len(train) < num_train:
            train.append({"source": source, "target": target})
        tries += 1
        if tries > 100 * (num_train + num_val + 10):
            raise ValueError(f"the task has too few distinct held-out examples for {num_val}; "
                             "ask for fewer examples.")
    return train, [{"source": s, "target": t} for s, t in val.items()]


def docsig(num_train: int, num_val: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Docstring → signature over the stdlib's documented functions. The stdlib fixes how many
    there are: at most `num_train` / `num_val` are kept (a seeded choice), fewer if it has fewer."""
    train: list[Record] = []
    val: list[Record] = []
    for path in corpora.pystdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # Test fixtures of bad syntax.
            continue
        held_out = _held_out(path.name)  # ~10% of the files (by name: machine-independent).
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                record = _docsig_record(node)
                if record is not None:
                    (val if held_out else train).append(record)
    rng = np.random.default_rng((seed, 3))
    return _subset(train, num_train, rng), _subset(val, num_val, rng)


def _docsig_record(node: ast.FunctionDef | ast.AsyncFunctionDef) -> Record | None:
    doc = ast.get_docstring(node)
    if not doc:
        return None
    first = " ".join(doc.split("\n\n")[0].split())  # The summary paragraph, on one line.
    if len(first) < 10 or not first.isascii():
        return None
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    signature = f"{keyword} {node.name}({ast.unparse(node.args)})"
    if not signature.isascii() or re.search(r"\s{2,}", signature):
        return None
    return {"source": first, "target": signature}


def _subset(records: list[Record], n: int, rng: np.random.Generator) -> list[Record]:
    if len(records) <= n:
        return records
    keep = np.sort(rng.choice(len(records), size=n, replace=False))
    return [records[i] for i in keep]


TASKS: dict[str, Callable[[int, int, int], tuple[list[Record], list[Record]]]] = {
    "addition": addition, "sort": sort, "docsig": docsig}


def make(name: str, num_train: int, seed: int) -> tuple[list[Record], list[Record]]:
    """The (train, val) records of task `name`: `num_train` train examples and a tenth as many
    (at least 100) val examples."""
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not one of {sorted(TASKS)}; pick one of those.")
    if num_train < 1:
        raise ValueError(f"the number of task examples ({num_train}) must be ≥ 1.")
    return TASKS[name](num_train, max(100, num_train // 10), seed)
