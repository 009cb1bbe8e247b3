"""GPT: decoder-only Transformer language model, `model.arch=gpt`: GPT-2 by default, and by
config the variants the literature names (positions, norms, MLPs, grouped-query attention, QK-norm,
additive attention, logit soft-capping), so that they can be ablated against each other.

Shapes are named in suffixes: B batch, T time, D d_model, V padded vocabulary, P soft-prompt
embeddings (finetune.prompt_tokens).
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
from gpt_jax.models import positions, registry
from gpt_jax.models.layers import (
    ACTIVATIONS,
    DTYPES,
    AttentionShapes,
    Block,
    DecodeState,
    Embed,
    ScannedBlock,
    mask_padded_vocab,
    norm,
)
from gpt_jax.parallel.sharding import constrain

Array = jax.Array

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
ATTENTIONS = ("dot_product", "additive")
MLPS = ("gelu", "swiglu", "relu2")
NORMS = ("layernorm", "rmsnorm")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class GPTConfig(AttentionShapes):
    """Hyperparameters of a GPT; each field is the `model.*` config field of the same name
    (configs/base.py documents them), vocab_size and max_seq_len resolved."""

    vocab_size: int
    vocab_multiple: int
    max_seq_len: int
    num_layers: int
    num_heads: int
    d_model: int
    mlp_ratio: int
    mlp_dim: int | None
    mlp_multiple: int
    mlp: str
    norm: str
    positions: str
    rope_theta: float
    scale_embeddings: bool
    num_kv_heads: int | None
    qk_norm: bool
    attention: str
    additive_chunk: int
    logit_softcap: float
    dropout: float
    attention_dropout: float
    bias: bool
    tie_embeddings: bool
    activation: str
    norm_eps: float
    init_std: float
    dtype: str
    attention_impl: str
    remat: str
    scan_layers: bool
    # Adapters (the finetune group; gpt_jax/finetune/): LoRA rank (0 = none), its alpha and
    # target projections, and soft-prompt embeddings (0 = none).
    lora_rank: int
    lora_alpha: float
    lora_targets: str
    prompt_tokens: int



class GPT(nn.Module):
    """Token embeddings (+ learned or sinusoidal positions) → N pre-norm blocks → final norm →
    LM head (soft-capped if model.logit_softcap).

    `__call__` returns float32 logits over the padded vocabulary; padded ids get a large negative
    logit so they never count in the loss nor get sampled. `hidden` and `head` are its two halves,
    for callers that want logits for only some positions at a time (chunked cross-entropy, decoding).
    """

    cfg: GPTConfig

    def setup(self) -> None:
        cfg = self.cfg
        emb_init = nn.initializers.normal(cfg.init_std)
        self.wte = Embed(
            cfg.padded_vocab_size,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(emb_init, ("vocab", "embed")),
        )
        if cfg.positions == "learned":
            self.wpe = Embed(
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
                in_axes=(nn.broadcast,) * 4,  # deterministic, decode, segment ids, positions.
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.h = [block(cfg) for _ in range(cfg.num_layers)]  # Named h_0, h_1, …
        self.ln_f = norm(cfg)
        if cfg.prompt_tokens:  # Soft-prompt tuning (Lester et al. 2021); gpt_jax/finetune/.
            self.soft_prompt = self.param(
                "soft_prompt", nn.with_logical_partitioning(emb_init, (None, "embed")),
                (cfg.prompt_tokens, cfg.d_model), jnp.float32)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.padded_vocab_size,
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(emb_init, ("embed", "vocab")),
            )

    def __call__(self, tokens_BT: Array, deterministic: bool = True,
                 decode: DecodeState | None = None, segment_ids_BT: Array | None = None,
                 positions_BT: Array | None = None) -> Array:
        """Logits [B, T, padded_vocab] (float32) for every position of `tokens_BT`."""
        return self.head(self.hidden(tokens_BT, deterministic, decode, segment_ids_BT,
                                     positions_BT))

    def hidden(self, tokens_BT: Array, deterministic: bool = True,
               decode: DecodeState | None = None, segment_ids_BT: Array | None = None,
               positions_BT: Array | None = None) -> Array:
        """The final-LayerNorm output [B, T, D].

        Positions: `positions_BT` if given ([B, T] or [1, T]), else 0 … T-1; with `decode`, keys
        and values go to the KV cache (apply with mutable=["cache"]) and positions count from
        each row's first token. With `segment_ids_BT` [B, T] (packed documents), attention stays
        inside each segment.

        With a soft prompt of P embeddings, every row is read after them: they take positions
        0 … P-1 and the tokens' positions move up by P; the output is the tokens' only. Decoding
        instead feeds them as ids V … V+P-1 (`prompt_ids`) in front of each prompt, so that they
        sit in the KV cache like tokens."""
        T, P = tokens_BT.shape[1], self.cfg.prompt_tokens
        if decode is not None:
            positions_BT = positions.decode_positions(decode.slot, decode.first_B, T,
                                                      self.cfg.max_seq_len)
        elif positions_BT is None:
            positions_BT = positions.sequence_positions(T)
        if P and decode is None:
            if segment_ids_BT is not None:
                raise ValueError("a soft prompt serves one sequence per row, and this batch has "
                                 "segments; use data.sft_packing=padded, data.document_mask=False.")
            B = tokens_BT.shape[0]
            tokens_BT = jnp.concatenate(
                [jnp.broadcast_to(prompt_ids(self.cfg)[None], (B, P)), tokens_BT], axis=1)
            prefix_BP = jnp.broadcast_to(jnp.arange(P, dtype=positions_BT.dtype)[None],
                                         (positions_BT.shape[0], P))
            positions_BT = jnp.concatenate([prefix_BP, positions_BT + P], axis=1)
        x_BTD = self._embed(tokens_BT)
        if self.cfg.scale_embeddings:  # Vaswani et al.'s √d_model.
            x_BTD = x_BTD * jnp.asarray(math.sqrt(self.cfg.d_model), x_BTD.dtype)
        if self.cfg.positions == "learned":
            x_BTD = x_BTD + self.wpe(positions_BT)
        elif self.cfg.positions == "sinusoidal":
            x_BTD = x_BTD + positions.sinusoidal(positions_BT, self.cfg.d_model).astype(
                x_BTD.dtype)
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
        x_BTD = self.drop(x_BTD, deterministic=deterministic)
        if segment_ids_BT is not None:
            segment_ids_BT = constrain(segment_ids_BT, ("batch", "length"))
        if self.cfg.scan_layers:
            x_BTD, _ = self.h(x_BTD, deterministic, decode, segment_ids_BT, positions_BT)
        else:
            for block in self.h:
                x_BTD = block(x_BTD, deterministic, decode, segment_ids_BT, positions_BT)
        if P and decode is None:
            x_BTD = x_BTD[:, P:]
        return self.ln_f(x_BTD)

    def _embed(self, tokens_BT: Array) -> Array:
        """Token embeddings [B, T, D]; with a soft prompt, ids from V on are its rows."""
        P, V = self.cfg.prompt_tokens, self.cfg.padded_vocab_size
        if not P:
            return self.wte(tokens_BT)
        is_prompt_BT = tokens_BT >= V
        x_BTD = self.wte(jnp.where(is_prompt_BT, 0, tokens_BT))
        rows_BTD = jnp.take(self.soft_prompt, jnp.clip(tokens_BT - V, 0, P - 1), axis=0)
        return jnp.where(is_prompt_BT[..., None], rows_BTD.astype(x_BTD.dtype), x_BTD)

    def head(self, x_BTD: Array) -> Array:
        """LM head: hidden states [B, T, D] → float32 logits [B, T, padded_vocab]."""
        cfg = self.cfg
        logits_BTV = self.wte.attend(x_BTD) if cfg.tie_embeddings else self.lm_head(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab"))
        logits_BTV = logits_BTV.astype(jnp.float32)
        if cfg.logit_softcap > 0:  # Bounded logits, smooth near 0 (Gemma 2).
            logits_BTV = cfg.logit_softcap * jnp.tanh(logits_BTV / cfg.logit_softcap)
        logits_BTV = mask_padded_vocab(logits_BTV, cfg)
        return logits_BTV


def prompt_ids(cfg: GPTConfig) -> Array:
    """The ids [P] that stand for the soft prompt's embeddings when decoding: V … V+P-1, past
    the padded vocabulary (the head never predicts them)."""
    return cfg.padded_vocab_size + jnp.arange(cfg.prompt_tokens, dtype=jnp.int32)


def flops_per_token(cfg: GPTConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token, 6·N + 12·L·H·Q·T (PaLM appendix B, as nanoGPT).

    N counts the parameters that do matmuls: the position table never does, and an untied token
    table is a lookup (its LM head is counted). The second term is attention's QK^T and AV (for
    additive attention, its W_k·k, tanh and vᵀ per query-key pair: the same 2·H per pair, a
    lower bound of its cost, which is elementwise work, not matmuls).
    """
    n = num_params - (cfg.max_seq_len * cfg.d_model if cfg.positions == "learned" else 0)
    if not cfg.tie_embeddings:
        n -= cfg.padded_vocab_size * cfg.d_model
    return 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def validate(config: ml_collections.ConfigDict) -> None:
    """The `model` group's values for a GPT; one-line ConfigErrors naming field and fix."""
    m = config.model
    for field in ("num_layers", "num_heads", "d_model", "mlp_ratio", "vocab_multiple"):
        check(m[field] >= 1, f"model.{field}={m[field]} must be ≥ 1.")
    check(m.d_model % m.num_heads == 0,
          f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; "
          "choose heads so that d_model % num_heads == 0.")
    one_of(m.dtype, "model.dtype", DTYPES)
    one_of(m.attention_impl, "model.attention_impl", ATTENTION_IMPLS)
    if m.attention_impl == "cudnn":
        head_dim = m.d_model // m.num_heads
        check(m.dtype == "bfloat16" and head_dim % 8 == 0 and head_dim <= 128,
              f"model.attention_impl=cudnn needs model.dtype=bfloat16 and a head dim that is a "
              f"multiple of 8 up to 128 (got {m.dtype}, {head_dim}); use auto or xla.")
        check(not config.data.document_mask,
              "data.document_mask=True needs a masked attention, which model.attention_impl="
              "cudnn does not take here; use auto or xla (auto takes XLA when masking).")
    one_of(m.activation, "model.activation", ACTIVATIONS)
    one_of(m.mlp, "model.mlp", MLPS)
    one_of(m.norm, "model.norm", NORMS)
    one_of(m.positions, "model.positions", positions.POSITIONS)
    one_of(m.attention, "model.attention", ATTENTIONS)
    check(m.mlp_multiple >= 1, f"model.mlp_multiple={m.mlp_multiple} must be ≥ 1.")
    check(m.mlp_dim is None or m.mlp_dim >= 1,
          f"model.mlp_dim={m.mlp_dim} must be ≥ 1 (or unset for its default).")
    check(m.additive_chunk >= 1, f"model.additive_chunk={m.additive_chunk} must be ≥ 1.")
    check(m.logit_softcap >= 0, f"model.logit_softcap={m.logit_softcap} must be ≥ 0 (0 = off).")
    check(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be > 0.")
    if m.num_kv_heads is not None:
        check(m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads == 0,
              f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} "
              "(each kv head serves the same number of query heads); e.g. 1 or num_heads.")
    if m.positions == "rope":
        check((m.d_model // m.num_heads) % 2 == 0,
              f"model.positions=rope rotates pairs of dimensions: the head dim "
              f"{m.d_model // m.num_heads} must be even; change d_model or num_heads.")
    if m.positions == "alibi":
        check(m.attention_impl != "cudnn",
              "model.positions=alibi adds biases to the scores, which model.attention_impl=cudnn "
              "does not take here; use auto or xla (alibi runs on XLA's attention).")
    if m.attention == "additive":
        check(m.attention_impl != "cudnn",
              "model.attention=additive computes its own scores; model.attention_impl=cudnn "
              "is for dot_product attention: use auto or xla.")
    one_of(m.remat, "model.remat", REMAT_POLICIES)
    for field in ("dropout", "attention_dropout"):
        check(0.0 <= m[field] < 1.0, f"model.{field}={m[field]} must be in [0, 1).")
    # Fields of the encoder–decoder that a GPT would silently ignore.
    check(m.norm_position == "pre", f"model.norm_position={m.norm_position!r} is for model.arch="
                                    "seq2seq; a GPT is pre-norm: leave it at 'pre'.")
    for field in ("encoder_layers", "max_source_len"):
        check(m[field] is None, f"model.{field}={m[field]} is for model.arch=seq2seq; a GPT has "
                                "no encoder: leave it unset.")
    if m.max_seq_len is not None and m.positions == "learned":
        check(config.data.seq_len <= m.max_seq_len,
              f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
              "(positions); lower data.seq_len or raise model.max_seq_len.")


# Fields that change parameter shapes or names (scan_layers stacks them under h/); the MLP width
# and kv heads are compared as `normalized` resolves them (mlp_ratio and mlp_multiple only act
# through mlp_dim).
ARCH_SHAPE_FIELDS = ("num_layers", "num_heads", "d_model", "mlp_dim", "mlp", "norm", "positions",
                     "num_kv_heads", "qk_norm", "attention", "vocab_size", "vocab_multiple",
                     "max_seq_len", "bias", "tie_embeddings", "scan_layers")


def normalized(model: Mapping[str, Any]) -> dict[str, Any]:
    """A `model` group with num_kv_heads and mlp_dim resolved (GPTConfig.kv_heads, hidden_dim):
    unset and the value it stands for are the same shapes."""
    m = dict(model)
    if m.get("num_kv_heads") is None:
        m["num_kv_heads"] = m.get("num_heads")
    if m.get("mlp_dim") is None and all(k in m for k in ("mlp", "mlp_ratio", "d_model")):
        width = m["mlp_ratio"] * m["d_model"]
        if m["mlp"] == "swiglu":  # (A partial group without mlp_multiple stays unresolved.)
            width = (m["mlp_multiple"] * math.ceil(2 * width / 3 / m["mlp_multiple"])
                     if "mlp_multiple" in m else None)
        m["mlp_dim"] = width
    return m

ARCH = registry.register(registry.Architecture(
    name="gpt",
    config_class=GPTConfig,
    module=GPT,
    flops_per_token=flops_per_token,
    shape_fields=ARCH_SHAPE_FIELDS,
    # Without a position table, max_seq_len only sizes the KV cache: a run may read longer
    # sequences than it was trained on (length extrapolation).
    shape_fields_for=lambda m: tuple(
        f for f in ARCH_SHAPE_FIELDS if f != "max_seq_len" or m.get("positions") == "learned"),
    normalize=normalized,
    function_fields=("activation", "norm_eps", "rope_theta", "logit_softcap", "scale_embeddings"),
    decoding="kv_cache",
    split_head=True,
    # Remat and dropout do nothing for decoding but cost compile time.
    for_inference=lambda cfg: dataclasses.replace(cfg, remat="none", dropout=0.0,
                                                  attention_dropout=0.0),
    uses_dropout=lambda cfg: cfg.dropout > 0 or cfg.attention_dropout > 0,
    logical_axes=("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "norm", "layers"),
    validate=validate,
))
