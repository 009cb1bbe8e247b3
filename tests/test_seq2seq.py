"""The encoder–decoder (gpt_jax/models/seq2seq.py) and its decoding (gpt_jax/translate.py):
padding, causality and what cross-attention sees; the loss on target tokens only; cached decoding
against recomputation; greedy, sampling and beam search (beam 1 = greedy, a wide beam = the
exhaustive optimum of the length-penalised score); attention against a float64 NumPy reference;
the registry entry (validation, parameter counts, FLOPs).

Shapes are named in suffixes: B batch, S source length, T target length, D d_model, N heads,
K kv heads, H head dim, V padded vocabulary. Models are tiny: d 32, 2 heads, 1 encoder and 2
decoder blocks, a vocabulary of 20 padded to 24 (padded ids are masked), peaked logits
(init_std 0.3) so that greedy outputs vary.
"""

import dataclasses
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from gpt_jax.config import ConfigError
from gpt_jax.generate import SamplingParams
from gpt_jax.models import registry, seq2seq
from gpt_jax.training.step import cross_entropy
from gpt_jax.translate import (
    beam_search,
    gnmt_length_penalty,
    translate,
    translate_scored,
)

V, V_PADDED = 20, 24  # Vocabulary, padded to a multiple of 8.
BOS, EOS = 1, 2
S_MAX, T_MAX = 12, 10  # max_source_len, max_seq_len.
# Ragged sources (decoding pads them to 8 tokens and 8 rows).
SOURCES = [np.array([5, 9, 3, 7, 11, 4]), np.array([8]), np.array([6, 13, 17, 3, 9, 10, 12, 4]),
           np.array([19, 0, 14])]
# Variants: model.* overrides. The default tests take the main model (learned_mqa) and the
# original recipe's options; rope, rmsnorm, swiglu, GQA and NoPE run with --runslow.
VARIANTS = {
    "learned_mqa": {"num_kv_heads": 1},
    # The original recipe: post-LN, sinusoidal positions, √D-scaled embeddings; and biases, an
    # untied head, another MLP.
    "post_sinusoidal": {"norm_position": "post", "positions": "sinusoidal",
                        "scale_embeddings": True, "bias": True, "tie_embeddings": False,
                        "mlp": "relu2"},
    "rope_gqa_swiglu": {"positions": "rope", "num_heads": 4, "num_kv_heads": 2,
                        "norm": "rmsnorm", "mlp": "swiglu", "mlp_multiple": 16},
    "nope_post": {"positions": "none", "norm_position": "post", "encoder_layers": 2},
}
FAST = ("learned_mqa", "post_sinusoidal")


def variants(names=tuple(VARIANTS), fast=FAST) -> list:
    """`names` as parametrize values, those outside `fast` marked slow."""
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def config(**fields):
    """The tiny seq2seq config with model.* `fields` overridden."""
    c = base.get_config()
    c.model.arch = "seq2seq"
    c.model.num_layers, c.model.encoder_layers, c.model.num_heads, c.model.d_model = 2, 1, 2, 32
    c.model.vocab_multiple, c.model.init_std = 8, 0.3
    c.model.max_source_len = S_MAX
    c.data.seq_len, c.data.source_len = T_MAX, S_MAX
    c.model.update(fields)
    return c


@functools.cache
def build(name: str, seed: int = 0):
    """(module, params) of VARIANTS[name], cached. Parameters are drawn here, not by the
    module's init (whose compile would cost more than the tests): kernels and tables
    normal(init_std), biases normal(0.1), norm scales 1 + normal(0.1)."""
    model = registry.build(registry.hyperparameters(config(**VARIANTS[name]), V))
    shapes = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, T_MAX), jnp.int32))["params"]))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        std = {"bias": 0.1, "scale": 0.1}.get(name, model.cfg.init_std)
        x = rng.normal(0.0, std, leaf.shape) + (1.0 if name == "scale" else 0.0)
        return jnp.asarray(x, jnp.float32)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def main():
    return build("learned_mqa")


ROWS = 20  # Every teacher-forced pass runs [ROWS, T_MAX] inputs: one compile per model.


@functools.cache
def _forward(model):
    return jax.jit(lambda params, inputs_BT, source_BS, mask_BS: model.apply(
        {"params": params}, inputs_BT, source_BS=source_BS, source_mask_BS=mask_BS))


def forward(model, params, inputs_NT, source_NS, mask_NS):
    """Teacher-forced logits [N, T, V] (float32 NumPy), computed ROWS rows at a time."""
    N = len(inputs_NT)
    n = -(-N // ROWS) * ROWS
    rows = lambda a: np.concatenate([np.asarray(a, np.int32),
                                     np.zeros((n - N, *np.shape(a)[1:]), np.int32)])
    inputs, source, mask = rows(inputs_NT), rows(source_NS), rows(mask_NS)
    out = [_forward(model)(params, inputs[i:i + ROWS], source[i:i + ROWS], mask[i:i + ROWS])
           for i in range(0, n, ROWS)]
    return np.concatenate(out)[:N]


def pad(sources, S=S_MAX, fill=0):
    """Right-padded ids [B, S] (padding `fill`, or fill[b] for row b) and the mask [B, S]."""
    source_BS = np.zeros((len(sources), S), np.int32)
    mask_BS = np.zeros((len(sources), S), np.int32)
    for b, s in enumerate(sources):
        source_BS[b] = np.asarray(fill[b] if isinstance(fill, list) else fill)
        source_BS[b, :len(s)], mask_BS[b, :len(s)] = s, 1
    return source_BS, mask_BS


def teacher_forced(model, params, source, targets_NT):
    """log p of each token of each row of `targets_NT` [N, T] given `source` (inputs: BOS +
    targets shifted right): [N, T]."""
    targets_NT = np.asarray(targets_NT, np.int32)
    inputs_NT = np.concatenate([np.full((len(targets_NT), 1), BOS), targets_NT[:, :-1]], 1)
    source_BS, mask_BS = pad([source] * len(targets_NT))
    logits_NTV = forward(model, params, inputs_NT, source_BS, mask_BS)
    log_probs_NTV = np.asarray(jax.nn.log_softmax(logits_NTV), np.float64)
    return np.take_along_axis(log_probs_NTV, targets_NT[..., None], -1)[..., 0]


def sequence_log_prob(model, params, source, tokens, ended):
    """Σ log p of `tokens` (+ EOS if `ended`), teacher-forced, padded to T_MAX."""
    seq = [*tokens.tolist(), EOS] if ended else tokens.tolist()
    row = np.zeros(T_MAX, np.int32)
    row[:len(seq)] = seq
    return float(teacher_forced(model, params, source, row[None])[0, :len(seq)].sum())


def reference_greedy(model, params, source, n):
    """Greedy decoding without a cache: the whole decoder rerun for every token."""
    source_BS, mask_BS = pad([source])
    seq, log_prob = [BOS], 0.0
    for i in range(n):
        inputs_1T = np.zeros((1, T_MAX), np.int32)
        inputs_1T[0, :len(seq)] = seq
        logits_V = forward(model, params, inputs_1T, source_BS, mask_BS)[0, i]
        token = int(jnp.argmax(logits_V))
        log_prob += float(jax.nn.log_softmax(logits_V)[token])
        if token == EOS:
            return seq[1:], log_prob, True
        seq.append(token)
    return seq[1:], log_prob, False


# ---------------------------------------------------------------------------------------------
# The model.


@pytest.mark.parametrize("name", variants(fast=("learned_mqa",)))
def test_encoder_padding_never_changes_real_tokens(name):
    """The same source alone (S = 6) and right-padded to S_MAX with zeros or arbitrary ids:
    every target position's logits are the same."""
    model, params = build(name)
    source = SOURCES[0]
    inputs_1T = np.array([[BOS, 4, 6, 8, 10, 12, 14, 16, 18, 3]], np.int32)
    alone = forward(model, params, inputs_1T, source[None], np.ones((1, len(source))))
    # Padded to S_MAX with zeros, and with arbitrary ids: masked, they are never seen.
    source_BS, mask_BS = pad([source, source], fill=[0, list(range(7, 7 + S_MAX))])
    padded = forward(model, params, np.repeat(inputs_1T, 2, 0), source_BS, mask_BS)
    np.testing.assert_allclose(padded, np.repeat(alone, 2, 0), atol=1e-5, rtol=0)


def test_decoder_is_causal_and_cross_attention_sees_the_whole_source(main):
    """One batch: a base row, rows with one target input changed (position t), rows with one
    real source token changed (position s). A target change reaches only positions ≥ t; any
    source change reaches the first target position."""
    model, params = main
    source = SOURCES[0]
    inputs_T = np.array([BOS, 4, 6, 8, 10, 12, 14, 16, 18, 3], np.int32)
    inputs_BT = np.repeat(inputs_T[None], 1 + T_MAX + len(source), 0)
    sources = [source.copy() for _ in range(len(inputs_BT))]
    for t in range(T_MAX):
        inputs_BT[1 + t, t] = (inputs_T[t] + 5) % V
    for s in range(len(source)):
        sources[1 + T_MAX + s][s] = (source[s] + 5) % V
    logits_BTV = forward(model, params, inputs_BT, *pad(sources))
    base_TV = logits_BTV[0]
    for t in range(T_MAX):
        changed_T = np.abs(logits_BTV[1 + t] - base_TV).max(-1) > 1e-4
        assert not changed_T[:t].any(), f"input {t} changed earlier positions: {changed_T}"
        assert changed_T[t], f"input {t} did not change its own position's logits"
    for s in range(len(source)):
        first_V = logits_BTV[1 + T_MAX + s, 0]
        assert np.abs(first_V - base_TV[0]).max() > 1e-4, f"source token {s} unseen"
    assert base_TV.shape[-1] == V_PADDED
    assert (base_TV[:, V:] == np.finfo(np.float32).min).all()  # Padded ids masked.


def test_loss_is_on_target_tokens_only(main):
    """Targets of 4 and 7 tokens in T_MAX columns: whatever fills the padding (inputs, targets,
    source padding), the weighted cross-entropy is the same, and is the real tokens' sum."""
    model, params = main
    lengths = [4, 7]
    rng = np.random.default_rng(0)
    sums = []
    for fill in (0, 1):
        targets_BT = rng.integers(3, V, (2, T_MAX)).astype(np.int32)
        targets_BT[0, :4], targets_BT[1, :7] = [5, 6, 7, EOS], [9, 8, 7, 6, 5, 4, EOS]
        weights_BT = (np.arange(T_MAX)[None] < np.array(lengths)[:, None]).astype(np.float32)
        if fill == 0:
            targets_BT = np.where(weights_BT > 0, targets_BT, 0)
        inputs_BT = np.concatenate([np.full((2, 1), BOS), targets_BT[:, :-1]], 1)
        source_BS, mask_BS = pad(SOURCES[:2], fill=[fill * 17, fill * 5])
        logits_BTV = forward(model, params, inputs_BT, source_BS, mask_BS)
        total, weight = cross_entropy(logits_BTV, targets_BT, weights_BT)
        assert float(weight) == sum(lengths)
        log_probs_BTV = jax.nn.log_softmax(logits_BTV)
        by_hand = -sum(float(log_probs_BTV[b, t, targets_BT[b, t]])
                       for b, n in enumerate(lengths) for t in range(n))
        np.testing.assert_allclose(float(total), by_hand, rtol=1e-5)
        sums.append(float(total))
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-6)


@functools.cache
def cached_decoder(model):
    """Jitted cached decoding: (first call: tokens from slot 0 → logits, cache), (step)."""
    def first(params, tokens_BT, source_BS, mask_BS):
        memory_BSD = model.apply({"params": params}, source_BS, mask_BS, method="encode")
        logits, mutated = model.apply({"params": params}, tokens_BT, memory_BSD, mask_BS,
                                      decode_slot=jnp.int32(0), method="decode",
                                      mutable=["cache"])
        return logits, mutated["cache"]

    def step(params, cache, tokens_BT, slot):
        logits, mutated = model.apply({"params": params, "cache": cache}, tokens_BT, None,
                                      decode_slot=slot, method="decode", mutable=["cache"])
        return logits, mutated["cache"]

    return jax.jit(first), jax.jit(step)


# The main model's cache is checked end to end by test_cached_greedy_equals_recomputation (by
# default); the variants' logits with --runslow.
@pytest.mark.parametrize("name", variants(fast=()))
def test_cached_decoding_logits_equal_recomputation(name):
    """A 3-token prefill, then one token per call through the KV cache (cross-attention keys
    and values cached on the first call): every position's logits equal the full pass's."""
    model, params = build(name)
    rng = np.random.default_rng(1)
    inputs_BT = rng.integers(0, V, (len(SOURCES), T_MAX)).astype(np.int32)
    inputs_BT[:, 0] = BOS
    source_BS, mask_BS = pad(SOURCES)
    full_BTV = forward(model, params, inputs_BT, source_BS, mask_BS)
    first, step = cached_decoder(model)
    logits_BTV, cache = first(params, inputs_BT[:, :3], source_BS, mask_BS)
    cached = [logits_BTV]
    for i in range(3, T_MAX):
        logits_B1V, cache = step(params, cache, inputs_BT[:, i:i + 1], jnp.int32(i))
        cached.append(logits_B1V)
    # Float32 sums in another order (logits up to ~5 here): 1e-4, far below what a wrong mask,
    # slot or position would change.
    np.testing.assert_allclose(jnp.concatenate(cached, 1), full_BTV, atol=1e-4, rtol=0)


@pytest.mark.slow  # Compiles a training forward pass (~2 s).
def test_dropout_only_in_training(main):
    """Dropout (embeddings, residual branches, attention weights) draws with the training key;
    decoding's hyperparameters have none."""
    model, params = main
    cfg = dataclasses.replace(model.cfg, dropout=0.2, attention_dropout=0.2)
    arch = registry.arch_of(cfg)
    assert arch.uses_dropout(cfg) and arch.for_inference(cfg) == model.cfg
    source_BS, mask_BS = pad(SOURCES[:2])
    inputs_BT = np.full((2, T_MAX), 4, np.int32)
    train = jax.jit(lambda key: registry.build(cfg).apply(
        {"params": params}, inputs_BT, deterministic=False, source_BS=source_BS,
        source_mask_BS=mask_BS, rngs={"dropout": key}))
    # rbg keys: XLA:CPU compiles threefry's masks for attention weights in ~8 s, rbg's in ~2.
    a, b = train(jax.random.key(0, impl="rbg")), train(jax.random.key(1, impl="rbg"))
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-3


def test_misuse_is_refused(main):
    model, params = main
    inputs_BT = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="source_BS"):
        model.apply({"params": params}, inputs_BT)
    with pytest.raises(ValueError, match="segment ids"):
        model.apply({"params": params}, inputs_BT, source_BS=inputs_BT,
                    segment_ids_BT=inputs_BT)
    with pytest.raises(ValueError, match="max_source_len"):
        model.apply({"params": params}, inputs_BT, source_BS=jnp.zeros((1, S_MAX + 1), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Attention against a float64 NumPy reference written from the definition.


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def numpy_attention(q_BTNH, k_BSKH, v_BSKH, keep_BTS):
    G = q_BTNH.shape[2] // k_BSKH.shape[2]
    k_BSNH, v_BSNH = np.repeat(k_BSKH, G, 2), np.repeat(v_BSKH, G, 2)
    scores_BNTS = np.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH) / math.sqrt(q_BTNH.shape[-1])
    scores_BNTS = np.where(keep_BTS[:, None], scores_BNTS, -np.inf)
    return np.einsum("bnts,bsnh->btnh", softmax(scores_BNTS), v_BSNH)


@pytest.mark.parametrize("kind", ["cross", "encoder_self"])
def test_attention_matches_float64_numpy(kind):
    """Cross-attention (GQA: 4 query heads, 2 kv heads, biases) and the encoder's bidirectional
    self-attention, each masked to real source tokens, against NumPy in float64."""
    cfg = registry.hyperparameters(config(num_heads=4, num_kv_heads=2, bias=True), V)
    rng = np.random.default_rng(2)
    B, T, S, D = 2, 5, 7, cfg.d_model
    x_BTD = rng.normal(size=(B, T if kind == "cross" else S, D)).astype(np.float32)
    memory_BSD = rng.normal(size=(B, S, D)).astype(np.float32)
    keep_BS = np.arange(S)[None] < np.array([[7], [3]])
    if kind == "cross":
        module = seq2seq.CrossAttention(cfg)
        args = (x_BTD, memory_BSD, jnp.asarray(keep_BS))
    else:
        module = seq2seq.SelfAttention(cfg, causal=False)
        args = (x_BTD, jnp.asarray(keep_BS[:, None, None, :]), jnp.arange(S)[None])
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *args)["params"])
    out = jax.jit(module.apply)({"params": params}, *args)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def dense(x, layer):
        return np.tensordot(x, layer["kernel"], 1) + layer["bias"]

    x = x_BTD.astype(np.float64)
    if kind == "cross":
        q_BTNH, kv_BS2KH = dense(x, p["q"]), dense(memory_BSD.astype(np.float64), p["kv"])
    else:
        q_BTNH, kv_BS2KH = dense(x, p["q"]), dense(x, p["kv"])
    heads_BTNH = numpy_attention(q_BTNH, kv_BS2KH[:, :, 0], kv_BS2KH[:, :, 1],
                                 np.broadcast_to(keep_BS[:, None], (B, x.shape[1], S)))
    want = np.tensordot(heads_BTNH, p["out"]["kernel"], 2) + p["out"]["bias"]
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Decoding.


@functools.cache
def greedy_reference(i: int) -> tuple[list[int], float, bool]:
    """reference_greedy of the main model for SOURCES[i] (several tests compare with it)."""
    model, params = build("learned_mqa")
    return reference_greedy(model, params, SOURCES[i], T_MAX)


@pytest.fixture(scope="module")
def sharded(main):
    """The main model with its params on a 1-device mesh (as a training run's state holds
    them): the beam and sampling tests decode those, the greedy test plain arrays."""
    model, params = main
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return model, jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def test_cached_greedy_equals_recomputation(main):
    """Greedy decoding with the cache, in batches of 2 sources (sorted by length, restored to
    the sources' order), equals rerunning the whole decoder for every token."""
    model, params = main
    kwargs = {"bos_id": BOS, "eos_id": EOS, "max_new_tokens": T_MAX, "batch_size": 2}
    outs = translate_scored(model, params, SOURCES, **kwargs)
    for i, out in enumerate(outs):
        tokens, log_prob, ended = greedy_reference(i)
        assert (out.tokens.tolist(), out.ended) == (tokens, ended)
        np.testing.assert_allclose(out.log_prob, log_prob, rtol=1e-5)
    assert len({tuple(o.tokens) for o in outs}) == len(SOURCES)  # Not a one-output model.
    assert any(o.ended for o in outs) and not all(o.ended for o in outs)  # Both kinds of end.
    plain = translate(model, params, SOURCES, **kwargs)
    assert [p.tolist() for p in plain] == [o.tokens.tolist() for o in outs]


@pytest.mark.slow  # One more decoding program (~3 s); the loop is the greedy test's.
def test_sampling_is_seeded_and_stays_in_the_vocabulary(sharded):
    model, params = sharded
    sampling = SamplingParams(temperature=1.5, top_k=10)

    def draw(seed):
        return [o.tolist() for o in translate(
            model, params, SOURCES, bos_id=BOS, eos_id=EOS, max_new_tokens=T_MAX,
            sampling=sampling, key=jax.random.key(seed))]

    first = draw(0)
    assert draw(0) == first and draw(1) != first
    assert all(0 <= t < V and t != EOS for row in first for t in row)


@pytest.mark.slow  # Three decoding programs; the exhaustive test below checks beam search.
@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_one_is_greedy(sharded, alpha):
    """Whatever the length penalty, a beam of 1 takes the argmax and stops at its EOS."""
    model, params = sharded
    beam = beam_search(model, params, SOURCES, bos_id=BOS, eos_id=EOS, max_new_tokens=T_MAX,
                       beam_size=1, length_penalty=alpha)
    for i, b in enumerate(beam):
        tokens, log_prob, ended = greedy_reference(i)
        assert (b.tokens.tolist(), b.ended) == (tokens, ended)
        np.testing.assert_allclose(b.log_prob, log_prob, rtol=1e-5)


def penalised(t, alpha):
    return t.log_prob / gnmt_length_penalty(len(t.tokens) + t.ended, alpha)


@pytest.mark.slow  # One more beam program (~3 s); the exhaustive test below checks the scores.
def test_beam_search_scores_its_hypotheses_and_beats_greedy(main):
    """Beam 4: each returned hypothesis's log p is what the full model gives it (the caches
    followed their hypotheses), and its penalised score is at least greedy's."""
    model, params = main
    kwargs = {"bos_id": BOS, "eos_id": EOS, "max_new_tokens": T_MAX, "length_penalty": 0.6}
    greedy = translate_scored(model, params, SOURCES, **kwargs)
    beam = translate_scored(model, params, SOURCES, beam_size=4, **kwargs)
    for source, g, b in zip(SOURCES, greedy, beam, strict=True):
        np.testing.assert_allclose(
            b.log_prob, sequence_log_prob(model, params, source, b.tokens, b.ended), rtol=1e-5)
        assert penalised(b, 0.6) >= penalised(g, 0.6) - 1e-6
    assert any(penalised(b, 0.6) > penalised(g, 0.6) + 1e-3
               for g, b in zip(greedy, beam, strict=True))


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_finds_the_exhaustive_optimum(sharded, alpha):
    """Up to 3 target tokens: a beam of 380 keeps every hypothesis (19 after one token, 361
    after two, with the EOS endings among the 380 candidates), so it must return the best of
    all of them by log p / ((5 + n) / 6)^α, enumerated here with the teacher-forced model."""
    model, params = sharded
    sources = SOURCES[:2]
    beam = beam_search(model, params, sources, bos_id=BOS, eos_id=EOS, max_new_tokens=3,
                       beam_size=380, length_penalty=alpha)
    words = [t for t in range(V) if t != EOS]
    for source, got in zip(sources, beam, strict=True):
        prefixes = np.array(list(itertools.product(words, words)), np.int32)  # [361, 2]
        # log p of every third token after each two-token prefix: [361, T] inputs give it all.
        inputs = np.zeros((len(prefixes), T_MAX), np.int32)  # Causal: columns 3… change nothing.
        inputs[:, 0], inputs[:, 1:3] = BOS, prefixes
        source_BS, mask_BS = pad([source] * len(prefixes))
        log_probs = np.asarray(jax.nn.log_softmax(forward(model, params, inputs, source_BS,
                                                          mask_BS)), np.float64)[..., :V]
        lp = lambda n: gnmt_length_penalty(n, alpha)
        first_V, second_WV = log_probs[0, 0], log_probs[::len(words), 1]  # x = words[i].
        best = {((), True): first_V[EOS] / lp(1)}
        for i, x in enumerate(words):
            best[((x,), True)] = (first_V[x] + second_WV[i, EOS]) / lp(2)
        for r, (x, y) in enumerate(prefixes):
            for z in range(V):
                head = first_V[x] + log_probs[r, 1, y] + log_probs[r, 2, z]
                best[((x, y) if z == EOS else (x, y, z), z == EOS)] = head / lp(3)
        (tokens, ended), score = max(best.items(), key=lambda kv: kv[1])
        assert (tuple(got.tokens.tolist()), got.ended) == (tokens, ended)
        np.testing.assert_allclose(penalised(got, alpha), score, rtol=1e-5)


def test_decoding_refuses_what_it_cannot_do(main):
    model, params = main
    kwargs = {"bos_id": BOS, "eos_id": EOS, "max_new_tokens": T_MAX}
    with pytest.raises(ValueError, match="temperature"):
        translate(model, params, SOURCES, beam_size=2, sampling=SamplingParams(1.0),
                  key=jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="needs a key"):
        translate(model, params, SOURCES, sampling=SamplingParams(1.0), **kwargs)
    with pytest.raises(ValueError, match="max_source_len"):
        translate(model, params, [np.arange(S_MAX + 1) % V], **kwargs)
    with pytest.raises(ValueError, match="max_seq_len"):
        translate(model, params, SOURCES, bos_id=BOS, eos_id=EOS, max_new_tokens=T_MAX + 1)
    with pytest.raises(ValueError, match="length_penalty"):
        translate(model, params, SOURCES, beam_size=2, length_penalty=-1.0, **kwargs)


# ---------------------------------------------------------------------------------------------
# The registry entry.


@pytest.mark.parametrize("overrides, words", [
    ({"model.positions": "alibi"}, ["model.positions=alibi", "bidirectional"]),
    ({"model.norm_position": "middle"}, ["model.norm_position"]),
    ({"model.encoder_layers": 0}, ["model.encoder_layers"]),
    ({"model.num_kv_heads": 3}, ["model.num_kv_heads"]),
    ({"model.attention": "additive"}, ["model.attention", "gpt"]),
    ({"model.scan_layers": True}, ["model.scan_layers"]),
    ({"data.document_mask": True}, ["data.document_mask"]),
    ({"data.source_len": 20}, ["data.source_len", "model.max_source_len"]),
])
def test_validate_refuses_in_one_line(overrides, words):
    c = config()
    registry.get("seq2seq").validate(c)  # The base is valid.
    for key, value in overrides.items():
        group, field = key.split(".")
        c[group][field] = value
    with pytest.raises(ConfigError) as e:
        registry.get("seq2seq").validate(c)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


def test_registry_entry_counts_and_compares(main):
    model, params = main
    cfg = model.cfg
    arch = registry.arch_of(cfg)
    assert arch.name == "seq2seq" and arch.decoding == "encoder_decoder"
    assert cfg.max_source_len == S_MAX and cfg.n_encoder_layers == 1
    assert seq2seq.encoder_params(cfg) == registry.count_params(params["encoder"])
    cross_kv = sum(registry.count_params(params["decoder"][f"block_{i}"]["cross_attn"]["kv"])
                   for i in range(cfg.num_layers))
    assert seq2seq.cross_kv_params(cfg) == cross_kv
    n = registry.count_params(params)
    # Each matmul parameter costs 6 FLOPs per token it acts on: those of the encoder and the
    # cross-attention's keys/values act on the S_MAX source tokens, the others on the T target
    # tokens; plus the attention terms.
    matmul = n - (T_MAX + S_MAX) * cfg.d_model  # Without the two position tables.
    source = seq2seq.encoder_params(cfg) + cross_kv
    attn = 12 * 32 * (2 * T_MAX + 2 * S_MAX + 1 * S_MAX ** 2 / T_MAX)  # N·H = d_model.
    assert arch.flops_per_token(cfg, n, T_MAX) == pytest.approx(
        6 * (matmul - source) + 6 * source * S_MAX / T_MAX + attn)
    # Shapes compare with encoder_layers unset = num_layers, and ignore max_*_len without
    # position tables.
    fields = registry.model_fields(cfg)
    assert arch.mismatch(fields, {**fields, "encoder_layers": 2}) == "encoder_layers"
    deep = registry.model_fields(dataclasses.replace(cfg, encoder_layers=None))
    assert arch.mismatch(deep, {**deep, "encoder_layers": cfg.num_layers}) is None
    rope = {**fields, "positions": "rope"}
    assert arch.mismatch(rope, {**rope, "max_source_len": 99}) is None
    assert arch.mismatch(fields, {**fields, "max_source_len": 99}) == "max_source_len"


# ---------------------------------------------------------------------------------------------
# End to end.


@pytest.mark.slow  # ~30 s of training on CPU.
@pytest.mark.parametrize("fields", [{}, {"norm_position": "post", "positions": "sinusoidal",
                                         "scale_embeddings": True}])
def test_learns_to_reverse_and_decodes_what_it_learned(fields):
    """Teacher-forced training (loss on target tokens only) on reversing 1-8 tokens, then greedy
    and beam decoding of unseen sources: the conventions of training (BOS, shift, EOS) and of
    decoding agree."""
    import optax

    c = config(num_heads=4, d_model=64, init_std=0.02, **fields)
    c.data.source_len = c.model.max_source_len = 8
    model = registry.build(registry.hyperparameters(c, 16))
    params = jax.jit(lambda key: nn.meta.unbox(model.init(
        key, jnp.zeros((1, T_MAX), jnp.int32))["params"]))(jax.random.key(0))
    rng = np.random.default_rng(0)

    def pairs(n):
        sources = [rng.integers(3, 16, rng.integers(1, 9)) for _ in range(n)]
        targets_BT = np.zeros((n, T_MAX), np.int32)
        for b, s in enumerate(sources):
            targets_BT[b, :len(s) + 1] = [*s[::-1], EOS]
        weights_BT = (targets_BT != 0).astype(np.float32)
        inputs_BT = np.concatenate([np.full((n, 1), BOS), targets_BT[:, :-1]], 1)
        return sources, (*pad(sources, S=8), inputs_BT.astype(np.int32), targets_BT, weights_BT)

    tx = optax.adamw(3e-3)

    @jax.jit
    def step(params, opt_state, source_BS, mask_BS, inputs_BT, targets_BT, weights_BT):
        def loss(p):
            logits_BTV = model.apply({"params": p}, inputs_BT, source_BS=source_BS,
                                     source_mask_BS=mask_BS)
            total, weight = cross_entropy(logits_BTV, targets_BT, weights_BT)
            return total / weight

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = tx.init(params)
    for _ in range(500):
        params, opt_state, value = step(params, opt_state, *pairs(64)[1])
    assert float(value) < 0.05
    sources, _ = pairs(50)
    for beam_size in (1, 3):
        outs = translate(model, params, sources, bos_id=BOS, eos_id=EOS, max_new_tokens=T_MAX,
                         beam_size=beam_size)
        exact = np.mean([o.tolist() == s[::-1].tolist() for o, s in zip(outs, sources, strict=True)])
        assert exact >= 0.9, (beam_size, exact)


@pytest.mark.slow  # Two inits and three applies to compile (~8 s).
def test_separate_embeddings_give_the_encoder_its_own_table():
    shared = registry.build(registry.hyperparameters(config(), V))
    own = registry.build(registry.hyperparameters(config(share_embeddings=False), V))
    tokens_BT, source_BS = jnp.ones((1, 3), jnp.int32), jnp.arange(1, 5)[None]
    p_shared, p_own = (nn.meta.unbox(m.init(jax.random.key(0), tokens_BT,
                                            source_BS=source_BS)["params"]) for m in (shared, own))
    assert "wte_source" in p_own and "wte_source" not in p_shared
    n_shared, n_own = registry.count_params(p_shared), registry.count_params(p_own)
    assert n_own - n_shared == V_PADDED * 32
    arch = registry.arch_of(own.cfg)
    assert arch.flops_per_token(own.cfg, n_own, T_MAX) == pytest.approx(
        arch.flops_per_token(shared.cfg, n_shared, T_MAX))  # A lookup: no FLOPs.
    assert arch.mismatch(registry.model_fields(shared.cfg),
                         registry.model_fields(own.cfg)) == "share_embeddings"

    def logits(params):
        return own.apply({"params": params}, tokens_BT, source_BS=source_BS)

    moved = {**p_own, "wte_source": {"embedding": p_own["wte_source"]["embedding"] + 1.0}}
    assert not np.allclose(logits(p_own), logits(moved))  # The encoder reads its own table …
    memory = own.apply({"params": p_own}, source_BS, method="encode")
    memory_moved_target = own.apply(
        {"params": {**p_own, "wte": {"embedding": p_own["wte"]["embedding"] + 1.0}}},
        source_BS, method="encode")
    np.testing.assert_array_equal(memory, memory_moved_target)  # … and not the target's.
