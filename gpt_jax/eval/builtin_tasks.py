"""The shipped offline tasks, generated deterministically from text every machine has or is given.

- `stdlib_nextline` (multiple choice, 4 choices): which line comes next in a Python source file?
  Drawn from the running interpreter's standard library, only from the files wholly inside the
  val split of the `pystdlib` corpus (the last data.val_fraction = 10% of its byte stream, files
  in gpt_jax/data/corpora.py's order), so a model trained on it (the quickstart) never trained on
  these lines. Counted in bytes, the quickstart's byte tokenizer's tokens; another tokenizer
  splits its own token stream at a slightly different place. The context is the text from up to 6
  non-blank lines before the answer (blank lines kept, ≤ 100 characters, ending with its
  newline: the quickstart sees 128 bytes); the choices are the real next non-blank line and 3
  lines of other val files of a length within a factor of 2 (each with its indentation, without
  its newline), shuffled. The delimiter is "": the continuation is the line itself. The
  examples depend on the Python version (its stdlib), as the corpus does: the description names
  it.
- `shakespeare_cloze` (completion): the last word of a line of Tiny Shakespeare, LAMBADA-style.
  Needs the text (`source`, e.g. a copy of char-rnn's input.txt); from its last 10% of characters
  only, the val split of the shakespeare_char recipe (a char tokenizer: one token a character).
  The context is whole lines (≤ 200 characters) up to the word, without the space before it; the
  target is the word (letters only, ≥ 3 of them; a speaker's name line, ending with ":", is
  skipped), after the delimiter " ".

Train examples (the few-shot pool) come from other files (stdlib) or an earlier part of the text
(Shakespeare) than the test examples, so a prompt's shots never show a test answer.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import pathlib
import platform
import re
import sysconfig
from collections.abc import Callable

import numpy as np

from gpt_jax.data import corpora
from gpt_jax.eval.tasks import COMPLETION, MULTIPLE_CHOICE, Example, Task

# Name → one-line description of each built-in task.
BUILTIN = {
    "stdlib_nextline": "multiple choice (4): the next line of a Python stdlib file from the "
                       "pystdlib corpus's val split (offline).",
    "shakespeare_cloze": "completion: the last word of a line of Tiny Shakespeare's val split "
                         "(needs the text as the source).",
}
TAKES_SOURCE = ("shakespeare_cloze",)  # The built-in tasks made from a text given as the source.
VAL_FRACTION = 0.1  # configs/base.py's data.val_fraction: the corpora's split.
SEED = 0  # Fixed: a built-in task is the same everywhere (for one Python version and text).

# stdlib_nextline.
_MAX_CONTEXT_LINES = 6  # Non-blank lines before the answer.
_MAX_CONTEXT_CHARS = 100  # The quickstart model sees 128 bytes: context and answer mostly fit.
_MIN_LINE_CHARS = 8  # Without indentation; shorter lines ("else:", ")") are trivial to guess.
_MAX_LINE_CHARS = 80
_NUM_CHOICES = 4
_MIN_SIMILAR = 8  # Lines of a similar length needed to pick distractors from.
_TRAIN_SHARE = 0.25  # Of the candidate lines, in whole files, for the few-shot pool.

# shakespeare_cloze.
_CLOZE_CONTEXT_CHARS = 200
_LAST_WORD = re.compile(r" ([A-Za-z]{3,})[^A-Za-z]*$")


def make(name: str, source: str | None = None) -> Task:
    """Returns the built-in task `name` (see BUILTIN); `source` is the text file that
    shakespeare_cloze is made from (the other takes none)."""
    makers: dict[str, Callable[[str | None], Task]] = {
        "stdlib_nextline": _stdlib_nextline_task, "shakespeare_cloze": _shakespeare_cloze_task}
    if name not in makers:
        raise ValueError(f"unknown built-in task {name!r}; valid names: {', '.join(BUILTIN)}.")
    return makers[name](source)


def _stdlib_nextline_task(source: str | None) -> Task:
    if source is not None:
        raise ValueError(f"stdlib_nextline is made from the Python stdlib and takes no source "
                         f"({source}); drop it.")
    return stdlib_nextline()


def _shakespeare_cloze_task(source: str | None) -> Task:
    if source is None:
        raise ValueError("shakespeare_cloze is made from Tiny Shakespeare: give its text file as "
                         "the task source (e.g. a copy of char-rnn's tinyshakespeare input.txt).")
    return shakespeare_cloze(source)


@functools.cache
def pystdlib_split(val_fraction: float = VAL_FRACTION
                   ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The pystdlib corpus's files by split, as the byte tokenizer divides it: (the stdlib-relative
    paths of the files with a byte in the train split, ((path, text) of each file wholly in the
    val split)). Cached: listing the stdlib takes most of a second."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in corpora.pystdlib_files():
        data = path.read_bytes()
        try:  # As corpora._load_files: a file that is not UTF-8 is not in the corpus.
            docs.append((path.relative_to(root).as_posix(), data.decode("utf-8"), len(data)))
        except UnicodeDecodeError:
            continue
    total = sum(size for _, _, size in docs) + len(docs) - 1  # Joined with "\n".
    num_train = int(total * (1 - val_fraction))  # shards.write_meta's split.
    train, val, start = [], [], 0
    for rel, text, size in docs:
        if start >= num_train:
            val.append((rel, text))
        else:
            train.append(rel)
        start += size + 1
    return tuple(train), tuple(val)


def stdlib_nextline(num_train: int = 200, num_test: int = 2000, seed: int = SEED) -> Task:
    """The stdlib_nextline task (module docstring): `num_train` few-shot and `num_test` scored
    examples, drawn with `seed`."""
    _, val = pystdlib_split()
    rng = np.random.default_rng(seed)
    files = [_SourceFile(rel, text) for rel, text in val]
    pool = _LinePool(files)
    # Whole files go to the few-shot pool until it holds _TRAIN_SHARE of the candidates.
    candidates = [f.candidates() for f in files]
    total, train_files, in_train = sum(map(len, candidates)), set(), 0
    for i in rng.permutation(len(files)):
        if in_train >= _TRAIN_SHARE * total:
            break
        train_files.add(int(i))
        in_train += len(candidates[i])
    splits = []
    for split, count in (("train", num_train), ("test", num_test)):
        positions = [(i, j) for i, c in enumerate(candidates)
                     if (i in train_files) == (split == "train") for j in c]
        examples, taken = [], {}
        for p in rng.permutation(len(positions)):
            if len(examples) == count:
                break
            i, j = positions[p]
            # Apart from the examples taken, so that no two share a line.
            if any(abs(j - other) <= _MAX_CONTEXT_LINES for other in taken.get(i, ())):
                continue
            if (example := _nextline_example(files, i, j, pool, rng)) is not None:
                examples.append(example)
                taken.setdefault(i, []).append(j)
        if len(examples) < count:
            raise ValueError(f"stdlib_nextline found {len(examples)} {split} examples of the "
                             f"{count} asked for in this Python's stdlib; ask for fewer.")
        splits.append(tuple(examples))
    description = (f"Next line of a Python {platform.python_version()} stdlib file: "
                   f"{len(files)} files of the pystdlib corpus's val split "
                   f"({len(train_files)} for few-shot examples).")
    return Task(name="stdlib_nextline", kind=MULTIPLE_CHOICE, train=splits[0], test=splits[1],
                delimiter="", separator="\n\n", description=description)


def _usable(line: str) -> bool:
    """Whether a line can be an answer or a distractor: not trivial, not long, plain text."""
    return (len(line.strip()) >= _MIN_LINE_CHARS and len(line) <= _MAX_LINE_CHARS
            and "\r" not in line and "\x0c" not in line)


class _SourceFile:
    """A val file's lines and where its non-blank ones are."""

    def __init__(self, rel: str, text: str):
        self.rel = rel
        self.lines = text.split("\n")
        self.nonblank = [i for i, line in enumerate(self.lines) if line.strip()]

    def candidates(self) -> list[int]:
        """Indices into `nonblank` of the lines that could be answers (one line before them)."""
        return [j for j in range(1, len(self.nonblank)) if _usable(self.lines[self.nonblank[j]])]

    def context(self, j: int) -> str | None:
        """The text before non-blank line j: from up to _MAX_CONTEXT_LINES non-blank lines back,
        as long as it fits _MAX_CONTEXT_CHARS; None if not even one line fits."""
        end = self.nonblank[j]
        for k in range(min(_MAX_CONTEXT_LINES, j), 0, -1):
            text = "\n".join(self.lines[self.nonblank[j - k]:end]) + "\n"
            if len(text) <= _MAX_CONTEXT_CHARS:
                return None if "\r" in text or "\x0c" in text else text
        return None


class _LinePool:
    """The usable distinct lines of all val files, sorted by length."""

    def __init__(self, files: list[_SourceFile]):
        first_file: dict[str, int] = {}
        for i, f in enumerate(files):
            for line in f.lines:
                if _usable(line):
                    first_file.setdefault(line, i)
        self.lines = sorted((len(line), line, i) for line, i in first_file.items())
        self.lengths = [n for n, _, _ in self.lines]

    def distractors(self, line: str, file: int, count: int, rng: np.random.Generator
                    ) -> list[str] | None:
        """`count` distinct lines of other files than `file`, of a length within a factor of 2
        of `line`'s, none equal to it (stripped); None if there are not enough."""
        lo = bisect.bisect_left(self.lengths, (len(line) + 1) // 2)
        hi = bisect.bisect_right(self.lengths, 2 * len(line))
        if hi - lo < _MIN_SIMILAR:
            return None
        seen, out = {line.strip()}, []
        for _ in range(20 * count):  # Enough draws: most are accepted.
            _, other, other_file = self.lines[int(rng.integers(lo, hi))]
            if other_file != file and other.strip() not in seen:
                seen.add(other.strip())
                out.append(other)
                if len(out) == count:
                    return out
        return None


def _nextline_example(files: list[_SourceFile], i: int, j: int, pool: _LinePool,
                      rng: np.random.Generator) -> Example | None:
    """The example whose answer is non-blank line j of file i, or None if it cannot be made."""
    f = files[i]
    context = f.context(j)
    if context is None:
        return None
    answer = f.lines[f.nonblank[j]]
    distractors = pool.distractors(answer, i, _NUM_CHOICES - 1, rng)
    if distractors is None:
        return None
    order = rng.permutation(_NUM_CHOICES)
    choices = [([answer, *distractors])[k] for k in order]
    return Example(context=context, choices=tuple(choices), label=int(np.argmax(order == 0)),
                   id=f"{f.rel}:{f.nonblank[j] + 1}")


def shakespeare_cloze(source: str | pathlib.Path, num_train: int = 100, num_test: int = 500,
                      seed: int = SEED) -> Task:
    """The shakespeare_cloze task (module docstring) from the text file `source`: `num_train`
    few-shot and `num_test` scored examples, drawn with `seed`."""
    path = pathlib.Path(source)
    if not path.is_file():
        raise ValueError(f"shakespeare_cloze's source {source} is not a file; give the Tiny "
                         "Shakespeare text file.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"shakespeare_cloze's source {source} is not UTF-8 text ({e.reason}); "
                         "give the Tiny Shakespeare text file.") from None
    val_start = int(len(text) * (1 - VAL_FRACTION))  # nanoGPT's shakespeare_char split.
    # The first line wholly in the val split.
    start = val_start if val_start == 0 or text[val_start - 1] == "\n" else (
        text.find("\n", val_start) + 1 or len(text))
    line_starts, candidates = [], []
    number = text.count("\n", 0, start) + 1
    for line in text[start:].split("\n"):
        line_starts.append(start)
        match = _LAST_WORD.search(line)
        if match and not line.rstrip().endswith(":"):
            word_at = start + match.start(1)
            # Whole lines that fit before the word, the space before it left to the delimiter.
            k = bisect.bisect_left(line_starts, word_at - 1 - _CLOZE_CONTEXT_CHARS)
            if k < len(line_starts) and text[line_starts[k]:word_at - 1].strip():
                candidates.append((line_starts[k], word_at - 1, match.group(1), number))
        start += len(line) + 1
        number += 1
    # The few-shot pool comes from the first 20% of the candidates, the scored examples from the
    # text after it: no test context shows a few-shot answer, nor the other way round.
    cut = len(candidates) // 5
    train = candidates[:cut]
    end_of_train = train[-1][1] + 1 + len(train[-1][2]) if train else 0
    test = [c for c in candidates[cut:] if c[0] >= end_of_train]
    if len(train) < num_train or len(test) < num_test:
        raise ValueError(f"shakespeare_cloze's source {source} gives {len(train)} few-shot and "
                         f"{len(test)} test candidates, fewer than {num_train} and {num_test}; "
                         "give the whole Tiny Shakespeare text (1.1 MB).")
    rng = np.random.default_rng(seed)
    splits = []
    for pool, count in ((train, num_train), (test, num_test)):
        picked = sorted(rng.choice(len(pool), size=count, replace=False))
        # Leading blank lines say nothing: the context starts at its first line of text.
        splits.append(tuple(Example(context=text[pool[p][0]:pool[p][1]].lstrip("\n"),
                                    target=pool[p][2], id=f"{path.name}:{pool[p][3]}")
                            for p in picked))
    digest = hashlib.sha256(data).hexdigest()[:16]
    description = (f"Last word of a line of Tiny Shakespeare's val split (the last "
                   f"{VAL_FRACTION:.0%} of {path.name}, sha256 {digest}…), LAMBADA-style.")
    return Task(name="shakespeare_cloze", kind=COMPLETION, train=splits[0], test=splits[1],
                delimiter=" ", separator="\n\n", description=description)
