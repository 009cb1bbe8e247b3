"""Encoder–decoder Transformer, `model.arch=seq2seq` ("Attention is all you need", Vaswani et al.):
a bidirectional encoder over the source, a causal decoder over the target that cross-attends to
the encoder's output, and an LM head over the target vocabulary.

Source and target share one tokenizer and one vocabulary, and by default one embedding table
`wte` (shared embeddings, as in Vaswani et al. §3.4; model.share_embeddings=False gives the
encoder its own `wte_source`); with model.tie_embeddings the head is the target's table too.
Sources are right-padded: `source_mask_BS` is 1 on real tokens, 0 on padding, and no real token's
output depends on the padding (the encoder's keys and the decoder's cross-attention keys are
masked to real tokens; positions count from the first token, so padding after it moves nothing).

The options of the GPT family apply where they make sense: model.norm, mlp (layers.MLP),
num_kv_heads (grouped-query self- and cross-attention), positions (learned: one table per side,
model.max_seq_len target and model.max_source_len source rows; sinusoidal: added on both sides;
rope: rotates queries and keys of the self-attentions, not of cross-attention, whose source and
target positions do not share an origin; none), scale_embeddings, dropout, attention_dropout,
bias; init as GPT-2's, residual output projections scaled by 1/√(2·blocks of their stack).
model.norm_position=pre (the default) puts a norm before each sublayer and a final norm on
the encoder's and the decoder's outputs; post puts it after each residual add and has no final
norm: with positions=sinusoidal and scale_embeddings that is the original recipe. ALiBi is
refused (its bias is defined for causal attention), and so are the GPT-only options (additive
attention, QK-norm, soft-capping, remat, scan_layers, packed documents).

Decoding (gpt_jax/translate.py) encodes a source once (`encode`), then calls `decode` one token at
a time with `decode_slot`: the self-attention keys and values go to a KV cache (the mutable
`cache` collection, model.max_seq_len slots) and each cross-attention projects the encoder's
output to keys and values once, on the first call, and reads them from the cache afterwards.

Shapes are named in suffixes: B batch, S source length (encoder tokens; cross-attention keys), T
target length (decoder tokens), L self-attention cache slots (decoding), D d_model, N heads, K kv
heads, H head dim, F mlp width, V padded vocabulary. An attention between Q queries and P keys
has masks [B, 1, Q, P] (written B1TS, B11S, …: 1 where a query may see a key).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gpt_jax.config import check, one_of
from gpt_jax.models import gpt, positions, registry
from gpt_jax.models.layers import (
    ACTIVATIONS,
    DTYPES,
    MLP,
    AttentionShapes,
    Embed,
    attention_implementation,
    bias_init,
    dense_init,
    mask_padded_vocab,
    norm,
)
from gpt_jax.parallel.sharding import constrain

Array = jax.Array

NORM_POSITIONS = ("pre", "post")
# Every scheme but ALiBi, whose distance penalty is defined for causal attention only.
POSITIONS = tuple(p for p in positions.POSITIONS if p != "alibi")


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(AttentionShapes):
    """Hyperparameters of the encoder–decoder; each field is the `model.*` config field of the
    same name (configs/base.py documents them): vocab_size, max_seq_len (target positions; None →
    data.seq_len) and max_source_len (source positions; None → data.source_len) resolved."""

    vocab_size: int
    vocab_multiple: int
    max_seq_len: int
    max_source_len: int
    num_layers: int  # Decoder blocks.
    encoder_layers: int | None  # Encoder blocks; None → num_layers.
    num_heads: int
    num_kv_heads: int | None
    d_model: int
    mlp_ratio: int
    mlp_dim: int | None
    mlp_multiple: int
    mlp: str
    norm: str
    norm_position: str
    positions: str
    rope_theta: float
    scale_embeddings: bool
    dropout: float
    attention_dropout: float
    bias: bool
    tie_embeddings: bool
    share_embeddings: bool  # One token table for source and target; False: the encoder's own.
    activation: str
    norm_eps: float
    init_std: float
    dtype: str
    attention_impl: str

    def __post_init__(self) -> None:
        if self.max_source_len is None:  # registry.resolve fills only max_seq_len.
            raise ValueError("model.max_source_len is not resolved; set it, or build the "
                             "hyperparameters from a config whose build fills it from "
                             "data.source_len.")

    @property
    def n_encoder_layers(self) -> int:
        """Encoder blocks: encoder_layers, or num_layers when it is None."""
        return self.num_layers if self.encoder_layers is None else self.encoder_layers



# --- Attention. Keys and values have K heads; each serves N / K query heads (GQA). ---


def _attend(cfg: Seq2SeqConfig, q_BTNH: Array, k_BSKH: Array, v_BSKH: Array,
            keep_B1TS: Array | None, causal: bool, deterministic: bool) -> Array:
    """softmax(q·k/√H) · v [B, T, N, H] over the keys `keep_B1TS` allows (and, if `causal`, a
    key at most as far as the query, T = S). With attention dropout in training the weights are
    materialised (jax.nn.dot_product_attention has no dropout); otherwise a mask takes XLA's
    implementation, and only the unmasked causal case may take cuDNN's."""
    if deterministic or cfg.attention_dropout == 0.0:
        impl = attention_implementation(cfg) if keep_B1TS is None else "xla"
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=keep_B1TS,
                                            is_causal=causal, implementation=impl)
    _, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    k_BSNH, v_BSNH = jnp.repeat(k_BSKH, N // K, axis=2), jnp.repeat(v_BSKH, N // K, axis=2)
    scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH,
                             preferred_element_type=jnp.float32) / math.sqrt(H)
    keep = jnp.ones((1, 1, T, S), bool)
    if causal:
        keep = keep & jnp.tril(jnp.ones((T, S), bool))[None, None]
    if keep_B1TS is not None:
        keep = keep & keep_B1TS
    weights_BNTS = jax.nn.softmax(jnp.where(keep, scores_BNTS, jnp.finfo(jnp.float32).min), -1)
    weights_BNTS = nn.Dropout(cfg.attention_dropout)(weights_BNTS, deterministic=False)
    return jnp.einsum("bnts,bsnh->btnh", weights_BNTS.astype(v_BSNH.dtype), v_BSNH)


def _projection(cfg: Seq2SeqConfig, features: tuple[int, ...], axes: tuple[str | None, ...],
                name: str) -> nn.DenseGeneral:
    """An input projection D → `features` whose output dimensions have logical names `axes`."""
    return nn.DenseGeneral(features=features, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                           param_dtype=jnp.float32, kernel_init=dense_init(cfg, ("embed", *axes)),
                           bias_init=bias_init(axes), name=name)


def _output(cfg: Seq2SeqConfig, out_BTNH: Array, deterministic: bool) -> Array:
    """Heads → d_model (a residual projection: GPT-2's scaled init), then residual dropout."""
    out_BTNH = constrain(out_BTNH, ("batch", "length", "heads", "kv"))
    y_BTD = nn.DenseGeneral(
        features=cfg.d_model, axis=(-2, -1), use_bias=cfg.bias, dtype=cfg.compute_dtype,
        param_dtype=jnp.float32, kernel_init=dense_init(cfg, ("heads", "kv", "embed"), True),
        bias_init=bias_init(("embed",)), name="out")(out_BTNH)
    return nn.Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)


class SelfAttention(nn.Module):
    """Self-attention: bidirectional (the encoder's, masked to real tokens) or causal (the
    decoder's). Queries, keys and values come from one fused projection when K = N (as GPT-2's),
    else from a query projection and a fused key/value one; model.positions=rope rotates queries
    and keys by `positions_BT`.

    With `decode_slot` (causal only), this call's keys and values are written to the KV cache
    (`cache` collection, L = model.max_seq_len slots) from that slot on, and the queries attend to
    every written slot up to their own."""

    cfg: Seq2SeqConfig
    causal: bool

    @nn.compact
    def __call__(self, x_BTD: Array, keep_B1TT: Array | None, positions_BT: Array,
                 deterministic: bool = True, decode_slot: Array | None = None) -> Array:
        cfg = self.cfg
        N, K, H = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        if K == N:
            qkv_BT3NH = _projection(cfg, (3, N, H), (None, "heads", "kv"), "qkv")(x_BTD)
            qkv_BT3NH = constrain(qkv_BT3NH, ("batch", "length", None, "heads", "kv"))
            q_BTNH, k_BTKH, v_BTKH = qkv_BT3NH[:, :, 0], qkv_BT3NH[:, :, 1], qkv_BT3NH[:, :, 2]
        else:
            q_BTNH = _projection(cfg, (N, H), ("heads", "kv"), "q")(x_BTD)
            q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", "kv"))
            kv_BT2KH = _projection(cfg, (2, K, H), (None, "heads", "kv"), "kv")(x_BTD)
            kv_BT2KH = constrain(kv_BT2KH, ("batch", "length", None, "heads", "kv"))
            k_BTKH, v_BTKH = kv_BT2KH[:, :, 0], kv_BT2KH[:, :, 1]
        if cfg.positions == "rope":
            q_BTNH = positions.rope(q_BTNH, positions_BT, cfg.rope_theta)
            k_BTKH = positions.rope(k_BTKH, positions_BT, cfg.rope_theta)
        causal = self.causal
        if decode_slot is not None:
            if not self.causal:
                raise ValueError("only the decoder's (causal) self-attention has a KV cache.")
            k_BTKH, v_BTKH, keep_B1TT = self._cache(k_BTKH, v_BTKH, decode_slot)
            causal = False  # The cache's mask is causal by slot already.
        out_BTNH = _attend(cfg, q_BTNH, k_BTKH, v_BTKH, keep_B1TT, causal, deterministic)
        return _output(cfg, out_BTNH, deterministic)

    def _cache(self, k_BTKH: Array, v_BTKH: Array, slot: Array) -> tuple[Array, Array, Array]:
        """Writes this call's keys/values at `slot`; returns the whole cache (k, v [B, L, K, H])
        and which slots each query sees [1, 1, T, L] (those written, up to its own)."""
        B, T, K, H = k_BTKH.shape
        L = self.cfg.max_seq_len
        k_cache = self.variable("cache", "k", jnp.zeros, (B, L, K, H), k_BTKH.dtype)
        v_cache = self.variable("cache", "v", jnp.zeros, (B, L, K, H), v_BTKH.dtype)
        k_cache.value = jax.lax.dynamic_update_slice_in_dim(k_cache.value, k_BTKH, slot, 1)
        v_cache.value = jax.lax.dynamic_update_slice_in_dim(v_cache.value, v_BTKH, slot, 1)
        keep_TL = jnp.arange(L)[None, :] <= (slot + jnp.arange(T))[:, None]
        return k_cache.value, v_cache.value, keep_TL[None, None]


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder's output `memory_BSD` (keys and values), masked to
    the real source tokens `keep_BS`. No positions act here (rope's source and target positions
    do not share an origin): the memory carries the source positions.

    With `decode` set, the first call projects the memory to keys and values and stores them
    with the mask in the `cache` collection; later calls read them (memory and mask may be None)."""

    cfg: Seq2SeqConfig

    @nn.compact
    def __call__(self, x_BTD: Array, memory_BSD: Array | None, keep_BS: Array | None,
                 deterministic: bool = True, decode: bool = False) -> Array:
        cfg = self.cfg
        N, K, H = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        q_BTNH = _projection(cfg, (N, H), ("heads", "kv"), "q")(x_BTD)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", "kv"))
        if decode and self.has_variable("cache", "k"):
            k_BSKH, v_BSKH = self.get_variable("cache", "k"), self.get_variable("cache", "v")
            keep_BS = self.get_variable("cache", "keep")
        else:
            if memory_BSD is None:
                raise ValueError("cross-attention needs the encoder's output on its first call.")
            kv_BS2KH = _projection(cfg, (2, K, H), (None, "heads", "kv"), "kv")(memory_BSD)
            kv_BS2KH = constrain(kv_BS2KH, ("batch", "length", None, "heads", "kv"))
            k_BSKH, v_BSKH = kv_BS2KH[:, :, 0], kv_BS2KH[:, :, 1]
            if keep_BS is None:
                keep_BS = jnp.ones(memory_BSD.shape[:2], bool)
            if decode:
                self.put_variable("cache", "k", k_BSKH)
                self.put_variable("cache", "v", v_BSKH)
                self.put_variable("cache", "keep", keep_BS)
        out_BTNH = _attend(cfg, q_BTNH, k_BSKH, v_BSKH, keep_BS[:, None, None, :], False,
                           deterministic)
        return _output(cfg, out_BTNH, deterministic)


# --- Blocks and stacks. ---


def _residual(cfg: Seq2SeqConfig, x_BTD: Array, sublayer, name: str) -> Array:
    """x + sublayer(norm(x)) (pre-LN), or norm(x + sublayer(x)) (post-LN); the norm is `name`."""
    if cfg.norm_position == "pre":
        return x_BTD + sublayer(norm(cfg, name)(x_BTD))
    return norm(cfg, name)(x_BTD + sublayer(x_BTD))


class EncoderBlock(nn.Module):
    """Bidirectional self-attention over the real source tokens, then the MLP."""

    cfg: Seq2SeqConfig

    @nn.compact
    def __call__(self, x_BSD: Array, keep_B11S: Array, positions_BS: Array,
                 deterministic: bool = True) -> Array:
        cfg = self.cfg
        attn = SelfAttention(cfg, causal=False, name="attn")
        x_BSD = _residual(cfg, x_BSD, lambda h: attn(h, keep_B11S, positions_BS, deterministic),
                          "ln_1")
        mlp = MLP(cfg, name="mlp")
        x_BSD = _residual(cfg, x_BSD, lambda h: mlp(h, deterministic), "ln_2")
        return constrain(x_BSD, ("batch", "length", "embed"))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder's output, then the MLP."""

    cfg: Seq2SeqConfig

    @nn.compact
    def __call__(self, x_BTD: Array, memory_BSD: Array | None, keep_BS: Array | None,
                 positions_BT: Array, deterministic: bool = True,
                 decode_slot: Array | None = None) -> Array:
        cfg = self.cfg
        self_attn = SelfAttention(cfg, causal=True, name="self_attn")
        x_BTD = _residual(cfg, x_BTD, lambda h: self_attn(h, None, positions_BT, deterministic,
                                                           decode_slot), "ln_1")
        cross_attn = CrossAttention(cfg, name="cross_attn")
        x_BTD = _residual(cfg, x_BTD, lambda h: cross_attn(h, memory_BSD, keep_BS, deterministic,
                                                            decode_slot is not None), "ln_2")
        mlp = MLP(cfg, name="mlp")
        x_BTD = _residual(cfg, x_BTD, lambda h: mlp(h, deterministic), "ln_3")
        return constrain(x_BTD, ("batch", "length", "embed"))


class Encoder(nn.Module):
    """cfg.num_layers EncoderBlocks (Seq2Seq gives it its config with num_layers = the encoder's
    depth, so the residual init scales by it), then a final norm (pre-LN only)."""

    cfg: Seq2SeqConfig

    @nn.compact
    def __call__(self, x_BSD: Array, keep_BS: Array, positions_BS: Array,
                 deterministic: bool = True) -> Array:
        keep_B11S = keep_BS[:, None, None, :]
        for i in range(self.cfg.num_layers):
            x_BSD = EncoderBlock(self.cfg, name=f"block_{i}")(x_BSD, keep_B11S, positions_BS,
                                                              deterministic)
        return norm(self.cfg, "ln_f")(x_BSD) if self.cfg.norm_position == "pre" else x_BSD


class Decoder(nn.Module):
    """cfg.num_layers DecoderBlocks, then a final norm (pre-LN only)."""

    cfg: Seq2SeqConfig

    @nn.compact
    def __call__(self, x_BTD: Array, memory_BSD: Array | None, keep_BS: Array | None,
                 positions_BT: Array, deterministic: bool = True,
                 decode_slot: Array | None = None) -> Array:
        for i in range(self.cfg.num_layers):
            x_BTD = DecoderBlock(self.cfg, name=f"block_{i}")(
                x_BTD, memory_BSD, keep_BS, positions_BT, deterministic, decode_slot)
        return norm(self.cfg, "ln_f")(x_BTD) if self.cfg.norm_position == "pre" else x_BTD


class Seq2Seq(nn.Module):
    """Token embeddings (+ positions) → encoder over the source; token embeddings (+ positions)
    → decoder over the target inputs, cross-attending to the encoder → LM head. One token table
    serves both sides unless model.share_embeddings=False gives the encoder its own.

    `__call__` is the teacher-forced forward pass the train and eval steps take: float32 logits
    over the padded vocabulary for every decoder input (padded ids get finfo.min, as GPT.head).
    `encode` and `decode` are its two halves, for decoding.
    """

    cfg: Seq2SeqConfig

    def setup(self) -> None:
        cfg = self.cfg
        emb_init = nn.initializers.normal(cfg.init_std)
        def tokens() -> Embed:
            return Embed(cfg.padded_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                            param_dtype=jnp.float32,
                            embedding_init=nn.with_logical_partitioning(emb_init,
                                                                        ("vocab", "embed")))

        self.wte = tokens()  # The target's (and the tied head's); the source's when shared.
        if not cfg.share_embeddings:
            self.wte_source = tokens()
        if cfg.positions == "learned":
            def table(rows: int) -> Embed:
                return Embed(rows, cfg.d_model, dtype=cfg.compute_dtype,
                                param_dtype=jnp.float32,
                                embedding_init=nn.with_logical_partitioning(emb_init,
                                                                            (None, "embed")))

            self.wpe = table(cfg.max_seq_len)  # Target positions.
            self.wpe_source = table(cfg.max_source_len)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(dataclasses.replace(cfg, num_layers=cfg.n_encoder_layers))
        self.decoder = Decoder(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.padded_vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(emb_init, ("embed", "vocab")))

    def __call__(self, inputs_BT: Array, deterministic: bool = True,
                 source_BS: Array | None = None, source_mask_BS: Array | None = None,
                 segment_ids_BT: Array | None = None, positions_BT: Array | None = None) -> Array:
        """Logits [B, T, V] (float32) of the target tokens that follow each decoder input
        (`inputs_BT`: BOS + the target shifted right), given the source.

        `source_BS` int32 right-padded ids; `source_mask_BS` 1 on real tokens, 0 on padding (None:
        all real). `positions_BT`: target positions (default 0 … T-1). Packed pairs
        (`segment_ids_BT`) are not supported. At init only, a missing source stands for a
        one-token one (parameter shapes do not depend on the source's length)."""
        if segment_ids_BT is not None:
            raise ValueError("model.arch=seq2seq takes one source/target pair per row; packed "
                             "pairs (segment ids) are not supported.")
        if source_BS is None:
            if not self.is_initializing():
                raise ValueError("model.arch=seq2seq needs source_BS (and source_mask_BS).")
            source_BS = jnp.zeros((inputs_BT.shape[0], 1), jnp.int32)
        memory_BSD = self.encode(source_BS, source_mask_BS, deterministic)
        return self.decode(inputs_BT, memory_BSD, source_mask_BS, deterministic, positions_BT)

    def encode(self, source_BS: Array, source_mask_BS: Array | None = None,
               deterministic: bool = True) -> Array:
        """The encoder's output [B, S, D] (its real tokens' rows do not depend on the padding)."""
        cfg = self.cfg
        S = source_BS.shape[1]
        if cfg.positions == "learned" and source_BS.shape[1] > cfg.max_source_len:
            raise ValueError(f"a source of {S} tokens exceeds model.max_source_len="
                             f"{cfg.max_source_len} (learned source positions); cut it.")
        keep_BS = (jnp.ones(source_BS.shape, bool) if source_mask_BS is None
                   else source_mask_BS.astype(bool))
        keep_BS = constrain(keep_BS, ("batch", "length"))
        positions_BS = positions.sequence_positions(S)
        x_BSD = self._embed(source_BS, positions_BS, self.wpe_source if cfg.positions == "learned"
                            else None, deterministic,
                            self.wte if cfg.share_embeddings else self.wte_source)
        return self.encoder(x_BSD, keep_BS, positions_BS, deterministic)

    def decode(self, inputs_BT: Array, memory_BSD: Array | None,
               source_mask_BS: Array | None = None, deterministic: bool = True,
               positions_BT: Array | None = None, decode_slot: Array | None = None) -> Array:
        """Logits [B, T, V] of the decoder over `inputs_BT` given the encoder's output.

        With `decode_slot` (an int32 scalar; apply with mutable=["cache"]): the inputs are the
        target tokens at positions decode_slot … decode_slot + T - 1, their keys and values go to
        the self-attention cache, and the first such call caches the cross-attention's keys,
        values and source mask, so later calls may pass memory_BSD=None and no mask."""
        cfg = self.cfg
        T = inputs_BT.shape[1]
        if decode_slot is not None:
            positions_BT = decode_slot + positions.sequence_positions(T)
        elif positions_BT is None:
            positions_BT = positions.sequence_positions(T)
        keep_BS = None if source_mask_BS is None else source_mask_BS.astype(bool)
        x_BTD = self._embed(inputs_BT, positions_BT,
                            self.wpe if cfg.positions == "learned" else None, deterministic,
                            self.wte)
        x_BTD = self.decoder(x_BTD, memory_BSD, keep_BS, positions_BT, deterministic, decode_slot)
        return self._head(x_BTD)

    def _embed(self, tokens_BT: Array, positions_BT: Array, table: Embed | None,
               deterministic: bool, token_table: Embed) -> Array:
        """Token embeddings from `token_table` (× √D with scale_embeddings) + learned or
        sinusoidal positions, then embedding dropout."""
        cfg = self.cfg
        x_BTD = token_table(tokens_BT)
        if cfg.scale_embeddings:  # Vaswani et al.'s √d_model.
            x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), x_BTD.dtype)
        if table is not None:
            x_BTD = x_BTD + table(positions_BT)
        elif cfg.positions == "sinusoidal":
            x_BTD = x_BTD + positions.sinusoidal(positions_BT, cfg.d_model).astype(x_BTD.dtype)
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
        return self.drop(x_BTD, deterministic=deterministic)

    def _head(self, x_BTD: Array) -> Array:
        """Hidden states [B, T, D] → float32 logits [B, T, V], padded ids masked."""
        cfg = self.cfg
        logits_BTV = self.wte.attend(x_BTD) if cfg.tie_embeddings else self.lm_head(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab")).astype(jnp.float32)
        logits_BTV = mask_padded_vocab(logits_BTV, cfg)
        return logits_BTV


# --- What the registry needs. ---


def _norm_params(cfg: Seq2SeqConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def _attention_params(cfg: Seq2SeqConfig) -> tuple[int, int]:
    """(query + output projection parameters, key/value projection parameters) of one
    attention (fused or not, the same count)."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    b = int(cfg.bias)
    return D * N * H + b * N * H + N * H * D + b * D, 2 * (D * K * H + b * K * H)


def _mlp_params(cfg: Seq2SeqConfig) -> int:
    D, F, b = cfg.d_model, cfg.hidden_dim, int(cfg.bias)
    ups = 2 if cfg.mlp == "swiglu" else 1
    return ups * (D * F + b * F) + F * D + b * D


def encoder_params(cfg: Seq2SeqConfig) -> int:
    """Parameters of the encoder stack (its blocks and final norm; embeddings not included)."""
    qo, kv = _attention_params(cfg)
    block = qo + kv + _mlp_params(cfg) + 2 * _norm_params(cfg)
    return cfg.n_encoder_layers * block + (_norm_params(cfg) if cfg.norm_position == "pre" else 0)


def cross_kv_params(cfg: Seq2SeqConfig) -> int:
    """Parameters of the decoder's cross-attention key/value projections, which act on the
    encoder's output (once per source token), not on the target tokens."""
    return cfg.num_layers * _attention_params(cfg)[1]


def flops_per_token(cfg: Seq2SeqConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per TARGET token (T = seq_len), the GPT's 6·N + attention accounting
    (PaLM appendix B) for both halves, assuming every source has S = max_source_len tokens:

      6·N_target + 6·N_source·S/T + 12·N·H·(L_dec·T + L_dec·S + L_enc·S²/T),

    N_source the encoder's parameters and the cross-attention key/value projections (they run
    once per source token, spread here over the T target tokens of the example), N_target the
    other matmul parameters (decoder blocks, the head; position tables and an untied table's
    lookups excluded). The attention terms are the decoder's self-attention (T keys per query),
    cross-attention (S keys per target query) and the encoder's (S keys per source query)."""
    D, S, T = cfg.d_model, cfg.max_source_len, seq_len
    n = num_params
    if cfg.positions == "learned":
        n -= (cfg.max_seq_len + cfg.max_source_len) * D
    if not cfg.tie_embeddings:  # The table is only looked up; the head's matmul counts.
        n -= cfg.padded_vocab_size * D
    if not cfg.share_embeddings:  # The source's own table: a lookup too.
        n -= cfg.padded_vocab_size * D
    n_source = encoder_params(cfg) + cross_kv_params(cfg)
    attention = 12 * cfg.num_heads * cfg.head_dim * (
        cfg.num_layers * T + cfg.num_layers * S + cfg.n_encoder_layers * S * S / T)
    return 6 * (n - n_source) + 6 * n_source * S / T + attention


def validate(config: ml_collections.ConfigDict) -> None:
    """The `model` group's values for the encoder–decoder; one-line ConfigErrors naming field
    and fix."""
    m, d = config.model, config.data
    for field in ("num_layers", "num_heads", "d_model", "mlp_ratio", "vocab_multiple",
                  "mlp_multiple"):
        check(m[field] >= 1, f"model.{field}={m[field]} must be ≥ 1.")
    check(m.encoder_layers is None or m.encoder_layers >= 1,
          f"model.encoder_layers={m.encoder_layers} must be ≥ 1 (or unset: num_layers).")
    check(m.d_model % m.num_heads == 0,
          f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; "
          "choose heads so that d_model % num_heads == 0.")
    one_of(m.dtype, "model.dtype", DTYPES)
    one_of(m.attention_impl, "model.attention_impl", gpt.ATTENTION_IMPLS)
    if m.attention_impl == "cudnn":
        head_dim = m.d_model // m.num_heads
        check(m.dtype == "bfloat16" and head_dim % 8 == 0 and head_dim <= 128,
              f"model.attention_impl=cudnn needs model.dtype=bfloat16 and a head dim that is a "
              f"multiple of 8 up to 128 (got {m.dtype}, {head_dim}); use auto or xla.")
    one_of(m.activation, "model.activation", ACTIVATIONS)
    one_of(m.mlp, "model.mlp", gpt.MLPS)
    one_of(m.norm, "model.norm", gpt.NORMS)
    one_of(m.norm_position, "model.norm_position", NORM_POSITIONS)
    check(m.positions != "alibi",
          "model.positions=alibi is causal-only here and model.arch=seq2seq has a bidirectional "
          "encoder; use learned, sinusoidal, rope or none.")
    one_of(m.positions, "model.positions", POSITIONS)
    check(m.mlp_dim is None or m.mlp_dim >= 1,
          f"model.mlp_dim={m.mlp_dim} must be ≥ 1 (or unset for its default).")
    check(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be > 0.")
    if m.num_kv_heads is not None:
        check(m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads == 0,
              f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} "
              "(each kv head serves the same number of query heads); e.g. 1 or num_heads.")
    if m.positions == "rope":
        check((m.d_model // m.num_heads) % 2 == 0,
              f"model.positions=rope rotates pairs of dimensions: the head dim "
              f"{m.d_model // m.num_heads} must be even; change d_model or num_heads.")
    for field in ("dropout", "attention_dropout"):
        check(0.0 <= m[field] < 1.0, f"model.{field}={m[field]} must be in [0, 1).")
    # GPT-only options: refused rather than silently ignored.
    for field, off in (("attention", "dot_product"), ("qk_norm", False), ("logit_softcap", 0.0),
                       ("remat", "none"), ("scan_layers", False)):
        check(m[field] == off, f"model.{field}={m[field]!r} is a model.arch=gpt option; "
                               f"model.arch=seq2seq takes only model.{field}={off!r}.")
    check(not d.document_mask, "data.document_mask=True packs documents; model.arch=seq2seq "
                               "takes one source/target pair per row: set it to False.")
    check(m.max_source_len is None or m.max_source_len >= 1,
          f"model.max_source_len={m.max_source_len} must be ≥ 1 (or unset: data.source_len).")
    check(d.source_len >= 1, f"data.source_len={d.source_len} must be ≥ 1.")
    if m.positions == "learned":
        if m.max_seq_len is not None:
            check(d.seq_len <= m.max_seq_len,
                  f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
                  "(target positions); lower data.seq_len or raise model.max_seq_len.")
        if m.max_source_len is not None:
            check(d.source_len <= m.max_source_len,
                  f"data.source_len={d.source_len} exceeds model.max_source_len="
                  f"{m.max_source_len} (source positions); lower data.source_len or raise "
                  "model.max_source_len.")


SHAPE_FIELDS = ("num_layers", "encoder_layers", "num_heads", "num_kv_heads", "d_model", "mlp_dim",
                "mlp", "norm", "norm_position", "positions", "vocab_size", "vocab_multiple",
                "max_seq_len", "max_source_len", "bias", "tie_embeddings", "share_embeddings")


def normalized(model: Mapping[str, Any]) -> dict[str, Any]:
    """A `model` group with num_kv_heads, mlp_dim (as gpt.normalized) and encoder_layers (unset
    = num_layers) resolved: unset and the value it stands for are the same shapes."""
    m = gpt.normalized(model)
    if m.get("encoder_layers") is None:
        m["encoder_layers"] = m.get("num_layers")
    return m


ARCH = registry.register(registry.Architecture(
    name="seq2seq",
    config_class=Seq2SeqConfig,
    module=Seq2Seq,
    flops_per_token=flops_per_token,
    shape_fields=SHAPE_FIELDS,
    # Position tables exist only for learned positions; otherwise the limits only size caches.
    shape_fields_for=lambda m: tuple(
        f for f in SHAPE_FIELDS
        if f not in ("max_seq_len", "max_source_len") or m.get("positions") == "learned"),
    normalize=normalized,
    function_fields=("activation", "norm_eps", "rope_theta", "scale_embeddings"),
    decoding="encoder_decoder",
    split_head=False,
    for_inference=lambda cfg: dataclasses.replace(cfg, dropout=0.0, attention_dropout=0.0),
    uses_dropout=lambda cfg: cfg.dropout > 0 or cfg.attention_dropout > 0,
    logical_axes=("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "norm"),
    validate=validate,
))
