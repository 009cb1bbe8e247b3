"""LSTM language model, `model.arch=lstm`: token embeddings → `num_layers` stacked LSTM layers
(Flax's `nn.OptimizedLSTMCell`, scanned over time by `nn.RNN`) → LM head, tied to the embeddings
or not; dropout (model.dropout) on the embeddings, between layers and on the last layer's output.

The baseline the Transformer is compared against at equal parameters and equal training FLOPs
(README "LSTM baseline"). It trains through the same loop, data, checkpoints and mesh rules as
the GPT (the registry's module contract), and decodes statefully (gpt_jax/generate.py carries each
layer's (c, h) from token to token: no window, no recomputation).

Fields of the `model` group it reads: vocab_size, vocab_multiple, num_layers, d_model (embedding
width D), lstm_hidden (cell width H; None → d_model), dropout, tie_embeddings (a tied head with
H ≠ D projects H → D first), init_std (the projection and an untied head), dtype.

Initialization: the cells keep Flax's LSTM initializers (LeCun-normal input kernels, orthogonal
recurrent kernels, zero biases), which keep gate pre-activations O(1) for unit-variance inputs;
so the token embeddings start N(0, 1) (`EMBEDDING_STD`, PyTorch's nn.Embedding default), not
N(0, init_std²). At GPT-2's 0.02 the first layer's gates hardly see their input and training
sits at the unigram loss for ~200 steps: on the shakespeare_char :cpu recipe with 2 layers of
222, val loss after 300 steps (20 val batches, seed 0) was 2.82 with 0.02, 2.14 with 0.02
inputs scaled ×50, and 1.97 with N(0, 1) (tied head; the GPT :cpu: 2.40).

Fields it does not read: max_seq_len is required by the registry contract but bounds nothing (an
LSTM's context is unbounded; sampling past the training length is allowed). The Transformer's
structural fields (heads, attention, positions, MLP, norms, bias: the gates always have biases,
activation) have no meaning here and are ignored, so a Transformer recipe runs with
--config.model.arch=lstm as it is; remat, scan_layers, logit_softcap and scale_embeddings could
apply to any model but are not implemented here, so `validate` refuses them rather than
silently doing nothing.

Shapes are named in suffixes: B batch, T time, D d_model, H lstm_hidden, F a layer's input width
(D for the first layer, H above it), V padded vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gpt_jax.config import check, one_of
from gpt_jax.models import registry
from gpt_jax.models.layers import DTYPES, Embed, VocabAndDtype, mask_padded_vocab
from gpt_jax.parallel.sharding import constrain

Array = jax.Array
# The recurrent state: one (c_BH, h_BH) pair per layer, bottom first, float32 (the cells'
# parameter dtype, whatever the compute dtype: the state accumulates over the whole sequence).
Carry = tuple[tuple[Array, Array], ...]
# Standard deviation of the token embeddings at init (see the module docstring).
EMBEDDING_STD = 1.0


@dataclasses.dataclass(frozen=True)
class LSTMConfig(VocabAndDtype):
    """Hyperparameters of an LSTM LM; each field is the `model.*` config field of the same name
    (configs/base.py documents them), vocab_size and max_seq_len resolved."""

    vocab_size: int
    vocab_multiple: int
    max_seq_len: int
    num_layers: int
    d_model: int
    lstm_hidden: int | None
    dropout: float
    tie_embeddings: bool
    init_std: float
    dtype: str

    @property
    def hidden(self) -> int:
        """H: the cells' width (lstm_hidden, or d_model when it is None)."""
        return self.d_model if self.lstm_hidden is None else self.lstm_hidden

    @property
    def projects(self) -> bool:
        """Whether the head projects H → D before the tied embedding matrix."""
        return self.tie_embeddings and self.hidden != self.d_model


class _Cell(nn.RNNCellBase):
    """Flax's OptimizedLSTMCell (its parameters under `cell`), optionally steered per step.

    With `flags`, the last two input features are not input but two 0/1 flags (nn.RNN scans one
    array, so they ride along with the step's input): `keep` (0: a new segment starts here, the
    state restarts from zeros) and `real` (0: left padding, the state passes through unchanged).
    Without them (training on unpacked rows, every decoded token) the step is the plain cell:
    the same parameters either way.
    """

    features: int
    flags: bool
    dtype: Any

    @nn.compact
    def __call__(self, carry: tuple[Array, Array],
                 inputs: Array) -> tuple[tuple[Array, Array], Array]:
        cell = nn.OptimizedLSTMCell(
            self.features,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     ("embed", "mlp")),
            recurrent_kernel_init=nn.with_logical_partitioning(nn.initializers.orthogonal(),
                                                               (None, "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
            name="cell",
        )
        if not self.flags:
            return cell(carry, inputs)
        x_BF, keep_B1, real_B1 = inputs[:, :-2], inputs[:, -2:-1] > 0, inputs[:, -1:] > 0
        carry = jax.tree.map(lambda s: jnp.where(keep_B1, s, jnp.zeros_like(s)), carry)
        new, _ = cell(carry, x_BF)
        new = jax.tree.map(lambda n, o: jnp.where(real_B1, n, o), new, carry)
        return new, new[1]

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> tuple[Array, Array]:
        """Zeros (c, h) [*batch, features] (`rng` unused: the state starts at zero)."""
        zeros = jnp.zeros((*input_shape[:-1], self.features), jnp.float32)
        return zeros, zeros

    @property
    def num_feature_axes(self) -> int:
        return 1


class LSTM(nn.Module):
    """Embeddings → stacked LSTM layers → head; float32 logits over the padded vocabulary (padded
    ids get finfo.min, so they never count in the loss nor get sampled).

    `__call__` is the registry's contract (every row starts from a zero state); `decode`
    continues from a given state and returns the state after the tokens (stateful sampling).
    """

    cfg: LSTMConfig

    def __call__(self, tokens_BT: Array, deterministic: bool = True,
                 segment_ids_BT: Array | None = None, positions_BT: Array | None = None) -> Array:
        """Logits [B, T, V] (float32) for every position, each row from a zero state. With
        `segment_ids_BT` [B, T] (packed documents), the state restarts from zeros where a new
        segment begins, so a document never sees the one before it. `positions_BT` is ignored:
        an LSTM knows order from its recurrence, not from position ids."""
        del positions_BT
        keep_BT = None
        if segment_ids_BT is not None:
            segment_ids_BT = constrain(segment_ids_BT, ("batch", "length"))
            same_BT = segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]
            keep_BT = jnp.concatenate([jnp.ones_like(same_BT[:, :1]), same_BT], axis=1)
        carry = self.initial_carry(tokens_BT.shape[0])
        return self._forward(tokens_BT, carry, deterministic, keep_BT, None)[0]

    def decode(self, tokens_BT: Array, carry: Carry,
               real_BT: Array | None = None) -> tuple[Array, Carry]:
        """(logits [B, T, V], state after the last token) for `tokens_BT` continuing from `carry`
        (`initial_carry` for a fresh start); no dropout. Where `real_BT` [B, T] is False (a left-
        padded prompt's padding) the state passes through unchanged, so padding leaves a row's
        state where it was (zeros before its prompt)."""
        return self._forward(tokens_BT, carry, True, None, real_BT)

    @nn.nowrap
    def initial_carry(self, batch_size: int) -> Carry:
        """The zero state of every layer, for `batch_size` rows."""
        zeros_BH = jnp.zeros((batch_size, self.cfg.hidden), jnp.float32)
        return tuple((zeros_BH, zeros_BH) for _ in range(self.cfg.num_layers))

    @nn.compact
    def _forward(self, tokens_BT: Array, carry: Carry, deterministic: bool,
                 keep_BT: Array | None, real_BT: Array | None) -> tuple[Array, Carry]:
        # One compact method builds every submodule, so that the layers can take the per-step
        # flags or not (a static choice per call) with the same parameters.
        cfg = self.cfg
        normal = nn.initializers.normal(cfg.init_std)
        wte = Embed(
            cfg.padded_vocab_size,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            # Unit variance, not init_std: see the module docstring.
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(EMBEDDING_STD),
                                                        ("vocab", "embed")),
            name="wte",
        )
        drop = nn.Dropout(cfg.dropout)
        x_BTF = constrain(wte(tokens_BT), ("batch", "length", "embed"))
        flags = keep_BT is not None or real_BT is not None
        if flags:
            ones_BT = jnp.ones(tokens_BT.shape, bool)
            keep_BT = ones_BT if keep_BT is None else keep_BT
            real_BT = ones_BT if real_BT is None else real_BT
            flags_BT2 = jnp.stack([keep_BT, real_BT], axis=-1).astype(cfg.compute_dtype)
        new_carry = []
        for i, layer_carry in enumerate(carry):
            x_BTF = drop(x_BTF, deterministic=deterministic)  # Embeddings, then between layers.
            if flags:
                x_BTF = jnp.concatenate([x_BTF.astype(cfg.compute_dtype), flags_BT2], axis=-1)
            # Parameters: lstm_{i}/cell/{ii,if,ig,io}/kernel (input), {hi,hf,hg,ho}/{kernel,bias}.
            cell = _Cell(cfg.hidden, flags, cfg.compute_dtype, name=f"lstm_{i}")
            layer_carry, x_BTF = nn.RNN(cell, return_carry=True)(x_BTF, initial_carry=layer_carry)
            x_BTF = constrain(x_BTF, ("batch", "length", "mlp"))
            new_carry.append(layer_carry)
        x_BTH = drop(x_BTF, deterministic=deterministic)
        if cfg.tie_embeddings:
            if cfg.projects:
                x_BTH = nn.Dense(
                    cfg.d_model,
                    use_bias=False,
                    dtype=cfg.compute_dtype,
                    param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(normal, ("mlp", "embed")),
                    name="proj",
                )(x_BTH)
            logits_BTV = wte.attend(x_BTH.astype(cfg.compute_dtype))
        else:
            logits_BTV = nn.Dense(
                cfg.padded_vocab_size,
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(normal, ("embed", "vocab")),
                name="lm_head",
            )(x_BTH)
        logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab")).astype(jnp.float32)
        logits_BTV = mask_padded_vocab(logits_BTV, cfg)
        return logits_BTV, tuple(new_carry)


def matmul_params(cfg: LSTMConfig) -> int:
    """Parameters that take part in a matmul per token: each layer's input kernels (4·F·H) and
    recurrent kernels (4·H·H), the H → D projection of a tied head, and the head (D·V tied, H·V
    untied). Not the gate biases, nor an untied embedding table (a lookup)."""
    H, D, V = cfg.hidden, cfg.d_model, cfg.padded_vocab_size
    cells = sum(4 * H * ((D if i == 0 else H) + H) for i in range(cfg.num_layers))
    head = (H * D if cfg.projects else 0) + D * V if cfg.tie_embeddings else H * V
    return cells + head


def flops_per_token(cfg: LSTMConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 · `matmul_params` (2 per multiply-add forward, 4 backward).

    Counted from the shapes, not from `num_params`; independent of `seq_len` (an LSTM does the
    same work per token at any length: no attention term). The gates' elementwise work (three
    sigmoids, two tanh, the state update: ~O(10·H) per layer) is not counted, as the GPT's
    softmax and GELU are not: MFU and equal-FLOPs comparisons count matmuls on both sides.
    """
    del num_params, seq_len
    return 6.0 * matmul_params(cfg)


def validate(config: ml_collections.ConfigDict) -> None:
    """The `model` group's values for an LSTM; one-line ConfigErrors naming field and fix."""
    m = config.model
    for field in ("num_layers", "d_model", "vocab_multiple"):
        check(m[field] >= 1, f"model.{field}={m[field]} must be ≥ 1.")
    check(m.lstm_hidden is None or m.lstm_hidden >= 1,
          f"model.lstm_hidden={m.lstm_hidden} must be ≥ 1 (or unset: d_model).")
    check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1).")
    one_of(m.dtype, "model.dtype", DTYPES)
    # Options the LSTM does not implement, which a user could expect to apply to any model:
    # refused rather than silently doing nothing.
    check(m.remat == "none", f"model.remat={m.remat!r} is not implemented for model.arch=lstm "
                             "(its activations are small); set model.remat=none.")
    check(not m.scan_layers, "model.scan_layers=True is not implemented for model.arch=lstm (its "
                             "layers compile quickly); set model.scan_layers=False.")
    check(m.logit_softcap == 0, f"model.logit_softcap={m.logit_softcap} is not implemented for "
                                "model.arch=lstm; set model.logit_softcap=0.")
    check(not m.scale_embeddings, "model.scale_embeddings=True is not implemented for "
                                  "model.arch=lstm; set model.scale_embeddings=False.")


def normalized(model: Mapping[str, Any]) -> dict[str, Any]:
    """A `model` group with lstm_hidden resolved (unset = d_model: the same shapes)."""
    m = dict(model)
    if m.get("lstm_hidden") is None:
        m["lstm_hidden"] = m.get("d_model")
    return m


ARCH = registry.register(registry.Architecture(
    name="lstm",
    config_class=LSTMConfig,
    module=LSTM,
    flops_per_token=flops_per_token,
    shape_fields=("num_layers", "d_model", "lstm_hidden", "vocab_size", "vocab_multiple",
                  "tie_embeddings"),
    normalize=normalized,
    decoding="recurrent",
    split_head=False,
    for_inference=lambda cfg: dataclasses.replace(cfg, dropout=0.0),
    uses_dropout=lambda cfg: cfg.dropout > 0,
    logical_axes=("batch", "length", "embed", "mlp", "vocab"),
    validate=validate,
))
