"""Transformer building blocks: causal self-attention (dot-product or additive; multi-, grouped-
or multi-query heads; rotary or ALiBi positions; QK-norm), MLPs (GELU, SwiGLU, ReLU²), norms
(LayerNorm, RMSNorm), the pre-norm block.

Every module is a pure Flax Linen module usable on its own (init/apply). Parameters carry logical
axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, `norm`), and so do the main activations
(`batch`, `length`, … through `constrain`); the mapping to mesh axes lives in the config, never
here. Shapes are named in suffixes: B batch, T time (queries), S keys (cache slots, or T), D
d_model, N heads, K kv heads, G query heads per kv head, H head dim (A: additive attention's, = H),
C queries per chunk, F mlp. `positions_BT` ([B, T] or [1, T]) reach every block (see
positions.py): rope and alibi use them inside attention; learned and sinusoidal positions are
added to the embeddings before the blocks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax.models import positions
from gpt_jax.parallel.sharding import constrain

if TYPE_CHECKING:  # gpt.py imports this module.
    from gpt_jax.models.gpt import GPTConfig

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype → compute dtype.


class VocabAndDtype:
    """What every architecture's hyperparameters derive the same way (a mixin of their frozen
    dataclasses, which have the fields vocab_size, vocab_multiple and dtype)."""

    vocab_size: int
    vocab_multiple: int
    dtype: str

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up to model.vocab_multiple (the padded ids are masked)."""
        m = self.vocab_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def compute_dtype(self):
        """model.dtype as a jnp dtype."""
        return DTYPES[self.dtype]


class AttentionShapes(VocabAndDtype):
    """The derived widths of a Transformer's hyperparameters (GPT, encoder–decoder): a mixin of
    dataclasses with d_model, num_heads, num_kv_heads, mlp, mlp_dim, mlp_ratio, mlp_multiple."""

    d_model: int
    num_heads: int
    num_kv_heads: int | None
    mlp: str
    mlp_dim: int | None
    mlp_ratio: int
    mlp_multiple: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head: d_model / num_heads."""
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: num_kv_heads, or num_heads when it is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden width F (model.mlp_dim, or its default; see configs/base.py)."""
        if self.mlp_dim is not None:
            return self.mlp_dim
        if self.mlp == "swiglu":  # ⅔ of the width: three matrices, two's parameters (Llama).
            m = self.mlp_multiple
            return m * math.ceil(2 * self.mlp_ratio * self.d_model / 3 / m)
        return self.mlp_ratio * self.d_model


def mask_padded_vocab(logits_BTV: Array, cfg: VocabAndDtype) -> Array:
    """Float32 logits [B, T, V] with the padded ids (past vocab_size) at finfo.min: never in the
    loss's normaliser's way, never sampled."""
    if cfg.padded_vocab_size == cfg.vocab_size:
        return logits_BTV
    valid_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
    return jnp.where(valid_V, logits_BTV, jnp.finfo(jnp.float32).min)

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


# finetune.lora_targets: the projections by name, and the names that stand for several.
LORA_TARGETS = ("q", "k", "v", "out", "fc", "gate", "proj")
LORA_GROUPS = {"attention": ("q", "k", "v", "out"), "mlp": ("fc", "gate", "proj")}


def lora_targets(cfg: GPTConfig) -> frozenset[str]:
    """The projections LoRA adapts in `cfg`'s model (none when lora_rank is 0): the names of
    lora_targets, a group standing for those of its projections the model has (gate only with
    mlp=swiglu). Models without adapter fields (the encoder–decoder shares the MLP) have none."""
    if not getattr(cfg, "lora_rank", 0):
        return frozenset()
    names: set[str] = set()
    for name in (n.strip() for n in cfg.lora_targets.split(",")):
        if name in LORA_GROUPS:
            names.update(n for n in LORA_GROUPS[name] if n != "gate" or cfg.mlp == "swiglu")
        elif name:
            names.add(name)
    return frozenset(names)


class LoRA(nn.Module):
    """The low-rank update (alpha / r) · (x A) B of one projection (Hu et al. 2021), added to its
    output: A [in…, r] uniform in ±1/√fan_in (PEFT's and loralib's init), B [r, out…] zero, so a
    fresh adapter adds exactly 0. Computed on the activations, never as a [in, out] matrix, so
    the backward pass costs O(r), not a weight gradient of the frozen projection.

    `in_axes` name the logical axes of the trailing dimensions of x it contracts (their number
    is how many), `out_axes` those of `out_features`."""

    cfg: GPTConfig
    in_axes: tuple[str | None, ...]
    out_features: tuple[int, ...]
    out_axes: tuple[str | None, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, n_in, r = self.cfg, len(self.in_axes), self.cfg.lora_rank
        in_shape = x.shape[-n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))

        def a_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        a = self.param("a", nn.with_logical_partitioning(a_init, (*self.in_axes, None)),
                       (*in_shape, r), jnp.float32)
        b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         (None, *self.out_axes)),
                       (r, *self.out_features), jnp.float32)
        dt = cfg.compute_dtype
        xa = jnp.tensordot(x, a.astype(dt), axes=n_in)  # [..., r]
        return jnp.tensordot(xa, b.astype(dt), axes=1) * jnp.asarray(cfg.lora_alpha / r, dt)


class Embed(nn.Embed):
    """`nn.Embed` that gathers from its float32 table and casts the rows to `dtype` after.

    The values are bitwise those of `nn.Embed` (a cast commutes with a gather), but the table's
    gradient becomes a float32 scatter-add. `nn.Embed` casts the table first, so in bfloat16 the
    gradient is a bfloat16 scatter-add, which on GPUs serialises on atomics whenever ids repeat,
    as real text's do: on an H200 (docs/performance.md, 2026-12-01) it took 9.1 ms for one
    batch of the baby GPT's text (0.04 ms in float32), and GPT-2 small's step ran 58.6 ms on
    Zipf-distributed tokens against 34.4 ms on uniform ones.
    """

    def __call__(self, inputs: Array) -> Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"embedding ids must be integers, got {inputs.dtype}.")
        rows = jnp.take(self.embedding, inputs, axis=0)
        return rows if self.dtype is None else rows.astype(self.dtype)


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


def norm(cfg: GPTConfig, name: str | None = None) -> nn.Module:
    """model.norm: LayerNorm with optional bias (nanoGPT's bias=False drops it), or RMSNorm (no
    mean, no bias); statistics in float32."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                          scale_init=scale_init, name=name)
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        use_bias=cfg.bias,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        scale_init=scale_init,
        bias_init=bias_init(("norm",)),
        name=name,
    )


def head_norm(cfg: GPTConfig, name: str) -> nn.RMSNorm:
    """QK-norm: RMSNorm over each head's H dimensions, with its own scale [H]."""
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("kv",)),
                      name=name)


class CausalSelfAttention(nn.Module):
    """Causal self-attention: queries, keys and values per head, then softmax(scores) · v.

    Heads: N query heads share K = model.num_kv_heads key/value heads (grouped-query; K = N is
    multi-head, with GPT-2's fused QKV projection, K = 1 multi-query). model.qk_norm RMS-normalises
    queries and keys per head; model.positions=rope rotates them, alibi biases the scores.
    Scores: q·k/√H (dot_product), or vᵀ tanh(W_q q + W_k k) per head (additive, Bahdanau).

    With `decode` set, keys and values go to a KV cache (the mutable `cache` collection, one
    max_seq_len window of K heads per row) and the queries attend to the cache instead of to each
    other. With `segment_ids_BT` (packed documents), a token attends only to its own segment's
    tokens up to itself; that mask takes XLA's attention (cuDNN's is used only without segments).
    """

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool = True,
                 decode: DecodeState | None = None, segment_ids_BT: Array | None = None,
                 positions_BT: Array | None = None) -> Array:
        cfg = self.cfg
        if positions_BT is None:  # Used on its own: positions 0 … T-1.
            positions_BT = positions.sequence_positions(x_BTD.shape[1])
        q_BTNH, k_BTKH, v_BTKH = self._project(x_BTD)
        if cfg.qk_norm:
            q_BTNH = head_norm(cfg, "q_norm")(q_BTNH)
            k_BTKH = head_norm(cfg, "k_norm")(k_BTKH)
        if cfg.positions == "rope":
            q_BTNH = positions.rope(q_BTNH, positions_BT, cfg.rope_theta)
            k_BTKH = positions.rope(k_BTKH, positions_BT, cfg.rope_theta)
        if decode is not None:
            if segment_ids_BT is not None:
                raise ValueError("decoding takes no segment ids: a KV-cache row is one document.")
            k_BSKH, v_BSKH, mask_B1TS, k_pos_BS = self._cache(k_BTKH, v_BTKH, decode)
        else:
            k_BSKH, v_BSKH, k_pos_BS = k_BTKH, v_BTKH, positions_BT
            mask_B1TS = None if segment_ids_BT is None else (  # Same segment; causal below.
                segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
        bias_BNTS = (positions.alibi_bias(positions_BT, k_pos_BS, cfg.num_heads)
                     if cfg.positions == "alibi" else None)
        causal = decode is None  # The cache's mask is causal by slot already.
        dropout = not deterministic and cfg.attention_dropout > 0.0
        if cfg.attention == "additive" or dropout:
            out_BTNH = self._explicit(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, causal,
                                      dropout)
        else:
            # A mask or bias goes to XLA's implementation: cuDNN's flash attention is taken only
            # without (config validation refuses attention_impl=cudnn with data.document_mask).
            plain = mask_B1TS is None and bias_BNTS is None and decode is None
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask_B1TS, is_causal=causal,
                implementation=attention_implementation(cfg) if plain else "xla")
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
        if "out" in lora_targets(cfg):
            y_BTD = y_BTD + LoRA(cfg, ("heads", "kv"), (cfg.d_model,), ("embed",),
                                 name="lora_out")(out_BTNH)
        return nn.Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)

    def _project(self, x_BTD: Array) -> tuple[Array, Array, Array]:
        """(q [B, T, N, H], k and v [B, T, K, H]): GPT-2's fused QKV when K = N, else a query
        projection and a fused key/value one."""
        cfg = self.cfg
        N, K, H = cfg.num_heads, cfg.kv_heads, cfg.head_dim

        def dense(features: tuple[int, ...], axes: tuple[str | None, ...], name: str):
            return nn.DenseGeneral(
                features=features, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                param_dtype=jnp.float32, kernel_init=dense_init(cfg, ("embed", *axes)),
                bias_init=bias_init(axes), name=name)(x_BTD)

        if K == N:
            qkv_BT3NH = dense((3, N, H), (None, "heads", "kv"), "qkv")
            qkv_BT3NH = constrain(qkv_BT3NH, ("batch", "length", None, "heads", "kv"))
            q_BTNH, k_BTKH, v_BTKH = qkv_BT3NH[:, :, 0], qkv_BT3NH[:, :, 1], qkv_BT3NH[:, :, 2]
        else:
            q_BTNH = constrain(dense((N, H), ("heads", "kv"), "q"),
                               ("batch", "length", "heads", "kv"))
            kv_BT2KH = dense((2, K, H), (None, "heads", "kv"), "kv")
            kv_BT2KH = constrain(kv_BT2KH, ("batch", "length", None, "heads", "kv"))
            k_BTKH, v_BTKH = kv_BT2KH[:, :, 0], kv_BT2KH[:, :, 1]
        targets = lora_targets(cfg)  # Each of q, k, v its own adapter, fused kernel or not.
        for name in ("q", "k", "v") if targets else ():
            if name in targets:
                heads = N if name == "q" else K
                delta = LoRA(cfg, ("embed",), (heads, H), ("heads", "kv"), name=f"lora_{name}")(
                    x_BTD)
                if name == "q":
                    q_BTNH = q_BTNH + delta
                elif name == "k":
                    k_BTKH = k_BTKH + delta
                else:
                    v_BTKH = v_BTKH + delta
        return q_BTNH, k_BTKH, v_BTKH

    def _cache(self, k_BTKH: Array, v_BTKH: Array, decode: DecodeState
               ) -> tuple[Array, Array, Array, Array]:
        """Writes this call's keys/values at `decode.slot`; returns the whole cache (k, v), the
        mask of what each query may see [B, 1, T, S], and each slot's position [B, S]."""
        B, T, K, H = k_BTKH.shape
        S = self.cfg.max_seq_len
        k_cache = self.variable("cache", "k", jnp.zeros, (B, S, K, H), k_BTKH.dtype)
        v_cache = self.variable("cache", "v", jnp.zeros, (B, S, K, H), v_BTKH.dtype)
        k_cache.value = jax.lax.dynamic_update_slice_in_dim(k_cache.value, k_BTKH, decode.slot, 1)
        v_cache.value = jax.lax.dynamic_update_slice_in_dim(v_cache.value, v_BTKH, decode.slot, 1)
        q_slot_T = decode.slot + jnp.arange(T)
        k_slot_S = jnp.arange(S)
        causal_TS = k_slot_S[None, :] <= q_slot_T[:, None]
        # A padding query attends to itself only, so its (unused) output stays finite.
        valid_BTS = (k_slot_S[None, None, :] >= decode.first_B[:, None, None]) | (
            k_slot_S[None, :] == q_slot_T[:, None])[None]
        mask_B1TS = (causal_TS[None] & valid_BTS)[:, None]
        k_pos_BS = k_slot_S[None, :] - decode.first_B[:, None]  # As decode_positions counts.
        return k_cache.value, v_cache.value, mask_B1TS, k_pos_BS

    def _explicit(self, q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1TS: Array | None,
                  bias_BNTS: Array | None, causal: bool, dropout: bool) -> Array:
        """Attention with its weights materialised: additive scores, or dot-product ones with
        dropout on the weights (jax.nn.dot_product_attention has none)."""
        cfg = self.cfg
        _, T, N, _ = q_BTNH.shape
        S, K = k_BSKH.shape[1], k_BSKH.shape[2]
        G = N // K
        k_BSNH, v_BSNH = jnp.repeat(k_BSKH, G, axis=2), jnp.repeat(v_BSKH, G, axis=2)
        if cfg.attention != "additive":  # Dot-product with dropout: Flax's explicit attention.
            mask = nn.make_causal_mask(jnp.ones((1, T), bool)) if causal else None
            return nn.dot_product_attention(
                q_BTNH, k_BSNH, v_BSNH, bias=bias_BNTS, mask=nn.combine_masks(mask, mask_B1TS),
                dropout_rng=self.make_rng("dropout"), dropout_rate=cfg.attention_dropout,
                deterministic=False, dtype=cfg.compute_dtype)
        scores_BNTS = self._additive_scores(q_BTNH, k_BSKH)
        if bias_BNTS is not None:
            scores_BNTS = scores_BNTS + bias_BNTS
        keep = jnp.ones((1, 1, T, S), bool)
        if causal:  # Training: queries and keys are the same T tokens.
            keep = keep & jnp.tril(jnp.ones((T, S), bool))[None, None]
        if mask_B1TS is not None:
            keep = keep & mask_B1TS
        scores_BNTS = jnp.where(keep, scores_BNTS, jnp.finfo(jnp.float32).min)
        weights_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
        if dropout:
            weights_BNTS = nn.Dropout(cfg.attention_dropout)(weights_BNTS, deterministic=False)
        return jnp.einsum("bnts,bsnh->btnh", weights_BNTS.astype(v_BSNH.dtype), v_BSNH)

    def _additive_scores(self, q_BTNH: Array, k_BSKH: Array) -> Array:
        """Bahdanau scores [B, N, T, S] (float32): v_nᵀ tanh(W_q q + W_k k) for each head n, its
        [H, H] projections and [H] vector. The tanh needs every (query, key) pair's H-vector:
        [B, C, S, N, H] for C queries at a time (model.additive_chunk), recomputed in the backward
        pass (jax.checkpoint), so memory grows with the chunk, not with T²."""
        cfg = self.cfg
        B, T, N, H = q_BTNH.shape
        G = N // k_BSKH.shape[2]
        init = dense_init(cfg, ("heads", "kv", None))
        wq_NHA = self.param("additive_wq", init, (N, H, H), jnp.float32)
        wk_NHA = self.param("additive_wk", init, (N, H, H), jnp.float32)
        v_NA = self.param("additive_v", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("heads", "kv")), (N, H), jnp.float32)
        dt = cfg.compute_dtype
        qa_BTNA = jnp.einsum("btnh,nha->btna", q_BTNH, wq_NHA.astype(dt))
        ka_BSNA = jnp.einsum("bsnh,nha->bsna", jnp.repeat(k_BSKH, G, axis=2), wk_NHA.astype(dt))
        C = min(cfg.additive_chunk, T)
        pad = -T % C
        qa_nBCNA = jnp.pad(qa_BTNA, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
            B, -1, C, N, H).swapaxes(0, 1)

        @jax.checkpoint
        def chunk(qa_BCNA: Array) -> Array:
            e_BCSNA = jnp.tanh(qa_BCNA[:, :, None] + ka_BSNA[:, None])
            return jnp.einsum("bcsna,na->bncs", e_BCSNA, v_NA.astype(dt),
                              preferred_element_type=jnp.float32)

        scores_nBNCS = jax.lax.map(chunk, qa_nBCNA)
        S = ka_BSNA.shape[1]
        scores_BNTS = scores_nBNCS.transpose(1, 2, 0, 3, 4).reshape(B, N, -1, S)
        return scores_BNTS[:, :, :T]


class MLP(nn.Module):
    """Position-wise feed-forward, D → F → D (F = cfg.hidden_dim): gelu is fc → model.activation
    → proj; relu2 is fc → relu² → proj; swiglu is proj(silu(gate) · fc)."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        targets = lora_targets(cfg)

        def up(name: str) -> Array:
            h_BTF = nn.Dense(
                cfg.hidden_dim,
                use_bias=cfg.bias,
                dtype=cfg.compute_dtype,
                param_dtype=jnp.float32,
                kernel_init=dense_init(cfg, ("embed", "mlp")),
                bias_init=bias_init(("mlp",)),
                name=name,
            )(x_BTD)
            if name in targets:
                h_BTF = h_BTF + LoRA(cfg, ("embed",), (cfg.hidden_dim,), ("mlp",),
                                     name=f"lora_{name}")(x_BTD)
            return constrain(h_BTF, ("batch", "length", "mlp"))

        h_BTF = up("fc")
        if cfg.mlp == "swiglu":
            h_BTF = jax.nn.silu(up("gate")) * h_BTF
        elif cfg.mlp == "relu2":
            h_BTF = jnp.square(jax.nn.relu(h_BTF))
        else:
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
        if "proj" in targets:
            y_BTD = y_BTD + LoRA(cfg, ("mlp",), (cfg.d_model,), ("embed",), name="lora_proj")(h_BTF)
        return nn.Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool = True,
                 decode: DecodeState | None = None, segment_ids_BT: Array | None = None,
                 positions_BT: Array | None = None) -> Array:
        x_BTD = x_BTD + CausalSelfAttention(self.cfg, name="attn")(
            norm(self.cfg, "ln_1")(x_BTD), deterministic, decode, segment_ids_BT, positions_BT)
        x_BTD = x_BTD + MLP(self.cfg, name="mlp")(norm(self.cfg, "ln_2")(x_BTD), deterministic)
        return constrain(x_BTD, ("batch", "length", "embed"))


class ScannedBlock(Block):
    """A Block as an `nn.scan` body: (carry, broadcast args) → (carry, no per-layer output)."""

    def __call__(self, x_BTD: Array, deterministic: bool = True,
                 decode: DecodeState | None = None, segment_ids_BT: Array | None = None,
                 positions_BT: Array | None = None) -> tuple[Array, None]:
        return super().__call__(x_BTD, deterministic, decode, segment_ids_BT, positions_BT), None
