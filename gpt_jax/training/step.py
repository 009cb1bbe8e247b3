"""The jitted train and eval steps, and the loss they share.

A batch is a dict (see gpt_jax/data/batch.py): `inputs`, `targets`, `weights`, and optionally
`segment_ids` and `positions`, all [B, T]; for sequence pairs also `source` and `source_mask`
[B, S] (gpt_jax/data/pairs.py). Shapes: B batch, T time, D d_model, V vocabulary,
C loss chunk, A accumulation steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from gpt_jax.parallel.sharding import constrain

Array = jax.Array
Batch = dict[str, Array]


class TrainState(train_state.TrainState):
    """Params, optimizer state, step, the dropout key, and the first non-finite step (0 = none).

    The dropout key is raw uint32 key data (checkpointable as is); each step folds in its number,
    so a resumed run draws the same masks as an uninterrupted one.
    """

    dropout_key: Array
    first_nonfinite_step: Array


def new_train_state(apply_fn, params, tx: optax.GradientTransformation, seed_key: Array) -> TrainState:
    """A fresh state at step 0 (`seed_key` is a typed PRNG key)."""
    return TrainState.create(
        apply_fn=apply_fn,
        params=params,
        tx=tx,
        dropout_key=jax.random.key_data(seed_key),
        first_nonfinite_step=jnp.zeros((), jnp.int32),
    )


def cross_entropy(logits_BTV: Array, targets_BT: Array, weights_BT: Array,
                  z_loss: float = 0.0) -> tuple[Array, Array]:
    """Sum of token losses weighted by `weights_BT`, and the sum of weights (float32). With
    `z_loss` > 0 each token's loss also has z_loss · logsumexp(logits)² (PaLM's z-loss)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    if z_loss > 0:
        losses_BT = losses_BT + z_loss * jnp.square(jax.nn.logsumexp(logits_BTV, axis=-1))
    return jnp.sum(losses_BT * weights_BT), jnp.sum(weights_BT)


def chunked_cross_entropy(head: Callable[[Array], Array], x_BTD: Array, targets_BT: Array,
                          weights_BT: Array, chunk: int, z_loss: float = 0.0
                          ) -> tuple[Array, Array]:
    """`cross_entropy(head(x_BTD), …)` computed `chunk` positions at a time.

    Only one chunk's logits [B, chunk, V] exist at once: each chunk is rematerialised in the
    backward pass (jax.checkpoint), so peak memory drops by T / chunk for the logits and their
    gradient. Chunks split the time axis, so a batch sharded over devices stays sharded.
    """
    B, T = targets_BT.shape
    n = T // chunk

    def split(a: Array) -> Array:  # [B, T, …] → [n, B, chunk, …]
        return a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_loss(x_BCD: Array, targets_BC: Array, weights_BC: Array) -> Array:
        return cross_entropy(head(x_BCD), targets_BC, weights_BC, z_loss)[0]

    def body(total: Array, xs: tuple[Array, Array, Array]) -> tuple[Array, None]:
        return total + chunk_loss(*xs), None

    xs = (split(x_BTD), split(targets_BT), split(weights_BT))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(weights_BT)


def document_segment_ids(tokens_BT: Array, eot_id: int) -> Array:
    """Segment ids [B, T] int32 numbering each row's documents 0, 1, … from its first token: an
    end-of-text token belongs to the document it ends; the token after it starts the next."""
    is_eot_BT = (tokens_BT == eot_id).astype(jnp.int32)
    return jnp.cumsum(is_eot_BT, axis=1) - is_eot_BT


def model_loss(params, model: nn.Module, batch: Batch, dropout_key: Array | None,
               loss_chunk: int, eot_id: int | None = None, z_loss: float = 0.0
               ) -> tuple[Array, Array]:
    """(Σ weights · next-token losses, Σ weights) over one batch dict.

    `batch`: `inputs` and `targets` [B, T] int32, `weights` [B, T] float32 (0 = no loss, as on
    padding or a prompt), optionally `segment_ids` [B, T] (attention stays inside a segment) and
    `positions` [B, T]. With `eot_id` (data.document_mask) and no `segment_ids`, segments are
    the documents the end-of-text tokens end (see `document_segment_ids`). `loss_chunk` > 0 takes
    `chunked_cross_entropy` over the model's hidden states (a model with `hidden`/`head`).
    `z_loss` > 0 adds the z-loss term (see `cross_entropy`)."""
    inputs_BT, targets_BT, weights_BT = batch["inputs"], batch["targets"], batch["weights"]
    deterministic = dropout_key is None
    rngs = None if deterministic else {"dropout": dropout_key}
    variables = {"params": params}
    segment_ids_BT = batch.get("segment_ids")
    if segment_ids_BT is None and eot_id is not None:
        segment_ids_BT = document_segment_ids(inputs_BT, eot_id)
    kwargs = {"deterministic": deterministic, "rngs": rngs}
    if segment_ids_BT is not None:  # Only what the batch has: a model need not take them all.
        kwargs["segment_ids_BT"] = segment_ids_BT
    if batch.get("positions") is not None:
        kwargs["positions_BT"] = batch["positions"]
    if "source" in batch:  # Sequence pairs (gpt_jax/data/pairs.py): the encoder's input.
        kwargs["source_BS"], kwargs["source_mask_BS"] = batch["source"], batch["source_mask"]
    if loss_chunk == 0:
        logits_BTV = model.apply(variables, inputs_BT, **kwargs)
        return cross_entropy(logits_BTV, targets_BT, weights_BT, z_loss)
    x_BTD = model.apply(variables, inputs_BT, method="hidden", **kwargs)
    head = functools.partial(model.apply, variables, method="head")
    return chunked_cross_entropy(head, x_BTD, targets_BT, weights_BT, loss_chunk, z_loss)


def make_train_step(
    model: nn.Module, schedule: optax.Schedule, grad_accum_steps: int, use_dropout: bool,
    loss_chunk: int = 0, eot_id: int | None = None, z_loss: float = 0.0,
    trainable: Any | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]]:
    """Returns train_step(state, batch) -> (state, metrics); jit it with the state donated.

    The loss is the weighted mean Σ w·ℓ / Σ w over the whole batch. With accumulation the batch
    is split into `grad_accum_steps` micro-batches inside one compiled step (a `lax.scan`); each
    contributes its weighted sum over the whole batch's Σ w, so a micro-batch with few weighted
    tokens (a masked fine-tuning batch) counts for what it holds, not as a full share. With
    all-ones weights and no accumulation this is exactly the mean token loss. `loss_chunk` > 0
    computes the cross-entropy that many positions at a time. With `eot_id`
    (data.document_mask), attention stays inside each document. `z_loss` > 0 adds PaLM's z-loss
    to what is optimised and logged as train/loss. `trainable` (a tree of bools like the params;
    None = all) freezes the others: no gradient flows into them (their gradients are zeros, so
    XLA computes none) and the step returns them as they were, bitwise (gpt_jax/finetune/).
    """

    def loss_fn(params, micro: Batch, key: Array | None, inv_weight: Array) -> Array:
        if trainable is not None:
            params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                                  trainable)
        total, _ = model_loss(params, model, micro, key, loss_chunk, eot_id, z_loss)
        return total * inv_weight

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        base_key = jax.random.wrap_key_data(state.dropout_key)
        step_key = jax.random.fold_in(base_key, state.step) if use_dropout else None
        # A product with 1 / Σw, not a division: what XLA made of the mean over a constant
        # token count before weights existed, so all-ones weights reproduce it bitwise.
        inv_weight = 1.0 / jnp.sum(batch["weights"])
        if grad_accum_steps == 1:
            loss, grads = grad_fn(state.params, batch, step_key, inv_weight)
        else:
            # Strided micro-batches (rows i, i + A, …): each device splits its own rows, so a
            # batch sharded over devices stays sharded without moving data.
            def split(x_BT: Array) -> Array:
                x_ABT = x_BT.reshape(-1, grad_accum_steps, *x_BT.shape[1:]).swapaxes(0, 1)
                return constrain(x_ABT, (None, "batch") + (None,) * (x_BT.ndim - 1))

            def accumulate(carry, xs):
                i, micro = xs
                key = None if step_key is None else jax.random.fold_in(step_key, i)
                loss_i, grads_i = grad_fn(state.params, micro, key, inv_weight)
                return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(grad_accum_steps), jax.tree.map(split, batch))
            )
        grad_norm = optax.tree.norm(grads)
        # optax.apply_if_finite (see optim.py) drops a non-finite update; remember the first one.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        first_bad = jnp.where(
            (state.first_nonfinite_step == 0) & ~finite, state.step + 1, state.first_nonfinite_step
        )
        new_state = state.apply_gradients(grads=grads).replace(first_nonfinite_step=first_bad)
        if trainable is not None:  # The frozen ones as they came in (their update was zero).
            new_state = new_state.replace(params=jax.tree.map(
                lambda new, old, t: new if t else old, new_state.params, state.params, trainable))
        metrics = {
            "train/loss": loss,
            "grad_norm": grad_norm,
            # Skipped (non-finite) steps do not advance the optimizer's own count.
            "lr": schedule(state.step - state.opt_state.total_notfinite),
            "train/nonfinite_steps": new_state.opt_state.total_notfinite,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, loss_chunk: int = 0, eot_id: int | None = None
                   ) -> Callable[[Any, Batch], tuple[Array, Array]]:
    """Returns eval_step(params, batch) -> (Σ weights · losses, Σ weights); with `eot_id`,
    attention masked to documents as in training."""

    def eval_step(params, batch: Batch) -> tuple[Array, Array]:
        return model_loss(params, model, batch, None, loss_chunk, eot_id)

    return eval_step
