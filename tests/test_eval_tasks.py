"""Tests for gpt_jax.eval.tasks, gpt_jax.eval.builtin_tasks and tools/make_task.py.

The metrics are checked against a fake scorer whose scores are set by hand; one test runs the
real Scorer (gpt_jax.eval.scoring) on a tiny random GPT.
"""

import functools
import json
import math
import pathlib
import random
import re
import sysconfig

import numpy as np
import pytest

from gpt_jax.data import corpora
from gpt_jax.data.tokenizers import ByteTokenizer
from gpt_jax.eval import builtin_tasks, tasks

BYTES = ByteTokenizer()
MC_LINES = [
    {"task": "capitals", "description": "d", "delimiter": " ", "separator": "\n"},
    {"context": "France:", "choices": ["Paris", "Rome"], "label": 0, "split": "train"},
    {"context": "Italy:", "choices": ["Paris", "Rome"], "label": 1, "id": "x:2"},
    {"context": "Spain:", "choices": ["Madrid", "Rome", "Oslo"], "label": 0, "split": "test"},
]


def write_lines(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class FakeScorer:
    """Scores (context, continuation) from a table {(last line of the context, continuation):
    (logprob, greedy)}, decoding byte ids; records every call's requests."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def loglikelihood(self, requests):
        self.calls.append(requests)
        return [self.table[(BYTES.decode(c).split("\n")[-1], BYTES.decode(x))] for c, x in requests]


def mc_task(examples, train=(), delimiter=" ", separator="\n"):
    def example(e):
        return tasks.Example(context=e[0], choices=tuple(e[1]), label=e[2])
    return tasks.Task("t", tasks.MULTIPLE_CHOICE, tuple(map(example, train)),
                      tuple(map(example, examples)), delimiter, separator)


# --- Task files ---------------------------------------------------------------------------------

def test_load_task_file_and_round_trip(tmp_path):
    task = tasks.load_task(str(write_lines(tmp_path / "c.jsonl", [*MC_LINES, ""])))
    assert (task.name, task.kind, task.description) == ("capitals", "multiple_choice", "d")
    assert (task.delimiter, task.separator) == (" ", "\n")
    assert [e.context for e in task.train] == ["France:"]
    assert [e.context for e in task.test] == ["Italy:", "Spain:"]
    assert task.test[0] == tasks.Example("Italy:", ("Paris", "Rome"), 1, id="x:2")
    assert task.test[1].answer == "Madrid"
    again = tmp_path / "again.jsonl"
    again.write_text(tasks.to_jsonl(task))
    assert tasks.load_task_file(again) == task
    odd = tasks.Task("odd", tasks.COMPLETION, (), (
        tasks.Example("a\u2028b\x85\r\n", target="\u00e9\t"), tasks.Example("c", target="d")),
        "", "\f")
    again.write_text(tasks.to_jsonl(odd))  # Line breaks that are not "\n" stay in their line.
    assert tasks.load_task_file(again) == odd


def test_file_without_header_takes_defaults(tmp_path):
    path = write_lines(tmp_path / "words.jsonl", [{"context": "a b", "target": "c"},
                                                   {"context": "d e", "target": "f"}])
    task = tasks.load_task(str(path))
    assert (task.name, task.kind, task.delimiter, task.separator) == (
        "words", "completion", " ", "\n\n")
    assert [e.answer for e in task.test] == ["c", "f"] and not task.train


GOOD = {"context": "c", "choices": ["a", "b"], "label": 0}
MALFORMED = [
    (['{"context": "c", '], 1, "not valid JSON"),
    ([GOOD, "[1, 2]"], 2, "expected a JSON object"),
    ([{**GOOD, "lable": 1}], 1, "unknown key(s) 'lable'"),
    ([{"choices": ["a", "b"], "label": 0}], 1, 'non-empty string "context"'),
    ([{**GOOD, "context": ""}], 1, 'non-empty string "context"'),
    ([{**GOOD, "choices": []}], 1, "at least 2 strings"),
    ([{**GOOD, "choices": ["a"]}], 1, "at least 2 strings"),
    ([{**GOOD, "choices": ["a", ""]}], 1, "non-empty strings"),
    ([GOOD, {**GOOD, "label": 2}], 2, "out of range"),
    ([{**GOOD, "label": -1}], 1, "out of range"),
    ([{"context": "c", "choices": ["a", "b"]}], 1, 'integer "label"'),
    ([{**GOOD, "label": True}], 1, 'integer "label"'),
    ([{**GOOD, "target": "t"}], 1, "not both or neither"),
    ([{"context": "c"}], 1, "not both or neither"),
    ([{"context": "c", "target": ""}], 1, '"target" must be a non-empty string'),
    ([{"context": "c", "target": "t", "label": 0}], 1, 'has no "label"'),
    ([{**GOOD, "split": "val"}], 1, '"train" or "test"'),
    ([{**GOOD, "id": 3}], 1, '"id" must be a string'),
    ([GOOD, "", {"context": "c", "target": "t"}], 3, "line 1 is one"),
    ([GOOD, {"task": "late"}], 2, "must be the first line"),
    ([{"task": "t", "delimter": ""}], 1, "unknown header key(s) 'delimter'"),
    ([{"delimiter": ""}, GOOD], 1, 'header line needs "task"'),
    ([{"task": "t", "separator": 2}], 1, 'header "separator" must be a string'),
]


@pytest.mark.parametrize("rows, line, words", MALFORMED, ids=[m[2] for m in MALFORMED])
def test_malformed_lines_are_one_line_errors_naming_file_and_line(tmp_path, rows, line, words):
    path = write_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as e:
        tasks.load_task(str(path))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: ") and words in message, message


@pytest.mark.parametrize("rows", [[], [""], [{"task": "t"}], [{**GOOD, "split": "train"}]])
def test_no_test_examples(tmp_path, rows):
    path = write_lines(tmp_path / "empty.jsonl", rows)
    with pytest.raises(ValueError, match=r"empty\.jsonl: no (test )?examples.*\"split\": \"test\""):
        tasks.load_task(str(path))


def test_bad_names_sources_and_encodings(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in task .*stdlib_nextline.* nor a task "
                       "file .no such file"):
        tasks.load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="a folder"):
        tasks.load_task(str(tmp_path))
    path = write_lines(tmp_path / "ok.jsonl", [GOOD])
    with pytest.raises(ValueError, match="drop the source"):
        tasks.load_task(str(path), source="x.txt")
    with pytest.raises(ValueError, match="takes no source"):
        tasks.load_task("stdlib_nextline", source="x.txt")
    with pytest.raises(ValueError, match="give its text file"):
        tasks.load_task("shakespeare_cloze")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"context": "caf\xe9", "target": "x"}\n')
    with pytest.raises(ValueError, match="latin1.jsonl: not UTF-8"):
        tasks.load_task(str(tmp_path / "latin1.jsonl"))
    example = tasks.Example("c", target="t")
    with pytest.raises(ValueError, match="one task holds one kind"):
        tasks.Task("t", tasks.MULTIPLE_CHOICE, (), (example,))


# --- Few-shot prompts ---------------------------------------------------------------------------

def test_fewshot_prompts_are_deterministic_and_formatted():
    train = [(f"q{i}", [f"a{i}", "z"], 0) for i in range(6)]
    task = mc_task([("Q0", ["x", "y"], 0), ("Q1", ["x", "y"], 1)], train, delimiter="=",
                   separator=" | ")
    assert tasks.fewshot_prompt(task, 1, 0) == "Q1"
    prompt = tasks.fewshot_prompt(task, 1, 3, seed=7)
    parts = prompt.split(" | ")
    assert len(parts) == 4 and parts[-1] == "Q1"
    shots = [re.fullmatch(r"q(\d)=a\1", p) for p in parts[:3]]
    assert all(shots) and len({m.group(1) for m in shots}) == 3  # Three distinct examples.
    assert tasks.fewshot_prompt(task, 1, 3, seed=7) == prompt
    # Per (seed, index): other indices and seeds draw other examples (these do).
    assert tasks.fewshot_prompt(task, 0, 3, seed=7).split(" | ")[:3] != parts[:3]
    assert tasks.fewshot_prompt(task, 1, 3, seed=8) != prompt
    # The caller's separator and delimiter replace the task's.
    assert tasks.fewshot_prompt(task, 1, 1, separator="\n\n", delimiter=" ").startswith("q")
    assert re.fullmatch(r"q(\d) a\1\n\nQ1", tasks.fewshot_prompt(task, 1, 1, "\n\n", " "))
    assert len(set(tasks.fewshot_prompt(task, 0, 6, seed=s) for s in range(5))) > 1
    text = tasks.fewshot_text(task, "what?", 2, seed=3)
    assert text == tasks.fewshot_text(task, "what?", 2, seed=3) and text.endswith(" | what?")
    assert tasks.fewshot_text(task, "what?", 0) == "what?"
    with pytest.raises(ValueError, match="task 't' has 6; ask for at most 6"):
        tasks.fewshot_prompt(task, 0, 7)
    with pytest.raises(ValueError, match="≥ 0"):
        tasks.fewshot_text(task, "q", -1)


# --- Metrics ------------------------------------------------------------------------------------

def test_acc_and_acc_norm_by_hand():
    # Choices "a" (1 character) and "bbbb" (4): -2/1 < -3/4, so length normalisation (by the
    # choice's characters, lm-eval's acc_norm) turns example 0's wrong answer right, and
    # example 1's ("cc": -1.5/2 = -0.75 against "d": -1.2) too. Example 2 is right either way, 3
    # wrong.
    task = mc_task([("Q", ["a", "bbbb"], 1), ("R", ["cc", "d"], 0),
                    ("S", ["e", "ffff", "g"], 0), ("T", ["h", "i"], 1)])
    scorer = FakeScorer({("Q", " a"): (-2.0, True), ("Q", " bbbb"): (-3.0, False),
                         ("R", " cc"): (-1.5, False), ("R", " d"): (-1.2, True),
                         ("S", " e"): (-0.5, True), ("S", " ffff"): (-4.0, False),
                         ("S", " g"): (-1.0, False), ("T", " h"): (-1.0, True),
                         ("T", " i"): (-2.0, False)})
    result = tasks.evaluate_task(scorer, BYTES, task)
    assert result == pytest.approx({
        "task": "t", "kind": "multiple_choice", "n": 4, "num_fewshot": 0,
        "acc": 0.25, "acc_stderr": math.sqrt(0.25 * 0.75 / 3),
        "acc_norm": 0.75, "acc_norm_stderr": math.sqrt(0.25 * 0.75 / 3),
        "chance": (1 / 2 + 1 / 2 + 1 / 3 + 1 / 2) / 4})
    # One batched call; the continuation's tokens split from the whole text's.
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 9
    context, continuation = scorer.calls[0][1]
    assert list(context) == list(BYTES.encode("Q")) and list(continuation) == [32, 98, 98, 98, 98]
    # limit: the first examples only; at least 2 for a standard error.
    assert tasks.evaluate_task(scorer, BYTES, task, limit=2)["acc_norm"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        tasks.evaluate_task(scorer, BYTES, task, limit=1)


def test_fewshot_contexts_and_task_delimiter_reach_the_scorer():
    train = [(f"q{i}", [f"a{i}", "b"], 0) for i in range(4)]
    task = mc_task([("Q", ["x", "yy"], 0), ("R", ["x", "yy"], 1)], train, delimiter="")
    scorer = FakeScorer({(q, c): (-1.0, False) for q in "QR" for c in ("x", "yy")})
    result = tasks.evaluate_task(scorer, BYTES, task, num_fewshot=2, seed=5)
    # Equal log-likelihoods: acc takes the first choice, acc_norm the longer one.
    assert (result["acc"], result["acc_norm"], result["num_fewshot"]) == (0.5, 0.5, 2)
    contexts = [BYTES.decode(c) for c, _ in scorer.calls[0]]
    assert contexts == [tasks.fewshot_prompt(task, i, 2, seed=5) for i in (0, 0, 1, 1)]
    assert contexts[0].count("\n") == 2 and contexts[0] != contexts[2]


def test_completion_exact_match_and_loglikelihood():
    examples = tuple(tasks.Example(c, target=t) for c, t in (("A", "x"), ("B", "y"), ("C", "z")))
    task = tasks.Task("c", tasks.COMPLETION, (), examples)
    scorer = FakeScorer({("A", " x"): (-1.0, True), ("B", " y"): (-2.0, False),
                         ("C", " z"): (-3.0, True)})
    result = tasks.evaluate_task(scorer, BYTES, task)
    assert result == pytest.approx({"task": "c", "kind": "completion", "n": 3, "num_fewshot": 0,
                                    "exact_match": 2 / 3, "exact_match_stderr": 1 / 3,
                                    "loglikelihood": -2.0})


def test_stderr_is_lm_evals_mean_stderr():
    rng = random.Random(0)
    for n in (2, 3, 10, 57):
        scores = [rng.randint(0, 1) for _ in range(n)]
        mu = sum(scores) / n
        sample_stddev = math.sqrt(sum((x - mu) ** 2 for x in scores) / (n - 1))
        assert tasks.mean_stderr(mu, n) == pytest.approx(sample_stddev / math.sqrt(n))
    with pytest.raises(ValueError, match="at least 2"):
        tasks.mean_stderr(1.0, 1)


def test_real_scorer_on_a_tiny_gpt():
    """evaluate_task with gpt_jax.eval.scoring's Scorer agrees with the scorer's own scores. The
    model is test_eval_scoring's (1 layer, d 32, T 16, vocab 50, random parameters drawn in
    NumPy, no init to compile), so that the suite compiles its scoring program once."""
    scoring = pytest.importorskip("gpt_jax.eval.scoring")
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from configs import base
    from gpt_jax.data.tokenizers import CharTokenizer
    from gpt_jax.models import registry

    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model, c.data.seq_len = 1, 2, 32, 16
    model = registry.build(registry.hyperparameters(c, 50))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
                          nn.meta.unbox(shapes["params"]))
    scorer = scoring.Scorer(model, params, max_len=16, batch_size=3)
    task = mc_task([("def f(x):", ["return x", "pass"], 0), ("import", ["os", "sys", "re"], 1),
                    ("x = ", ["1", "[]"], 1)], train=[("a", ["b", "c"], 0)])
    completion = tasks.Task("c", tasks.COMPLETION, (), (tasks.Example("ab", target="cd"),
                                                        tasks.Example("ef", target="g")))
    tok = CharTokenizer.from_text(tasks.to_jsonl(task) + tasks.to_jsonl(completion))
    result = tasks.evaluate_task(scorer, tok, task, num_fewshot=1)
    requests, lengths = [], []
    for i, e in enumerate(task.test):
        text = tasks.fewshot_prompt(task, i, 1)
        moved = text[len(text.rstrip()):]  # lm-eval moves trailing whitespace ("x = ").
        context = tok.encode(text.rstrip())
        requests += [(context, tok.encode(moved + " " + c)) for c in e.choices]
        lengths += [len(c) for c in e.choices]  # lm-eval's acc_norm: characters, no delimiter.
    scores = np.array([s for s, _ in scorer.loglikelihood(requests)])
    expected, expected_norm, first = [], [], 0
    for e in task.test:
        these = slice(first, first + len(e.choices))
        expected.append(np.argmax(scores[these]) == e.label)
        expected_norm.append(np.argmax(scores[these] / np.array(lengths[these])) == e.label)
        first += len(e.choices)
    assert result["acc"] == pytest.approx(np.mean(expected))
    assert result["acc_norm"] == pytest.approx(np.mean(expected_norm))
    got = tasks.evaluate_task(scorer, tok, completion)
    ll = scorer.loglikelihood([(tok.encode(e.context), tok.encode(" " + e.target))
                               for e in completion.test])
    assert got["loglikelihood"] == pytest.approx(np.mean([x for x, _ in ll]), rel=1e-5)
    assert got["exact_match"] == np.mean([g for _, g in ll]) and ll[0][0] < 0


# --- Built-in tasks -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nextline():
    """The stdlib_nextline task, made once (listing the stdlib takes a second)."""
    return tasks.load_task("stdlib_nextline")


def test_stdlib_nextline_is_well_formed_and_deterministic(nextline):
    task = nextline
    assert (task.kind, len(task.train), len(task.test)) == ("multiple_choice", 200, 2000)
    assert (task.delimiter, task.separator) == ("", "\n\n")
    assert builtin_tasks.stdlib_nextline() == task
    for e in task.train + task.test:
        assert len(e.choices) == 4 and 0 <= e.label < 4
        assert len({c.strip() for c in e.choices}) == 4
        assert e.context.endswith("\n") and len(e.context) <= 100 and e.context.strip()
        assert all(len(c.strip()) >= 8 and "\n" not in c for c in e.choices)
        assert all(len(e.answer) / 2 <= len(c) <= 2 * len(e.answer) for c in e.choices)
    labels = np.bincount([e.label for e in task.test], minlength=4)
    assert labels.min() > 80  # Shuffled: the answer is at no one place.


def test_stdlib_nextline_comes_from_the_corpus_val_split(nextline):
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train_files, val = builtin_tasks.pystdlib_split()
    val_text = dict(val)
    assert set(train_files).isdisjoint(val_text) and len(val_text) > 20
    # The val files are the corpus's last ones, wholly after its first 90% of bytes.
    sizes = [len((root / rel).read_bytes()) + 1 for rel in val_text]
    total = sum(len((root / rel).read_bytes()) + 1 for rel in train_files) + sum(sizes) - 1
    assert sum(sizes) <= total - int(0.9 * total)
    few_shot = {e.id.rpartition(":")[0] for e in nextline.train}
    scored = {e.id.rpartition(":")[0] for e in nextline.test}
    assert few_shot.isdisjoint(scored) and (few_shot | scored) <= set(val_text)
    for e in nextline.train + nextline.test:
        rel, _, line = e.id.rpartition(":")
        lines = val_text[rel].split("\n")
        assert lines[int(line) - 1] == e.answer
        assert e.context + e.answer + "\n" in val_text[rel]


def test_pystdlib_split_matches_the_corpus_byte_split(tmp_path, monkeypatch):
    """On a small made-up stdlib, against corpora.load_corpus's text of the same files."""
    folder = tmp_path / "lib"
    rng = random.Random(0)
    for i in range(40):
        (folder / f"m{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"m{i % 3}" / f"f{i:02d}.py").write_text("x = 1\n" * rng.randint(1, 30))
    (folder / "m1" / "latin1.py").write_bytes(b"caf\xe9 = 1\n" * 500)  # Not in the corpus.
    files = sorted(folder.rglob("*.py"), key=lambda p: p.relative_to(folder).as_posix())
    monkeypatch.setattr(corpora, "pystdlib_files", lambda: files)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(folder)})
    builtin_tasks.pystdlib_split.cache_clear()
    try:
        train, val = builtin_tasks.pystdlib_split()
    finally:
        builtin_tasks.pystdlib_split.cache_clear()
    corpus = corpora.load_corpus(None, str(folder), str(tmp_path)).text.encode()
    num_train = int(len(corpus) * 0.9)
    assert len(train) + len(val) == 40 and "m1/latin1.py" not in train
    for rel, text in val:
        assert corpus.index(text.encode() + b"\n" if rel != val[-1][0] else text.encode(),
                            num_train) >= num_train
    last_train = (folder / train[-1]).read_bytes()
    assert corpus.rindex(last_train, 0, num_train + len(last_train)) < num_train


@functools.cache
def shakespeare_like(num_lines: int) -> str:
    """A play-shaped text: speakers, lines of words, blank lines."""
    rng = random.Random(1)
    words = ["lord", "sweet", "night", "thee", "heaven", "king", "o'er", "a", "fair", "death"]
    out = []
    for i in range(num_lines):
        if i % 5 == 0:
            out += ["", f"{rng.choice(['ROMEO', 'JULIET'])}:"]
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
                   + rng.choice([",", ".", "", "!", ";"]))
    return "\n".join(out) + "\n"


def test_shakespeare_cloze(tmp_path):
    source = tmp_path / "play.txt"
    source.write_text(shakespeare_like(15000))
    text = source.read_text()
    val = text[int(len(text) * 0.9):]
    task = tasks.load_task("shakespeare_cloze", str(source))
    assert task == builtin_tasks.shakespeare_cloze(source)
    assert (task.kind, len(task.train), len(task.test), task.delimiter) == (
        "completion", 100, 500, " ")
    last_train = 0
    for e in task.train + task.test:
        assert re.fullmatch(r"[A-Za-z]{3,}", e.target)
        assert 0 < len(e.context) <= 200 and not e.context.endswith(" ")
        assert not e.context.startswith("\n") and not e.context.endswith(":")
        where = val.index(e.context + " " + e.target)
        # The target ends its line (but for punctuation).
        assert re.match(r"[^A-Za-z\n]*\n", val[where + len(e.context) + 1 + len(e.target):])
        if e in task.train:
            last_train = max(last_train, where)
        else:
            assert where > last_train  # Scored examples follow the few-shot pool.
    with pytest.raises(ValueError, match="gives .* fewer than 100 and 500; give the whole"):
        builtin_tasks.shakespeare_cloze(source.write_text(shakespeare_like(3000)) and source)
    with pytest.raises(ValueError, match="is not a file"):
        tasks.load_task("shakespeare_cloze", str(tmp_path / "missing.txt"))


def test_shakespeare_cloze_on_tiny_shakespeare():
    path = pathlib.Path("/work/shared/data/tinyshakespeare.txt")
    if not path.is_file():
        pytest.skip("no Tiny Shakespeare text here")
    task = builtin_tasks.shakespeare_cloze(path)
    assert len(task.test) == 500 and "sha256 86c4e6aa9db7c042" in task.description


# --- tools/make_task.py -------------------------------------------------------------------------

def test_make_task_writes_and_refuses_to_overwrite(tool, tmp_path, capsys):
    make_task = tool("make_task")
    source = write_lines(tmp_path / "in.jsonl", MC_LINES)
    out = tmp_path / "new" / "task.jsonl"
    assert make_task.main([f"--task={source}", f"--out={out}"]) == 0
    assert tasks.load_task_file(out) == tasks.load_task_file(source)
    assert "2 test examples" in capsys.readouterr().out
    out.write_text("mine\n")
    with pytest.raises(SystemExit) as e:
        make_task.main([f"--task={source}", f"--out={out}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error:") and "--force" in err
    assert "\n" not in err and out.read_text() == "mine\n"
    assert make_task.main([f"--task={source}", f"--out={out}", "--force"]) == 0
    assert tasks.load_task_file(out).name == "capitals"
    play = tmp_path / "play.txt"
    play.write_text(shakespeare_like(15000))
    cloze = tmp_path / "cloze" / "c.jsonl"
    assert make_task.main(["--task=shakespeare_cloze", f"--source={play}", f"--out={cloze}"]) == 0
    assert tasks.load_task(str(cloze)) == builtin_tasks.shakespeare_cloze(play)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        make_task.main(["--task=shakespeare_cloze", f"--out={tmp_path / 'gone' / 'x.jsonl'}"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "source" in err and not (tmp_path / "gone").exists()


def test_load_tasks_gives_the_source_to_the_tasks_made_from_one(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(tasks.to_jsonl(mc_task([("Q", ["a", "b"], 0), ("R", ["a", "b"], 1)])))
    with pytest.raises(ValueError, match="none is asked for"):
        tasks.load_tasks([str(path)], source=str(path))
    with pytest.raises(ValueError, match="two tasks are named 't'"):
        tasks.load_tasks([str(path), str(path)])
    [task] = tasks.load_tasks([str(path)])
    with pytest.raises(ValueError, match="ask for at most 0"):
        tasks.check_task(BYTES, task, num_fewshot=1)  # No train examples: caught unscored.
    tasks.check_task(BYTES, task)


def test_truncated_prompts_are_counted():
    task = mc_task([("Q" * 10, ["a", "b"], 0), ("R", ["a", "b"], 1)])

    class Short(FakeScorer):
        max_len = 8

    scorer = Short({(q, c): (-1.0, True) for q in ("Q" * 10, "R") for c in (" a", " b")})
    assert tasks.evaluate_task(scorer, BYTES, task)["truncated"] == 0.5
