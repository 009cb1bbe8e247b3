"""Token positions: which position each input token has. The model computes them once and passes
them to the embedding and to every block, so a position scheme applied inside attention (rotary,
linear biases) sees the same positions as one added to the embeddings (the learned table).

Shapes: B batch, T time (queries), S key slots, N heads, H head dim, D d_model, F frequencies.
Positions are int32 [B, T], or [1, T] when every row has the same ones
(training on windows): a [1, T] lookup broadcasts over the batch, which keeps the learned table's
gradient a sum over T rows rather than B·T.
"""

from __future__ import annotations

import math

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


# --- Schemes (model.positions). Each is a small function of the token positions, so every one
# works with the KV cache (positions from decode_positions), packed documents and any length. ---

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
ADDED_TO_EMBEDDINGS = ("learned", "sinusoidal")  # The others act inside attention (or nowhere).


def sinusoidal(positions_BT: Array, D: int) -> Array:
    """Vaswani et al.'s fixed encoding [B, T, D] (float32): PE[p, 2i] = sin(p / 10000^(2i/D)),
    PE[p, 2i+1] = cos(p / 10000^(2i/D)), sines and cosines interleaved."""
    inv_freq_F = 10000.0 ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # F = ⌈D/2⌉.
    angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
    pe_BTF2 = jnp.stack([jnp.sin(angle_BTF), jnp.cos(angle_BTF)], axis=-1)
    return pe_BTF2.reshape(*positions_BT.shape, -1)[..., :D]


def rope(x_BTNH: Array, positions_BT: Array, theta: float) -> Array:
    """Rotary embedding of queries or keys [B, T, N, H] (Su et al.), in Hugging Face Llama's
    rotate-half layout: dimension i pairs with i + H/2, rotated by p · theta^(-2i/H). Computed in
    float32, returned in x's dtype; q·k then depends on positions only through their difference."""
    H = x_BTNH.shape[-1]
    inv_freq_F = theta ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)  # F = H/2.
    angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
    cos_BT1H = jnp.tile(jnp.cos(angle_BTF), 2)[:, :, None, :]
    sin_BT1H = jnp.tile(jnp.sin(angle_BTF), 2)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos_BT1H + rotated * sin_BT1H).astype(x_BTNH.dtype)


def alibi_slopes(N: int) -> Array:
    """ALiBi's per-head slopes [N] (Press et al.): 2^(-8k/N), k = 1…N, for a power of two;
    otherwise those of the power of two below, then every other slope of the one above."""
    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    m = 2 ** math.floor(math.log2(N))
    slopes = powers(m) if m == N else powers(m) + powers(2 * m)[0::2][: N - m]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(q_positions_BT: Array, k_positions_BS: Array, N: int) -> Array:
    """Attention-score biases [B, N, T, S] (float32): -slope_n · (q position - k position), so a
    key d positions back costs slope_n · d (masked pairs are never read)."""
    distance_BTS = (q_positions_BT[:, :, None] - k_positions_BS[:, None, :]).astype(jnp.float32)
    return -alibi_slopes(N)[None, :, None, None] * distance_BTS[:, None]
