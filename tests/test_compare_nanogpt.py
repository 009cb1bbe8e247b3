"""tools/compare_nanogpt.py: parses both logs and runs the two back to back (a stand-in nanoGPT
that prints its log format, and a real run of ours)."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

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


def test_refuses_a_folder_that_is_not_a_prepared_checkout(tmp_path):
    r = subprocess.run([sys.executable, "tools/compare_nanogpt.py", f"--nanogpt={tmp_path}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "prepare.py" in r.stderr.strip().splitlines()[-1]
