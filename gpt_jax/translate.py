"""Decoding for encoder–decoder models (registry decoding="encoder_decoder", model.arch=seq2seq):
greedy, sampling and beam search, each one compiled `lax.while_loop` over target tokens.

Sources (1-D id arrays of any lengths) are sorted by length and decoded `batch_size` at a time,
each batch right-padded to a power of two tokens (≥ 8) and to `batch_size` rows (a call with
fewer sources: to a multiple of 8 rows; padding rows start finished), so that few programs
compile: one per source-length bucket. Each batch is encoded once; the first decoder call (BOS at
slot 0) caches every cross-attention's keys and values and the first self-attention keys and
values; each later step feeds one token through the KV cache. A loop stops as soon as every row
is finished.

Beam search (beam_size k > 1) runs B·k rows. At each step the k best one-token extensions of the
live hypotheses are taken (top-k of k·V log-probabilities); those that end with EOS leave the beam
and compete for the row's result with the length-penalised score log p / ((5 + n) / 6)^α (GNMT,
Wu et al. 2016; n counts the target tokens, EOS included), the others are the next step's live
hypotheses, their parents' self-attention caches gathered to their rows. At max_new_tokens the live
hypotheses are complete too. A row stops when no live hypothesis can beat its best finished one
(log p only falls as a hypothesis grows and the penalty is at most that of max_new_tokens, so
live log p / lp(max_new_tokens) bounds every extension's score). With k = 1 the one candidate is
the argmax: beam search is greedy decoding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gpt_jax.generate import SamplingParams, sample_logits
from gpt_jax.models import registry
from gpt_jax.parallel.sharding import put_replicated_host, replicate, replicated_like

Array = jax.Array
MIN_SOURCE_PAD = 8  # Sources are right-padded to a power of two tokens, at least this many.
GREEDY = SamplingParams(temperature=0.0)


class Translation(NamedTuple):
    """One decoded target."""

    tokens: np.ndarray  # int32 target ids, without BOS and without EOS.
    # Σ log p of the tokens (and of the EOS when one ended them) under the model's softmax at
    # temperature 1, whatever the sampling parameters.
    log_prob: float
    ended: bool  # Whether an EOS ended it (else it has max_new_tokens tokens).


def gnmt_length_penalty(length: int | Array, alpha: float) -> float | Array:
    """GNMT's length penalty ((5 + length) / 6)^α; a hypothesis ranks by log p / this."""
    return ((5.0 + length) / 6.0) ** alpha


def translate(model: nn.Module, params, sources: Sequence[np.ndarray], *, bos_id: int,
              eos_id: int, max_new_tokens: int, beam_size: int = 1, length_penalty: float = 0.6,
              sampling: SamplingParams = GREEDY,
              key: Array | None = None, batch_size: int = 64) -> list[np.ndarray]:
    """The decoded target ids (without BOS and EOS) of each source; see `translate_scored`."""
    return [t.tokens for t in translate_scored(
        model, params, sources, bos_id=bos_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
        beam_size=beam_size, length_penalty=length_penalty, sampling=sampling, key=key,
        batch_size=batch_size)]


def translate_scored(model: nn.Module, params, sources: Sequence[np.ndarray], *, bos_id: int,
                     eos_id: int, max_new_tokens: int, beam_size: int = 1,
                     length_penalty: float = 0.6,
                     sampling: SamplingParams = GREEDY,
                     key: Array | None = None, batch_size: int = 64) -> list[Translation]:
    """Decodes each source (1-D int arrays, any lengths, no padding) into at most
    `max_new_tokens` target tokens, EOS included, the decoder starting from `bos_id`.

    beam_size 1: greedy (sampling.temperature 0) or a draw per token with `sampling` (top-k,
    top-p) and `key` (the draws depend on the key and on which sources share a batch); beam_size
    > 1: `beam_search` (`sampling` must then be greedy), ranking by log p / ((5 + n) / 6)^α,
    α = length_penalty. `params` may be sharded on a mesh: inputs and outputs are then whole on
    every device of it. Returns one Translation per source, in order.
    """
    if beam_size > 1:
        if sampling.temperature != 0.0:
            raise ValueError(f"beam search (beam_size={beam_size}) ranks hypotheses, it draws "
                             "nothing: set the temperature to 0, or beam_size to 1 to sample.")
        return beam_search(model, params, sources, bos_id=bos_id, eos_id=eos_id,
                           max_new_tokens=max_new_tokens, beam_size=beam_size,
                           length_penalty=length_penalty, batch_size=batch_size)
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be ≥ 1.")
    if sampling.temperature != 0.0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a key.")
    decoder = _decoder(model, max_new_tokens)
    key_data = np.asarray(jax.random.key_data(jax.random.key(0) if key is None else key))

    def run(chunk: int, source_BS, mask_BS, live_B, replicated):
        # Batch i draws with fold_in(key, i).
        data = np.asarray(jax.random.key_data(
            jax.random.fold_in(jax.random.wrap_key_data(key_data), chunk)))
        if replicated is not None:
            data = put_replicated_host(data, replicated)
        return _sample(decoder, params, source_BS, mask_BS, live_B, data, bos=bos_id,
                       eos=eos_id, max_new_tokens=max_new_tokens, sampling=sampling,
                       replicated=replicated)

    return _in_batches(decoder.cfg, params, sources, batch_size, eos_id, run)


def beam_search(model: nn.Module, params, sources: Sequence[np.ndarray], *, bos_id: int,
                eos_id: int, max_new_tokens: int, beam_size: int, length_penalty: float = 0.6,
                batch_size: int = 64) -> list[Translation]:
    """Beam search for every beam_size, 1 included (which `translate_scored` decodes with the
    cheaper greedy loop): the best hypothesis of each source by log p / ((5 + n) / 6)^α,
    α = length_penalty ≥ 0. Arguments as `translate_scored`'s."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be ≥ 1.")
    if length_penalty < 0:
        raise ValueError(f"length_penalty={length_penalty} must be ≥ 0 (0 = none).")
    decoder = _decoder(model, max_new_tokens)

    def run(chunk: int, source_BS, mask_BS, live_B, replicated):
        # A traced α: every length penalty runs the same program.
        alpha = np.asarray(length_penalty, np.float32)
        if replicated is not None:
            alpha = put_replicated_host(alpha, replicated)
        return _beam(decoder, params, source_BS, mask_BS, live_B, alpha, bos=bos_id,
                     eos=eos_id, max_new_tokens=max_new_tokens, beam_size=beam_size,
                     replicated=replicated)

    return _in_batches(decoder.cfg, params, sources, batch_size, eos_id, run)


def _decoder(model: nn.Module, max_new_tokens: int) -> nn.Module:
    """The module to decode with: dropout off, and (without a position table) a self-attention
    cache of max_new_tokens slots, whatever model.max_seq_len."""
    arch = registry.arch_of(model.cfg)
    if arch.decoding != "encoder_decoder":
        raise ValueError(f"model.arch={arch.name!r} is not an encoder–decoder; decode it with "
                         "gpt_jax.generate.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be ≥ 1.")
    cfg = arch.for_inference(model.cfg)
    if cfg.positions == "learned":
        if max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds model.max_seq_len="
                             f"{cfg.max_seq_len} (learned target positions); lower it.")
    else:  # max_seq_len sizes only the cache then.
        cfg = dataclasses.replace(cfg, max_seq_len=max_new_tokens)
    return registry.build(cfg)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket(length: int) -> int:
    """The padded source length: a power of two, at least MIN_SOURCE_PAD (few programs
    compile, at most twice the tokens encoded)."""
    return max(MIN_SOURCE_PAD, 1 << max(length - 1, 0).bit_length())


def _in_batches(cfg, params, sources: Sequence[np.ndarray], batch_size: int, eos: int,
                run: Callable) -> list[Translation]:
    """Sorts the sources by length, pads each batch of them, calls `run(chunk index, source_BS,
    mask_BS, live_B, replicated)` → (tokens_BL, log_prob_B) and cuts each row at its first EOS."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be ≥ 1.")
    lengths = [len(s) for s in sources]
    if cfg.positions == "learned" and lengths and max(lengths) > cfg.max_source_len:
        raise ValueError(f"a source has {max(lengths)} tokens, more than model.max_source_len="
                         f"{cfg.max_source_len} (learned source positions); cut it.")
    # Params sharded on a mesh (the training run's): inputs and outputs whole on every device.
    replicated = replicated_like(params)
    order = sorted(range(len(sources)), key=lambda i: lengths[i])
    results: list[Translation | None] = [None] * len(sources)
    for chunk, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start:start + batch_size]
        S = _bucket(max(lengths[i] for i in rows))
        if cfg.positions == "learned":
            S = min(S, cfg.max_source_len)
        # Every batch of a call has the same rows (the last one padded), so one program serves
        # them all; a call of fewer sources takes fewer rows.
        B = batch_size if len(sources) > batch_size else min(_round_up(len(rows), 8), batch_size)
        source_BS = np.zeros((B, S), np.int32)
        mask_BS = np.zeros((B, S), np.int32)
        for b, i in enumerate(rows):
            source_BS[b, :lengths[i]] = np.asarray(sources[i], np.int32)
            mask_BS[b, :lengths[i]] = 1
        live_B = np.arange(B) < len(rows)
        inputs = [source_BS, mask_BS, live_B]
        if replicated is not None:
            inputs = [put_replicated_host(a, replicated) for a in inputs]
        tokens_BL, log_prob_B = run(chunk, *inputs, replicated)
        tokens_BL, log_prob_B = np.asarray(tokens_BL), np.asarray(log_prob_B)
        for b, i in enumerate(rows):
            row = tokens_BL[b]
            ends = np.flatnonzero(row == eos)
            n = int(ends[0]) if len(ends) else len(row)
            results[i] = Translation(row[:n].astype(np.int32), float(log_prob_B[b]),
                                     bool(len(ends)))
    return results


def _start(decoder: nn.Module, params, source_BS: Array, mask_BS: Array, bos: int
           ) -> tuple[Array, dict]:
    """Encodes the sources and runs BOS through the decoder at slot 0: the logits of the first
    target token [B, V] and the cache (with the cross-attention keys and values)."""
    memory_BSD = decoder.apply({"params": params}, source_BS, mask_BS, method="encode")
    bos_B1 = jnp.full((memory_BSD.shape[0], 1), bos, jnp.int32)
    logits_B1V, mutated = decoder.apply({"params": params}, bos_B1, memory_BSD, mask_BS,
                                        decode_slot=jnp.zeros((), jnp.int32), method="decode",
                                        mutable=["cache"])
    return logits_B1V[:, 0], mutated["cache"]


def _step(decoder: nn.Module, params, cache: dict, tokens_B: Array, slot: Array
          ) -> tuple[Array, dict]:
    """Feeds one token per row at cache `slot`: the next logits [B, V] and the cache."""
    logits_B1V, mutated = decoder.apply({"params": params, "cache": cache}, tokens_B[:, None],
                                        None, decode_slot=slot, method="decode",
                                        mutable=["cache"])
    return logits_B1V[:, 0], mutated["cache"]


@functools.partial(jax.jit, static_argnames=("decoder", "bos", "eos", "max_new_tokens",
                                             "sampling", "replicated"))
def _sample(decoder: nn.Module, params, source_BS: Array, mask_BS: Array, live_B: Array,
            key_data: Array, *, bos: int, eos: int, max_new_tokens: int,
            sampling: SamplingParams, replicated) -> tuple[Array, Array]:
    """Greedy or sampled decoding: (tokens [B, max_new_tokens], EOS after a row's end; Σ log p)."""
    keys_N = jax.random.split(jax.random.wrap_key_data(key_data), max_new_tokens)
    last_slot = decoder.cfg.max_seq_len - 1
    logits_BV, cache = _start(decoder, params, source_BS, mask_BS, bos)
    B = logits_BV.shape[0]

    def running(carry) -> Array:
        i, _, _, _, done_B, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def step(carry):
        i, cache, logits_BV, tokens_BL, done_B, log_prob_B = carry
        next_B = sample_logits(logits_BV, keys_N[i], sampling).astype(jnp.int32)
        token_log_prob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), next_B[:, None],
                                               axis=-1)[:, 0]
        log_prob_B = log_prob_B + jnp.where(done_B, 0.0, token_log_prob_B)
        next_B = jnp.where(done_B, eos, next_B)
        tokens_BL = jax.lax.dynamic_update_index_in_dim(tokens_BL, next_B, i, axis=1)
        done_B = done_B | (next_B == eos)
        # After the last token the slot is clamped: that call's logits are never read.
        logits_BV, cache = _step(decoder, params, cache, next_B, jnp.minimum(i + 1, last_slot))
        return i + 1, cache, logits_BV, tokens_BL, done_B, log_prob_B

    carry = (jnp.int32(0), cache, logits_BV, jnp.full((B, max_new_tokens), eos, jnp.int32),
             ~live_B, jnp.zeros((B,), jnp.float32))
    _, _, _, tokens_BL, _, log_prob_B = jax.lax.while_loop(running, step, carry)
    return replicate(tokens_BL, replicated), replicate(log_prob_B, replicated)


@functools.partial(jax.jit, static_argnames=("decoder", "bos", "eos", "max_new_tokens",
                                             "beam_size", "replicated"))
def _beam(decoder: nn.Module, params, source_BS: Array, mask_BS: Array, live_B: Array,
          alpha: Array, *, bos: int, eos: int, max_new_tokens: int, beam_size: int,
          replicated) -> tuple[Array, Array]:
    """Beam search: (each row's best hypothesis [B, max_new_tokens], EOS after its end; its
    Σ log p). Beams: k = beam_size, row b's beams are rows b·k … b·k + k - 1; L =
    max_new_tokens; `alpha` the length penalty (a float32 scalar: every α runs one program)."""
    k, L = beam_size, max_new_tokens
    last_slot = decoder.cfg.max_seq_len - 1
    # The source and the first step once per row, then copied to its k beams.
    logits_BV, cache = _start(decoder, params, source_BS, mask_BS, bos)
    B, V = logits_BV.shape
    logits_RV = jnp.repeat(logits_BV, k, axis=0)
    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
    # Cross-attention keys/values are the same for a row's beams and never change: only the
    # self-attention caches follow their hypotheses.
    flat = traverse_util.flatten_dict(cache)
    cross = {path: x for path, x in flat.items() if "cross_attn" in path}
    own = {path: x for path, x in flat.items() if "cross_attn" not in path}
    bound_penalty = gnmt_length_penalty(L, alpha)

    def running(carry) -> Array:
        i, *_, done_B = carry
        return (i < L) & ~jnp.all(done_B)

    def step(carry):
        i, own, logits_RV, live_Bk, seqs_BkL, best_score_B, best_lp_B, best_BL, done_B = carry
        # Every one-token extension of every live hypothesis (dead ones are -inf), k best.
        cand_BkV = live_Bk[:, :, None] + jax.nn.log_softmax(logits_RV).reshape(B, k, V)
        cand_lp_Bk, index_Bk = jax.lax.top_k(cand_BkV.reshape(B, k * V), k)
        parent_Bk, token_Bk = index_Bk // V, (index_Bk % V).astype(jnp.int32)
        cand_BkL = jnp.take_along_axis(seqs_BkL, parent_Bk[:, :, None], axis=1)
        cand_BkL = jax.lax.dynamic_update_index_in_dim(cand_BkL, token_Bk, i, axis=2)
        # Complete: ended by EOS, or at the length limit. A finished row takes no more.
        ended_Bk = token_Bk == eos
        complete_Bk = (ended_Bk | (i == L - 1)) & ~done_B[:, None]
        score_Bk = jnp.where(complete_Bk, cand_lp_Bk / gnmt_length_penalty(i + 1, alpha),
                             -jnp.inf)
        j_B = jnp.argmax(score_Bk, axis=1)
        better_B = jnp.max(score_Bk, axis=1) > best_score_B
        pick = lambda x_Bk: jnp.take_along_axis(x_Bk, j_B[:, None], axis=1)[:, 0]
        best_score_B = jnp.where(better_B, pick(score_Bk), best_score_B)
        best_lp_B = jnp.where(better_B, pick(cand_lp_Bk), best_lp_B)
        best_BL = jnp.where(better_B[:, None],
                            jnp.take_along_axis(cand_BkL, j_B[:, None, None], axis=1)[:, 0],
                            best_BL)
        live_Bk = jnp.where(ended_Bk, -jnp.inf, cand_lp_Bk)
        # No live hypothesis can beat the best finished one: the row is done.
        done_B = done_B | (best_score_B >= jnp.max(live_Bk, axis=1) / bound_penalty)
        rows_R = (jnp.arange(B)[:, None] * k + parent_Bk).reshape(-1)
        own = jax.tree.map(lambda x: x[rows_R], own)
        cache = traverse_util.unflatten_dict({**own, **cross})
        logits_RV, cache = _step(decoder, params, cache, token_Bk.reshape(-1),
                                 jnp.minimum(i + 1, last_slot))
        own = {p: x for p, x in traverse_util.flatten_dict(cache).items() if "cross_attn" not in p}
        return i + 1, own, logits_RV, live_Bk, cand_BkL, best_score_B, best_lp_B, best_BL, done_B

    # Only beam 0 is live at first (the others would repeat it); padding rows start finished.
    live_Bk = jnp.where(jnp.arange(k)[None, :] == 0, 0.0, -jnp.inf) * jnp.ones((B, 1))
    carry = (jnp.int32(0), own, logits_RV, live_Bk, jnp.full((B, k, L), eos, jnp.int32),
             jnp.full((B,), -jnp.inf), jnp.zeros((B,), jnp.float32),
             jnp.full((B, L), eos, jnp.int32), ~live_B)
    *_, best_lp_B, best_BL, _ = jax.lax.while_loop(running, step, carry)
    return replicate(best_BL, replicated), replicate(best_lp_B, replicated)

