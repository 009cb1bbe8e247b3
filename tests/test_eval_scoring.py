"""Log-likelihood scoring (gpt_jax/eval/scoring.py) against plain forward passes: continuations
after a context (truncated, chunked), greedy checks, rolling windows, the sliding-window eval
batches against the training eval's, bits per byte. A tiny random GPT (and one LSTM case) with
a context of T = 16 tokens.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from gpt_jax.data import pipeline
from gpt_jax.eval import scoring
from gpt_jax.models import registry
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.parallel import sharding
from gpt_jax.training import step

T = 16  # max_len: the model's context.
V = 50  # Vocabulary.


@functools.cache
def tiny(arch: str = "gpt"):
    """(module, params) of a 1-layer, d 32 model with random parameters, built once. The
    parameters are drawn in NumPy (N(0, 0.2²), whatever the module's initializers): compiling
    the module's init would cost seconds, and any parameters make a scoring test."""
    c = base.get_config()
    c.model.arch = arch
    c.model.num_layers, c.model.num_heads, c.model.d_model = 1, 2, 32  # Quick to compile.
    c.data.seq_len = T
    model = registry.build(registry.hyperparameters(c, V))
    if arch == "seq2seq":
        return model, None
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
                          nn.meta.unbox(shapes["params"]))
    return model, params


@functools.cache
def forward(model):
    """model.apply, jitted (an eager pass of the tiny model costs ~0.5 s in op dispatch)."""
    return jax.jit(model.apply)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def logprobs(model, params, window: list[int]) -> np.ndarray:
    """log p(window[j + 1] | window[: j + 1]) for every j, in float64, from one plain forward
    pass over the window's inputs. A window shorter than T + 1 is followed by random tokens up to T
    inputs (one compiled length; the model is causal, so they change nothing before them, and
    they are not the scorer's padding)."""
    filler = ids(T + 1 - len(window), seed=len(window))
    logits = forward(model)({"params": params}, jnp.asarray([window[:-1] + filler], jnp.int32))
    logits = np.asarray(logits[0], np.float64)
    top = logits.max(axis=-1, keepdims=True)  # Log-softmax in float64, by hand.
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    n = len(window) - 1
    return logp[np.arange(n), window[1:]]


def reference(model, params, context: list[int], continuation: list[int]) -> float:
    """Σ log p(continuation) where each token j is read in the window of the T + 1 tokens
    ending at the end of its chunk (chunks of T continuation tokens from its start)."""
    seq = context + continuation
    total = 0.0
    for a in range(len(context), len(seq), T):
        b = min(a + T, len(seq))
        start = max(0, b - T - 1)
        total += logprobs(model, params, seq[start:b])[a - start - 1 :].sum()
    return total


REQUESTS = [
    (ids(3, 1), ids(4, 2)),  # Fits: one forward pass over the whole sequence.
    (ids(14, 3), ids(5, 4)),  # 19 tokens: the context is truncated from the left.
    (ids(2, 5), ids(40, 6)),  # A continuation of 40 > T: three chunks.
    (ids(6, 7), ids(1, 8)),
    (ids(9, 9), ids(8, 10)),  # Exactly T + 1 tokens.
]


def mesh_scorer(model, params, batch_size: int = 3) -> scoring.Scorer:
    """A Scorer on a one-device mesh with the default rules (what the evaluate command makes of
    a one-device run); the tests share its compiled programs."""
    mesh_cfg = base.get_config().mesh
    mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:1])
    return scoring.Scorer(model, params, max_len=T, batch_size=batch_size, mesh=mesh,
                          rules=sharding.logical_rules(mesh_cfg))


def test_loglikelihood_equals_plain_forward_passes():
    model, params = tiny()
    scores = mesh_scorer(model, params).loglikelihood(REQUESTS)
    for (context, continuation), (score, _) in zip(REQUESTS, scores, strict=True):
        assert score == pytest.approx(reference(model, params, context, continuation), abs=1e-4)
    # The cases by hand: a plain pass over everything, and over the last T + 1 tokens.
    (c0, k0), (c1, k1) = REQUESTS[:2]
    assert scores[0][0] == pytest.approx(logprobs(model, params, c0 + k0)[-4:].sum(), abs=1e-5)
    assert scores[1][0] == pytest.approx(
        logprobs(model, params, (c1 + k1)[-(T + 1):])[-5:].sum(), abs=1e-5)


def test_batching_order_padding_and_the_mesh_do_not_change_scores(monkeypatch):
    model, params = tiny()
    want = scoring.Scorer(model, params, max_len=T, batch_size=1).loglikelihood(REQUESTS)
    # Rows of 8 and 16 positions (a 6-token row padded to either) in batches of 3, in another
    # order, on the mesh.
    monkeypatch.setattr(scoring, "MIN_BUCKET", 8)
    scorer = mesh_scorer(model, params)
    assert [scorer._bucket(n) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    order = [3, 0, 4, 2, 1]
    got = scorer.loglikelihood([REQUESTS[i] for i in order])
    for i, (score, greedy) in zip(order, got, strict=True):
        assert score == pytest.approx(want[i][0], abs=1e-5)
        assert greedy == want[i][1]


def test_is_greedy_is_true_exactly_for_the_argmax_continuation():
    model, params = tiny()
    context, continuation = ids(5, 11), []
    for _ in range(4):  # Greedy decoding by plain forward passes (right-padded to T).
        seq = context + continuation
        logits = forward(model)({"params": params}, jnp.asarray([seq + [0] * (T - len(seq))]))
        continuation.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    worse = [*continuation[:-1], (continuation[-1] + 1) % V]
    scorer = mesh_scorer(model, params)
    (best, is_best), (other, is_other) = scorer.loglikelihood(
        [(context, continuation), (context, worse)])
    assert is_best and not is_other
    assert best > other
    assert scorer.loglikelihood([(context, [])]) == [(0.0, True)]


def eval_step_sum(model, params, tokens, stride) -> tuple[float, int]:
    """Σ log p and Σ weights of step.make_eval_step over scoring.text_batches."""
    eval_step = jax.jit(step.make_eval_step(model))
    batches = list(scoring.text_batches(np.asarray(tokens), T, 3, stride))
    assert len(batches) == scoring.count_text_batches(len(tokens), T, 3, stride)
    sums = np.asarray([jax.device_get(eval_step(params, b)) for b in batches], np.float64)
    return -sums[:, 0].sum(), int(sums[:, 1].sum())


@pytest.mark.parametrize("stride", [None, 5])
def test_rolling_loglikelihood_scores_each_token_once_as_text_batches_do(stride):
    model, params = tiny()
    text = ids(60, 12)
    scorer = mesh_scorer(model, params)
    total, count = scorer.rolling_loglikelihood(text, stride)
    assert count == len(text) - 1
    want_total, want_count = eval_step_sum(model, params, text, stride)
    assert count == want_count
    assert total == pytest.approx(want_total, rel=1e-6)
    if stride is not None:  # More context per token: another score than stride T's.
        assert total != pytest.approx(scorer.rolling_loglikelihood(text)[0], abs=1e-3)
    assert scorer.rolling_loglikelihoods([text[:1], text], stride) == [(0.0, 0), (total, count)]


@pytest.mark.parametrize("num_tokens", [2, 17, 33, 40, 65, 100])
def test_text_batches_with_stride_seq_len_are_the_full_eval_batches(num_tokens):
    tokens = np.arange(1, num_tokens + 1, dtype=np.uint16)
    # Two shards: windows run across the boundary, as in a prepared folder.
    parts = [tokens[: num_tokens // 3], tokens[num_tokens // 3 :]]
    ours = list(scoring.text_batches(parts, T, 3))
    assert len(ours) == scoring.count_text_batches(num_tokens, T, 3)
    if num_tokens < T + 1:  # The training eval refuses a split shorter than one window.
        assert len(ours) == 1 and ours[0]["weights"].sum() == num_tokens - 1
        return
    theirs = list(pipeline.full_eval_batches(parts, T, 3))
    assert len(ours) == len(theirs) == pipeline.count_full_eval_batches(num_tokens, T, 3)
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("stride", [1, 4, 7, 16])
def test_text_batches_score_every_target_once_with_enough_context(stride):
    n = 50
    tokens = np.arange(n, dtype=np.int32)
    batches = list(scoring.text_batches(tokens, T, 2, stride))
    assert len(batches) == scoring.count_text_batches(n, T, 2, stride)
    scored = []
    for b in batches:
        for targets, weights, inputs in zip(b["targets"], b["weights"], b["inputs"], strict=True):
            for j in np.flatnonzero(weights):
                scored.append(int(targets[j]))
                # Context: the whole text so far, or at least T - stride + 1 tokens.
                assert j + 1 >= min(targets[j], T - stride + 1)
                assert list(inputs[: j + 1]) == list(range(targets[j] - j - 1, targets[j]))
    assert scored == list(range(1, n))


def test_bits_per_byte_of_a_known_text():
    model, params = tiny()
    text = "naïve café, déjà vu: " * 4  # Accents: more UTF-8 bytes than characters.
    vocab = {ch: i for i, ch in enumerate(sorted(set(text)))}
    tokens = np.asarray([vocab[ch] for ch in text], np.int32)
    total, count = eval_step_sum(model, params, tokens, None)
    assert count == len(tokens) - 1
    loss = -total / count  # The mean token loss in nats, as loop.evaluate reports it.
    num_bytes = len(text.encode("utf-8"))
    assert num_bytes > len(text)
    bpb = scoring.bits_per_byte(loss * count, num_bytes)
    assert bpb == pytest.approx(loss * count / num_bytes / math.log(2), rel=1e-12)
    assert scoring.bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)


def test_an_lstm_scores_like_its_forward_pass():
    model, params = tiny("lstm")
    scorer = scoring.Scorer(model, params, max_len=T, batch_size=3)
    requests = REQUESTS[1:3]  # Windows of T + 1 tokens: one reference shape.
    for (context, continuation), (score, _) in zip(
            requests, scorer.loglikelihood(requests), strict=True):
        assert score == pytest.approx(reference(model, params, context, continuation), abs=1e-4)


@pytest.mark.parametrize(("call", "words"), [
    (lambda s: s.loglikelihood([([1], [2]), ([], [3])]), ["request 1", "empty context"]),
    (lambda s: s.loglikelihood([([1, V], [2])]), ["request 0", f"token id {V}", "vocabulary"]),
    (lambda s: s.loglikelihood([([1], [-1])]), ["continuation", "token id -1"]),
    (lambda s: s.rolling_loglikelihood([1, 2, 3], stride=T + 1), ["stride=17", "[1, 16]"]),
    (lambda s: s.rolling_loglikelihood([1, 2, 3], stride=0), ["stride=0"]),
])
def test_bad_requests_are_refused_in_one_line(call, words):
    model, params = tiny()
    with pytest.raises(ValueError) as e:
        call(scoring.Scorer(model, params, max_len=T, batch_size=2))
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_refuses_an_encoder_decoder_and_bad_settings():
    with pytest.raises(ValueError, match="encoder-decoder"):
        scoring.Scorer(tiny("seq2seq")[0], None, max_len=T, batch_size=2)
    model, params = tiny()
    with pytest.raises(ValueError, match="learned positions"):
        scoring.Scorer(model, params, max_len=T + 1, batch_size=2)
    with pytest.raises(ValueError, match="mesh and rules together"):
        scoring.Scorer(model, params, max_len=T, batch_size=2, mesh=object())
    with pytest.raises(ValueError, match="at least 2"):
        scoring.text_batches(np.zeros(1, np.int32), T, 2)
    with pytest.raises(ValueError, match="num_bytes"):
        scoring.bits_per_byte(1.0, 0)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_position_losses_average_each_position_over_whole_windows(arch):
    model, params = tiny(arch)
    text = ids(5 * T + 7, seed=11)  # 5 whole windows of T + 1 tokens; the partial one is left out.
    want = -np.mean([logprobs(model, params, text[s : s + T + 1]) for s in range(0, 5 * T, T)],
                    axis=0)
    for scorer in (scoring.Scorer(model, params, max_len=T, batch_size=2),
                   mesh_scorer(model, params)):
        losses, windows = scorer.position_losses(np.asarray(text))
        assert windows == 5 and losses.shape == (T,)
        np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one window"):
        scorer.position_losses(np.asarray(text[:T]))
