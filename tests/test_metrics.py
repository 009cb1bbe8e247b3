"""MFU's FLOP count against a hand count, peak lookup, and the JSONL/TensorBoard writer."""

import json
import math
import platform

import jax
import jax.numpy as jnp
import pytest

from configs import base
from gpt_jax.models import gpt, registry
from gpt_jax.training import allocator
from gpt_jax.training.metrics import MetricsWriter, peak_flops_per_device


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


def test_writer_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.write(1, {"train/loss": jnp.float32(2.5), "mfu": None, "lr": 1e-3})
    w.write(2, {"train/loss": float("nan")})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "train/loss": 2.5, "mfu": None, "lr": 1e-3}
    assert rows[1]["train/loss"] == "nan" and not math.isnan(rows[0]["train/loss"])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_tuning_applies_on_glibc():
    assert allocator.tune_glibc_malloc() is True
