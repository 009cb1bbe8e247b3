"""tools/benchmark.py: runs the real train step and reports consistent figures."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def bench(tmp_path, *flags):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), f"--out={tmp_path}",
                          *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_benchmark_figures_are_consistent(tmp_path):
    bench(tmp_path, "--preset=quickstart", "--steps=20", "--decode_tokens=8",
          "--set=model.num_layers=2", "--set=train.batch_size=4")
    r = json.loads((tmp_path / "quickstart.json").read_text())
    assert r["batch"] == 4 and r["seq_len"] == 128 and r["backend"] == "cpu"
    assert r["tokens_per_sec"] == pytest.approx(4 * 128 / (r["step_ms_median"] / 1e3))
    # 6N + attention per token (N without the position table), times the tokens of a step.
    n = r["parameters"] - 128 * 128
    step_flops = (6 * n + 12 * 2 * 4 * 32 * 128) * 4 * 128
    assert r["model_tflops_per_sec"] == pytest.approx(step_flops / (r["step_ms_median"] / 1e3) / 1e12)
    assert r["mfu"] is None and 0 < r["fraction_of_matmul_ceiling"] < 1  # CPU: no peak table entry.
    assert r["decode_tokens_per_sec"] > 0 and r["compile_s"] > 0
    assert "| quickstart |" in (tmp_path / "quickstart.md").read_text()


def test_compile_only_and_peak_override(tmp_path):
    bench(tmp_path, "--preset=shakespeare_char:cpu", "--compile_only")
    r = json.loads((tmp_path / "shakespeare_char_cpu_compile.json").read_text())
    assert r["compile_s"] > 0 and "tokens_per_sec" not in r
    bench(tmp_path, "--preset=shakespeare_char:cpu", "--steps=20", "--decode_tokens=0",
          "--peak_flops=1e12")
    r = json.loads((tmp_path / "shakespeare_char_cpu.json").read_text())
    assert r["mfu"] == pytest.approx(r["model_tflops_per_sec"] / 1.0)
