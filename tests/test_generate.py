"""KV-cache decoding: equals full recomputation token for token (ragged prompts, past the context
limit, scanned layers), sampling filters, seeds, stop tokens, sharded params."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.generate import SamplingParams, generate, sample_logits, window_start
from gpt_jax.models import registry

GREEDY = SamplingParams(temperature=0.0)
W = 16  # max_seq_len of the test model.


@pytest.fixture
def model_and_params(tiny_gpt):
    """make(vocab_size=50, **model_fields) → (module, params) of the tiny GPT with a window of W,
    a vocabulary padded to 64 and peaked logits (init_std 0.3: greedy continuations that do not
    repeat one token)."""
    def make(vocab_size=50, scan_layers=False, **model_fields):
        fields = {"vocab_multiple": 64, "init_std": 0.3, **model_fields}
        cfg, model, params = tiny_gpt(vocab_size=vocab_size, seq_len=W, **fields)
        if scan_layers:  # The same weights stacked for scan_layers (an eager scanned init is slow).
            model = registry.build(dataclasses.replace(cfg, scan_layers=True))
            layers = [params.pop(f"h_{i}") for i in range(cfg.num_layers)]
            params["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        return model, params

    return make


@functools.cache
def forward(model):
    """The jitted forward pass of `model` (one compile per model, whatever the params)."""
    return jax.jit(model.apply)


def reference_greedy(model, params, prompt, n, window="crop"):
    """Recomputes the context for every token without a cache: `crop` keeps the last W tokens
    (nanoGPT); `half` the window generate's cache holds (sliding by W/2)."""
    # Right-padded to W: a causal model's logits at a position ignore what follows it, and one
    # shape compiles once.
    seq = list(prompt)
    for _ in range(n):
        i = len(seq) - 1
        start = max(0, i - W + 1) if window == "crop" else window_start(i, W)
        ctx = seq[start:i + 1]
        logits = forward(model)({"params": params},
                                jnp.asarray([ctx + [0] * (W - len(ctx))], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, len(ctx) - 1])))
    return seq


RAGGED = [np.array([3, 1, 4, 1, 5]), np.array([7]), np.array([2, 7, 1, 8, 2, 8, 1, 8, 2])]


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cached_greedy_equals_recomputation_with_ragged_prompts(model_and_params, scan_layers):
    model, params = model_and_params(scan_layers=scan_layers)
    outs = generate(model, params, RAGGED, 7, jax.random.key(0), GREEDY)  # 9 + 7 = W: no slide.
    for prompt, out in zip(RAGGED, outs, strict=True):
        assert out.tolist() == reference_greedy(model, params, prompt, 7)
    assert len({tuple(o[-7:]) for o in outs}) == 3  # Not a degenerate one-token model.
    numpy_params = jax.tree.map(np.asarray, params)  # E.g. straight from an HF import.
    again = generate(model, numpy_params, RAGGED, 7, jax.random.key(0), GREEDY)
    assert [a.tolist() for a in again] == [o.tolist() for o in outs]


def test_cache_slides_past_the_context_limit(model_and_params):
    model, params = model_and_params()
    prompt = RAGGED[0]
    out = generate(model, params, [prompt], 40, jax.random.key(0), GREEDY)[0]
    assert len(out) == 45 > W
    assert out.tolist() == reference_greedy(model, params, prompt, 40, window="half")
    # A prompt longer than the window is cropped to its newest tokens.
    long = np.arange(1, 30) % 50
    out = generate(model, params, [long], 5, jax.random.key(0), GREEDY)[0]
    assert out.tolist() == reference_greedy(model, params, long, 5, window="half")


def test_uncached_decoding_is_nanogpt_cropping(model_and_params):
    model, params = model_and_params()
    out = generate(model, params, [RAGGED[0]], 30, jax.random.key(0), GREEDY, use_cache=False)[0]
    assert out.tolist() == reference_greedy(model, params, RAGGED[0], 30, window="crop")
    # Within the window, cached and uncached decoding agree on ragged batches too.
    a = generate(model, params, RAGGED, 7, jax.random.key(0), GREEDY)
    b = generate(model, params, RAGGED, 7, jax.random.key(0), GREEDY, use_cache=False)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_top_k_one_is_greedy_and_sampling_is_seeded(model_and_params):
    model, params = model_and_params()
    # Lengths as in the other tests: each (prompts, length, sampling) compiles once.
    greedy = generate(model, params, RAGGED, 7, jax.random.key(0), GREEDY)
    top1 = generate(model, params, RAGGED, 7, jax.random.key(1), SamplingParams(1.0, top_k=1))
    assert [x.tolist() for x in greedy] == [x.tolist() for x in top1]
    hot = SamplingParams(temperature=1.5)
    a = generate(model, params, RAGGED, 7, jax.random.key(3), hot)
    b = generate(model, params, RAGGED, 7, jax.random.key(3), hot)
    c = generate(model, params, RAGGED, 7, jax.random.key(4), hot)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]


def test_padded_vocab_ids_are_never_sampled(model_and_params):
    model, params = model_and_params(vocab_size=5, vocab_multiple=64)
    outs = generate(model, params, [np.array([1])] * 4, 60, jax.random.key(3),
                    SamplingParams(temperature=3.0))
    tokens = np.concatenate(outs)
    assert tokens.max() < 5  # 59 padded ids exist; a high temperature would reach them if unmasked.
    assert len(np.unique(tokens)) > 1


def test_top_p_keeps_the_smallest_nucleus():
    logits_BV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_logits(logits_BV, jax.random.key(i), SamplingParams(1.0, 0, 0.7))[0])
             for i in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 ≤ 0.5 + 0.3: ids 2 and 3 are cut.
    draws = {int(sample_logits(logits_BV, jax.random.key(i), SamplingParams(1.0, 0, 0.1))[0])
             for i in range(50)}
    assert draws == {0}  # The most likely id always stays.


def test_stop_tokens_end_each_row(model_and_params):
    model, params = model_and_params()
    free = generate(model, params, RAGGED, 7, jax.random.key(0), GREEDY)
    stop = int(free[0][len(RAGGED[0]) + 3])  # Row 0's 4th new token (or an earlier copy).
    outs = generate(model, params, RAGGED, 7, jax.random.key(0), GREEDY, stop_tokens=[stop])
    for prompt, full, out in zip(RAGGED, free, outs, strict=True):
        new = full[len(prompt):].tolist()
        cut = new.index(stop) + 1 if stop in new else len(new)
        assert out.tolist() == prompt.tolist() + new[:cut]
    assert len(outs[0]) <= len(RAGGED[0]) + 4 < len(free[0])


def test_empty_prompt_is_refused(model_and_params):
    model, params = model_and_params()
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, params, [np.array([], np.int32)], 3, jax.random.key(0), GREEDY)
