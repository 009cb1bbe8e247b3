"""GPT: decoder-only Transformer language model (GPT-2 architecture)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax.config import ModelConfig
from gpt_jax.models.layers import Block, ScannedBlock, layer_norm
from gpt_jax.parallel.sharding import constrain

Array = jax.Array


class GPT(nn.Module):
    """Token + learned position embeddings → N pre-LN blocks → final LayerNorm → LM head.

    Returns float32 logits over the padded vocabulary; padded ids get a large negative logit so they
    never count in the loss nor get sampled.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        T = tokens_BT.shape[1]
        emb_init = nn.initializers.normal(cfg.init_std)
        wte = nn.Embed(
            cfg.padded_vocab_size,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(emb_init, ("vocab", "embed")),
            name="wte",
        )
        wpe = nn.Embed(
            cfg.max_seq_len,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(emb_init, (None, "embed")),
            name="wpe",
        )
        x_BTD = wte(tokens_BT) + wpe(jnp.arange(T))[None]
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
        block = ScannedBlock if cfg.scan_layers else Block
        if cfg.remat != "none":  # Recompute in the backward pass what the policy does not save.
            policy = None if cfg.remat == "full" else getattr(jax.checkpoint_policies, cfg.remat)
            block = nn.remat(block, policy=policy, static_argnums=(2,))  # self, x, deterministic.
        if cfg.scan_layers:  # One traced layer, its parameters stacked on a leading `layers` axis.
            block = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BTD, _ = block(cfg, name="h")(x_BTD, deterministic)
        else:
            for i in range(cfg.num_layers):
                x_BTD = block(cfg, name=f"h_{i}")(x_BTD, deterministic)
        x_BTD = layer_norm(cfg, "ln_f")(x_BTD)

        if cfg.tie_embeddings:
            logits_BTV = wte.attend(x_BTD)
        else:
            logits_BTV = nn.Dense(
                cfg.padded_vocab_size,
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(emb_init, ("embed", "vocab")),
                name="lm_head",
            )(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab"))
        logits_BTV = logits_BTV.astype(jnp.float32)
        if cfg.padded_vocab_size != cfg.vocab_size:
            valid_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
            logits_BTV = jnp.where(valid_V, logits_BTV, jnp.finfo(jnp.float32).min)
        return logits_BTV


def count_params(params) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(x.size for x in jax.tree.leaves(params))
