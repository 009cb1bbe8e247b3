"""tools/benchmark.py: runs the real train step and reports figures that agree with a hand count
of the model and with each other."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


# The quickstart preset with 2 layers and batch 4, counted by hand: byte vocabulary V 256,
# T 128, D 128, 4 heads of 32, MLP 512, no biases, tied head.
V, T, D, L, B = 256, 128, 128, 2, 4
PER_LAYER = D * 3 * D + D * D + D * 4 * D + 4 * D * D + 2 * D  # qkv, out, fc, proj, 2 LN scales.
PARAMETERS = V * D + T * D + L * PER_LAYER + D  # wte, wpe, blocks, ln_f: 443,008.
# 6N + 12·L·H·Q·T per token (N without the position table, which does no matmul).
FLOPS_PER_TOKEN = 6 * (PARAMETERS - T * D) + 12 * L * 4 * 32 * T  # 2,952,960.


def bench(tmp_path, *flags):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), f"--out={tmp_path}",
                          *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


# Subprocesses: each is ~8 s of compiles, steps and the CPU's matmul ceiling (and the tool's absl
# flags would clash with tools/compare_nanogpt.py's, which test_compare_nanogpt.py imports).
@pytest.mark.slow
def test_figures_agree_with_a_hand_count_of_the_model(tmp_path):
    bench(tmp_path, "--preset=quickstart", "--steps=20", "--decode_tokens=8",
          "--set=model.num_layers=2", "--set=train.batch_size=4")
    r = json.loads((tmp_path / "quickstart.json").read_text())
    assert r["parameters"] == PARAMETERS
    assert (r["batch"], r["seq_len"], r["backend"]) == (B, T, "cpu")
    step_s = r["step_ms_median"] / 1e3
    assert r["tokens_per_sec"] == pytest.approx(B * T / step_s)
    assert r["model_tflops_per_sec"] == pytest.approx(FLOPS_PER_TOKEN * B * T / step_s / 1e12)
    assert r["mfu"] is None  # CPU: no peak table entry …
    assert r["fraction_of_matmul_ceiling"] == pytest.approx(  # … but this machine's matmul speed.
        r["model_tflops_per_sec"] * 1e3 / r["cpu_matmul_ceiling_gflops"])
    assert 0 < r["fraction_of_matmul_ceiling"] < 1 and r["compile_s"] > 0
    assert r["step_ms_pipelined"] > 0
    assert r["decode_tokens_per_sec"] > 0 and r["decode_tokens_per_sec_uncached"] > 0
    assert r["decode_cache_speedup"] == pytest.approx(
        r["decode_tokens_per_sec"] / r["decode_tokens_per_sec_uncached"])
    assert "| quickstart |" in (tmp_path / "quickstart.md").read_text()


@pytest.mark.slow
def test_compile_only_and_peak_override(tmp_path):
    bench(tmp_path, "--preset=shakespeare_char:cpu", "--compile_only")
    r = json.loads((tmp_path / "shakespeare_char_cpu_compile.json").read_text())
    assert r["compile_s"] > 0 and "tokens_per_sec" not in r
    bench(tmp_path, "--preset=shakespeare_char:cpu", "--steps=20", "--decode_tokens=0",
          "--peak_flops=1e12")
    r = json.loads((tmp_path / "shakespeare_char_cpu.json").read_text())
    assert r["mfu"] == pytest.approx(r["model_tflops_per_sec"] / 1.0)


def test_set_refuses_an_unknown_field_in_one_line():
    """--set with a typo must not benchmark the unchanged model (it used to, silently)."""
    r = subprocess.run([sys.executable, "tools/benchmark.py", "--preset=quickstart",
                        "--set=model.num_layer=2", "--compile_only"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --set=model.num_layer=2: unknown config field: 'model.num_layer'. Did you mean "
        "\"num_layers\"? (every field is listed in configs/base.py)")
