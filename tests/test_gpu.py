"""GPU-only checks, skipped elsewhere: run `python -m pytest tests/test_gpu.py` on a GPU machine."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from gpt_jax.config import ModelConfig
from gpt_jax.models.gpt import GPT
from gpt_jax.models.layers import CausalSelfAttention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def cfg(**model) -> ModelConfig:
    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 6, 384
    c.data.seq_len = 256
    for k, v in model.items():
        c.model[k] = v
    return ModelConfig.from_config(c, vocab_size=65)


def test_cudnn_attention_matches_xla():
    x = jax.random.normal(jax.random.key(0), (4, 256, 384), jnp.bfloat16)
    xla = CausalSelfAttention(cfg(dtype="bfloat16", attention_impl="xla"))
    params = xla.init(jax.random.key(1), x)
    cudnn = CausalSelfAttention(cfg(dtype="bfloat16", attention_impl="cudnn"))
    a = np.asarray(xla.apply(params, x), np.float32)
    b = np.asarray(cudnn.apply(params, x), np.float32)
    np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)


def test_bfloat16_logits_close_to_float32():
    tokens = jax.random.randint(jax.random.key(0), (4, 256), 0, 65)
    f32 = GPT(cfg(dtype="float32", attention_impl="xla"))
    params = nn.meta.unbox(f32.init(jax.random.key(1), tokens)["params"])
    bf16 = GPT(cfg(dtype="bfloat16", attention_impl="cudnn"))
    a = f32.apply({"params": params}, tokens)
    b = bf16.apply({"params": params}, tokens)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-2)
    assert float(jnp.mean(jnp.abs(a - b))) < 1e-2
