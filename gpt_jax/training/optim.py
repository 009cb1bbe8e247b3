"""Optimizer: AdamW (decay on matrices only), linear warmup + cosine decay, global-norm clipping;
with adapters (gpt_jax/finetune/), for the adapters alone."""

from __future__ import annotations

import jax
import ml_collections
import optax

from gpt_jax.finetune import adapters


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to optim.lr, then cosine to optim.min_lr at optim.decay_steps."""
    o = config.optim
    decay_steps = o.decay_steps if o.decay_steps is not None else config.train.num_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=decay_steps,
        end_value=o.min_lr,
    )


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings) only; never on biases or norm scales, nor
    on adapters (LoRA's a and b, a soft prompt: finetune.*). By name, not rank: a fused QKV bias
    is 3-D, and scan_layers stacks every parameter."""
    def decays(path, _) -> bool:
        return getattr(path[-1], "key", None) in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The full update rule of a training step."""
    o = config.optim
    adamw = optax.adamw(
        make_schedule(config),
        b1=o.beta1,
        b2=o.beta2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        mask=decay_mask,
    )
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw
    if adapters.active(config.finetune):  # Only adapters train: no state, no update for the base.
        tx = optax.multi_transform({adapters.TRAIN: tx, adapters.FREEZE: optax.set_to_zero()},
                                   adapters.labels)
    # A non-finite gradient leaves params and moments as they were (train.on_nonfinite decides
    # whether the run then stops or goes on). The error budget is unbounded: with a finite budget
    # optax would apply a non-finite update once it is spent.
    return optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
