"""Log-likelihood scoring of token sequences with one model, and the sliding-window text eval.

`Scorer` answers the two questions every log-likelihood evaluation asks of a causal language
model (lm-evaluation-harness's `loglikelihood` and `loglikelihood_rolling`): how likely is this
continuation after this context, and is it the greedy one; and how likely is this whole text.
Requests become rows of at most max_len input tokens (a target beside each, and a mask of the
targets that count), sorted by length and right-padded into [batch_size, L] arrays, L a power of
two from 32 up to max_len, so a few compiled shapes serve any mix of lengths. Right padding cannot
change a score: the model is causal, so no real token sees a padding token. Per-token
log-probabilities come back from the device in float32 and add up on the host in float64.

`text_batches` is the perplexity protocol as batch dicts for the train/eval step (windows of
seq_len + 1 tokens every `stride` tokens, each target scored once): with stride == seq_len it is
`pipeline.full_eval_batches` exactly, so `loop.evaluate` over it reproduces training's val loss.

Shapes are named in suffixes: B batch rows, L a row's (bucketed) length, V padded vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax.data.batch import lm_batch
from gpt_jax.data.pipeline import Tokens, TokenStream, as_stream
from gpt_jax.models import registry
from gpt_jax.parallel import distributed, sharding

Batch = dict[str, np.ndarray]

# The shortest row length compiled: shorter rows pad up to it (a compile costs more than the
# padding's compute at these sizes). Row lengths double from here up to max_len.
MIN_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class _Row:
    """One model input: `tokens` (≤ max_len + 1) give inputs tokens[:-1] and targets
    tokens[1:]; targets from index `first` on are scored, for request `request`."""

    request: int
    tokens: np.ndarray
    first: int

    @property
    def length(self) -> int:  # Input (and target) positions.
        return len(self.tokens) - 1


def _window_starts(num_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int]]:
    """(start, first scored target) of each window of seq_len + 1 tokens over a text of
    `num_tokens` (≥ 2): windows start every `stride` tokens; the first scores all its targets,
    each later one only the targets no earlier window scored (its last `stride`). Every target
    (token 1 … num_tokens - 1) is scored exactly once."""
    yield 0, 0
    start = stride
    while start + seq_len - stride + 1 < num_tokens:  # The window holds an unscored target.
        yield start, seq_len - stride
        start += stride


def _check_stride(seq_len: int, stride: int | None) -> int:
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride={stride} must be in [1, {seq_len}] (the window length); a "
                         "smaller stride gives each token more context at more compute.")
    return stride


def count_text_batches(num_tokens: int, seq_len: int, batch_size: int,
                       stride: int | None = None) -> int:
    """How many batches `text_batches` yields for a text of `num_tokens` tokens."""
    stride = _check_stride(seq_len, stride)
    num_windows = 1 + math.ceil(max(0, num_tokens - 1 - seq_len) / stride)
    return math.ceil(num_windows / batch_size)


def text_batches(tokens: Tokens, seq_len: int, batch_size: int,
                 stride: int | None = None) -> Iterator[Batch]:
    """Yields batch dicts (gpt_jax/data/batch.py) of [batch_size, seq_len] arrays that score every
    target of `tokens` (tokens[1:]) exactly once: the sliding-window perplexity protocol.

    Windows of seq_len + 1 tokens start every `stride` tokens (None: seq_len, no overlap); the
    first window scores all its targets, each later window only its last `stride` (weight 0 on
    the others, which are its context), so a smaller stride gives every token more context.
    The last window and batch are padded with token 0 and weight 0 (one static shape). With
    stride == seq_len the batches are `pipeline.full_eval_batches`'s, bit for bit.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive.")
    stride = _check_stride(seq_len, stride)
    tokens = as_stream(tokens)
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} token(s); scoring needs at least 2 (one "
                         "to read, one to predict).")
    return _text_batches(tokens, seq_len, batch_size, stride)


def _text_batches(tokens: TokenStream, seq_len: int, batch_size: int, stride: int
                  ) -> Iterator[Batch]:
    # A separate generator so that text_batches validates its arguments when called.
    windows = list(_window_starts(len(tokens), seq_len, stride))
    for b in range(0, len(windows), batch_size):
        batch = np.zeros((batch_size, seq_len + 1), dtype=np.int32)
        weights = np.zeros((batch_size, seq_len), dtype=np.float32)
        for row, (start, first) in enumerate(windows[b : b + batch_size]):
            window = tokens.read(start, start + seq_len + 1)
            batch[row, : len(window)] = window
            weights[row, first : len(window) - 1] = 1.0
        yield lm_batch(batch, weights)


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    """Bits per byte of a text: its summed negative log-likelihood `total_nats` (natural log,
    e.g. mean token loss × scored tokens) over `num_bytes`, the number of UTF-8 bytes of the
    evaluated text (the text whose tokens were scored), / ln 2. Unlike per-token loss it
    compares across tokenizers."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes={num_bytes}: bits per byte needs a non-empty text.")
    return float(total_nats) / (num_bytes * math.log(2))


# Module-level, the model static: scorers of one model share compiled programs.
@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _token_scores(model: nn.Module, params, inputs_BL: jax.Array, targets_BL: jax.Array,
                  replicated: NamedSharding | None, rules: sharding.Rules | None
                  ) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [B, L] float32, target == argmax [B, L]) at every position. `rules` is
    only part of the cache key: the trace reads them from the activation context."""
    logits_BLV = model.apply({"params": params}, inputs_BL, deterministic=True)
    logits_BLV = logits_BLV.astype(jnp.float32)
    # log p = logit − logsumexp: no second [B, L, V] array (a log_softmax) beside the logits.
    logp_BL = (jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
               - jax.nn.logsumexp(logits_BLV, axis=-1))
    greedy_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
    return sharding.replicate(logp_BL, replicated), sharding.replicate(greedy_BL, replicated)


def _position_sums(rows: int, logp_BL: jax.Array) -> np.ndarray:
    """Σ over a batch's first `rows` rows (the rest are padding) of log p at each position."""
    return np.sum(np.asarray(jax.device_get(logp_BL))[:rows], axis=0, dtype=np.float64)


class Scorer:
    """Log-likelihoods of token sequences under one decoder-only model (gpt, lstm)."""

    def __init__(self, model: nn.Module, params, *, max_len: int, batch_size: int,
                 mesh: jax.sharding.Mesh | None = None, rules: sharding.Rules | None = None):
        """`max_len`: tokens per row, the model's context (data.seq_len / model.max_seq_len);
        `batch_size`: rows per compiled call (padding rows never change a score). With `mesh`
        and `rules` (the training run's), rows are split over the mesh's batch axes and the model
        runs under its activation rules; `params` may then be sharded on it. Without, the
        default device."""
        arch = registry.arch_of(model.cfg)
        if arch.reads_pairs:
            raise ValueError(f"model.arch={arch.name!r} is an encoder-decoder model; log-likelihood "
                             "scoring needs a decoder-only one (gpt, lstm).")
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len ({max_len}) and batch_size ({batch_size}) must be positive.")
        cfg = arch.for_inference(model.cfg)
        soft = getattr(cfg, "prompt_tokens", 0)  # A soft prompt takes the first positions.
        if getattr(cfg, "positions", None) == "learned" and max_len + soft > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's {cfg.max_seq_len - soft} "
                             "learned positions (model.max_seq_len, less a soft prompt's); pass "
                             "a max_len that fits.")
        if (mesh is None) != (rules is None):
            raise ValueError("give mesh and rules together (the run's mesh and mesh.rules), or "
                             "neither for the default device.")
        self.max_len, self.batch_size = max_len, batch_size
        self.vocab_size = cfg.vocab_size
        self._model, self._params = registry.build(cfg), params
        self._mesh = mesh
        # Hashable (a static argument of the compiled scorer), whatever sequences they came in.
        self._rules = None if rules is None else tuple(
            (name, axes if axes is None or isinstance(axes, str) else tuple(axes))
            for name, axes in rules)
        self._sync = distributed.must_sync_each_step()
        self._replicated = None
        if mesh is not None:
            spec, _ = sharding.mesh_spec(("batch", None), (batch_size, 1), mesh.shape, rules)
            self._batch_sh = NamedSharding(mesh, spec)
            # Scores whole on every device, so that every process can read them.
            self._replicated = NamedSharding(mesh, P())

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                      ) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): (sum of log p(continuation token | all
        tokens before it), True iff every continuation token is the argmax).

        A context longer than fits is truncated from the left. A continuation longer than
        max_len is scored in chunks of max_len tokens from its start, each read in the row of
        the max_len + 1 tokens that ends with it, so every token is conditioned on up to max_len
        previous tokens (the first of a full chunk on only the one before it). The context must
        be non-empty; an empty continuation scores (0.0, True). Results are in `requests`' order.
        """
        rows = []
        for i, (context, continuation) in enumerate(requests):
            context = self._ids(context, f"request {i}'s context")
            continuation = self._ids(continuation, f"request {i}'s continuation")
            if not len(context):
                raise ValueError(f"request {i} has an empty context; give at least one token "
                                 "(e.g. the end-of-text token).")
            seq = np.concatenate([context, continuation])
            for a in range(len(context), len(seq), self.max_len):
                b = min(a + self.max_len, len(seq))
                start = max(0, b - self.max_len - 1)
                rows.append(_Row(i, seq[start:b], a - start - 1))
        totals, greedy, _ = self._score_rows(rows, len(requests))
        return [(float(t), bool(g)) for t, g in zip(totals, greedy, strict=True)]

    def rolling_loglikelihood(self, tokens: Sequence[int], stride: int | None = None
                              ) -> tuple[float, int]:
        """(sum of log p over tokens[1:], number of predicted tokens): windows of max_len with
        `stride` new tokens per window after the first (None: max_len, non-overlapping), the
        windows of `text_batches`; each token is predicted once."""
        return self.rolling_loglikelihoods([tokens], stride)[0]

    def rolling_loglikelihoods(self, texts: Sequence[Sequence[int]], stride: int | None = None
                               ) -> list[tuple[float, int]]:
        """`rolling_loglikelihood` of each text, their windows batched together."""
        stride = _check_stride(self.max_len, stride)
        rows = []
        for i, text in enumerate(texts):
            text = self._ids(text, f"text {i}")
            if len(text) < 2:  # Nothing to predict.
                continue
            for start, first in _window_starts(len(text), self.max_len, stride):
                rows.append(_Row(i, text[start : start + self.max_len + 1], first))
        totals, _, counts = self._score_rows(rows, len(texts))
        return [(float(t), int(n)) for t, n in zip(totals, counts, strict=True)]

    def position_losses(self, tokens: Tokens) -> tuple[np.ndarray, int]:
        """(mean negative log-likelihood at each position 0..max_len-1 [max_len] float64, number
        of windows) over the non-overlapping windows of max_len + 1 tokens of `tokens`. Position
        t predicts a window's token t + 1 from the t + 1 before it, so the curve shows how loss
        falls with context. A last partial window is left out: every position averages the same
        windows."""
        text = as_stream(tokens)  # A prepared split is read window by window.
        starts = range(0, len(text) - self.max_len, self.max_len)
        if not starts:
            raise ValueError(f"the text has {len(text)} tokens; per-position losses need at least "
                             f"one window of max_len + 1 = {self.max_len + 1}.")
        total_L = np.zeros(self.max_len, np.float64)
        pending = []
        context = (sharding.activation_context(self._mesh, self._rules) if self._mesh is not None
                   else contextlib.nullcontext())
        with context:
            for b in range(0, len(starts), self.batch_size):
                group = starts[b : b + self.batch_size]
                inputs_BL = np.zeros((self.batch_size, self.max_len), np.int32)
                targets_BL = np.zeros((self.batch_size, self.max_len), np.int32)
                for row, start in enumerate(group):
                    window = self._ids(text.read(start, start + self.max_len + 1), "the text")
                    inputs_BL[row], targets_BL[row] = window[:-1], window[1:]
                pending.append((len(group), _token_scores(
                    self._model, self._params, self._put(inputs_BL), self._put(targets_BL),
                    self._replicated, self._rules)[0]))
                if self._sync:
                    jax.block_until_ready(pending[-1][1])
                if len(pending) > 1:  # Summed one batch behind: the device stays busy, memory flat.
                    total_L -= _position_sums(*pending.pop(0))
        for rows, logp_BL in pending:
            total_L -= _position_sums(rows, logp_BL)
        return total_L / len(starts), len(starts)

    def _ids(self, ids: Sequence[int], what: str) -> np.ndarray:
        """`ids` as a 1-D int32 array, checked against the model's vocabulary."""
        array = np.asarray(ids, dtype=np.int64)
        if array.ndim != 1:
            raise ValueError(f"{what} is not a flat sequence of token ids (shape {array.shape}).")
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            bad = int(array[(array < 0) | (array >= self.vocab_size)][0])
            raise ValueError(f"{what} has token id {bad}, outside the model's vocabulary "
                             f"[0, {self.vocab_size}); encode it with the model's tokenizer.")
        return array.astype(np.int32)

    def _bucket(self, length: int) -> int:
        """The compiled row length for rows of up to `length` inputs."""
        size = MIN_BUCKET
        while size < length:
            size *= 2
        return min(size, self.max_len)

    def _put(self, array: np.ndarray) -> jax.Array:
        if self._mesh is None:
            return jax.device_put(array)
        # Every process holds every request, so each device reads its block of the whole array.
        return sharding.put_replicated_host(array, self._batch_sh)

    def _score_rows(self, rows: list[_Row], num_requests: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per request: (Σ scored log p in float64, all scored targets greedy, scored count)."""
        totals = np.zeros(num_requests, np.float64)
        greedy = np.ones(num_requests, bool)
        counts = np.zeros(num_requests, np.int64)
        # Longest first: batches of similar lengths waste little padding, and a length that
        # does not fit in memory fails at once.
        order = sorted(range(len(rows)), key=lambda r: -rows[r].length)
        groups = [[rows[r] for r in order[b : b + self.batch_size]]
                  for b in range(0, len(order), self.batch_size)]
        pending = []
        context = (sharding.activation_context(self._mesh, self._rules) if self._mesh is not None
                   else contextlib.nullcontext())
        with context:
            for group in groups:
                L = self._bucket(group[0].length)
                inputs_BL = np.zeros((self.batch_size, L), np.int32)
                targets_BL = np.zeros((self.batch_size, L), np.int32)
                for b, row in enumerate(group):
                    inputs_BL[b, : row.length] = row.tokens[:-1]
                    targets_BL[b, : row.length] = row.tokens[1:]
                pending.append(_token_scores(self._model, self._params, self._put(inputs_BL),
                                             self._put(targets_BL), self._replicated,
                                             self._rules))
                if self._sync:
                    jax.block_until_ready(pending[-1])
        for group, (logp_BL, greedy_BL) in zip(groups, jax.device_get(pending), strict=True):
            for b, row in enumerate(group):
                scored = slice(row.first, row.length)
                totals[row.request] += np.sum(logp_BL[b, scored], dtype=np.float64)
                greedy[row.request] &= bool(np.all(greedy_BL[b, scored]))
                counts[row.request] += row.length - row.first
        return totals, greedy, counts
