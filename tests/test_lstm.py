"""The LSTM language model (model.arch=lstm, gpt_jax/models/lstm.py) against a float64 NumPy LSTM
written from the equations (not from the Flax code): one cell step, the stacked model with tied
(projected) and untied heads, causality, packed documents, stateful decoding against running the
whole sequence, parameter and FLOP counts, config checks, and a training run through the real
loop that resumes bitwise and samples.

Shapes are named in suffixes: B batch, T time, D d_model, H lstm_hidden, V padded vocabulary.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, shakespeare_char
from gpt_jax import config as config_lib
from gpt_jax.generate import SamplingParams, generate
from gpt_jax.models import lstm, registry

V, W = 50, 16  # Vocabulary and max_seq_len (which bounds nothing for an LSTM).
B, T = 3, 16
ROWS = {  # model.* overrides: a tied head projecting H → D, and an untied head with H = D.
    "tied_projected": {"lstm_hidden": 24, "vocab_multiple": 64},
    "untied": {"tie_embeddings": False, "init_std": 0.2},
}
GREEDY = SamplingParams(temperature=0.0)


@functools.cache
def built(name: str):
    """(hyperparameters, module, params) of the 2-layer, d 16 LSTM of ROWS[name] (seed 0)."""
    c = base.get_config()
    c.model.arch, c.model.num_layers, c.model.d_model = "lstm", 2, 16
    c.data.seq_len = W
    c.model.update(ROWS[name])
    hparams = registry.hyperparameters(c, V)
    model = registry.build(hparams)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, W), jnp.int32))["params"]
    return hparams, model, nn.meta.unbox(params)


@functools.cache
def forward(model):
    """The jitted forward pass of `model` (one compile per model and shape)."""
    return jax.jit(model.apply)


def tokens(seed: int, shape=(B, T)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# The reference: an LSTM in float64 NumPy.


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_cell(p: dict, c_BH, h_BH, x_BF):
    """One LSTM step (Hochreiter & Schmidhuber with a forget gate, Gers et al.):
    i, f, o = σ(W_i· x + U_i· h + b_·), g = tanh(W_g x + U_g h + b_g), c' = f c + i g,
    h' = o tanh(c'). `p` holds Flax's names: input kernels i{gate}, recurrent h{gate} (+ bias)."""
    def pre(gate):
        k = {n: np.asarray(v, np.float64) for n, v in p[f"h{gate}"].items()}
        return x_BF @ np.asarray(p[f"i{gate}"]["kernel"], np.float64) + h_BH @ k["kernel"] + k["bias"]

    i, f, g, o = sigmoid(pre("i")), sigmoid(pre("f")), np.tanh(pre("g")), sigmoid(pre("o"))
    c_BH = f * c_BH + i * g
    return c_BH, o * np.tanh(c_BH)


def np_logits(cfg, params, tokens_BT, segment_ids_BT=None):
    """float64 logits [B, T, V] of the stacked LSTM, each row from a zero state that restarts
    where a segment begins; padded vocabulary ids at -inf (the model: finfo.min)."""
    embedding = np.asarray(params["wte"]["embedding"], np.float64)
    x_BTF = embedding[tokens_BT]
    Bn, Tn = tokens_BT.shape
    for layer in range(cfg.num_layers):
        p = params[f"lstm_{layer}"]["cell"]
        c_BH = h_BH = np.zeros((Bn, cfg.hidden))
        out = []
        for t in range(Tn):
            if segment_ids_BT is not None and t > 0:
                new_B1 = (segment_ids_BT[:, t] != segment_ids_BT[:, t - 1])[:, None]
                c_BH, h_BH = np.where(new_B1, 0.0, c_BH), np.where(new_B1, 0.0, h_BH)
            c_BH, h_BH = np_cell(p, c_BH, h_BH, x_BTF[:, t])
            out.append(h_BH)
        x_BTF = np.stack(out, axis=1)
    if cfg.tie_embeddings:
        if cfg.hidden != cfg.d_model:
            x_BTF = x_BTF @ np.asarray(params["proj"]["kernel"], np.float64)
        logits_BTV = x_BTF @ embedding.T
    else:
        logits_BTV = x_BTF @ np.asarray(params["lm_head"]["kernel"], np.float64)
    logits_BTV[..., cfg.vocab_size:] = -np.inf
    return logits_BTV


def assert_logits_close(got_BTV, want_BTV, vocab=V, atol=2e-5):
    np.testing.assert_allclose(np.asarray(got_BTV)[..., :vocab], want_BTV[..., :vocab], atol=atol,
                               rtol=0)


# ---------------------------------------------------------------------------------------------
# The model against the reference.


def test_one_cell_step_matches_float64_numpy_with_and_without_flags():
    """Flax's cell (with its gate order and names) is the LSTM step; the flags variant restarts
    from zeros where keep is 0 and passes the state through where real is 0."""
    cfg, _, params = built("tied_projected")
    H, F = cfg.hidden, cfg.d_model
    rng = np.random.default_rng(1)
    c_BH, h_BH, x_BF = rng.normal(size=(4, H)), rng.normal(size=(4, H)), rng.normal(size=(4, F))
    carry = (jnp.asarray(c_BH, jnp.float32), jnp.asarray(h_BH, jnp.float32))
    p = params["lstm_0"]
    (c1, h1), y = jax.jit(lstm._Cell(H, False, jnp.float32).apply)(
        {"params": p}, carry, jnp.asarray(x_BF, jnp.float32))
    want_c, want_h = np_cell(p["cell"], c_BH, h_BH, x_BF)
    np.testing.assert_allclose(c1, want_c, atol=1e-5)
    np.testing.assert_allclose(h1, want_h, atol=1e-5)
    np.testing.assert_array_equal(y, h1)
    # Rows: plain step, new segment (keep 0), padding (real 0), padding at a segment start.
    flags_B2 = np.array([[1, 1], [0, 1], [1, 0], [0, 0]], np.float32)
    (c2, h2), y2 = jax.jit(lstm._Cell(H, True, jnp.float32).apply)(
        {"params": p}, carry, jnp.asarray(np.concatenate([x_BF, flags_B2], axis=1), jnp.float32))
    fresh_c, fresh_h = np_cell(p["cell"], np.zeros_like(c_BH), np.zeros_like(h_BH), x_BF)
    want_c = np.stack([want_c[0], fresh_c[1], c_BH[2], np.zeros(H)])
    want_h = np.stack([want_h[0], fresh_h[1], h_BH[2], np.zeros(H)])
    np.testing.assert_allclose(c2, want_c, atol=1e-5)
    np.testing.assert_allclose(h2, want_h, atol=1e-5)
    np.testing.assert_array_equal(y2, h2)


@pytest.mark.parametrize("name", list(ROWS))
def test_logits_match_float64_reference(name):
    cfg, model, params = built(name)
    tokens_BT = tokens(2)
    logits_BTV = forward(model)({"params": params}, tokens_BT)
    assert logits_BTV.shape == (B, T, cfg.padded_vocab_size) and logits_BTV.dtype == jnp.float32
    assert_logits_close(logits_BTV, np_logits(cfg, params, tokens_BT))
    if cfg.padded_vocab_size > V:  # Padded ids are masked as the GPT's are.
        assert (np.asarray(logits_BTV)[..., V:] == np.finfo(np.float32).min).all()


def test_parameter_tree_and_counts_tied_and_untied():
    """Tied: embeddings + cells + an H → D projection (when H ≠ D); untied: + an H → V head."""
    _, _, tied_params = built("tied_projected")
    _, _, untied_params = built("untied")

    def cells(D, H):  # Per layer: 4 input kernels F × H, 4 recurrent H × H, 4 biases H.
        return 4 * H * (D + H + 1) + 4 * H * (H + H + 1)

    assert registry.count_params(tied_params) == 64 * 16 + cells(16, 24) + 24 * 16
    assert registry.count_params(untied_params) == 50 * 16 + cells(16, 16) + 16 * 50
    assert set(tied_params) == {"wte", "lstm_0", "lstm_1", "proj"}
    assert set(untied_params) == {"wte", "lstm_0", "lstm_1", "lm_head"}
    assert set(tied_params["lstm_0"]["cell"]) == {"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"}


def test_flops_per_token_is_six_times_the_matmul_parameters():
    tied, _, p = built("tied_projected")
    untied, _, q = built("untied")
    # Tied, D 16, H 24, V' 64: cells 4·24·(16+24) + 4·24·(24+24) = 3840 + 4608, projection
    # 24·16 = 384, head 64·16 = 1024 (the table, counted as the head): 9856.
    assert lstm.flops_per_token(tied, registry.count_params(p), W) == 6 * 9856
    # Untied, D = H = 16, V 50: cells 2 · 4·16·32 = 4096, head 16·50 = 800 (the table is a lookup).
    assert lstm.flops_per_token(untied, registry.count_params(q), 999) == 6 * 4896


def test_cpu_lstm_has_the_transformers_parameter_count():
    """configs/shakespeare_char.py:cpu_lstm's docstring: 804,750 against :cpu's ~804k."""
    def count(variant):
        config = shakespeare_char.get_config(variant)
        model = registry.build(registry.hyperparameters(config, 65))
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64), jnp.int32))
        return registry.count_params(shapes["params"])

    assert count("cpu_lstm") == 804_750
    assert count("cpu_lstm") == pytest.approx(count("cpu"), rel=0.01)


def test_changing_a_token_never_changes_earlier_logits():
    _, model, params = built("tied_projected")
    a_BT = tokens(3)
    b_BT = a_BT.copy()
    b_BT[:, 7] = (b_BT[:, 7] + 1) % V
    la = np.asarray(forward(model)({"params": params}, a_BT))
    lb = np.asarray(forward(model)({"params": params}, b_BT))
    np.testing.assert_array_equal(la[:, :7], lb[:, :7])
    assert not np.allclose(la[:, 7:], lb[:, 7:])


@pytest.mark.parametrize("name", list(ROWS))
def test_packed_documents_equal_the_documents_run_alone(name):
    """With segment ids (data.document_mask) the state restarts at each document: a packed row's
    logits are each document's own (and the float64 reference's with resets)."""
    cfg, model, params = built(name)
    tokens_BT = tokens(4)
    segment_ids_BT = np.repeat(np.array([[0] * 7 + [1] * 5 + [2] * 4]), B, axis=0).astype(np.int32)
    packed = forward(model)({"params": params}, tokens_BT, segment_ids_BT=segment_ids_BT)
    for lo, hi in ((0, 7), (7, 12), (12, 16)):
        alone_BT = np.zeros_like(tokens_BT)  # Right-padded to T: what follows cannot reach it.
        alone_BT[:, :hi - lo] = tokens_BT[:, lo:hi]
        alone = forward(model)({"params": params}, alone_BT)[:, :hi - lo]
        assert_logits_close(packed[:, lo:hi], np.asarray(alone, np.float64), atol=1e-6)
    assert_logits_close(packed, np_logits(cfg, params, tokens_BT, segment_ids_BT))
    plain = forward(model)({"params": params}, tokens_BT)
    assert not np.allclose(np.asarray(plain)[:, 7:, :V], np.asarray(packed)[:, 7:, :V])


# ---------------------------------------------------------------------------------------------
# Stateful decoding.


def test_decode_in_pieces_equals_the_whole_sequence():
    """Carrying the state across calls (a prompt, then one token at a time) gives the logits of
    one pass over the whole sequence; left padding masked with real_BT leaves the state at zero."""
    _, model, params = built("tied_projected")
    decode = jax.jit(functools.partial(model.apply, method="decode"))
    tokens_BT = tokens(5)
    whole = np.asarray(forward(model)({"params": params}, tokens_BT))
    logits, carry = decode({"params": params}, tokens_BT[:, :6], model.initial_carry(B))
    pieces = [logits]
    for t in range(6, T):
        logits, carry = decode({"params": params}, tokens_BT[:, t:t + 1], carry)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, atol=1e-5, rtol=0)
    # Row b left-padded by b tokens (pad id 7: any id, the mask decides).
    padded_BT = np.full((B, T + 2), 7, np.int32)
    real_BT = np.zeros((B, T + 2), bool)
    for b in range(B):
        padded_BT[b, b:b + T], real_BT[b, b:b + T] = tokens_BT[b], True
    logits, _ = decode({"params": params}, padded_BT, model.initial_carry(B), real_BT)
    for b in range(B):
        np.testing.assert_allclose(np.asarray(logits)[b, b:b + T], whole[b], atol=1e-5, rtol=0)


def reference_greedy(model, params, prompt, n, length):
    """Greedy continuation from running the whole sequence through the plain forward pass for
    every token (right-padded to `length`: the LSTM is causal, and one shape compiles once)."""
    seq = list(prompt)
    for _ in range(n):
        row = jnp.asarray([seq + [0] * (length - len(seq))], jnp.int32)
        seq.append(int(jnp.argmax(forward(model)({"params": params}, row)[0, len(seq) - 1])))
    return seq


RAGGED = [np.array([3, 1, 4, 1, 5]), np.array([7]), np.array([2, 7, 1, 8, 2, 8, 1, 8, 2])]


@pytest.mark.slow  # test_decode_in_pieces covers the recurrent decode by default.
def test_stateful_generation_equals_recomputation_with_ragged_prompts():
    """generate() on an LSTM: one batch of prompts of different lengths, continued past
    max_seq_len (no window), token for token what recomputing the whole sequence gives, greedy
    and sampled (the same key per token index)."""
    _, model, params = built("tied_projected")
    n = 20  # 9 + 20 > W = 16: an LSTM keeps its whole history, nothing is cropped.
    outs = generate(model, params, RAGGED, n, jax.random.key(0), GREEDY)
    for prompt, out in zip(RAGGED, outs, strict=True):
        assert out.tolist() == reference_greedy(model, params, prompt, n, 9 + n)
    assert len({tuple(o[-n:]) for o in outs}) == 3  # Not a degenerate one-token model.
    hot = SamplingParams(temperature=1.0, top_k=10)
    a = generate(model, params, RAGGED, n, jax.random.key(3), hot)
    b = generate(model, params, RAGGED, n, jax.random.key(3), hot, use_cache=False)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    stop = int(a[0][len(RAGGED[0]) + 2])  # A stop token ends each row as for the GPT.
    cut = generate(model, params, RAGGED, n, jax.random.key(3), hot, stop_tokens=[stop])
    for full, out, prompt in zip(a, cut, RAGGED, strict=True):
        new = full[len(prompt):].tolist()
        assert out.tolist() == prompt.tolist() + new[:new.index(stop) + 1 if stop in new else n]


# ---------------------------------------------------------------------------------------------
# Config and registry.


def lstm_config(**model_fields):
    c = base.get_config()
    c.model.arch = "lstm"
    c.model.update(model_fields)
    return c


@pytest.mark.parametrize(("fields", "words"), [
    ({"remat": "full"}, ["model.remat", "none"]),
    ({"scan_layers": True}, ["model.scan_layers"]),
    ({"logit_softcap": 30.0}, ["model.logit_softcap"]),
    ({"scale_embeddings": True}, ["model.scale_embeddings"]),
    ({"lstm_hidden": 0}, ["model.lstm_hidden", "≥ 1"]),
    ({"dropout": 1.0}, ["model.dropout"]),
    ({"num_layers": 0}, ["model.num_layers"]),
])
def test_bad_values_are_one_line_config_errors(fields, words):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(lstm_config(**fields))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_chunked_loss_is_refused_and_transformer_fields_are_ignored():
    c = lstm_config()
    c.train.loss_chunk = 16
    with pytest.raises(config_lib.ConfigError, match="train.loss_chunk"):
        config_lib.validate(c)
    # A Transformer recipe runs as it is (heads, attention dropout, bf16) with arch=lstm.
    c = shakespeare_char.get_config("gpu")
    c.model.arch = "lstm"
    config_lib.validate(c)


def test_registry_entry_and_shape_compatibility():
    arch = registry.get("lstm")
    assert (arch.decoding, arch.split_head) == ("recurrent", False)
    m = {**lstm_config().model.to_dict(), "vocab_size": V, "max_seq_len": W}
    # lstm_hidden unset is d_model's width; another width, or another max_seq_len (no table).
    assert arch.mismatch(m, {**m, "lstm_hidden": m["d_model"], "max_seq_len": 4 * W}) is None
    assert arch.mismatch(m, {**m, "lstm_hidden": 2 * m["d_model"]}) == "lstm_hidden"
    assert arch.mismatch(m, {**m, "arch": "gpt"}) == "arch"
    cfg, _, _ = built("tied_projected")
    assert arch.for_inference(dataclasses.replace(cfg, dropout=0.3)).dropout == 0.0


# ---------------------------------------------------------------------------------------------
# Training through the real loop.


@pytest.mark.slow  # Two training runs (~10 s of compiling each).
def test_training_resumes_bitwise_and_samples(tiny_config, tmp_path, metrics_rows, capsys):
    """An LSTM with dropout trains through loop.run and prints its sample; a copy of the run cut
    back to its step-6 checkpoint (as if killed after it) resumes to the same step-12 run:
    metrics and parameters bitwise equal."""
    import shutil

    from gpt_jax.sample import load_run
    from gpt_jax.training import loop

    config = tiny_config(**{"model.arch": "lstm", "model.lstm_hidden": 48, "model.dropout": 0.1,
                            "train.num_steps": 12, "train.eval_every": 6, "log.every": 3,
                            "train.final_eval": "batches", "checkpoint.every": 6,
                            "sample.num_samples": 1, "sample.prompt": "def"})
    loop.run(config, tmp_path / "whole")
    samples = capsys.readouterr().out.split("-" * 40 + "\n")[1:]
    assert len(samples) == 1 and samples[0].startswith("def") and len(samples[0]) > 10
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "12")
    config.sample.num_samples = 0
    loop.run(config, tmp_path / "split")
    assert (metrics_rows(tmp_path / "split", timing=False)
            == metrics_rows(tmp_path / "whole", timing=False))
    *_, split_params, split_step = load_run(tmp_path / "split")
    *_, whole_params, whole_step = load_run(tmp_path / "whole")
    assert split_step == whole_step == 12
    jax.tree.map(np.testing.assert_array_equal, split_params, whole_params)


@pytest.mark.slow  # Two CLI processes.
def test_cli_trains_and_samples_an_lstm(tiny_config, tmp_path, train_command):
    import subprocess
    import sys

    workdir = tmp_path / "run"
    c = tiny_config(**{"model.arch": "lstm", "train.num_steps": 20, "sample.prompt": "def"})
    r = subprocess.run(train_command(workdir, c), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("-" * 40 + "\n")[1].startswith("def")
    r = subprocess.run([sys.executable, "-m", "gpt_jax.sample", f"--workdir={workdir}",
                        "--prompt=def", "--max_new_tokens=40", "--num_samples=2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    texts = r.stdout.split("-" * 40 + "\n")[1:]
    assert len(texts) == 2 and all(t.startswith("def") and len(t) > 20 for t in texts)
