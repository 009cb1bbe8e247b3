"""GPT: decoder-only Transformer language model (GPT-2 architecture)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax.config import ModelConfig
from gpt_jax.models.layers import Block, DecodeState, ScannedBlock, layer_norm
from gpt_jax.parallel.sharding import constrain

Array = jax.Array


class GPT(nn.Module):
    """Token + learned position embeddings → N pre-LN blocks → final LayerNorm → LM head.

    `__call__` returns float32 logits over the padded vocabulary; padded ids get a large negative
    logit so they never count in the loss nor get sampled. `hidden` and `head` are its two halves,
    for callers that want logits for only some positions at a time (chunked cross-entropy, decoding).
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        emb_init = nn.initializers.normal(cfg.init_std)
        self.wte = nn.Embed(
            cfg.padded_vocab_size,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(emb_init, ("vocab", "embed")),
        )
        self.wpe = nn.Embed(
            cfg.max_seq_len,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(emb_init, (None, "embed")),
        )
        self.drop = nn.Dropout(cfg.dropout)
        block = ScannedBlock if cfg.scan_layers else Block
        if cfg.remat != "none":  # Recompute in the backward pass what the policy does not save.
            policy = None if cfg.remat == "full" else getattr(jax.checkpoint_policies, cfg.remat)
            block = nn.remat(block, policy=policy, static_argnums=(2,))  # self, x, deterministic.
        if cfg.scan_layers:  # One traced layer, its parameters stacked on a leading `layers` axis.
            self.h = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.h = [block(cfg) for _ in range(cfg.num_layers)]  # Named h_0, h_1, …
        self.ln_f = layer_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.padded_vocab_size,
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(emb_init, ("embed", "vocab")),
            )

    def __call__(self, tokens_BT: Array, deterministic: bool = True,
                 decode: DecodeState | None = None,
                 segment_ids_BT: Array | None = None) -> Array:
        """Logits [B, T, padded_vocab] (float32) for every position of `tokens_BT`."""
        return self.head(self.hidden(tokens_BT, deterministic, decode, segment_ids_BT))

    def hidden(self, tokens_BT: Array, deterministic: bool = True,
               decode: DecodeState | None = None,
               segment_ids_BT: Array | None = None) -> Array:
        """The final-LayerNorm output [B, T, D]. With `decode`, keys and values go to the KV
        cache (apply with mutable=["cache"]) and positions count from each row's first token.
        With `segment_ids_BT` [B, T] (packed documents), attention stays inside each segment;
        positions stay absolute (a row's, not restarted per document)."""
        T = tokens_BT.shape[1]
        if decode is None:
            pos_emb_BTD = self.wpe(jnp.arange(T))[None]
        else:
            pos_BT = decode.slot + jnp.arange(T)[None, :] - decode.first_B[:, None]
            pos_emb_BTD = self.wpe(jnp.clip(pos_BT, 0, self.cfg.max_seq_len - 1))
        x_BTD = self.wte(tokens_BT) + pos_emb_BTD
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
        x_BTD = self.drop(x_BTD, deterministic=deterministic)
        if segment_ids_BT is not None:
            segment_ids_BT = constrain(segment_ids_BT, ("batch", "length"))
        if self.cfg.scan_layers:
            x_BTD, _ = self.h(x_BTD, deterministic, decode, segment_ids_BT)
        else:
            for block in self.h:
                x_BTD = block(x_BTD, deterministic, decode, segment_ids_BT)
        return self.ln_f(x_BTD)

    def head(self, x_BTD: Array) -> Array:
        """LM head: hidden states [B, T, D] → float32 logits [B, T, padded_vocab]."""
        cfg = self.cfg
        logits_BTV = self.wte.attend(x_BTD) if cfg.tie_embeddings else self.lm_head(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab"))
        logits_BTV = logits_BTV.astype(jnp.float32)
        if cfg.padded_vocab_size != cfg.vocab_size:
            valid_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
            logits_BTV = jnp.where(valid_V, logits_BTV, jnp.finfo(jnp.float32).min)
        return logits_BTV


def count_params(params) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(x.size for x in jax.tree.leaves(params))
