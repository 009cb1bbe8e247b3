"""Autoregressive sampling by full recomputation over a sliding context window.

One jitted `lax.fori_loop`: each new token reruns the model on the last `max_seq_len` tokens. Simple
and exact; a KV cache is the faster path for long generations.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.parallel.sharding import put_replicated_host


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy when temperature == 0; else softmax sampling at `temperature`, top-k if top_k > 0."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


def generate(
    model: nn.Module,
    params,
    prompt: np.ndarray,
    max_new_tokens: int,
    key: jax.Array,
    temperature: float,
    top_k: int,
    num_samples: int,
) -> np.ndarray:
    """Continues one prompt `num_samples` times; returns [num_samples, len(prompt) + max_new_tokens]."""
    if len(prompt) == 0:
        raise ValueError("the prompt is empty; pass at least one token (e.g. a newline).")
    window = model.cfg.max_seq_len
    total = len(prompt) + max_new_tokens
    buf_BS = np.zeros((num_samples, max(total, window)), np.int32)
    buf_BS[:, : len(prompt)] = np.asarray(prompt, np.int32)
    key_data = np.asarray(jax.random.key_data(key))
    # Params sharded on a mesh (the training run's): inputs and output are whole on every device
    # of it, so every process of a multi-process run can read the result.
    first = jax.tree.leaves(params)[0].sharding
    replicated = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
                  if isinstance(first, jax.sharding.NamedSharding) else None)
    if replicated is not None:
        buf_BS, key_data = (put_replicated_host(a, replicated) for a in (buf_BS, key_data))

    @functools.partial(jax.jit, out_shardings=replicated)
    def run(params, buf_BS, key_data):
        key = jax.random.wrap_key_data(key_data)

        def body(pos, carry):
            buf_BS, key = carry
            key, sub = jax.random.split(key)
            # The window ends at `pos`; tokens after it are zeros the causal mask never lets through.
            start = jnp.clip(pos - window, 0, buf_BS.shape[1] - window)
            ctx_BW = jax.lax.dynamic_slice_in_dim(buf_BS, start, window, axis=1)
            logits_BWV = model.apply({"params": params}, ctx_BW, deterministic=True)
            logits_BV = jax.lax.dynamic_index_in_dim(logits_BWV, pos - 1 - start, 1, False)
            next_B = sample_logits(logits_BV, sub, temperature, top_k).astype(jnp.int32)
            return jax.lax.dynamic_update_index_in_dim(buf_BS, next_B, pos, axis=1), key

        buf_BS, _ = jax.lax.fori_loop(len(prompt), total, body, (buf_BS, key))
        return buf_BS

    return np.asarray(run(params, buf_BS, key_data))[:, :total]
