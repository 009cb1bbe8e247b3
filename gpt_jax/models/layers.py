"""Transformer building blocks: causal self-attention, MLP, pre-LN block.

Every module is a pure Flax Linen module usable on its own (init/apply). Parameters carry logical
axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, `norm`), and so do the main activations
(`batch`, `length`, … through `constrain`); the mapping to mesh axes lives in the config, never
here. Shapes are named in suffixes: B batch, T time, S cache slots, D d_model, N heads, H head dim,
F mlp. `positions_BT` ([B, T] or [1, T]) reach every block (see positions.py): schemes applied
inside attention use them; the learned table is added to the embeddings before the blocks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax.parallel.sharding import constrain

if TYPE_CHECKING:  # gpt.py imports this module.
    from gpt_jax.models.gpt import GPTConfig

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype → compute dtype.

# Activations named in config → functions. nanoGPT uses the exact (erf) GELU; GPT-2 / Hugging Face
# use the tanh approximation ("gelu_new").
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def dense_init(cfg: GPTConfig, axes: tuple[str | None, ...], residual: bool = False):
    """GPT-2 init: normal(init_std); residual output projections scaled by 1/sqrt(2·num_layers)."""
    std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if residual else cfg.init_std
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def bias_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class DecodeState(NamedTuple):
    """Where a decoding call writes in the KV cache (see gpt_jax/generate.py).

    Prompts are left-padded so that every row's newest token sits in the same cache slot; row b's
    real tokens start at `first_B[b]`, and a token in slot s has position s - first_B[b].
    """

    slot: jax.Array  # int32 scalar: the cache slot of the first input token.
    first_B: jax.Array  # int32 [B]: each row's first valid cache slot (left padding before it).


def attention_implementation(cfg: GPTConfig) -> str:
    """The `jax.nn.dot_product_attention` implementation: `auto` takes cuDNN's flash attention on
    CUDA GPUs of compute capability 8.0+ where it supports the shapes (16-bit compute, head_dim a
    multiple of 8 up to 128) and XLA elsewhere."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    device = jax.devices()[0]
    cuda = device.platform == "gpu" and "cuda" in device.client.platform_version.lower()
    # cuDNN's flash attention needs compute capability 8.0+ (Ampere); older cards take XLA.
    cuda = cuda and float(getattr(device, "compute_capability", "0")) >= 8.0
    supported = cfg.dtype == "bfloat16" and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
    return "cudnn" if cuda and supported else "xla"


def layer_norm(cfg: GPTConfig, name: str | None = None) -> nn.LayerNorm:
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
    """Multi-head causal self-attention with a fused QKV projection (GPT-2's c_attn layout).

    With `decode` set, keys and values go to a KV cache (the mutable `cache` collection, one
    max_seq_len window per row) and the queries attend to the cache instead of to each other.
    With `segment_ids_BT` (packed documents), a token attends only to its own segment's tokens
    up to itself; that mask takes XLA's attention (cuDNN's is used only without segments).
    """

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool = True,
                 decode: DecodeState | None = None, segment_ids_BT: Array | None = None,
                 positions_BT: Array | None = None) -> Array:
        # `positions_BT` is for position schemes applied to queries and keys; the learned table
        # (today's only scheme) is added before the blocks, so attention does not read them.
        del positions_BT
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
        # Same segment: [B, 1, T, T], broadcast over heads; None attends across the whole row.
        same_B1TT = None if segment_ids_BT is None else (
            segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])

        if decode is not None:
            if segment_ids_BT is not None:
                raise ValueError("decoding takes no segment ids: a KV-cache row is one document.")
            out_BTNH = self._attend_cache(q_BTNH, k_BTNH, v_BTNH, decode)
        elif not deterministic and cfg.attention_dropout > 0.0:
            # jax.nn.dot_product_attention has no dropout on the weights; Flax's explicit-weights
            # attention does. Only taken while training with attention_dropout > 0.
            T = x_BTD.shape[1]
            mask = nn.combine_masks(nn.make_causal_mask(jnp.ones((1, T), bool)), same_B1TT)
            out_BTNH = nn.dot_product_attention(
                q_BTNH, k_BTNH, v_BTNH,
                mask=mask,
                dropout_rng=self.make_rng("dropout"),
                dropout_rate=cfg.attention_dropout,
                deterministic=False,
                dtype=cfg.compute_dtype,
            )
        else:
            # A mask goes to XLA's implementation: cuDNN's flash attention is taken only without
            # one (config validation refuses attention_impl=cudnn with data.document_mask).
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BTNH, v_BTNH, mask=same_B1TT, is_causal=True,
                implementation="xla" if same_B1TT is not None else attention_implementation(cfg),
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

    def _attend_cache(self, q_BTNH: Array, k_BTNH: Array, v_BTNH: Array,
                      decode: DecodeState) -> Array:
        """Writes this call's keys/values at `decode.slot` and attends to the whole cache."""
        B, T, N, H = k_BTNH.shape
        S = self.cfg.max_seq_len
        k_cache = self.variable("cache", "k", jnp.zeros, (B, S, N, H), k_BTNH.dtype)
        v_cache = self.variable("cache", "v", jnp.zeros, (B, S, N, H), v_BTNH.dtype)
        k_cache.value = jax.lax.dynamic_update_slice_in_dim(k_cache.value, k_BTNH, decode.slot, 1)
        v_cache.value = jax.lax.dynamic_update_slice_in_dim(v_cache.value, v_BTNH, decode.slot, 1)
        q_slot_T = decode.slot + jnp.arange(T)
        k_slot_S = jnp.arange(S)
        causal_TS = k_slot_S[None, :] <= q_slot_T[:, None]
        # A padding query attends to itself only, so its (unused) output stays finite.
        valid_BTS = (k_slot_S[None, None, :] >= decode.first_B[:, None, None]) | (
            k_slot_S[None, :] == q_slot_T[:, None])[None]
        mask_B1TS = (causal_TS[None] & valid_BTS)[:, None]
        return jax.nn.dot_product_attention(
            q_BTNH, k_cache.value, v_cache.value, mask=mask_B1TS, implementation="xla"
        )


class MLP(nn.Module):
    """Position-wise feed-forward: D → mlp_ratio·D → activation → D."""

    cfg: GPTConfig

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

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool = True,
                 decode: DecodeState | None = None, segment_ids_BT: Array | None = None,
                 positions_BT: Array | None = None) -> Array:
        x_BTD = x_BTD + CausalSelfAttention(self.cfg, name="attn")(
            layer_norm(self.cfg, "ln_1")(x_BTD), deterministic, decode, segment_ids_BT,
            positions_BT)
        x_BTD = x_BTD + MLP(self.cfg, name="mlp")(layer_norm(self.cfg, "ln_2")(x_BTD), deterministic)
        return constrain(x_BTD, ("batch", "length", "embed"))


class ScannedBlock(Block):
    """A Block as an `nn.scan` body: (carry, broadcast args) → (carry, no per-layer output)."""

    def __call__(self, x_BTD: Array, deterministic: bool = True,
                 decode: DecodeState | None = None, segment_ids_BT: Array | None = None,
                 positions_BT: Array | None = None) -> tuple[Array, None]:
        return super().__call__(x_BTD, deterministic, decode, segment_ids_BT, positions_BT), None
