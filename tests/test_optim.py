"""The optimizer (gpt_jax/training/optim.py): warmup + cosine schedule against a hand formula,
weight decay on matrices only, global-norm clipping, non-finite updates dropped."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from gpt_jax.models import registry
from gpt_jax.training import optim


def config(**optim_fields):
    c = base.get_config()
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 1e-3, 1e-4, 10
    c.optim.decay_steps, c.optim.weight_decay = 110, 0.0
    c.train.num_steps = 1000
    c.optim.update(optim_fields)
    return c


@pytest.mark.parametrize(("step_num", "want"), [
    (0, 0.0),
    (4, 4e-4),  # Linear from 0: lr · 4 / 10.
    (10, 1e-3),  # Peak at the end of warmup.
    (35, 1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2),  # A quarter into the cosine.
    (60, 5.5e-4),  # Half-way: (lr + min_lr) / 2.
    (110, 1e-4),  # min_lr at decay_steps …
    (500, 1e-4),  # … and after.
])
def test_schedule_warms_up_linearly_then_follows_the_cosine_to_min_lr(step_num, want):
    assert float(optim.make_schedule(config())(step_num)) == pytest.approx(want, rel=1e-5,
                                                                           abs=1e-12)


def test_decay_steps_default_to_the_run_length():
    c = config(decay_steps=None)
    c.train.num_steps = 50
    schedule = optim.make_schedule(c)
    assert float(schedule(50)) == pytest.approx(1e-4)
    assert float(schedule(30)) == pytest.approx(5.5e-4)  # Half-way through steps 10 … 50.


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_on_matrices_only_whatever_their_rank(tiny_gpt, scan_layers):
    cfg, _, _ = tiny_gpt(bias=True, tie_embeddings=False)
    model = registry.build(dataclasses.replace(cfg, scan_layers=scan_layers))
    params = jax.eval_shape(lambda: nn.meta.unbox(  # Shapes only: no (slow, scanned) init.
        model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]))
    mask = optim.decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    block = mask["h"] if scan_layers else mask["h_0"]
    stacked = params["h"] if scan_layers else params["h_0"]
    assert stacked["attn"]["qkv"]["bias"].ndim == (4 if scan_layers else 3)  # Not a vector.
    decays = [block["attn"]["qkv"]["kernel"], block["attn"]["out"]["kernel"],
              block["mlp"]["fc"]["kernel"], block["mlp"]["proj"]["kernel"],
              mask["wte"]["embedding"], mask["wpe"]["embedding"], mask["lm_head"]["kernel"]]
    assert all(decays)
    kept = [block["attn"]["qkv"]["bias"], block["attn"]["out"]["bias"], block["mlp"]["fc"]["bias"],
            block["ln_1"]["scale"], block["ln_1"]["bias"], block["ln_2"]["scale"],
            mask["ln_f"]["scale"], mask["ln_f"]["bias"]]
    assert not any(kept)
    # Decay moves exactly the masked leaves: a zero-gradient step with weight decay, from params
    # that are all non-zero (biases start at zero, where decay would not show).
    tx = optim.make_optimizer(config(weight_decay=0.5, warmup_steps=0, lr=1e-2))
    ones = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), params)
    updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(ones)
    for moved, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mask), strict=True):
        assert np.any(np.asarray(moved) != 0) == m


def first_moment(opt_state):
    """Adam's first moment (mu) after one update: (1 − β1) · the gradient it was given."""
    return optax.tree.get(opt_state, "mu")


@pytest.mark.parametrize(("grad_clip", "scale"), [(1.0, 10.0), (1.0, 0.5), (0.0, 10.0)])
def test_gradients_are_clipped_by_their_global_norm(grad_clip, scale):
    params = {"a": jnp.ones((3, 4)), "b": jnp.ones((5,))}
    rng = np.random.default_rng(0)
    g = {k: rng.normal(size=v.shape) for k, v in params.items()}
    norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
    grads = {k: jnp.asarray(v / norm * scale, jnp.float32) for k, v in g.items()}  # Norm `scale`.
    c = config(grad_clip=grad_clip)
    tx = optim.make_optimizer(c)
    _, state = tx.update(grads, tx.init(params), params)
    factor = min(1.0, grad_clip / scale) if grad_clip > 0 else 1.0
    mu = first_moment(state)
    for k in params:
        np.testing.assert_allclose(mu[k], (1 - c.optim.beta1) * np.asarray(grads[k]) * factor,
                                   rtol=1e-5)


def test_a_non_finite_update_is_dropped_and_counted():
    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros((2,))}
    tx = optim.make_optimizer(config(warmup_steps=0, lr=1e-2))
    state = tx.init(params)
    bad = {"w": jnp.array([[1.0, jnp.nan], [0.0, 1.0]]), "b": jnp.ones((2,))}
    updates, state = tx.update(bad, state, params)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates)  # Params unchanged.
    assert int(state.total_notfinite) == 1 and int(state.notfinite_count) == 1
    np.testing.assert_array_equal(first_moment(state)["w"], 0.0)  # Moments untouched.
    updates, state = tx.update(jax.tree.map(lambda p: jnp.full_like(p, jnp.inf), params), state,
                               params)
    assert int(state.total_notfinite) == 2 and not any(bool(jnp.any(u)) for u in
                                                       jax.tree.leaves(updates))
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)  # Finite.
    assert int(state.total_notfinite) == 2 and int(state.notfinite_count) == 0
    assert all(bool(jnp.all(u < 0)) for u in jax.tree.leaves(updates))  # A descent step.
