"""tools/compare_nanogpt.py: parses both logs and runs the two back to back (a stand-in nanoGPT
that prints its log format, and a real run of ours)."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.test_train import TEXT
from tools import compare_nanogpt

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


def test_back_to_back_rounds_report_the_ratio(tmp_path):
    nanogpt = tmp_path / "nanoGPT"
    (nanogpt / "data/shakespeare_char").mkdir(parents=True)
    (nanogpt / "train.py").write_text(FAKE_TRAIN)
    (nanogpt / "data/shakespeare_char/input.txt").write_text(TEXT)
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


def test_refuses_a_folder_that_is_not_a_prepared_checkout(tmp_path):
    r = subprocess.run([sys.executable, "tools/compare_nanogpt.py", f"--nanogpt={tmp_path}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "prepare.py" in r.stderr.strip().splitlines()[-1]
