"""End-of-run sampling: greedy equals step-by-step argmax, padded ids never appear, seeds repeat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from gpt_jax.config import ModelConfig
from gpt_jax.generate import generate
from gpt_jax.models.gpt import GPT


def model_and_params(vocab_size=50, vocab_multiple=64, max_seq_len=16):
    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 32
    c.model.vocab_multiple = vocab_multiple
    c.data.seq_len = max_seq_len
    model = GPT(ModelConfig.from_config(c, vocab_size))
    variables = model.init(jax.random.key(0), jnp.zeros((1, max_seq_len), jnp.int32))
    return model, nn.meta.unbox(variables["params"])


def reference_greedy(model, params, prompt, n):
    """Recomputes the whole (cropped) context for every token, like nanoGPT's generate."""
    seq = list(prompt)
    for _ in range(n):
        ctx = jnp.asarray([seq[-model.cfg.max_seq_len:]], jnp.int32)
        logits = model.apply({"params": params}, ctx)
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq


def test_greedy_matches_reference_past_the_context_window():
    model, params = model_and_params()
    prompt = np.array([3, 1, 4, 1, 5], np.int32)
    out = generate(model, params, prompt, 20, jax.random.key(0), temperature=0.0, top_k=0,
                   num_samples=1)
    assert out.shape == (1, 25)  # 25 > max_seq_len = 16: the window slides.
    assert out[0].tolist() == reference_greedy(model, params, prompt, 20)


def test_top_k_one_is_greedy():
    model, params = model_and_params()
    prompt = np.array([7, 8], np.int32)
    greedy = generate(model, params, prompt, 10, jax.random.key(0), 0.0, 0, 1)
    top1 = generate(model, params, prompt, 10, jax.random.key(1), 1.0, 1, 1)
    np.testing.assert_array_equal(greedy, top1)


def test_sampling_is_seeded_and_never_emits_padded_ids():
    model, params = model_and_params(vocab_size=5, vocab_multiple=64)
    prompt = np.array([1], np.int32)
    a = generate(model, params, prompt, 60, jax.random.key(3), 2.0, 0, 4)
    b = generate(model, params, prompt, 60, jax.random.key(3), 2.0, 0, 4)
    c = generate(model, params, prompt, 60, jax.random.key(4), 2.0, 0, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.max() < 5  # 59 padded ids exist; a high temperature would reach them if unmasked.
    assert len(np.unique(a[:, 1:])) > 1
