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


def _bench(*args):
    return lambda tmp: [sys.executable, "tools/benchmark.py", "--out={tmp}/out",
                        *(a.format(tmp=tmp) for a in args)]


# id, argv(tmp), words the error line must hold. Each row is a subprocess that stops before jax
# is imported (~0.3 s) unless it says otherwise; none may make its --out folder.
BENCH_ROWS = [
    pytest.param(_bench("--set=model=3"),
                 ("--set=model=3", "config group 'model' is not a field", "--set=model."),
                 id="set-replaces-a-group"),
    pytest.param(_bench("--set=model.num_layer=2"),
                 ("--set=model.num_layer=2", "unknown config field", 'did you mean "num_layers"'),
                 id="set-typo"),
    pytest.param(_bench("--set=model.num_layers"), ("--set=model.num_layers", "GROUP.FIELD=VALUE"),
                 id="set-without-value"),
    pytest.param(_bench("--set=model.num_layers=abc"),
                 ("model.num_layers takes a value of type int", "'abc'", "--set=model.num_layers=4"),
                 id="set-wrong-type"),
    pytest.param(_bench("--set=model.num_layers.x=1"),
                 ("is a value, not a group", "--set=model.num_layers=VALUE"), id="set-below-a-field"),
    pytest.param(_bench("--preset=nope"), ("--preset=nope", "quickstart", "--helpshort"),
                 id="unknown-preset"),
    pytest.param(_bench("--steps=5"), ("--steps=5", ">= 20", "--helpshort"), id="steps-out-of-range"),
    pytest.param(_bench("--warmup=0"), ("--warmup=0", "--helpshort"), id="warmup-0"),
    pytest.param(_bench("--decode_tokens=-1"), ("--decode_tokens=-1", "--helpshort"),
                 id="decode-tokens-negative"),
    pytest.param(_bench("--peak_flops=-1"), ("--peak_flops=-1", "--helpshort"), id="peak-flops-negative"),
    pytest.param(_bench("extra"), ("unexpected arguments 'extra'", "--helpshort"), id="stray-argument"),
    pytest.param(_bench("--out={tmp}/afile"), ("afile is a file", "give a folder path"),
                 id="out-is-a-file"),
    pytest.param(_bench("--out={tmp}/afile/results"), ("afile is a file", "choose another --out"),
                 id="out-under-a-file"),
    # jax imported (~2 s): refused by the config's checks before anything is compiled.
    pytest.param(_bench("--set=model.num_heads=5", "--compile_only"),
                 ("model.num_heads=5 does not divide",), id="set-bad-value",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("argv, words", BENCH_ROWS)
def test_bad_invocations_are_refused_in_one_line(argv, words, tmp_path, bad_invocation):
    """Every bad invocation (a --set that names no field used to benchmark the unchanged model,
    and one naming a group to replace it): exit ≠ 0, one `error:` line naming the problem and the
    fix, no traceback, and no results folder made."""
    (tmp_path / "afile").write_text("not a folder\n")
    bad_invocation(argv(tmp_path), *words, protect=[tmp_path], absent=[tmp_path / "out"], cwd=REPO)
