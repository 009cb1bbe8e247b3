"""tools/compare_nanogpt.py: parses both logs and runs the two back to back (a stand-in nanoGPT
that prints its log format, and a real run of ours)."""

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from tools import compare_nanogpt

REPO = pathlib.Path(__file__).resolve().parent.parent

FAKE_TRAIN = textwrap.dedent("""
    import sys
    steps = int([a for a in sys.argv if a.startswith("--max_iters=")][0].split("=")[1])
    for i in range(steps + 1):
        print(f"iter {i}: loss 2.0000, time {500.0 if i < 10 else 40.0 + i % 3:.2f}ms, mfu 0.04%")
""")


def test_nanogpt_log_median_skips_the_first_iterations():
    log = "step 0: train loss 4.1\n" + "".join(
        f"iter {i}: loss 4.0, time {900 if i < 10 else 32.0}ms, mfu -100.00%\n" for i in range(30))
    assert compare_nanogpt.nanogpt_tokens_per_sec(log) == pytest.approx(768 / 0.032)
    with pytest.raises(ValueError, match="no 'iter N"):
        compare_nanogpt.nanogpt_tokens_per_sec("nothing here")


def test_our_median_skips_the_first_interval(tmp_path):
    rows = [{"step": 0, "val/loss": 4.0}, {"step": 1, "train/loss": 4.0, "tokens_per_sec": 10.0},
            *({"step": 10 * i, "train/loss": 3.0, "tokens_per_sec": r}
              for i, r in enumerate((100.0, 300.0, 200.0), start=1))]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compare_nanogpt.ours_tokens_per_sec(path) == 200.0
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="no tokens_per_sec"):
        compare_nanogpt.ours_tokens_per_sec(path)


@pytest.mark.slow
def test_back_to_back_rounds_report_the_ratio(corpus, tmp_path):
    """A real 200-step run of ours against a stand-in nanoGPT that prints its log format."""
    nanogpt = tmp_path / "nanoGPT"
    (nanogpt / "data/shakespeare_char").mkdir(parents=True)
    (nanogpt / "train.py").write_text(FAKE_TRAIN)
    shutil.copy(corpus, nanogpt / "data/shakespeare_char/input.txt")
    (nanogpt / "data/shakespeare_char/train.bin").write_bytes(b"\0\0")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "tools/compare_nanogpt.py", f"--nanogpt={nanogpt}",
                        "--rounds=1", "--steps=200", f"--out={out}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "compare_nanogpt.json").read_text())
    (only,) = result["rounds"]
    assert only["nanogpt_tokens_per_sec"] == pytest.approx(768 / 0.041)  # Median of 40/41/42 ms.
    assert only["gpt_jax_tokens_per_sec"] > 0
    assert only["ratio"] == pytest.approx(only["gpt_jax_tokens_per_sec"] / (768 / 0.041))
    assert "| 1 |" in (out / "compare_nanogpt.md").read_text()


def _checkout(tmp, train_py=FAKE_TRAIN, prepared=True):
    """A stand-in nanoGPT checkout under tmp/nanoGPT whose train.py is `train_py`."""
    root = tmp / "nanoGPT"
    (root / "data/shakespeare_char").mkdir(parents=True)
    (root / "train.py").write_text(train_py)
    if prepared:
        (root / "data/shakespeare_char/input.txt").write_text("To be, or not to be\n" * 50)
        (root / "data/shakespeare_char/train.bin").write_bytes(b"\0\0")
    return root


def _compare(*args):
    return lambda tmp: [sys.executable, "tools/compare_nanogpt.py", "--out={tmp}/out",
                        *(a.format(tmp=tmp) for a in args)]


def _with(checkout, *args):
    """argv(tmp) with --nanogpt= the checkout that `checkout(tmp)` makes."""
    return lambda tmp: _compare(f"--nanogpt={checkout(tmp)}", *args)(tmp)


# id, argv(tmp), words the error line must hold. Each row is a subprocess (~0.3 s; the last two
# run a stand-in nanoGPT); none may make its --out folder.
COMPARE_ROWS = [
    pytest.param(_compare(), ("--nanogpt is missing", "nanoGPT checkout"), id="no-nanogpt"),
    pytest.param(_compare("--nanogpt={tmp}/nope"), ("nope: no such folder", "give the folder"),
                 id="nanogpt-missing"),
    pytest.param(_compare("--nanogpt={tmp}/afile"), ("afile is a file", "give the folder"),
                 id="nanogpt-is-a-file"),
    pytest.param(_compare("--nanogpt={tmp}"), ("is not a nanoGPT checkout (no train.py)", "git clone"),
                 id="not-a-checkout"),
    pytest.param(_with(lambda tmp: _checkout(tmp, prepared=False)),
                 ("data/shakespeare_char is not prepared", "input.txt and train.bin", "prepare.py"),
                 id="not-prepared"),
    pytest.param(_with(_checkout, "--steps=5"), ("--steps=5", ">= 200", "--helpshort"),
                 id="steps-out-of-range"),
    pytest.param(_with(_checkout, "--rounds=0"), ("--rounds=0", "--helpshort"), id="rounds-0"),
    pytest.param(_with(_checkout, "--steps=ten"), ("--steps=ten", "--helpshort"), id="steps-not-a-number"),
    pytest.param(_with(_checkout, "extra"), ("unexpected arguments 'extra'", "--helpshort"),
                 id="stray-argument"),
    pytest.param(_with(_checkout, "--out={tmp}/afile"), ("afile is a file", "give a folder path"),
                 id="out-is-a-file"),
    pytest.param(_with(lambda tmp: _checkout(tmp, "import sys\nsys.exit('boom: no torch')\n"),
                       "--steps=200"),
                 ("train.py", "failed (status 1)", "boom: no torch", "run it there by hand"),
                 id="nanogpt-run-fails"),
    pytest.param(_with(lambda tmp: _checkout(tmp, "print('hello')\n"), "--steps=200"),
                 ("no 'iter N", "karpathy/nanoGPT"), id="nanogpt-log-unknown"),
]


@pytest.mark.parametrize("argv, words", COMPARE_ROWS)
def test_bad_invocations_are_refused_in_one_line(argv, words, tmp_path, bad_invocation):
    """Every bad invocation: exit ≠ 0, one `error:` line naming the problem and the fix, no
    traceback (a failing run is its last line, not a RuntimeError's), and no results written."""
    (tmp_path / "afile").write_text("not a folder\n")
    bad_invocation(argv(tmp_path), *words, absent=[tmp_path / "out"], cwd=REPO)
