"""GPU-only checks, skipped elsewhere: run `python -m pytest tests/test_gpu.py` on a GPU machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.models.layers import CausalSelfAttention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@pytest.fixture
def gpt(tiny_gpt):
    """make(**model_fields) → (hyperparameters, module, params) of a 2-layer, 6-head, d 384 GPT
    (shakespeare_char's width) on 256 tokens and a 65-symbol vocabulary."""
    return lambda **fields: tiny_gpt(vocab_size=65, seq_len=256,
                                     **{"num_heads": 6, "d_model": 384, **fields})


def test_cudnn_attention_matches_xla(gpt):
    x = jax.random.normal(jax.random.key(0), (4, 256, 384), jnp.bfloat16)
    xla = CausalSelfAttention(gpt(dtype="bfloat16", attention_impl="xla")[0])
    params = xla.init(jax.random.key(1), x)
    cudnn = CausalSelfAttention(gpt(dtype="bfloat16", attention_impl="cudnn")[0])
    a = np.asarray(xla.apply(params, x), np.float32)
    b = np.asarray(cudnn.apply(params, x), np.float32)
    np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)


def test_bfloat16_logits_close_to_float32(gpt):
    tokens = jax.random.randint(jax.random.key(0), (4, 256), 0, 65)
    _, f32, params = gpt(dtype="float32", attention_impl="xla")
    _, bf16, _ = gpt(dtype="bfloat16", attention_impl="cudnn")
    a = f32.apply({"params": params}, tokens)
    b = bf16.apply({"params": params}, tokens)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-2)
    assert float(jnp.mean(jnp.abs(a - b))) < 1e-2
