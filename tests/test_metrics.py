"""MFU's FLOP count against a hand count, peak lookup, the JSONL/TensorBoard writer (read back
with TensorBoard's own EventAccumulator), its cumulative training FLOPs, and the train lines."""

import io
import json
import math
import platform
import time

import jax
import jax.numpy as jnp
import pytest

from configs import base
from gpt_jax.models import gpt, registry
from gpt_jax.training import allocator
from gpt_jax.training.metrics import MetricsWriter, TrainLogger, peak_flops_per_device, show_bar


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_matches_a_hand_count(tied):
    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 16
    c.model.tie_embeddings = tied
    c.data.seq_len = 8
    cfg = registry.hyperparameters(c, vocab_size=10)
    model = registry.build(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    n = registry.count_params(shapes["params"])
    # Hand count of the matmul weights: per layer qkv 16·48 + out 16·16 + fc 16·64 + proj 64·16,
    # plus the LM head 16·10 (tied or not); norms add 2·16 per layer + 16 (no bias).
    matmul = 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16) + 16 * 10
    norms = 2 * 2 * 16 + 16
    assert n - 8 * 16 - (0 if tied else 10 * 16) == matmul + norms
    attention = 12 * 2 * 2 * 8 * 8  # 12 · layers · heads · head_dim · T
    want = 6 * (matmul + norms) + attention
    assert gpt.flops_per_token(cfg, n, 8) == want
    assert registry.arch_of(cfg).flops_per_token(cfg, n, 8) == want  # What MFU and benchmarks use.


def test_peak_flops_lookup():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert peak_flops_per_device(Device("NVIDIA H100 80GB HBM3"), 0.0) == 989e12
    assert peak_flops_per_device(Device("TPU v5 lite"), 0.0) == 197e12
    assert peak_flops_per_device(Device("cpu"), 0.0) is None
    assert peak_flops_per_device(Device("cpu"), 1e12) == 1e12


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them (restart markers applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writer_jsonl_and_tensorboard(tmp_path):
    started = time.time() - 5.0
    w = MetricsWriter(tmp_path, tensorboard=True, tokens_per_step=64, started=started)
    w.write(1, {"train/loss": jnp.float32(2.5), "mfu": None, "lr": 1e-3})
    w.write(2, {"train/loss": float("nan")})
    w.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert {k: v for k, v in rows[0].items() if k != "time"} == {
        "step": 1, "train/loss": 2.5, "mfu": None, "lr": 1e-3, "tokens": 64, "flops": 0.0}
    assert 5.0 <= rows[0]["time"] <= rows[1]["time"] < 60 and rows[1]["tokens"] == 128
    assert rows[1]["train/loss"] == "nan" and not math.isnan(rows[0]["train/loss"])
    tb = tensorboard_scalars(tmp_path / "tb")
    assert tb["train/loss"] == [(1, 2.5)] and tb["tokens"] == [(1, 64.0), (2, 128.0)]


def test_tensorboard_has_every_row_before_close(tmp_path):
    """A row is in the event file when write() returns (tensorboardX's SummaryWriter held rows
    for up to 120 s in a queue, lost on a hard kill)."""
    w = MetricsWriter(tmp_path, tensorboard=True, tokens_per_step=1)
    for step in range(1, 6):
        w.write(step, {"train/loss": 1.0 / step})
    tb = tensorboard_scalars(tmp_path / "tb")  # Not closed: what a kill -9 leaves.
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4, 5]
    w.close()


def test_a_resume_rolls_back_both_files_and_continues_the_clock(tmp_path):
    first = MetricsWriter(tmp_path, tensorboard=True, tokens_per_step=10, started=time.time() - 100)
    for step in range(1, 11):
        first.write(step, {"train/loss": float(step)})
    first.close()  # Killed after step 10; the newest checkpoint is step 6.
    kept_time = read_rows(tmp_path / "metrics.jsonl")[5]["time"]
    resumed = MetricsWriter(tmp_path, tensorboard=True, resume_after=6, tokens_per_step=10)
    for step in (7, 8):
        resumed.write(step, {"train/loss": -float(step)})
    resumed.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["step"] for r in read_rows(tmp_path / "metrics.rolledback.jsonl")] == [7, 8, 9, 10]
    assert kept_time >= 100 and kept_time <= rows[6]["time"] < kept_time + 60
    assert rows[7]["tokens"] == 80
    # Resumed again from step 8 with twice the tokens per step: counted on from row 8's 80.
    again = MetricsWriter(tmp_path, tensorboard=False, resume_after=8, tokens_per_step=20)
    again.write(9, {"train/loss": 0.5})
    again.close()
    assert read_rows(tmp_path / "metrics.jsonl")[-1]["tokens"] == 100
    tb = tensorboard_scalars(tmp_path / "tb")["train/loss"]
    assert tb == [(s, float(s)) for s in range(1, 7)] + [(7, -7.0), (8, -8.0)]


def test_the_bar_only_on_a_terminal_of_process_0(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # Not a terminal.
    assert not show_bar("auto", True) and show_bar("bar", True) and not show_bar("lines", True)
    assert not show_bar("bar", False)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    assert show_bar("auto", True) and not show_bar("auto", False)


def test_train_lines_without_a_bar(tmp_path, capsys):
    import tqdm

    writer = MetricsWriter(tmp_path, tensorboard=False, tokens_per_step=100)
    bar = tqdm.tqdm(total=100, disable=True)
    logger = TrainLogger(writer, bar, 100, 1e6, 1e9, num_steps=100, lines=True)
    logger.queue(1, {"train/loss": jnp.float32(3.25), "lr": jnp.float32(1e-3)})
    logger.restart_clock(1)
    logger.queue(11, {"train/loss": jnp.float32(2.5), "lr": jnp.float32(2e-3)})
    logger.flush()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 1/100: loss 3.2500, lr 1.000e-03, n/a tokens/s, mfu n/a")
    assert out[1].startswith("step 11/100: loss 2.5000, lr 2.000e-03,") and "tokens/s, mfu " in out[1]
    assert "elapsed 0:00:0" in out[1] and "eta " in out[1] and "eta n/a" not in out[1]
    writer.close()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_tuning_applies_on_glibc():
    assert allocator.tune_glibc_malloc() is True


@pytest.mark.slow
def test_a_killed_run_keeps_every_logged_row_in_tensorboard(tiny_config, train_command, tmp_path):
    """kill -9 right after a logged step: TensorBoard has every row metrics.jsonl has; the run
    redirected to a file logs plain lines (no carriage returns of a bar)."""
    import os
    import signal
    import subprocess

    c = tiny_config(**{"train.num_steps": 5000, "log.every": 5, "log.progress": "auto",
                       "log.tensorboard": True, "checkpoint.every": 5000})
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(train_command(tmp_path / "run", c), stdout=out, stderr=out)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"train/loss"' in x for x in metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = [r for r in read_rows(metrics) if "train/loss" in r or "val/loss" in r]
    assert len(rows) >= 4
    tb = tensorboard_scalars(tmp_path / "run" / "tb")
    for r in rows:
        key = "train/loss" if "train/loss" in r else "val/loss"
        assert (r["step"], pytest.approx(r[key])) in tb[key]
    text = log.read_text()
    assert "\r" not in text
    assert "step 5/5000: loss " in text and "tokens/s" in text and "eta" in text


def test_flops_count_tokens_times_the_rate(tmp_path):
    """One rate: a row's `flops` is tokens_per_step × FLOPs per token × step."""
    w = MetricsWriter(tmp_path, tensorboard=False, tokens_per_step=64)
    w.write(0, {"val/loss": 3.0})  # Before any rate is set: none counted.
    w.set_flops_per_token(1000.0, 0)
    for step in (1, 2, 5):
        w.write(step, {"train/loss": 1.0})
    w.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["flops"]) for r in rows] == [(0, 0.0), (1, 64e3), (2, 128e3), (5, 320e3)]
    assert all(isinstance(r["flops"], float) for r in rows)


def test_a_new_flops_rate_counts_on_from_its_step(tmp_path):
    """set_flops_per_token(new, k) (a model grown after step k): rows up to k keep the old rate,
    rows after k add the new one to step k's count."""
    w = MetricsWriter(tmp_path, tensorboard=False, tokens_per_step=10)
    w.set_flops_per_token(100.0, 0)
    for step in (1, 2, 4):
        w.write(step, {"train/loss": 1.0})
    w.set_flops_per_token(300.0, 4)
    w.write(4, {"val/loss": 2.0})  # The eval at the growth step: still step 4's count.
    for step in (5, 8):
        w.write(step, {"train/loss": 1.0})
    w.close()
    flops = [(r["step"], r["flops"]) for r in read_rows(tmp_path / "metrics.jsonl")]
    at_4 = 4 * 10 * 100.0
    assert flops == [(1, 1e3), (2, 2e3), (4, at_4), (4, at_4), (5, at_4 + 3e3), (8, at_4 + 4 * 3e3)]


def test_a_resume_counts_flops_on_from_the_last_kept_row(tmp_path):
    """A writer with resume_after=N continues from the `flops` of the last row up to N (rows
    after N, rolled back, do not count), at the rate set from N on."""
    first = MetricsWriter(tmp_path, tensorboard=False, tokens_per_step=10)
    first.set_flops_per_token(100.0, 0)
    for step in range(1, 11):
        first.write(step, {"train/loss": 1.0})
    first.set_flops_per_token(1e9, 10)  # Grown after the checkpoint: rolled back with its rows.
    first.write(11, {"train/loss": 1.0})
    first.close()  # Killed after step 11; the newest checkpoint is step 6.
    resumed = MetricsWriter(tmp_path, tensorboard=False, resume_after=6, tokens_per_step=10)
    resumed.set_flops_per_token(200.0, 6)  # What the loop does: the resumed model's rate.
    for step in (7, 8):
        resumed.write(step, {"train/loss": 1.0})
    resumed.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["flops"]) for r in rows[5:]] == [(6, 6e3), (7, 6e3 + 2e3), (8, 6e3 + 4e3)]
    assert [r["step"] for r in read_rows(tmp_path / "metrics.rolledback.jsonl")] == [7, 8, 9, 10, 11]
    # A second writer without a rate set (a non-training writer): flops held at the kept row's.
    again = MetricsWriter(tmp_path, tensorboard=False, resume_after=8, tokens_per_step=10)
    again.write(9, {"val/loss": 1.0})
    again.close()
    assert read_rows(tmp_path / "metrics.jsonl")[-1]["flops"] == 10e3


def test_a_resume_counts_the_steps_between_the_last_row_and_the_checkpoint(tmp_path):
    """Rows every 5 steps, resumed from a checkpoint at step 8: steps 6–8 trained too."""
    first = MetricsWriter(tmp_path, tensorboard=False, tokens_per_step=10)
    first.set_flops_per_token(100.0, 0)
    for step in (5, 10):
        first.write(step, {"train/loss": 1.0})
    first.close()
    resumed = MetricsWriter(tmp_path, tensorboard=False, resume_after=8, tokens_per_step=10)
    resumed.set_flops_per_token(100.0, 8)
    resumed.write(9, {"train/loss": 1.0})
    resumed.close()
    last = read_rows(tmp_path / "metrics.jsonl")[-1]
    assert (last["tokens"], last["flops"]) == (90, 9 * 10 * 100.0)


def test_a_resume_with_another_batch_counts_flops_as_tokens(tmp_path):
    """Rows to step 8 at 100 tokens a step, a checkpoint at 10, resumed with 200: the steps 8..10
    trained 200 tokens at the old shape, counted at the rate the resumed run sets."""
    w = MetricsWriter(tmp_path, tensorboard=False, tokens_per_step=100)
    w.set_flops_per_token(3.0, 0)
    w.write(8, {"train/loss": 1.0})
    w.close()
    resumed = MetricsWriter(tmp_path, tensorboard=False, resume_after=10, tokens_per_step=200)
    resumed.set_flops_per_token(3.0, 10)
    resumed.write(12, {"train/loss": 1.0})
    resumed.close()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["tokens"] == 1000 + 2 * 200
    assert last["flops"] == 3.0 * last["tokens"]
