"""Train and eval steps on batch dicts: the weighted loss against a float64 NumPy reference,
masks under gradient accumulation, chunked cross-entropy, document masks, non-finite steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from gpt_jax.data.batch import lm_batch
from gpt_jax.models import registry
from gpt_jax.training import optim, step

B, T = 4, 16
# The model of most tests: one layer (fast compiles), a padded vocabulary (50 → 64: padded ids
# in every softmax), peaked logits (token losses that differ, so weightings differ).
NET = {"num_layers": 1, "vocab_multiple": 64, "init_std": 0.3}


def windows(vocab_size: int, seed: int = 0, rows: int = B) -> np.ndarray:
    """Random token windows [rows, T + 1]."""
    return np.random.default_rng(seed).integers(0, vocab_size, (rows, T + 1), dtype=np.int32)


def uneven_weights() -> np.ndarray:
    """A mask that falls unevenly over the strided micro-batches of grad_accum_steps=2 (rows
    0, 2 and rows 1, 3): 16 + 8 weighted tokens in one, 2 + 0 in the other, and fractions."""
    w = np.zeros((B, T), np.float32)
    w[0] = 1.0
    w[1, 3:5] = 1.0
    w[2, 8:] = 0.5
    return w


@functools.cache
def forward(hparams):
    """The jitted plain forward pass (logits) of the model `hparams` (compiled once per model)."""
    return jax.jit(registry.build(hparams).apply)


@functools.cache
def sgd_train_step(hparams, accum: int):
    """(model, jitted train step with `accum` micro-batches), compiled once per model."""
    model = registry.build(hparams)
    return model, jax.jit(step.make_train_step(model, optax.constant_schedule(1.0), accum, False))


# Updates params by −gradient, so a step's gradient can be read off; wrapped like the real
# optimizer so the step's non-finite bookkeeping works. One object: the jitted step's cache key.
SGD = optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=100)


def reference_ce(hparams, params, batch) -> np.ndarray:
    """Per-token cross-entropy [B, T] in float64 NumPy from the logits of a plain forward pass."""
    logits = np.asarray(forward(hparams)({"params": params}, batch["inputs"]), np.float64)
    top = logits.max(-1, keepdims=True)
    logsumexp = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    return logsumexp - picked


def reference_loss(hparams, params, batch) -> float:
    """Σ w·CE / Σ w in float64."""
    w = np.asarray(batch["weights"], np.float64)
    return float((w * reference_ce(hparams, params, batch)).sum() / w.sum())


def step_gradient(hparams, params, batch, accum: int):
    """(loss, gradient, grad_norm) of one train step with `accum` micro-batches."""
    model, train_step = sgd_train_step(hparams, accum)
    state = step.new_train_state(model.apply, params, SGD, jax.random.key(0))
    new_state, metrics = train_step(state, batch)
    grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                         params, new_state.params)
    return float(metrics["train/loss"]), grads, float(metrics["grad_norm"])


def test_weighted_loss_and_eval_step_equal_a_float64_reference(tiny_gpt):
    hparams, model, params = tiny_gpt(**NET)
    weights = np.random.default_rng(1).uniform(0, 2, (B, T)).astype(np.float32)
    weights[1, :5] = 0.0
    batch = lm_batch(windows(hparams.vocab_size), weights)
    ce = reference_ce(hparams, params, batch)
    want_total, want_count = float((weights * ce).sum()), float(weights.sum())
    eval_step = jax.jit(step.make_eval_step(model))  # model_loss: (Σ w·ℓ, Σ w) of the batch.
    total, count = eval_step(params, batch)
    np.testing.assert_allclose(float(count), want_count, rtol=1e-6)
    np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
    loss, _, _ = step_gradient(hparams, params, batch, 1)  # The train step's weighted mean.
    np.testing.assert_allclose(loss, want_total / want_count, rtol=1e-5)


def test_all_ones_weights_give_the_plain_mean(tiny_gpt):
    hparams, _, params = tiny_gpt(**NET)
    batch = lm_batch(windows(hparams.vocab_size, seed=2))  # Default weights: ones.
    assert batch["weights"].dtype == np.float32 and np.all(batch["weights"] == 1.0)
    loss, _, _ = step_gradient(hparams, params, batch, 1)
    np.testing.assert_allclose(loss, reference_ce(hparams, params, batch).mean(), rtol=1e-6)
    # The same figure as optax's plain mean over the model's float32 logits.
    logits = forward(hparams)({"params": params}, batch["inputs"])
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    np.testing.assert_allclose(loss, float(plain), rtol=1e-6)


def test_zero_weight_positions_change_neither_loss_nor_gradients(tiny_gpt):
    hparams, _, params = tiny_gpt(**NET)
    weights = uneven_weights()
    batch = lm_batch(windows(hparams.vocab_size, seed=3), weights)
    changed = dict(batch, targets=np.where(weights == 0, (batch["targets"] + 7) % 50,
                                           batch["targets"]))
    assert np.sum(changed["targets"] != batch["targets"]) > 20
    loss, grads, _ = step_gradient(hparams, params, batch, 1)
    loss2, grads2, _ = step_gradient(hparams, params, changed, 1)
    assert loss2 == loss
    jax.tree.map(np.testing.assert_array_equal, grads2, grads)
    # A weighted position's target does count.
    weighted = dict(batch, targets=batch["targets"].copy())
    weighted["targets"][0, 0] = (weighted["targets"][0, 0] + 1) % 50
    assert step_gradient(hparams, params, weighted, 1)[0] != loss


def test_accumulated_masked_loss_and_gradient_equal_the_whole_batch(tiny_gpt):
    """Σ w·ℓ / Σ w over the whole batch, however the mask falls over micro-batches: equal to the
    unaccumulated step and to a float64 reference, not the mean of micro-batch means."""
    hparams, model, params = tiny_gpt(**NET)
    batch = lm_batch(windows(hparams.vocab_size, seed=4), uneven_weights())
    want = reference_loss(hparams, params, batch)
    micro_means = np.mean([reference_loss(hparams, params, {k: v[i::2] for k, v in batch.items()})
                           for i in range(2)])
    assert abs(micro_means - want) > 1e-2  # The mask really is uneven: the wrong mean differs.

    def ref_loss(p):  # Independent of gpt_jax's loss code: optax over the plain forward pass.
        logits = model.apply({"params": p}, batch["inputs"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"])

    want_grads = jax.jit(jax.grad(ref_loss))(params)
    loss1, grads1, norm1 = step_gradient(hparams, params, batch, 1)
    loss2, grads2, norm2 = step_gradient(hparams, params, batch, 2)
    np.testing.assert_allclose([loss1, loss2], [want, want], rtol=1e-6)
    np.testing.assert_allclose(norm2, norm1, rtol=1e-5)

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    for got in (grads1, grads2):
        jax.tree.map(close, got, want_grads)
    jax.tree.map(close, grads2, grads1)


def test_chunked_cross_entropy_equals_the_plain_one(tiny_gpt):
    chunk = 4
    hparams, model, params = tiny_gpt(**NET)  # Padded vocab: ids stay masked chunk by chunk.
    weights = np.random.default_rng(6).uniform(0, 1, (B, T)).astype(np.float32)
    batch = lm_batch(windows(hparams.vocab_size, seed=5), weights)

    def loss(p):
        total, count = step.model_loss(p, model, batch, None, chunk)
        return total / count

    loss_and_grads = jax.jit(jax.value_and_grad(loss))
    got, got_grads = loss_and_grads(params)
    want, want_grads, _ = step_gradient(hparams, params, batch, 1)  # loss_chunk=0.
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got_grads,
                 want_grads)
    # The logits of one chunk at a time: no [B, T, V] array anywhere in the compiled step.
    hlo = loss_and_grads.lower(params).as_text()
    assert f"{B}x{chunk}x64" in hlo and f"{B}x{T}x64" not in hlo


def test_document_segment_ids_start_after_each_end_of_text():
    tokens = jnp.array([[5, 0, 7, 8, 0, 0, 3], [0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(step.document_segment_ids(tokens, eot_id=0),
                                  [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])


def test_eot_id_masks_attention_to_documents(tiny_gpt):
    """With eot_id and no segment_ids the loss is the one with the documents' segment ids;
    segment_ids given in the batch win over eot_id."""
    hparams, model, params = tiny_gpt(**NET)
    w = windows(hparams.vocab_size, seed=7)
    w[w == 0] = 1
    w[:, [4, 11]] = 0  # End-of-text tokens: three documents per row.
    batch = lm_batch(w)
    segments = np.asarray(step.document_segment_ids(jnp.asarray(batch["inputs"]), 0))
    assert segments.max() == 2

    def loss(b, eot_id=None):
        total, count = step.model_loss(params, model, b, None, 0, eot_id)
        return float(total / count)

    masked, plain = loss(batch, eot_id=0), loss(batch)
    assert masked == pytest.approx(loss(dict(batch, segment_ids=segments)), rel=1e-6)
    assert abs(masked - plain) > 1e-4
    one_segment = dict(batch, segment_ids=np.zeros_like(segments))
    assert loss(one_segment, eot_id=0) == pytest.approx(plain, rel=1e-6)


@functools.cache
def adamw_train_step(hparams):
    """(config, model, optimizer, jitted train step) with the real optimizer (AdamW, warmup 2
    steps to a constant 1e-2), compiled once per model (states must share the optimizer object:
    it is part of the jitted step's cache key)."""
    c = base.get_config()
    c.optim.lr = c.optim.min_lr = 1e-2
    c.optim.warmup_steps, c.optim.weight_decay, c.train.num_steps = 2, 0.0, 100
    model = registry.build(hparams)
    train_step = jax.jit(step.make_train_step(model, optim.make_schedule(c), 1, False))
    return c, model, optim.make_optimizer(c), train_step


def test_a_nan_weight_marks_the_step_and_leaves_the_params(tiny_gpt):
    hparams, _, params = tiny_gpt(**NET)
    c, model, tx, train_step = adamw_train_step(hparams)
    state = step.new_train_state(model.apply, params, tx, jax.random.key(0))
    good = lm_batch(windows(hparams.vocab_size, seed=8))
    bad = dict(good, weights=good["weights"].copy())
    bad["weights"][2, 5] = np.nan

    state, m = train_step(state, good)  # Step 1: finite.
    assert int(state.first_nonfinite_step) == 0 and int(m["train/nonfinite_steps"]) == 0
    before = jax.tree.map(np.asarray, state.params)
    state, m = train_step(state, bad)  # Step 2: NaN loss, update dropped.
    assert np.isnan(float(m["train/loss"]))
    assert int(state.first_nonfinite_step) == 2 and int(m["train/nonfinite_steps"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    state, m = train_step(state, bad)  # Step 3: the first bad step is kept.
    assert int(state.first_nonfinite_step) == 2 and int(m["train/nonfinite_steps"]) == 2
    state, m = train_step(state, good)  # Step 4: finite again, params move.
    assert np.isfinite(float(m["train/loss"])) and int(state.first_nonfinite_step) == 2
    assert not np.array_equal(np.asarray(state.params["wte"]["embedding"]),
                              before["wte"]["embedding"])
    # The schedule skips the dropped steps: step 4 is the optimizer's 2nd update (lr at 1 of 2
    # warmup steps).
    assert float(m["lr"]) == pytest.approx(c.optim.lr / 2)


def test_tiny_model_overfits_one_batch(tiny_gpt):
    hparams, _, params = tiny_gpt(**NET)
    _, model, tx, train_step = adamw_train_step(hparams)
    state = step.new_train_state(model.apply, params, tx, jax.random.key(0))
    batch = lm_batch(windows(hparams.vocab_size, seed=9))
    losses = []
    for _ in range(20):
        state, m = train_step(state, batch)
        losses.append(float(m["train/loss"]))
    assert losses[-1] < 0.1 * losses[0], losses[::10]
