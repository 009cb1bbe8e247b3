"""Positions: computed once by the model and handed to every block; explicit positions are used."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.models import positions
from gpt_jax.models.layers import Block


def test_sequence_positions_broadcast_over_the_batch():
    pos = positions.sequence_positions(5)
    assert pos.shape == (1, 5) and pos.dtype == jnp.int32
    np.testing.assert_array_equal(pos[0], np.arange(5))


def test_decode_positions_count_from_each_rows_first_token():
    # Slot 3 onwards, 2 tokens; row 0 starts at slot 0, row 1 at slot 4 (left padding before).
    pos = positions.decode_positions(jnp.int32(3), jnp.array([0, 4], jnp.int32), 2, max_len=8)
    np.testing.assert_array_equal(pos, [[3, 4], [0, 0]])  # Row 1's padding slot 3 → 0.
    far = positions.decode_positions(jnp.int32(9), jnp.array([0], jnp.int32), 2, max_len=8)
    np.testing.assert_array_equal(far, [[7, 7]])  # Clipped to the table.


def test_every_block_receives_the_models_positions(tiny_gpt):
    _, model, params = tiny_gpt(scan_layers=False)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Block) and context.method_name == "__call__":
            seen.append(np.asarray(args[4] if len(args) > 4 else kwargs["positions_BT"]))
        return next_fun(*args, **kwargs)

    tokens = jnp.ones((2, 6), jnp.int32)
    explicit = jnp.array([[5, 6, 7, 8, 9, 10], [0, 1, 2, 0, 1, 2]], jnp.int32)
    with nn.intercept_methods(record):
        model.apply({"params": params}, tokens)
        model.apply({"params": params}, tokens, positions_BT=explicit)
    assert len(seen) == 4  # 2 layers × 2 calls.
    np.testing.assert_array_equal(seen[0], [np.arange(6)])
    np.testing.assert_array_equal(seen[1], [np.arange(6)])
    np.testing.assert_array_equal(seen[2], explicit)


def test_explicit_default_positions_equal_implicit_ones_and_others_change_logits(tiny_gpt):
    _, model, params = tiny_gpt()
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 50)
    implicit = model.apply({"params": params}, tokens)
    explicit = model.apply({"params": params}, tokens,
                           positions_BT=jnp.broadcast_to(jnp.arange(8), (2, 8)))
    np.testing.assert_allclose(explicit, implicit, rtol=0, atol=1e-6)
    shifted = model.apply({"params": params}, tokens, positions_BT=jnp.arange(8)[None] + 3)
    assert not np.allclose(shifted, implicit, atol=1e-4)
    # The learned table keeps its name (checkpoints and converters rely on it).
    assert params["wpe"]["embedding"].shape == (16, 32)
