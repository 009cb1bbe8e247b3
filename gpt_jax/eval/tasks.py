"""Tasks scored by log-likelihood: the task file format, loading, k-shot prompts and metrics.

A task is multiple choice (which of several continuations does the model find likeliest?) or
completion (is the target the model's greedy continuation, LAMBADA-style, and how likely is it?).
Either way every question becomes (context, continuation) pairs scored by
`Scorer.loglikelihood` (gpt_jax/eval/scoring.py), as lm-evaluation-harness scores its
`multiple_choice` and `loglikelihood` tasks.

Task files (JSONL, UTF-8): one JSON object per line; blank lines are skipped.

- An optional first line, the header: {"task": NAME, "description": TEXT, "delimiter": TEXT,
  "separator": TEXT}. Only "task" is required in it; the name defaults to the file's stem, the
  description to "", the delimiter to " " and the separator to "\\n\\n" (lm-eval's defaults).
- Then one example per line, all of one kind:
    multiple choice   {"context": TEXT, "choices": [TEXT, TEXT, ...], "label": INDEX}
    completion        {"context": TEXT, "target": TEXT}
  and in either, optionally "split": "train" (a few-shot example, never scored) or "test" (scored;
  the default), and "id": TEXT (where the example came from; informational). The context and every
  choice or target are non-empty; there are at least two choices and the label (from 0) is one of
  their indices. At least one example is a test one.

For example, a two-line file of a task whose answers follow their question after a space:

    {"task": "capitals", "delimiter": " "}
    {"context": "The capital of France is", "choices": ["Paris", "Rome"], "label": 0}

Scoring: the continuation of a choice (or target) is delimiter + choice, so the model sees
"The capital of France is" then " Paris". A k-shot prompt puts k train examples, each written as
context + delimiter + answer, before the test context, every piece joined by the separator
(lm-eval's target_delimiter and fewshot_delimiter). The k examples are drawn per test example
from its index and a seed, so a test example's prompt does not depend on the others or on
`limit`. The pair is tokenized as lm-eval's causal models do (`encode_pair`: the context's
trailing whitespace moves to the continuation; the whole text is encoded and split after the
context's tokens), so the adapter (lm_eval_adapter.py) and this harness score the same tokens.

Metrics, over the n scored examples:
- multiple choice: acc (the choice of the highest log-likelihood is the label), acc_norm (the same
  with each log-likelihood divided by the length of its choice in characters, delimiter not
  counted, so long choices are not penalised for being long: lm-eval 0.4's acc_norm, so the two
  harnesses agree), and chance (the mean of 1/number of choices).
- completion: exact_match (the target is the greedy continuation, every token the argmax) and
  loglikelihood (the mean over examples of the target's summed log-probability, in nats).
Each rate p comes with its standard error sqrt(p (1 - p) / (n - 1)) (lm-eval's mean_stderr of
0/1 scores), so n ≥ 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from absl import logging

from gpt_jax.data.tokenizers import Tokenizer

MULTIPLE_CHOICE = "multiple_choice"
COMPLETION = "completion"
KINDS = (MULTIPLE_CHOICE, COMPLETION)
SPLITS = ("train", "test")
DEFAULT_DELIMITER = " "  # lm-eval's target_delimiter.
DEFAULT_SEPARATOR = "\n\n"  # lm-eval's fewshot_delimiter.
DEFAULT_SEED = 1234  # lm-eval's fewshot seed.

_HEADER_KEYS = ("task", "description", "delimiter", "separator")
_EXAMPLE_KEYS = ("context", "choices", "label", "target", "split", "id")


class Scorer(Protocol):
    """What evaluate_task needs of gpt_jax.eval.scoring.Scorer."""

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                      ) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether it is the greedy one) per
        (context ids, continuation ids) request."""
        ...


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: a context and either `choices` + `label` (multiple choice) or `target`."""

    context: str
    choices: tuple[str, ...] | None = None
    label: int | None = None
    target: str | None = None
    id: str | None = None

    @property
    def kind(self) -> str:
        return MULTIPLE_CHOICE if self.choices is not None else COMPLETION

    @property
    def answer(self) -> str:
        """The right choice, or the target."""
        if self.choices is not None:
            return self.choices[self.label]
        return self.target

    def to_json(self, split: str) -> dict[str, Any]:
        """The example as a task-file line's object (see the module docstring)."""
        row: dict[str, Any] = {"context": self.context}
        if self.choices is not None:
            row.update(choices=list(self.choices), label=self.label)
        else:
            row["target"] = self.target
        row["split"] = split
        if self.id is not None:
            row["id"] = self.id
        return row


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: its examples (train: the few-shot pool; test: scored) and how to format them."""

    name: str
    kind: str  # MULTIPLE_CHOICE | COMPLETION.
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    delimiter: str = DEFAULT_DELIMITER  # Between a context and its answer.
    separator: str = DEFAULT_SEPARATOR  # Between few-shot examples and before the test context.
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}.")
        if not self.test:
            raise ValueError(f"task {self.name!r} has no test examples; give at least one example "
                             'without "split" (or with "split": "test").')
        for split, examples in (("train", self.train), ("test", self.test)):
            for i, example in enumerate(examples):
                if example.kind != self.kind:
                    raise ValueError(f"task {self.name!r}: {split} example {i} is {example.kind}, "
                                     f"the task {self.kind}; one task holds one kind.")


def _problem(row: Any) -> str | None:
    """What is wrong with a task-file example object, with the fix; None if it is good."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}; write one object per line"
    unknown = sorted(set(row) - set(_EXAMPLE_KEYS))
    if unknown:
        return (f"unknown key(s) {', '.join(map(repr, unknown))}; an example has only "
                f"{', '.join(_EXAMPLE_KEYS)}")
    context = row.get("context")
    if not isinstance(context, str) or not context:
        return 'needs a non-empty string "context"'
    has_choices, has_target = "choices" in row, "target" in row
    if has_choices == has_target:
        return ('needs either "choices" and "label" (multiple choice) or "target" (completion), '
                "not both or neither")
    if has_choices:
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            return '"choices" must be a list of at least 2 strings'
        if not all(isinstance(c, str) and c for c in choices):
            return '"choices" must all be non-empty strings'
        label = row.get("label")
        if not isinstance(label, int) or isinstance(label, bool):
            return (f'needs an integer "label", the index of the right choice (0 to '
                    f"{len(choices) - 1})")
        if not 0 <= label < len(choices):
            return f'"label" {label} is out of range: it indexes the {len(choices)} choices from 0'
    elif "label" in row:
        return 'a completion example ("target") has no "label"'
    elif not isinstance(row["target"], str) or not row["target"]:
        return '"target" must be a non-empty string'
    if row.get("split", "test") not in SPLITS:
        return f'"split" must be "train" or "test", got {row["split"]!r}'
    if "id" in row and not isinstance(row["id"], str):
        return '"id" must be a string'
    return None


def _header_problem(row: dict[str, Any]) -> str | None:
    if "task" not in row:
        return 'a header line needs "task" (the task\'s name); an example needs "context"'
    unknown = sorted(set(row) - set(_HEADER_KEYS))
    if unknown:
        return (f"unknown header key(s) {', '.join(map(repr, unknown))}; the header has only "
                f"{', '.join(_HEADER_KEYS)}")
    for key in _HEADER_KEYS:
        if key in row and not isinstance(row[key], str):
            return f'header "{key}" must be a string'
    if not row["task"]:
        return 'header "task" must be a non-empty name'
    return None


def parse_task(text: str, where: str, default_name: str) -> Task:
    """Returns the task in the JSONL `text` (the module docstring's format); errors name
    `where`:LINE. `default_name` names a task without a header."""
    header: dict[str, Any] = {}
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    kind = first_line = None
    seen_line = False
    # Lines end at "\n" only: str.splitlines would also split at U+2028 and others, which JSON
    # strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        at = f"{where}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{at}: not valid JSON ({e.msg} at column {e.colno}); write one JSON "
                             "object per line.") from None
        if isinstance(row, dict) and "context" not in row and set(row) & set(_HEADER_KEYS):
            if seen_line:
                raise ValueError(f'{at}: a header ("task" key) must be the first line; move it '
                                 "to the top.")
            if problem := _header_problem(row):
                raise ValueError(f"{at}: {problem}.")
            header = row
            seen_line = True
            continue
        seen_line = True
        if problem := _problem(row):
            raise ValueError(f"{at}: {problem}.")
        example = Example(context=row["context"],
                          choices=tuple(row["choices"]) if "choices" in row else None,
                          label=row.get("label"), target=row.get("target"), id=row.get("id"))
        if kind is None:
            kind, first_line = example.kind, number
        elif example.kind != kind:
            raise ValueError(f"{at}: a {example.kind} example in a {kind} task (line {first_line} "
                             "is one); a task file holds one kind of example.")
        splits[row.get("split", "test")].append(example)
    name = header.get("task", default_name)
    if not splits["test"]:
        what = "examples" if kind is None else "test examples"
        raise ValueError(f"{where}: no {what}; a task file needs at least one example without "
                         '"split" or with "split": "test".')
    return Task(name=name, kind=kind, train=tuple(splits["train"]), test=tuple(splits["test"]),
                delimiter=header.get("delimiter", DEFAULT_DELIMITER),
                separator=header.get("separator", DEFAULT_SEPARATOR),
                description=header.get("description", ""))


def load_task_file(path: str | pathlib.Path) -> Task:
    """Returns the task in the JSONL file `path` (format: the module docstring)."""
    path = pathlib.Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the task "
                         "file as UTF-8.") from None
    return parse_task(text, str(path), path.stem)


def load_task(path_or_name: str, source: str | None = None) -> Task:
    """Returns a built-in task by name (gpt_jax.eval.builtin_tasks.BUILTIN; `source` is the
    file that some generate from), else the task in the JSONL file `path_or_name`."""
    from gpt_jax.eval import builtin_tasks  # It builds Tasks: imported here, not at the top.

    if path_or_name in builtin_tasks.BUILTIN:
        return builtin_tasks.make(path_or_name, source)
    path = pathlib.Path(path_or_name)
    if not path.is_file():
        names = ", ".join(builtin_tasks.BUILTIN)
        what = "a folder" if path.is_dir() else "no such file"
        raise ValueError(f"task {path_or_name!r} is neither a built-in task ({names}) nor a task "
                         f"file ({what}); give a built-in name or a JSONL task file.")
    if source is not None:
        raise ValueError(f"a source ({source}) is only for the built-in tasks that generate from "
                         f"one; {path_or_name} is a task file: drop the source.")
    return load_task_file(path)


class _NoScores:
    """A scorer that scores nothing (every log-likelihood 0): check_task's."""

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                      ) -> list[tuple[float, bool]]:
        return [(0.0, False)] * len(requests)


def check_task(tokenizer: Tokenizer, task: Task, num_fewshot: int = 0,
               separator: str | None = None, delimiter: str | None = None,
               seed: int = DEFAULT_SEED, limit: int | None = None) -> None:
    """Raises evaluate_task's ValueError for these settings (too many shots, text the
    tokenizer cannot encode, too few examples) without scoring: before a model is loaded or a
    training run compiles."""
    evaluate_task(_NoScores(), tokenizer, task, num_fewshot, separator, delimiter, seed, limit)


def load_tasks(names: Sequence[str], source: str | None = None) -> list[Task]:
    """The tasks `names` (load_task each), `source` given to the built-ins made from one; a
    ValueError if a source is given and none of them takes it, or two share a name (their
    metrics would share keys)."""
    from gpt_jax.eval import builtin_tasks

    if source is not None and not any(n in builtin_tasks.TAKES_SOURCE for n in names):
        raise ValueError(f"a task source ({source}) is for the built-in tasks made from one "
                         f"({', '.join(builtin_tasks.TAKES_SOURCE)}); none is asked for: drop it.")
    loaded = [load_task(n, source if n in builtin_tasks.TAKES_SOURCE else None) for n in names]
    seen = [t.name for t in loaded]
    if len(set(seen)) < len(seen):
        raise ValueError(f"two tasks are named {max(seen, key=seen.count)!r}; give each task "
                         "once (or rename one in its file's header).")
    return loaded


def to_jsonl(task: Task) -> str:
    """The task as a task file's text (header first), which load_task_file reads back."""
    header = {"task": task.name, "description": task.description, "delimiter": task.delimiter,
              "separator": task.separator}
    rows = [header] + [e.to_json("train") for e in task.train] + [e.to_json("test")
                                                                  for e in task.test]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _shots(task: Task, k: int, seed: int, index: int | None) -> list[Example]:
    """k distinct train examples in a random order, drawn from (seed, index)."""
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"the number of few-shot examples must be an integer ≥ 0, got {k!r}.")
    if k > len(task.train):
        raise ValueError(f"{k}-shot needs {k} train examples, and task {task.name!r} has "
                         f"{len(task.train)}; ask for at most {len(task.train)}.")
    if seed < 0:
        raise ValueError(f"the few-shot seed must be ≥ 0, got {seed}.")
    if k == 0:
        return []
    rng = np.random.default_rng([seed] if index is None else [seed, index])
    return [task.train[i] for i in rng.choice(len(task.train), size=k, replace=False)]


def _join(shots: list[Example], query: str, separator: str, delimiter: str) -> str:
    return separator.join([e.context + delimiter + e.answer for e in shots] + [query])


def fewshot_prompt(task: Task, index: int, k: int, separator: str | None = None,
                   delimiter: str | None = None, seed: int = DEFAULT_SEED) -> str:
    """The context scored for test example `index` of `task` with `k` few-shot examples: k train
    examples drawn from (seed, index), each "context + delimiter + answer", then the test
    context, joined by `separator`. None: the task's delimiter and separator."""
    separator = task.separator if separator is None else separator
    delimiter = task.delimiter if delimiter is None else delimiter
    shots = _shots(task, k, seed, index)
    return _join(shots, task.test[index].context, separator, delimiter)


def fewshot_text(task: Task, query: str, k: int, separator: str | None = None,
                 delimiter: str | None = None, seed: int = DEFAULT_SEED) -> str:
    """`query` after `k` train examples of `task` drawn from `seed`, formatted as
    fewshot_prompt's: a prompt for sampling a continuation of `query` the task's way."""
    separator = task.separator if separator is None else separator
    delimiter = task.delimiter if delimiter is None else delimiter
    return _join(_shots(task, k, seed, None), query, separator, delimiter)


def mean_stderr(p: float, n: int) -> float:
    """The standard error of the mean of n 0/1 scores whose mean is p: sqrt(p (1 - p) / (n - 1)),
    lm-eval's mean_stderr (the sample standard deviation / sqrt(n))."""
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 examples, got {n}.")
    return math.sqrt(p * (1.0 - p) / (n - 1))


def _encode(tokenizer: Tokenizer, text: str, what: str) -> np.ndarray:
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        raise ValueError(f"{what} cannot be tokenized: {e}") from None
    if len(ids) == 0:
        raise ValueError(f"{what} is no tokens: {text!r}; give it some text.")
    return ids


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, what: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """(context ids, continuation ids) as lm-eval's causal models make them (TemplateLM's
    _encode_pair), so the two harnesses score the same tokens: the context's trailing whitespace
    moves to the continuation, the whole text is encoded and split after the context's tokens.
    A context left empty is the tokenizer's end-of-text token, or without one the continuation's
    first token (then not scored)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation, f"{what}'s text")
    if context:
        n = len(_encode(tokenizer, context, f"{what}'s context"))
        context_ids, continuation_ids = whole[:n], whole[n:]
    elif tokenizer.eot_id is not None:
        context_ids, continuation_ids = np.array([tokenizer.eot_id], whole.dtype), whole
    else:
        context_ids, continuation_ids = whole[:1], whole[1:]
    if len(continuation_ids) == 0:
        raise ValueError(f"{what}'s continuation {continuation!r} is no tokens of its own (the "
                         "tokenizer merged it into the context); give a non-empty answer.")
    return context_ids, continuation_ids


def evaluate_task(scorer: Scorer, tokenizer: Tokenizer, task: Task, num_fewshot: int = 0,
                  separator: str | None = None, delimiter: str | None = None,
                  seed: int = DEFAULT_SEED, limit: int | None = None) -> dict[str, Any]:
    """Scores the test examples of `task` (the first `limit` of them if given) with `scorer` in one
    loglikelihood call, `num_fewshot` train examples before each (fewshot_prompt).

    Returns {"task", "kind", "n", "num_fewshot"} and, for multiple choice, "acc", "acc_stderr",
    "acc_norm", "acc_norm_stderr", "chance"; for completion "exact_match",
    "exact_match_stderr", "loglikelihood" (metrics: the module docstring). None for the separator
    or delimiter: the task's own.
    """
    delimiter = task.delimiter if delimiter is None else delimiter
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be ≥ 1 (or None for all examples), got {limit}.")
    test = task.test if limit is None else task.test[:limit]
    n = len(test)
    if n < 2:
        raise ValueError(f"task {task.name!r} scores {n} test example(s); metrics with a standard "
                         "error need at least 2: raise the limit or add test examples.")
    requests, first = [], []  # first[i]: example i's first request.
    for i, example in enumerate(test):
        what = f"task {task.name!r} test example {i}"
        context = fewshot_prompt(task, i, num_fewshot, separator, delimiter, seed)
        first.append(len(requests))
        answers = example.choices if example.choices is not None else (example.target,)
        for answer in answers:
            requests.append(encode_pair(tokenizer, context, delimiter + answer,
                                        f"{what} (answer {answer!r})"))
    first.append(len(requests))
    logging.info("Task %s: scoring %d requests for %d examples (%d-shot).", task.name,
                 len(requests), n, num_fewshot)
    results = scorer.loglikelihood(requests)
    max_len = getattr(scorer, "max_len", None)
    if len(results) != len(requests):
        raise RuntimeError(f"the scorer answered {len(results)} of {len(requests)} requests.")
    logprobs = np.array([float(r[0]) for r in results], dtype=np.float64)
    greedy = np.array([bool(r[1]) for r in results])
    out: dict[str, Any] = {"task": task.name, "kind": task.kind, "n": n,
                           "num_fewshot": num_fewshot}
    if max_len is not None:  # Prompts cut from the left to fit: the shots lost first.
        out["truncated"] = float(np.mean([len(c) + len(t) > max_len + 1 for c, t in requests]))
    if task.kind == COMPLETION:
        exact = float(np.mean(greedy))
        out.update(exact_match=exact, exact_match_stderr=mean_stderr(exact, n),
                   loglikelihood=float(np.mean(logprobs)))
        return out
    lengths = np.array([len(c) for e in test for c in e.choices], dtype=np.float64)
    correct, correct_norm = [], []
    for i, example in enumerate(test):
        scores = logprobs[first[i]:first[i + 1]]
        correct.append(int(np.argmax(scores)) == example.label)
        correct_norm.append(int(np.argmax(scores / lengths[first[i]:first[i + 1]]))
                            == example.label)
    acc, acc_norm = float(np.mean(correct)), float(np.mean(correct_norm))
    out.update(acc=acc, acc_stderr=mean_stderr(acc, n), acc_norm=acc_norm,
               acc_norm_stderr=mean_stderr(acc_norm, n),
               chance=float(np.mean([1.0 / len(e.choices) for e in test])))
    return out
