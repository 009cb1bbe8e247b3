"""Autoregressive sampling with a KV cache: one jitted prefill, then one token per loop step.

A batch of prompts of different lengths is left-padded so that every row's newest token sits in
the same cache slot (one shared write index); each row masks its own padding and counts positions
from its own first token. The whole loop (`lax.while_loop`) is one compiled program that stops
early once every row has emitted a stop token.

The context limit: the model has `max_seq_len` learned positions. When the cache is full the
window slides by half: the oldest half is dropped and the newest half is re-encoded from position
0 in one prefill, so every new token sees between max_seq_len/2 and max_seq_len tokens of context
and a re-encode happens once per max_seq_len/2 tokens. The window is shared by the rows of a batch,
so past the limit a row's continuation depends on the longest prompt beside it. `use_cache=False`
recomputes the last max_seq_len tokens for every new token instead (nanoGPT's cropping; exact
but ~W times the work) — the reference the cache is tested and benchmarked against.

A recurrent model (registry `decoding="recurrent"`, the LSTM) has no window: the left-padded
prompt is encoded once (padding leaves a row's state at zero), then each step feeds one token and
carries the state. `use_cache=False` reruns the whole sequence from the start for every token
instead (the reference it is tested against).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.models import positions, registry
from gpt_jax.models.layers import DecodeState
from gpt_jax.parallel.sharding import put_replicated_host, replicate, replicated_like

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the logits."""

    temperature: float = 1.0  # 0 → greedy (argmax).
    top_k: int = 0  # Keep the k most likely ids (0 = off).
    top_p: float = 1.0  # Keep the smallest set of ids whose probability reaches top_p (1 = off).


def sample_logits(logits_BV: Array, key: Array, sp: SamplingParams) -> Array:
    """Next ids [B]: argmax when temperature == 0, else a draw at `temperature` after top-k and
    top-p filtering. Masked (padded-vocab) ids have logit finfo.min and are never drawn."""
    if sp.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / sp.temperature
    if sp.top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(sp.top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if sp.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep an id while the mass strictly before it is below top_p (the top id always stays).
        keep_B = jnp.sum(jnp.cumsum(probs_BV, axis=-1) - probs_BV < sp.top_p, axis=-1)
        threshold_B1 = jnp.take_along_axis(sorted_BV, keep_B[:, None] - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


def slide_shift(window: int) -> int:
    """How far the cache window moves when it is full: half of it."""
    return max(window // 2, 1)


def window_start(index: int, window: int) -> int:
    """First buffer index of the cache window that holds `index` (the window slides by half)."""
    shift = slide_shift(window)
    over = index - window + 1
    return -(-over // shift) * shift if over > 0 else 0


def _left_pad(prompts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty; give every prompt at least one token (e.g. a newline).")
    P = max(len(p) for p in prompts)
    pad_B = np.array([P - len(p) for p in prompts], np.int32)
    tokens_BP = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        tokens_BP[b, pad_B[b]:] = np.asarray(p, np.int32)
    return tokens_BP, pad_B


def generate(
    model: nn.Module,
    params,
    prompts: Sequence[np.ndarray],
    max_new_tokens: int,
    key: Array,
    sampling: SamplingParams = SamplingParams(),
    stop_tokens: Sequence[int] = (),
    use_cache: bool = True,
) -> list[np.ndarray]:
    """Continues each prompt (1-D int arrays, any lengths) by up to `max_new_tokens` tokens.

    Returns one array per prompt: the prompt followed by its new tokens, ending at (and including)
    the first stop token if one was drawn. `params` may be sharded on the training mesh. A model
    whose architecture has no KV cache (registry `decoding="recompute"`) always recomputes; a
    recurrent one (`decoding="recurrent"`) carries its state (see the module docstring).
    """
    arch = registry.arch_of(model.cfg)
    cfg = arch.for_inference(model.cfg)
    decoder = registry.build(cfg)  # Same parameters.
    soft = getattr(cfg, "prompt_tokens", 0)
    if soft:
        prompts = _after_soft_prompt(cfg, prompts, max_new_tokens)
    tokens_BP, pad_B = _left_pad(prompts)
    B, P = tokens_BP.shape
    W = cfg.max_seq_len
    total = P + max_new_tokens
    # Room for the last window read (the slid window may reach past `total`); a recurrent model
    # has no window.
    recurrent = arch.decoding == "recurrent"
    L = total if recurrent else max(total, window_start(total - 1, W) + W)
    buf_BL = np.zeros((B, L), np.int32)
    buf_BL[:, :P] = tokens_BP
    inputs = [buf_BL, pad_B, np.asarray(jax.random.key_data(key)),
              np.asarray(sorted(set(stop_tokens)) or [-1], np.int32)]
    # Params sharded on a mesh (the training run's): inputs and output are whole on every device
    # of it, so every process of a multi-process run can read the result.
    replicated = replicated_like(params)
    if replicated is not None:
        inputs = [put_replicated_host(a, replicated) for a in inputs]
    if recurrent:
        run = _decode_recurrent if use_cache else _decode_recurrent_uncached
    elif arch.decoding != "kv_cache":
        run = _decode_recompute
    else:
        run = _decode_cached if use_cache else _decode_uncached
    buf_BL, end = run(decoder, params, *inputs, P, total, sampling, replicated)
    buf_BL, end = np.asarray(buf_BL), int(end)
    stops = set(stop_tokens)
    outs = []
    for b in range(B):
        new = buf_BL[b, P:end].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
        prompt = tokens_BP[b, pad_B[b] + soft:]  # Without the soft prompt's ids.
        outs.append(np.concatenate([prompt, np.asarray(new[:cut], np.int32)]))
    return outs


def _after_soft_prompt(cfg, prompts: Sequence[np.ndarray], max_new_tokens: int
                       ) -> list[np.ndarray]:
    """The prompts a soft-prompted GPT decodes: each after the soft prompt's ids
    (gpt.prompt_ids), which decoding reads as its embeddings and the KV cache holds like tokens.
    The window must not slide, or the soft prompt would drop out of the context."""
    from gpt_jax.models.gpt import prompt_ids

    room = cfg.max_seq_len - cfg.prompt_tokens
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > room:
        raise ValueError(f"a model with a soft prompt of {cfg.prompt_tokens} embeddings decodes "
                         f"at most {room} tokens (model.max_seq_len {cfg.max_seq_len} minus "
                         f"them), and this asks {longest} + {max_new_tokens}; ask fewer new "
                         "tokens or give a shorter prompt.")
    ids = np.asarray(prompt_ids(cfg))
    return [np.concatenate([ids, np.asarray(p, np.int32)]) if len(p) else p for p in prompts]


def _window(decoder: nn.Module, params, cache, buf_BL: Array, pad_B: Array, start: Array,
            read: Array, length: int) -> tuple[Array, dict]:
    """Encodes the `length` tokens of `buf_BL` from `start` into cache slots 0… (later slots keep
    stale entries that causality hides until they are overwritten); returns the logits at buffer
    index `read` and the cache."""
    tokens_BT = jax.lax.dynamic_slice_in_dim(buf_BL, start, length, axis=1)
    decode = DecodeState(slot=jnp.zeros((), jnp.int32), first_B=jnp.maximum(pad_B - start, 0))
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    x_BTD, mutated = decoder.apply(variables, tokens_BT, decode=decode, method="hidden",
                                   mutable=["cache"])
    x_B1D = jax.lax.dynamic_slice_in_dim(x_BTD, read - start, 1, axis=1)
    return decoder.apply({"params": params}, x_B1D, method="head")[:, 0], mutated["cache"]


def _sample_into(buf_BL, done_B, logits_BV, keys_N, i, stop_S, sampling):
    """Draws token i (with key i of `keys_N`, split once before the loop: a threefry split per
    step is a loop of its own on CPU) into the buffer; rows past a stop token get a filler."""
    next_B = sample_logits(logits_BV, keys_N[i], sampling).astype(jnp.int32)
    next_B = jnp.where(done_B, 0, next_B)  # Cut off on the host.
    buf_BL = jax.lax.dynamic_update_index_in_dim(buf_BL, next_B, i, axis=1)
    return buf_BL, done_B | jnp.isin(next_B, stop_S), next_B


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _decode_cached(decoder: nn.Module, params, buf_BL, pad_B, key_data, stop_S, P: int, total: int,
                   sampling: SamplingParams, replicated):
    W = decoder.cfg.max_seq_len
    shift = slide_shift(W)
    keys_N = jax.random.split(jax.random.wrap_key_data(key_data), total)  # Key i: token i.
    first = window_start(P - 1, W)  # Only the prompt's tokens in the window are encoded.
    start = jnp.asarray(first, jnp.int32)
    logits_BV, cache = _window(decoder, params, None, buf_BL, pad_B, start, jnp.int32(P - 1),
                               P - first)
    done_B = jnp.zeros(pad_B.shape, bool)

    def running(carry) -> Array:
        i, _, _, _, _, done_B = carry
        return (i < total) & ~jnp.all(done_B)

    def step(carry):  # Sample token i and feed it at its slot; the cache has room.
        i, start, cache, logits_BV, buf_BL, done_B = carry
        buf_BL, done_B, next_B = _sample_into(buf_BL, done_B, logits_BV, keys_N, i, stop_S,
                                              sampling)
        decode = DecodeState(slot=i - start, first_B=jnp.maximum(pad_B - start, 0))
        x_B1D, mutated = decoder.apply({"params": params, "cache": cache}, next_B[:, None],
                                       decode=decode, method="hidden", mutable=["cache"])
        logits_BV = decoder.apply({"params": params}, x_B1D, method="head")[:, 0]
        return i + 1, start, mutated["cache"], logits_BV, buf_BL, done_B

    def slide(carry):  # Cache full: sample token i, re-encode the newest half from position 0.
        i, start, cache, logits_BV, buf_BL, done_B = carry
        buf_BL, done_B, _ = _sample_into(buf_BL, done_B, logits_BV, keys_N, i, stop_S, sampling)
        start = start + shift
        logits_BV, cache = _window(decoder, params, cache, buf_BL, pad_B, start, i, W - shift + 1)
        return i + 1, start, cache, logits_BV, buf_BL, done_B

    def window(carry):  # Steps until the cache is full (no branch per token), then one slide.
        carry = jax.lax.while_loop(lambda c: running(c) & (c[0] - c[1] < W), step, carry)
        return jax.lax.cond(running(carry), slide, lambda c: c, carry)

    carry = (jnp.int32(P), start, cache, logits_BV, buf_BL, done_B)
    end, _, _, _, buf_BL, _ = jax.lax.while_loop(running, window, carry)
    return replicate(buf_BL, replicated), replicate(end, replicated)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _decode_uncached(decoder: nn.Module, params, buf_BL, pad_B, key_data, stop_S, P: int, total: int,
                     sampling: SamplingParams, replicated):
    W = decoder.cfg.max_seq_len
    keys_N = jax.random.split(jax.random.wrap_key_data(key_data), total)  # Key i: token i.

    def logits_at(buf_BL, i):  # The window of W tokens ending at index i, recomputed whole.
        start = jnp.maximum(i - W + 1, 0)
        return _window(decoder, params, None, buf_BL, pad_B, start, i, W)[0]

    def cond(carry):
        i, _, done_B = carry
        return (i < total) & ~jnp.all(done_B)

    def body(carry):
        i, buf_BL, done_B = carry
        buf_BL, done_B, _ = _sample_into(buf_BL, done_B, logits_at(buf_BL, i - 1), keys_N, i,
                                         stop_S, sampling)
        return i + 1, buf_BL, done_B

    carry = (jnp.int32(P), buf_BL, jnp.zeros(pad_B.shape, bool))
    end, buf_BL, _ = jax.lax.while_loop(cond, body, carry)
    return replicate(buf_BL, replicated), replicate(end, replicated)


def _recomputed_logits(decoder: nn.Module, params, buf_BL: Array, pad_B: Array, start: Array,
                       read: Array, length: int) -> Array:
    """Logits at buffer index `read` from the `length` tokens from `start`, through the plain
    forward pass: left padding is a segment of its own (segment 0) that real tokens never attend
    to, and positions count from each row's first real token in the window, as `_window`'s."""
    tokens_BT = jax.lax.dynamic_slice_in_dim(buf_BL, start, length, axis=1)
    first_B = jnp.maximum(pad_B - start, 0)  # Each row's first real token in the window.
    real_BT = jnp.arange(length, dtype=jnp.int32)[None, :] >= first_B[:, None]
    positions_BT = positions.decode_positions(jnp.zeros((), jnp.int32), first_B, length, length)
    logits_BTV = decoder.apply({"params": params}, tokens_BT,
                               segment_ids_BT=real_BT.astype(jnp.int32), positions_BT=positions_BT)
    return jax.lax.dynamic_slice_in_dim(logits_BTV, read - start, 1, axis=1)[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _decode_recompute(decoder: nn.Module, params, buf_BL, pad_B, key_data, stop_S, P: int,
                      total: int, sampling: SamplingParams, replicated):
    """Decoding for a model without a cache: the last max_seq_len tokens recomputed per token."""
    W = decoder.cfg.max_seq_len
    keys_N = jax.random.split(jax.random.wrap_key_data(key_data), total)  # Key i: token i.

    def cond(carry):
        i, _, done_B = carry
        return (i < total) & ~jnp.all(done_B)

    def body(carry):
        i, buf_BL, done_B = carry
        start = jnp.maximum(i - W, 0)
        logits_BV = _recomputed_logits(decoder, params, buf_BL, pad_B, start, i - 1, W)
        buf_BL, done_B, _ = _sample_into(buf_BL, done_B, logits_BV, keys_N, i, stop_S, sampling)
        return i + 1, buf_BL, done_B

    carry = (jnp.int32(P), buf_BL, jnp.zeros(pad_B.shape, bool))
    end, buf_BL, _ = jax.lax.while_loop(cond, body, carry)
    return replicate(buf_BL, replicated), replicate(end, replicated)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _decode_recurrent(decoder: nn.Module, params, buf_BL, pad_B, key_data, stop_S, P: int,
                      total: int, sampling: SamplingParams, replicated):
    """Decoding for a recurrent model: the prompt encoded once from the zero state (its left
    padding passes the state through), then one token per step carrying the state."""
    keys_N = jax.random.split(jax.random.wrap_key_data(key_data), total)  # Key i: token i.
    real_BP = jnp.arange(P, dtype=jnp.int32)[None, :] >= pad_B[:, None]
    logits_BPV, state = decoder.apply({"params": params}, buf_BL[:, :P],
                                      decoder.initial_carry(buf_BL.shape[0]), real_BP,
                                      method="decode")

    def cond(carry):
        i, _, _, _, done_B = carry
        return (i < total) & ~jnp.all(done_B)

    def body(carry):
        i, state, logits_BV, buf_BL, done_B = carry
        buf_BL, done_B, next_B = _sample_into(buf_BL, done_B, logits_BV, keys_N, i, stop_S,
                                              sampling)
        logits_B1V, state = decoder.apply({"params": params}, next_B[:, None], state,
                                          method="decode")
        return i + 1, state, logits_B1V[:, 0], buf_BL, done_B

    carry = (jnp.int32(P), state, logits_BPV[:, -1], buf_BL, jnp.zeros(pad_B.shape, bool))
    end, _, _, buf_BL, _ = jax.lax.while_loop(cond, body, carry)
    return replicate(buf_BL, replicated), replicate(end, replicated)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _decode_recurrent_uncached(decoder: nn.Module, params, buf_BL, pad_B, key_data, stop_S,
                               P: int, total: int, sampling: SamplingParams, replicated):
    """A recurrent model's reference decoding: for every token the whole buffer is run through
    the plain forward pass from the zero state (left padding a segment of its own, which the
    state forgets where the prompt begins; what follows index i - 1 does not reach it)."""
    keys_N = jax.random.split(jax.random.wrap_key_data(key_data), total)  # Key i: token i.

    def cond(carry):
        i, _, done_B = carry
        return (i < total) & ~jnp.all(done_B)

    def body(carry):
        i, buf_BL, done_B = carry
        logits_BV = _recomputed_logits(decoder, params, buf_BL, pad_B, jnp.int32(0), i - 1,
                                       buf_BL.shape[1])
        buf_BL, done_B, _ = _sample_into(buf_BL, done_B, logits_BV, keys_N, i, stop_S, sampling)
        return i + 1, buf_BL, done_B

    carry = (jnp.int32(P), buf_BL, jnp.zeros(pad_B.shape, bool))
    end, buf_BL, _ = jax.lax.while_loop(cond, body, carry)
    return replicate(buf_BL, replicated), replicate(end, replicated)

