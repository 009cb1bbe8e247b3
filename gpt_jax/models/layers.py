"""Transformer building blocks: causal self-attention, MLP, pre-LN block.

Every module is a pure Flax Linen module usable on its own (init/apply). Parameters carry logical
axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, `norm`), and so do the main activations
(`batch`, `length`, … through `constrain`); the mapping to mesh axes lives in the config, never
here. Shapes are named in suffixes: B batch, T time, D d_model, N heads, H head dim, F mlp.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax.config import ModelConfig
from gpt_jax.parallel.sharding import constrain

Array = jax.Array

# Activations named in config → functions. nanoGPT uses the exact (erf) GELU; GPT-2 / Hugging Face
# use the tanh approximation ("gelu_new").
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def dense_init(cfg: ModelConfig, axes: tuple[str | None, ...], residual: bool = False):
    """GPT-2 init: normal(init_std); residual output projections scaled by 1/sqrt(2·num_layers)."""
    std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if residual else cfg.init_std
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def bias_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    """LayerNorm with optional bias (nanoGPT's bias=False drops it); statistics in float32."""
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        use_bias=cfg.bias,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=bias_init(("norm",)),
        name=name,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection (GPT-2's c_attn layout)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        N, H = cfg.num_heads, cfg.head_dim
        qkv_BT3NH = nn.DenseGeneral(
            features=(3, N, H),
            use_bias=cfg.bias,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            kernel_init=dense_init(cfg, ("embed", None, "heads", "kv")),
            bias_init=bias_init((None, "heads", "kv")),
            name="qkv",
        )(x_BTD)
        qkv_BT3NH = constrain(qkv_BT3NH, ("batch", "length", None, "heads", "kv"))
        q_BTNH, k_BTNH, v_BTNH = (qkv_BT3NH[:, :, i] for i in range(3))

        use_dropout = not deterministic and cfg.attention_dropout > 0.0
        if use_dropout:
            # jax.nn.dot_product_attention has no dropout on the weights; Flax's explicit-weights
            # attention does. Only taken while training with attention_dropout > 0.
            T = x_BTD.shape[1]
            mask = nn.make_causal_mask(jnp.ones((1, T), bool))
            out_BTNH = nn.dot_product_attention(
                q_BTNH, k_BTNH, v_BTNH,
                mask=mask,
                dropout_rng=self.make_rng("dropout"),
                dropout_rate=cfg.attention_dropout,
                deterministic=False,
                dtype=cfg.compute_dtype,
            )
        else:
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BTNH, v_BTNH, is_causal=True, implementation=cfg.attention_impl
            )
        out_BTNH = constrain(out_BTNH, ("batch", "length", "heads", "kv"))
        y_BTD = nn.DenseGeneral(
            features=cfg.d_model,
            axis=(-2, -1),
            use_bias=cfg.bias,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            kernel_init=dense_init(cfg, ("heads", "kv", "embed"), residual=True),
            bias_init=bias_init(("embed",)),
            name="out",
        )(out_BTNH)
        return nn.Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)


class MLP(nn.Module):
    """Position-wise feed-forward: D → mlp_ratio·D → activation → D."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        h_BTF = nn.Dense(
            cfg.mlp_dim,
            use_bias=cfg.bias,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            kernel_init=dense_init(cfg, ("embed", "mlp")),
            bias_init=bias_init(("mlp",)),
            name="fc",
        )(x_BTD)
        h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
        h_BTF = ACTIVATIONS[cfg.activation](h_BTF)
        y_BTD = nn.Dense(
            cfg.d_model,
            use_bias=cfg.bias,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            kernel_init=dense_init(cfg, ("mlp", "embed"), residual=True),
            bias_init=bias_init(("embed",)),
            name="proj",
        )(h_BTF)
        return nn.Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool = True) -> Array:
        x_BTD = x_BTD + CausalSelfAttention(self.cfg, name="attn")(
            layer_norm(self.cfg, "ln_1")(x_BTD), deterministic
        )
        x_BTD = x_BTD + MLP(self.cfg, name="mlp")(layer_norm(self.cfg, "ln_2")(x_BTD), deterministic)
        return constrain(x_BTD, ("batch", "length", "embed"))


class ScannedBlock(Block):
    """A Block as an `nn.scan` body: (carry, deterministic) → (carry, no per-layer output)."""

    def __call__(self, x_BTD: Array, deterministic: bool = True) -> tuple[Array, None]:
        return super().__call__(x_BTD, deterministic), None
