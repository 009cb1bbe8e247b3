"""Model variants (configs/base.py: model.positions, rope_theta, num_kv_heads, qk_norm, norm, mlp,
mlp_dim, mlp_multiple, logit_softcap, attention, additive_chunk; train.z_loss) against a float64
NumPy reference forward pass written from the spec, not from the Flax code: parameter trees,
logits, causality, relative positions, grouped-query attention, KV-cache decoding, lengths beyond
the training length, z-loss. (Learned positions have no entries past max_seq_len: not tested there.)

Shapes are named in suffixes: B batch, T time, D d_model, N heads, K kv heads, H head dim,
F mlp width, V vocabulary. Every model is tiny_gpt's (2 layers, 4 heads, d 32, window 16).
"""

import functools
import math
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from configs import base
from gpt_jax.models.layers import DecodeState

V, W = 50, 16  # Vocabulary and window (max_seq_len) of every model here.
B, T = 4, 16  # Every forward pass here takes [B, T] tokens: one compile per model.

# Reference rows: each a set of model.* overrides, one variant (or a combination) at a time.
ROWS = {
    "learned": {},
    "sinusoidal_rmsnorm": {"positions": "sinusoidal", "norm": "rmsnorm",
                           "scale_embeddings": True},
    "rope": {"positions": "rope"},
    "alibi_swiglu": {"positions": "alibi", "mlp": "swiglu", "mlp_multiple": 16},  # F = 96.
    # A cap of 2, not 30: these logits (|l| ≲ 3) are left unchanged by 30 within 1e-4.
    "nope_relu2_softcap": {"positions": "none", "mlp": "relu2", "mlp_dim": 48,
                           "logit_softcap": 2.0},
    "gqa": {"num_kv_heads": 2},
    "mqa": {"num_kv_heads": 1, "positions": "alibi"},
    "qk_norm": {"qk_norm": True, "positions": "rope"},
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "positions": "rope", "num_kv_heads": 2,
              "qk_norm": True, "rope_theta": 100.0},
    # Biases everywhere (split q / kv, swiglu's gate) and an untied head.
    "biased": {"bias": True, "num_kv_heads": 2, "mlp": "swiglu", "tie_embeddings": False,
               "activation": "gelu_tanh"},
    # Bahdanau scores; the second row's chunk (5) does not divide T (a padded last chunk).
    "additive": {"attention": "additive", "positions": "alibi"},
    "additive_gqa": {"attention": "additive", "num_kv_heads": 2, "positions": "rope",
                     "qk_norm": True, "additive_chunk": 5},
}

# Every option appears in these; the other rows (combinations) run with --runslow.
# (sinusoidal's function is checked alone by default: test_sinusoidal_matches_vaswani_et_al.)
FAST_ROWS = ("nope_relu2_softcap", "llama", "additive_gqa")  # learned: also tests/test_model.py.


def rows(names) -> list:
    """`names` as parametrize values, those outside FAST_ROWS marked slow."""
    return [n if n in FAST_ROWS else pytest.param(n, marks=pytest.mark.slow) for n in names]


# ---------------------------------------------------------------------------------------------
# The spec: parameter shapes and a float64 NumPy forward pass.


def spec(fields: dict) -> dict:
    """The `model` group of tiny_gpt's model with `fields` overridden (a plain dict)."""
    s = base.get_config().model.to_dict()
    s.update(num_layers=2, num_heads=4, d_model=32, vocab_size=V, max_seq_len=W)
    s.update(fields)
    return s


def mlp_width(s: dict) -> int:
    """F: mlp_dim, else mlp_ratio·D (gelu, relu2) or ⌈⅔·mlp_ratio·D / mlp_multiple⌉·mlp_multiple."""
    if s["mlp_dim"] is not None:
        return s["mlp_dim"]
    F = s["mlp_ratio"] * s["d_model"]
    if s["mlp"] == "swiglu":
        return math.ceil(Fraction(2 * F, 3) / s["mlp_multiple"]) * s["mlp_multiple"]
    return F


def expected_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """{"a/b/c": shape} of every parameter the spec names (unscanned)."""
    D, N = s["d_model"], s["num_heads"]
    H, F = D // N, mlp_width(s)
    K = s["num_kv_heads"] or N
    Vp = math.ceil(s["vocab_size"] / s["vocab_multiple"]) * s["vocab_multiple"]
    shapes = {"wte/embedding": (Vp, D)}
    if s["positions"] == "learned":
        shapes["wpe/embedding"] = (s["max_seq_len"], D)

    def dense(name, kernel, bias):
        shapes[f"{name}/kernel"] = kernel
        if s["bias"]:
            shapes[f"{name}/bias"] = bias

    def norm(name, width):
        shapes[f"{name}/scale"] = (width,)
        if s["bias"] and s["norm"] == "layernorm":
            shapes[f"{name}/bias"] = (width,)

    for i in range(s["num_layers"]):
        h = f"h_{i}"
        norm(f"{h}/ln_1", D)
        norm(f"{h}/ln_2", D)
        if K == N:
            dense(f"{h}/attn/qkv", (D, 3, N, H), (3, N, H))
        else:
            dense(f"{h}/attn/q", (D, N, H), (N, H))
            dense(f"{h}/attn/kv", (D, 2, K, H), (2, K, H))
        if s["attention"] == "additive":
            shapes[f"{h}/attn/additive_wq"] = shapes[f"{h}/attn/additive_wk"] = (N, H, H)
            shapes[f"{h}/attn/additive_v"] = (N, H)
        if s["qk_norm"]:
            shapes[f"{h}/attn/q_norm/scale"] = (H,)
            shapes[f"{h}/attn/k_norm/scale"] = (H,)
        dense(f"{h}/attn/out", (N, H, D), (D,))
        dense(f"{h}/mlp/fc", (D, F), (F,))
        if s["mlp"] == "swiglu":
            dense(f"{h}/mlp/gate", (D, F), (F,))
        dense(f"{h}/mlp/proj", (F, D), (D,))
    norm("ln_f", D)
    if not s["tie_embeddings"]:
        shapes["lm_head/kernel"] = (D, Vp)
    return shapes


def shapes_of(params) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in path): tuple(np.shape(x)) for path, x in flat}


def rms_norm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def norm_reference(x, p, s):
    if s["norm"] == "rmsnorm":
        return rms_norm(x, p["scale"], s["norm_eps"])
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + s["norm_eps"]) * p["scale"] + p.get("bias", 0.0)


def sinusoids(pos_BT, D: int):
    """PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(…): [B, T, D]."""
    angle_BTi = pos_BT[..., None] / 10000.0 ** (2 * np.arange(D // 2) / D)
    pe_BTD = np.empty((*pos_BT.shape, D))
    pe_BTD[..., 0::2], pe_BTD[..., 1::2] = np.sin(angle_BTi), np.cos(angle_BTi)
    return pe_BTD


def rope_reference(x_BTNH, pos_BT, theta: float):
    """Hugging Face Llama's rotate-half RoPE."""
    H = x_BTNH.shape[-1]
    inv_freq = theta ** (-2.0 * np.arange(H // 2) / H)
    angle_BTH = np.concatenate([pos_BT[..., None] * inv_freq] * 2, -1)
    cos, sin = np.cos(angle_BTH)[:, :, None], np.sin(angle_BTH)[:, :, None]
    rotated = np.concatenate([-x_BTNH[..., H // 2:], x_BTNH[..., : H // 2]], -1)
    return x_BTNH * cos + rotated * sin


def alibi_slopes_reference(n: int) -> list[float]:
    """Press et al.: 2^(-8k/n), k = 1…n, for a power of 2; else m = 2^⌊log2 n⌋'s slopes, then
    every other one of 2m's."""
    def power_of_2(m):
        return [2.0 ** (-8.0 * k / m) for k in range(1, m + 1)]

    m = 2 ** math.floor(math.log2(n))
    return power_of_2(n) if m == n else power_of_2(m) + power_of_2(2 * m)[0::2][: n - m]


def attention_reference(x_BTD, p, s, pos_BT):
    N = s["num_heads"]
    H = s["d_model"] // N
    if "qkv" in p:
        qkv = np.einsum("btd,dknh->btknh", x_BTD, p["qkv"]["kernel"]) + p["qkv"].get("bias", 0.0)
        q_BTNH, k_BTKH, v_BTKH = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q_BTNH = np.einsum("btd,dnh->btnh", x_BTD, p["q"]["kernel"]) + p["q"].get("bias", 0.0)
        kv = np.einsum("btd,dknh->btknh", x_BTD, p["kv"]["kernel"]) + p["kv"].get("bias", 0.0)
        k_BTKH, v_BTKH = kv[:, :, 0], kv[:, :, 1]
    if s["qk_norm"]:  # Before RoPE.
        q_BTNH = rms_norm(q_BTNH, p["q_norm"]["scale"], s["norm_eps"])
        k_BTKH = rms_norm(k_BTKH, p["k_norm"]["scale"], s["norm_eps"])
    if s["positions"] == "rope":
        q_BTNH = rope_reference(q_BTNH, pos_BT, s["rope_theta"])
        k_BTKH = rope_reference(k_BTKH, pos_BT, s["rope_theta"])
    group = N // k_BTKH.shape[2]  # Query head n reads kv head n // group.
    k_BTNH, v_BTNH = np.repeat(k_BTKH, group, axis=2), np.repeat(v_BTKH, group, axis=2)
    if s["attention"] == "additive":  # v_nᵀ tanh(W_q q + W_k k), W [in H, out H] per head.
        qa_BTNH = np.einsum("btnh,nha->btna", q_BTNH, p["additive_wq"])
        ka_BSNH = np.einsum("bsnh,nha->bsna", k_BTNH, p["additive_wk"])
        e_BTSNH = np.tanh(qa_BTNH[:, :, None] + ka_BSNH[:, None])
        scores_BNTS = np.einsum("btsna,na->bnts", e_BTSNH, p["additive_v"])
    else:
        scores_BNTS = np.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH) / np.sqrt(H)
    if s["positions"] == "alibi":
        distance_BTS = pos_BT[:, :, None] - pos_BT[:, None, :]
        scores_BNTS = scores_BNTS - (np.asarray(alibi_slopes_reference(N))[None, :, None, None]
                                     * distance_BTS[:, None])
    Tn = x_BTD.shape[1]
    scores_BNTS = np.where(np.tril(np.ones((Tn, Tn), bool)), scores_BNTS, -np.inf)
    w_BNTS = np.exp(scores_BNTS - scores_BNTS.max(-1, keepdims=True))
    w_BNTS /= w_BNTS.sum(-1, keepdims=True)
    out_BTNH = np.einsum("bnts,bsnh->btnh", w_BNTS, v_BTNH)
    return np.einsum("btnh,nhd->btd", out_BTNH, p["out"]["kernel"]) + p["out"].get("bias", 0.0)


ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: np.maximum(x, 0.0),
}


def mlp_reference(x_BTD, p, s):
    def dense(name, x):
        return x @ p[name]["kernel"] + p[name].get("bias", 0.0)

    h_BTF = dense("fc", x_BTD)
    if s["mlp"] == "gelu":
        h_BTF = ACTIVATIONS[s["activation"]](h_BTF)
    elif s["mlp"] == "relu2":
        h_BTF = np.maximum(h_BTF, 0.0) ** 2
    else:  # swiglu: silu(gate) · fc.
        g_BTF = dense("gate", x_BTD)
        h_BTF = g_BTF / (1 + np.exp(-g_BTF)) * h_BTF
    return dense("proj", h_BTF)


def reference_logits(s, params, tokens_BT, pos_BT=None, softcap=True):
    """Float64 logits [B, T, vocab_size] of the model `s` (positions 0 … T-1 by default)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens_BT = np.asarray(tokens_BT)
    Tn = tokens_BT.shape[1]
    pos_BT = np.broadcast_to(np.arange(Tn) if pos_BT is None else np.asarray(pos_BT),
                             tokens_BT.shape).astype(np.float64)
    x_BTD = p["wte"]["embedding"][tokens_BT] * (math.sqrt(s["d_model"]) if s["scale_embeddings"]
                                                else 1.0)
    if s["positions"] == "learned":
        x_BTD = x_BTD + p["wpe"]["embedding"][pos_BT.astype(int)]
    elif s["positions"] == "sinusoidal":
        x_BTD = x_BTD + sinusoids(pos_BT, s["d_model"])
    for i in range(s["num_layers"]):
        h = p[f"h_{i}"]
        x_BTD = x_BTD + attention_reference(norm_reference(x_BTD, h["ln_1"], s), h["attn"], s,
                                            pos_BT)
        x_BTD = x_BTD + mlp_reference(norm_reference(x_BTD, h["ln_2"], s), h["mlp"], s)
    x_BTD = norm_reference(x_BTD, p["ln_f"], s)
    head_DV = p["wte"]["embedding"].T if s["tie_embeddings"] else p["lm_head"]["kernel"]
    logits_BTV = x_BTD @ head_DV
    c = s["logit_softcap"]
    if softcap and c > 0:
        logits_BTV = c * np.tanh(logits_BTV / c)
    return logits_BTV[..., : s["vocab_size"]]


# ---------------------------------------------------------------------------------------------
# Models (built once per row for the whole module: each compiles its forward pass once).


def perturbed(params, seed: int, scale: float = 0.2):
    """`params` + scale·normal noise on every leaf (zero biases and unit scales get checked too)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + scale * rng.normal(size=x.shape)).astype(np.float32),
                        params)


_BUILT: dict = {}


def built(tiny_gpt, name: str):
    """(spec, model, perturbed params, jitted forward(params, tokens, positions)) of row `name`."""
    if name not in _BUILT:
        _, model, params = tiny_gpt(vocab_size=V, seq_len=W, **ROWS[name])
        forward = jax.jit(lambda p, tokens_BT, pos_BT: model.apply(
            {"params": p}, tokens_BT, positions_BT=pos_BT))
        _BUILT[name] = (spec(ROWS[name]), model, perturbed(params, seed=list(ROWS).index(name)), forward)
    return _BUILT[name]


def tokens(seed: int = 0, shape=(B, T)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


DEFAULT_POS = np.arange(T, dtype=np.int32)[None]  # [1, T]


# ---------------------------------------------------------------------------------------------
# Parameter trees, reference numerics, causality.


@pytest.mark.parametrize("name", rows(ROWS))
def test_parameter_tree_matches_the_spec(tiny_gpt, name):
    s, _, params, _ = built(tiny_gpt, name)
    assert shapes_of(params) == expected_shapes(s)


@pytest.mark.parametrize(("fields", "F"), [
    ({"mlp": "gelu"}, 128), ({"mlp": "relu2"}, 128), ({"mlp": "swiglu"}, 256),
    ({"mlp": "swiglu", "mlp_multiple": 16}, 96), ({"mlp": "swiglu", "mlp_multiple": 64}, 128),
    ({"mlp": "swiglu", "mlp_dim": 40}, 40), ({"mlp": "gelu", "mlp_ratio": 2}, 64)])
def test_default_mlp_width(fields, F):
    """mlp_dim, else mlp_ratio·D, or for swiglu ⅔ of that rounded up to mlp_multiple."""
    from gpt_jax.models import registry

    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = 1, 4, 32
    c.data.seq_len = W
    c.model.update(fields)
    model = registry.build(registry.hyperparameters(c, V))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, W), jnp.int32))
    mlp = nn.meta.unbox(shapes["params"])["h_0"]["mlp"]
    assert mlp["fc"]["kernel"].shape == (32, F)
    assert mlp["proj"]["kernel"].shape == (F, 32)
    assert ("gate" in mlp) == (fields["mlp"] == "swiglu")
    assert mlp_width(spec(fields)) == F  # The reference's rule agrees with the figures above.


@pytest.mark.parametrize("name", rows(ROWS))
def test_logits_match_float64_reference(tiny_gpt, name):
    s, _, params, forward = built(tiny_gpt, name)
    tokens_BT = tokens(1)
    got = np.asarray(forward(params, tokens_BT, DEFAULT_POS))[..., :V]
    want = reference_logits(s, params, tokens_BT)
    assert np.abs(want).max() > 0.5  # Logits large enough for the tolerance to mean something.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    if s["logit_softcap"]:  # The cap changes these logits well beyond the tolerance.
        assert np.abs(reference_logits(s, params, tokens_BT, softcap=False) - want).max() > 1e-2
        assert np.abs(got).max() < s["logit_softcap"]


@pytest.mark.parametrize("name", rows(ROWS))
def test_changing_a_token_never_changes_earlier_logits(tiny_gpt, name):
    _, _, params, forward = built(tiny_gpt, name)
    base_BT = tokens(2)
    changed_at = [3, 7, 11, 14]  # Row b changes its token changed_at[b].
    changed_BT = base_BT.copy()
    for b, t in enumerate(changed_at):
        changed_BT[b, t] = (changed_BT[b, t] + 1) % V
    a = np.asarray(forward(params, base_BT, DEFAULT_POS))[..., :V]
    c = np.asarray(forward(params, changed_BT, DEFAULT_POS))[..., :V]
    for b, t in enumerate(changed_at):
        np.testing.assert_allclose(c[b, :t], a[b, :t], rtol=0, atol=1e-6, err_msg=f"row {b}, t {t}")
        assert np.abs(c[b, t:] - a[b, t:]).max(-1).min() > 1e-4  # Every later position changes.


# ---------------------------------------------------------------------------------------------
# Positions.


def test_alibi_slopes_follow_press_et_al():
    from gpt_jax.models import positions

    np.testing.assert_allclose(alibi_slopes_reference(8), [2.0 ** -k for k in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes_reference(6)[:4], [2.0 ** (-2 * k) for k in (1, 2, 3, 4)])
    np.testing.assert_allclose(alibi_slopes_reference(6)[4:], [2.0 ** -1, 2.0 ** -3])
    for n in (1, 2, 4, 6, 8, 12, 16):
        got = np.asarray(positions.alibi_slopes(n), np.float64)
        np.testing.assert_allclose(got, alibi_slopes_reference(n), rtol=1e-6, err_msg=f"n={n}")


def test_rope_scores_depend_only_on_relative_position():
    """positions.rope on queries and keys: the reference's rotation, and q·k unchanged when both
    positions move by the same offset (changed when only one does)."""
    from gpt_jax.models import positions

    rng = np.random.default_rng(9)
    q_BTNH, k_BTNH = (rng.normal(size=(1, T, 2, 8)).astype(np.float32) for _ in range(2))
    pos_1T = np.arange(T, dtype=np.int32)[None]
    np.testing.assert_allclose(np.asarray(positions.rope(q_BTNH, pos_1T, 100.0)),
                               rope_reference(q_BTNH.astype(np.float64), pos_1T, 100.0),
                               atol=1e-5)

    def scores(q_offset, k_offset):
        q = positions.rope(q_BTNH, pos_1T + q_offset, 10000.0)
        k = positions.rope(k_BTNH, pos_1T + k_offset, 10000.0)
        return np.asarray(jnp.einsum("btnh,bsnh->bnts", q, k))

    plain = scores(0, 0)
    for offset in (1, 7, 100):
        np.testing.assert_allclose(scores(offset, offset), plain, atol=1e-4, err_msg=f"{offset}")
    assert np.abs(scores(3, 0) - plain).max() > 0.1


@pytest.mark.parametrize("name", rows(["learned", "sinusoidal_rmsnorm", "rope", "alibi_swiglu",
                                       "nope_relu2_softcap", "llama"]))
def test_only_relative_positions_ignore_a_constant_offset(tiny_gpt, name):
    """Logits with positions_BT = (0 … T-1) + offset: the same for rope, alibi and none; other
    logits for learned and sinusoidal (on 8 tokens, so that the learned table holds the shifted
    positions: an out-of-table position is NaN, which reaches every position through 0 · NaN)."""
    s, _, params, forward = built(tiny_gpt, name)
    tokens_BT = tokens(3)
    if s["positions"] in ("learned", "sinusoidal"):
        tokens_BT, offsets = tokens_BT[:, : W // 2], (3, W // 2)
    Tn = tokens_BT.shape[1]
    pos_1T = np.arange(Tn, dtype=np.int32)[None]
    plain = np.asarray(forward(params, tokens_BT, pos_1T))[..., :V]
    for offset in (3, 40) if s["positions"] not in ("learned", "sinusoidal") else offsets:
        shifted = np.asarray(forward(params, tokens_BT, pos_1T + offset))[..., :V]
        if s["positions"] in ("learned", "sinusoidal"):
            assert np.abs(shifted - plain).max() > 1e-3, f"offset {offset}"
        else:
            np.testing.assert_allclose(shifted, plain, atol=1e-4, rtol=1e-4,
                                       err_msg=f"offset {offset}")
        # Shifted positions in the float64 reference too.
        np.testing.assert_allclose(shifted, reference_logits(s, params, tokens_BT, pos_1T + offset),
                                   atol=1e-4, rtol=1e-4, err_msg=f"offset {offset}")


# ---------------------------------------------------------------------------------------------
# Grouped-query attention.


def test_num_kv_heads_equal_to_num_heads_is_multi_head_attention(tiny_gpt):
    _, mha_model, mha = tiny_gpt(vocab_size=V, seq_len=W)
    _, gqa_model, gqa = tiny_gpt(vocab_size=V, seq_len=W, num_kv_heads=4)
    assert jax.tree.structure(gqa) == jax.tree.structure(mha)
    jax.tree.map(np.testing.assert_array_equal, gqa, mha)
    tokens_BT = tokens(4)
    a = np.asarray(jax.jit(mha_model.apply)({"params": mha}, tokens_BT))
    b = np.asarray(jax.jit(gqa_model.apply)({"params": gqa}, tokens_BT))
    np.testing.assert_array_equal(b, a)


def test_multi_query_attention_parameter_shapes(tiny_gpt):
    _, _, params = tiny_gpt(vocab_size=V, seq_len=W, num_kv_heads=1, qk_norm=True)
    for i in range(2):
        attn = params[f"h_{i}"]["attn"]
        assert set(attn) == {"q", "kv", "out", "q_norm", "k_norm"}
        assert attn["q"]["kernel"].shape == (32, 4, 8)
        assert attn["kv"]["kernel"].shape == (32, 2, 1, 8)
        assert attn["out"]["kernel"].shape == (4, 8, 32)
        assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (8,)


# ---------------------------------------------------------------------------------------------
# KV-cache decoding.

# Every position scheme (alibi: mqa; rope: llama, additive_gqa), GQA and MQA, qk_norm, additive.
DECODE_ROWS = ["learned", "sinusoidal_rmsnorm", "nope_relu2_softcap", "mqa", "llama", "additive_gqa"]


@functools.cache
def decoder_fns(model):
    """Jitted prefill (writes P tokens at slot 0) and step (one token at `slot`) of `model`."""
    def prefill(params, tokens_BP, first_B):
        x, mutated = model.apply({"params": params}, tokens_BP, method="hidden",
                                 decode=DecodeState(jnp.zeros((), jnp.int32), first_B),
                                 mutable=["cache"])
        return model.apply({"params": params}, x, method="head"), mutated["cache"]

    def step(params, cache, token_B1, slot, first_B):
        x, mutated = model.apply({"params": params, "cache": cache}, token_B1, method="hidden",
                                 decode=DecodeState(slot, first_B), mutable=["cache"])
        return model.apply({"params": params}, x, method="head")[:, 0], mutated["cache"]

    return jax.jit(prefill), jax.jit(step)


@pytest.mark.parametrize("name", rows(DECODE_ROWS))
def test_cached_decoding_logits_equal_the_full_forward_pass(tiny_gpt, name):
    """A prefill of P slots, then one token per step: every position's logits equal those of the
    plain forward pass over the row's real tokens (row 1 is left-padded by 3 slots, so its
    positions count from its first real token)."""
    _, model, params, forward = built(tiny_gpt, name)
    P, pad = 6, 3
    row0, row1 = tokens(5, (T,)), tokens(6, (T - pad,))
    buf_BT = np.stack([row0, np.concatenate([np.zeros(pad, np.int32), row1])])
    first_B = jnp.asarray([0, pad], jnp.int32)
    prefill, step = decoder_fns(model)
    logits, cache = prefill(params, buf_BT[:, :P], first_B)
    got = [np.asarray(logits)]
    for slot in range(P, T):
        logits_BV, cache = step(params, cache, buf_BT[:, slot:slot + 1], jnp.int32(slot), first_B)
        got.append(np.asarray(logits_BV)[:, None])
    got_BTV = np.concatenate(got, 1)[..., :V]
    # The forward pass on B rows (one compile): row 1's real tokens right-padded (causal).
    full_BT = np.zeros((B, T), np.int32)
    full_BT[0], full_BT[1, : T - pad] = row0, row1
    want = np.asarray(forward(params, full_BT, DEFAULT_POS))[..., :V]
    np.testing.assert_allclose(got_BTV[0], want[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_BTV[1, pad:], want[1, : T - pad], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # Cached decoding logits are checked by default above.
@pytest.mark.parametrize("name", ["mqa", "llama"])
def test_cached_greedy_generation_equals_recomputation(tiny_gpt, name):
    """generate's KV cache against its use_cache=False recomputation (nanoGPT's cropping) on
    ragged prompts, within the window (9 + 7 = W: past it the two keep different contexts)."""
    from gpt_jax.generate import SamplingParams, generate

    _, model, params, _ = built(tiny_gpt, name)
    prompts = [np.array([3, 1, 4, 1, 5]), np.array([7]), np.array([2, 7, 1, 8, 2, 8, 1, 8, 2])]
    greedy = SamplingParams(temperature=0.0)
    cached = generate(model, params, prompts, 7, jax.random.key(0), greedy)
    uncached = generate(model, params, prompts, 7, jax.random.key(0), greedy, use_cache=False)
    assert [c.tolist() for c in cached] == [u.tolist() for u in uncached]
    assert len({tuple(c[-7:]) for c in cached}) == 3  # Not one repeated token.


# ---------------------------------------------------------------------------------------------
# Beyond the training length.


@pytest.mark.parametrize("name", rows(["sinusoidal_rmsnorm", "rope", "alibi_swiglu",
                                       "nope_relu2_softcap", "mqa"]))
def test_positions_other_than_learned_run_past_max_seq_len(tiny_gpt, name):
    """A model built for 16 positions on 32 tokens: finite logits, the first 16 as on 16 tokens
    (causal), and all of them the reference's."""
    s, model, params, forward = built(tiny_gpt, name)
    long_BT = tokens(7, (2, 2 * W))
    logits = np.asarray(jax.jit(model.apply)({"params": params}, long_BT))[..., :V]
    assert logits.shape == (2, 2 * W, V) and np.all(np.isfinite(logits))
    short = np.asarray(forward(params, np.concatenate([long_BT[:, :W]] * 2), DEFAULT_POS))
    np.testing.assert_allclose(logits[:, :W], short[:2, :, :V], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits, reference_logits(s, params, long_BT), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# z-loss.


def z_loss_batch(seed: int = 8):
    from gpt_jax.data.batch import lm_batch

    windows = np.random.default_rng(seed).integers(0, V, (B, T + 1), dtype=np.int32)
    return lm_batch(windows)


# Updates params by −gradient, so a step's gradient can be read off (as tests/test_step.py does).
SGD = optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=100)


@functools.cache
def z_loss_model():
    """(model, params) for the z-loss tests: one layer, a padded vocabulary (50 → 64: the padded
    ids must not count in logsumexp), peaked logits (init_std 0.3: lse ≫ 0)."""
    from gpt_jax.models import registry

    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = 1, 4, 32
    c.model.vocab_multiple, c.model.init_std = 64, 0.3
    c.data.seq_len = T
    model = registry.build(registry.hyperparameters(c, V))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32)))
    return model, params["params"]


@functools.cache
def jitted_train_step(model, **kwargs):
    from gpt_jax.training import step

    return jax.jit(step.make_train_step(model, optax.constant_schedule(1.0), 1, False, **kwargs))


def sgd_state(model, params):
    from gpt_jax.training import step

    return step.new_train_state(model.apply, params, SGD, jax.random.key(0))


def sgd_step(model, params, batch, **kwargs):
    """(train/loss, gradient) of one train step, from an SGD(1) update."""
    new_state, metrics = jitted_train_step(model, **kwargs)(sgd_state(model, params), batch)
    grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                         params, new_state.params)
    return metrics["train/loss"], grads


@pytest.mark.slow  # Compiles two train steps.
def test_zero_z_loss_leaves_the_train_step_bitwise_unchanged():
    """z_loss=0 lowers to the very program of a step made without the argument (so its results
    are bitwise the same); if the programs differ, their results must still be."""
    model, params = z_loss_model()
    batch, state = z_loss_batch(), sgd_state(model, params)
    plain, zero = jitted_train_step(model), jitted_train_step(model, z_loss=0.0)
    if plain.lower(state, batch).as_text() == zero.lower(state, batch).as_text():
        return
    loss, grads = sgd_step(model, params, batch)
    loss0, grads0 = sgd_step(model, params, batch, z_loss=0.0)
    assert float(loss0) == float(loss)
    jax.tree.map(np.testing.assert_array_equal, grads0, grads)


@pytest.mark.slow  # Seconds of compiles; z-loss off (the default) is every other test.
@pytest.mark.parametrize("loss_chunk", [0, 8])
def test_z_loss_gradient_and_reported_loss(loss_chunk):
    """The step descends CE + z·mean(logsumexp²): its gradient is the model's vector-Jacobian
    product with the float64 NumPy gradient of that loss with respect to the logits,
    (softmax − onehot + 2z·lse·softmax) / (B·T). train/loss includes the z term, the eval loss
    does not."""
    z = 0.1
    model, params = z_loss_model()
    batch = z_loss_batch()
    forward = jax.jit(lambda p: model.apply({"params": p}, batch["inputs"]))
    vjp = jax.jit(lambda p, ct: jax.vjp(forward, p)[1](ct)[0])
    logits = np.asarray(forward(params), np.float64)
    top = logits.max(-1, keepdims=True)
    lse_BT = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    probs = np.exp(logits - lse_BT[..., None])
    targets_BT = np.asarray(batch["targets"])
    ce_BT = lse_BT - np.take_along_axis(logits, targets_BT[..., None], -1)[..., 0]
    onehot = np.eye(logits.shape[-1])[targets_BT]

    def gradient(dlogits):
        return jax.tree.leaves(jax.tree.map(lambda g: np.asarray(g, np.float64),
                                            vjp(params, jnp.asarray(dlogits, jnp.float32))))

    want = gradient((probs - onehot + 2 * z * lse_BT[..., None] * probs) / ce_BT.size)
    ce_only = gradient((probs - onehot) / ce_BT.size)
    scale = max(np.abs(w).max() for w in want)
    # The z term is a sizeable part of the gradient (the test tells z-loss from none).
    assert max(np.abs(a - b).max() for a, b in zip(want, ce_only, strict=True)) > 1e-2 * scale

    loss, grads = sgd_step(model, params, batch, z_loss=z, loss_chunk=loss_chunk)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, w in zip(jax.tree.leaves(grads), want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale)
    # What is logged (configs/base.py, train.z_loss): train/loss is what is optimised, CE plus
    # the z term; the eval step's loss (val/loss) is the plain cross-entropy.
    np.testing.assert_allclose(float(loss), ce_BT.mean() + z * (lse_BT**2).mean(), rtol=1e-5,
                               err_msg=f"the plain cross-entropy is {ce_BT.mean()}")
    from gpt_jax.training import step

    total, count = jax.jit(step.make_eval_step(model, loss_chunk))(params, batch)
    np.testing.assert_allclose(float(total) / float(count), ce_BT.mean(), rtol=1e-5)


def test_sinusoidal_matches_vaswani_et_al():
    """positions.sinusoidal against PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(…)."""
    from gpt_jax.models import positions

    D, pos_BT = 10, np.array([[0, 1, 5, 63]], np.int32)
    got_BTD = np.asarray(positions.sinusoidal(jnp.asarray(pos_BT), D), np.float64)
    i = np.arange(D // 2)
    angle = pos_BT[0, :, None].astype(np.float64) / 10000.0 ** (2 * i / D)
    want_TD = np.zeros((4, D))
    want_TD[:, 0::2], want_TD[:, 1::2] = np.sin(angle), np.cos(angle)
    np.testing.assert_allclose(got_BTD[0], want_TD, atol=1e-5)


@pytest.mark.slow  # Three short training runs.
@pytest.mark.parametrize("fields", [
    {"model.norm": "rmsnorm", "model.mlp": "swiglu", "model.positions": "rope",
     "model.num_kv_heads": 1, "model.qk_norm": True, "model.scan_layers": True},
    {"model.attention": "additive", "model.positions": "alibi", "model.remat": "full"},
])
def test_a_variant_resumed_equals_its_uninterrupted_run(tiny_config, tmp_path, metrics_rows,
                                                        fields):
    """Checkpoints and resume compose with the variants (and scan_layers / remat)."""
    from gpt_jax.training import loop

    def config(steps):
        return tiny_config(**{"train.num_steps": steps, "optim.decay_steps": 20, "train.eval_every": 10,
                              "train.final_eval": "batches", "checkpoint.every": 10,
                              "sample.num_samples": 0, **fields})

    loop.run(config(10), tmp_path / "split")
    loop.run(config(20), tmp_path / "split")
    loop.run(config(20), tmp_path / "whole")
    assert (metrics_rows(tmp_path / "split", timing=False)
            == metrics_rows(tmp_path / "whole", timing=False))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "additive_gqa", "mqa"])
def test_bfloat16_compute_stays_near_float32(tiny_gpt, name):
    """model.dtype=bfloat16 (parameters float32, compute bfloat16) gives finite logits within
    bfloat16's precision of the float32 model's, for the variants' own code paths."""
    _, model, params, _ = built(tiny_gpt, name)
    _, model16, _ = tiny_gpt(vocab_size=V, seq_len=W, **{**ROWS[name], "dtype": "bfloat16"})
    tokens_BT = tokens(3)
    want = np.asarray(model.apply({"params": params}, tokens_BT))[..., :V]
    got = np.asarray(model16.apply({"params": params}, tokens_BT))[..., :V]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=0.15, rtol=0)


def test_two_ways_of_writing_the_same_shapes_are_compatible():
    """Resume and init_from compare shapes, not spellings: num_kv_heads unset = num_heads, mlp_dim
    unset = the width it stands for; a real change of width is still refused."""
    from gpt_jax.models import gpt

    m = {**base.get_config().model.to_dict(), "vocab_size": V, "max_seq_len": W}
    assert gpt.ARCH.mismatch(m, {**m, "num_kv_heads": m["num_heads"],
                                 "mlp_dim": m["mlp_ratio"] * m["d_model"]}) is None
    swiglu = {**m, "mlp": "swiglu"}
    assert gpt.ARCH.mismatch(swiglu, {**swiglu, "mlp_dim": 512, "mlp_multiple": 64}) is None
    assert gpt.ARCH.mismatch(m, {**m, "mlp_ratio": 2}) == "mlp_dim"
    assert gpt.ARCH.mismatch(m, {**m, "num_kv_heads": 2}) == "num_kv_heads"


@pytest.mark.parametrize("name", rows(["llama", "additive_gqa", "mqa"]))
def test_packed_documents_do_not_see_each_other(tiny_gpt, name):
    """With segment ids (data.document_mask), the second document's logits do not depend on the
    first document's tokens, whatever the positions and attention (positions stay the row's)."""
    _, model, params, _ = built(tiny_gpt, name)
    segment_ids_BT = np.repeat(np.array([[0] * 7 + [1] * 9]), B, axis=0).astype(np.int32)
    a_BT = tokens(5)
    b_BT = a_BT.copy()
    b_BT[:, :7] = tokens(6)[:, :7]  # Another first document.
    apply = jax.jit(lambda t: model.apply({"params": params}, t, segment_ids_BT=segment_ids_BT))
    la, lb = np.asarray(apply(a_BT)), np.asarray(apply(b_BT))
    np.testing.assert_array_equal(la[:, 7:], lb[:, 7:])
    assert not np.allclose(la[:, :7], lb[:, :7])
