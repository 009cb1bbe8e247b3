"""Token positions: which position each input token has. The model computes them once and passes
them to the embedding and to every block, so a position scheme applied inside attention (rotary,
linear biases) sees the same positions as one added to the embeddings (the learned table).

Shapes: B batch, T time. Positions are int32 [B, T], or [1, T] when every row has the same ones
(training on windows): a [1, T] lookup broadcasts over the batch, which keeps the learned table's
gradient a sum over T rows rather than B·T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def sequence_positions(T: int) -> Array:
    """0 … T-1 for every row: [1, T] int32."""
    return jnp.arange(T, dtype=jnp.int32)[None, :]


def decode_positions(slot: Array, first_B: Array, T: int, max_len: int) -> Array:
    """[B, T] positions of `T` tokens written at KV-cache slot `slot` onwards, each row counting
    from its first real token `first_B` (left padding before it), clipped to [0, max_len): a
    padding token gets position 0 (its output is never used)."""
    pos_BT = slot + jnp.arange(T, dtype=jnp.int32)[None, :] - first_B[:, None]
    return jnp.clip(pos_BT, 0, max_len - 1)
