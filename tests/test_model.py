"""Model: shapes, dtypes, causality, init statistics, reference numerics, parameter counts.
(The loss and the train step are in test_step.py, the optimizer in test_optim.py.)"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base, gpt2
from gpt_jax.models import gpt, registry
from gpt_jax.models.layers import MLP, CausalSelfAttention, Embed
from gpt_jax.training import step


def test_logits_shape_and_dtype(tiny_gpt):
    cfg, model, params = tiny_gpt(vocab_multiple=64)
    tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, cfg.vocab_size)
    logits = jax.jit(model.apply)({"params": params}, tokens)
    assert logits.shape == (3, 16, 64)  # 50 padded up to a multiple of 64.
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # Master params f32.
    assert np.all(np.asarray(logits[..., 50:]) < -1e30)  # Padded ids can never win.


def test_causality(tiny_gpt):
    """Changing tokens after position t leaves logits at positions ≤ t unchanged."""
    cfg, model, params = tiny_gpt()
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    t = 7
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1) % cfg.vocab_size)
    forward = jax.jit(model.apply)
    a = forward({"params": params}, tokens)
    b = forward({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(a[:, : t + 1]), np.asarray(b[:, : t + 1]))
    assert not np.allclose(np.asarray(a[:, t + 1 :]), np.asarray(b[:, t + 1 :]))


def test_loss_at_init_is_uniform(tiny_gpt):
    _, model, params = tiny_gpt(vocab_size=256)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
    logits = jax.jit(model.apply)({"params": params}, tokens[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    assert abs(float(loss) - math.log(256)) < 0.05


def test_gpt2_init_statistics(tiny_gpt):
    _, _, params = tiny_gpt(vocab_size=256)  # 2 layers, d 32: ≥ 2,048 draws per statistic.

    def std(*path):  # Over both layers.
        return np.std([functools.reduce(dict.get, path, params[f"h_{i}"]) for i in range(2)])

    assert np.std(params["wte"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    assert std("mlp", "fc", "kernel") == pytest.approx(0.02, rel=0.05)
    assert std("attn", "qkv", "kernel") == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 2)  # Residual projections: GPT-2's 1/sqrt(2·layers).
    assert std("mlp", "proj", "kernel") == pytest.approx(residual_std, rel=0.05)
    assert std("attn", "out", "kernel") == pytest.approx(residual_std, rel=0.05)


def perturbed(params, seed: int, scale: float = 0.1):
    """`params` + scale·normal noise on every leaf (so zero biases and unit scales are checked),
    as float32 NumPy arrays."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + scale * rng.normal(size=x.shape)).astype(np.float32),
                        params)


def to64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def layer_norm_reference(x, p, eps):
    """Float64 LayerNorm (biased variance, like torch and Flax)."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p.get("bias", 0.0)


def attention_reference(x, p):
    """Float64 NumPy causal multi-head attention with the module's parameter layout."""
    qkv = np.einsum("btd,dknh->btknh", x, p["qkv"]["kernel"]) + p["qkv"].get("bias", 0.0)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    H = q.shape[-1]
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    T = x.shape[1]
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", w, v)
    return np.einsum("btnh,nhd->btd", out, p["out"]["kernel"]) + p["out"].get("bias", 0.0)


GELU_REFERENCE = {
    "gelu": np.vectorize(lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: np.maximum(x, 0.0),
}


def mlp_reference(x, p, activation):
    h = x @ p["fc"]["kernel"] + p["fc"].get("bias", 0.0)
    return GELU_REFERENCE[activation](h) @ p["proj"]["kernel"] + p["proj"].get("bias", 0.0)


def test_attention_matches_float64_reference(tiny_gpt):
    cfg, _, _ = tiny_gpt(bias=True)
    attn = CausalSelfAttention(cfg)
    x = jax.random.normal(jax.random.key(2), (2, 16, cfg.d_model))
    params = perturbed(nn.meta.unbox(attn.init(jax.random.key(3), x)["params"]), 4)
    got = attn.apply({"params": params}, x)
    want = attention_reference(np.asarray(x, np.float64), to64(params))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("activation", "bias"), [("gelu", False), ("gelu_tanh", True),
                                                  ("relu", True)])
def test_mlp_matches_float64_reference(tiny_gpt, activation, bias):
    cfg, _, _ = tiny_gpt(activation=activation, bias=bias)
    mlp = MLP(cfg)
    x = jax.random.normal(jax.random.key(2), (2, 5, cfg.d_model))
    params = perturbed(nn.meta.unbox(mlp.init(jax.random.key(0), x)["params"]), 5, scale=0.3)
    assert params["fc"]["kernel"].shape == (cfg.d_model, 4 * cfg.d_model)
    assert ("bias" in params["fc"]) == bias
    got = mlp.apply({"params": params}, x)
    want = mlp_reference(np.asarray(x, np.float64), to64(params), activation)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_block_matches_float64_reference(tiny_gpt):
    """A pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(·)); LayerNorm with norm_eps."""
    from gpt_jax.models.layers import Block

    cfg, _, _ = tiny_gpt(bias=True, activation="gelu_tanh", norm_eps=1e-3)
    block = Block(cfg)
    x = 3.0 * jax.random.normal(jax.random.key(2), (2, 16, cfg.d_model)) + 1.0
    params = perturbed(nn.meta.unbox(block.init(jax.random.key(0), x)["params"]), 6)
    got = block.apply({"params": params}, x)
    p, x64 = to64(params), np.asarray(x, np.float64)
    h = x64 + attention_reference(layer_norm_reference(x64, p["ln_1"], 1e-3), p["attn"])
    want = h + mlp_reference(layer_norm_reference(h, p["ln_2"], 1e-3), p["mlp"], "gelu_tanh")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=2e-5)


def test_attention_dropout_path_equals_fused_path_when_rate_is_zero_at_eval(tiny_gpt):
    """The explicit-weights path (used for attention dropout) computes the same attention."""
    cfg, _, _ = tiny_gpt(attention_dropout=0.5)
    attn = CausalSelfAttention(cfg)
    x = jax.random.normal(jax.random.key(2), (2, 16, cfg.d_model))
    params = attn.init(jax.random.key(3), x)["params"]
    fused = attn.apply({"params": params}, x, deterministic=True)
    dropped = attn.apply({"params": params}, x, deterministic=False,
                         rngs={"dropout": jax.random.key(5)})
    assert fused.shape == dropped.shape
    assert not np.allclose(np.asarray(fused), np.asarray(dropped))
    no_drop = CausalSelfAttention(tiny_gpt(attention_dropout=1e-9)[0])
    near = no_drop.apply({"params": params}, x, deterministic=False,
                         rngs={"dropout": jax.random.key(5)})
    np.testing.assert_allclose(np.asarray(fused), np.asarray(near), atol=1e-5)


def test_logical_axis_names_on_every_parameter(tiny_gpt):
    _, model, _ = tiny_gpt(bias=True, tie_embeddings=False)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["h_0"]["attn"]["qkv"]["kernel"]) == ("embed", None, "heads", "kv")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    names = {n for x in boxed for n in x.names if n is not None}
    assert names <= set(registry.get("gpt").logical_axes)  # Every name has a mesh rule.


def test_gpt2_small_has_124m_parameters():
    c = gpt2.get_config("small")
    c.model.vocab_multiple = 1  # The published count is for the unpadded 50257 vocab.
    model = registry.build(registry.hyperparameters(c, vocab_size=256))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    assert registry.count_params(shapes["params"]) == 124_439_808


def test_untied_head_adds_a_matrix(tiny_gpt):
    tied, untied = tiny_gpt()[2], tiny_gpt(tie_embeddings=False)[2]
    assert registry.count_params(untied) - registry.count_params(tied) == 50 * 32


def stacked(params):
    """Unrolled parameters (h_0 … h_{L-1}) in the scan_layers layout (h, stacked on axis 0)."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    layers = sorted((k for k in params if k.startswith("h_")), key=lambda k: int(k[2:]))
    out["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in layers])
    return out


@functools.cache
def loss_and_grads(cfg):
    """(jaxpr text, params, loss, gradients) of the mean next-token loss of the model `cfg` on
    fixed tokens, with tiny_gpt's weights (seed 0; for scan_layers, the unrolled model's stacked
    on a `layers` axis). Cached: remat and scan tests compare with the plain model's figures."""
    model = registry.build(cfg)
    if cfg.scan_layers:
        params = stacked(loss_and_grads(dataclasses.replace(cfg, scan_layers=False))[1])
    else:
        params = nn.meta.unbox(model.init(jax.random.key(0), TOKENS[:, :-1])["params"])

    def loss(p):
        logits = model.apply({"params": p}, TOKENS[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()

    grad_fn = jax.value_and_grad(loss)
    return str(jax.make_jaxpr(grad_fn)(params)), params, *jax.jit(grad_fn)(params)


TOKENS = jax.random.randint(jax.random.key(3), (2, 17), 0, 50)


@pytest.mark.slow  # Two compiles each; test_every_remat_policy_checkpoints_each_block traces them.
@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_give_the_same_loss_and_gradients(tiny_gpt, policy):
    plain, _, want_loss, want_grads = loss_and_grads(tiny_gpt()[0])
    remat, _, got_loss, got_grads = loss_and_grads(tiny_gpt(remat=policy)[0])
    assert "remat" not in plain and remat.count("remat") >= 2  # One per block.
    assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)  # Same checkpoints.
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads,
                 want_grads)


def test_every_remat_policy_checkpoints_each_block(tiny_gpt):
    """Traced only (each policy's loss and gradients are compared above, with --runslow): every
    policy the config accepts is one jax knows, applied once per block."""
    cfg, _, params = tiny_gpt()

    def jaxpr(c):
        m = registry.build(c)
        return str(jax.make_jaxpr(jax.grad(lambda p: m.apply({"params": p}, TOKENS[:, :-1]).sum()))(
            params))

    assert "remat" not in jaxpr(cfg)
    for policy in gpt.REMAT_POLICIES:
        if policy != "none":
            assert jaxpr(dataclasses.replace(cfg, remat=policy)).count("remat") >= 2, policy


def test_scanned_layers_equal_unrolled_outputs(tiny_gpt):
    """scan_layers stacks h_0 … h_{L-1} on a leading `layers` axis: the same function of the same
    weights (gradients: the next test, with --runslow)."""
    cfg, unrolled, params = tiny_gpt()
    scanned = registry.build(dataclasses.replace(cfg, scan_layers=True))
    boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), TOKENS[:, :-1]))["params"]
    assert boxed["h"]["attn"]["qkv"]["kernel"].names == ("layers", "embed", None, "heads", "kv")
    assert boxed["h"]["mlp"]["fc"]["kernel"].value.shape == (2, 32, 128)
    assert jax.tree.structure(nn.meta.unbox(boxed)) == jax.tree.structure(stacked(params))
    want, got = jax.jit(lambda p, q: (unrolled.apply({"params": p}, TOKENS[:, :-1]),
                                      scanned.apply({"params": q}, TOKENS[:, :-1])))(
        params, stacked(params))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # Two more gradient compiles; the function itself is compared above.
def test_scanned_layers_equal_unrolled_gradients(tiny_gpt):
    cfg = tiny_gpt()[0]
    _, _, want, want_g = loss_and_grads(cfg)
    _, _, got, got_g = loss_and_grads(dataclasses.replace(cfg, scan_layers=True))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for i in range(2):
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7),
                     got_g["h"], want_g[f"h_{i}"])
    np.testing.assert_allclose(got_g["wte"]["embedding"], want_g["wte"]["embedding"], rtol=1e-5,
                               atol=1e-7)


def test_bfloat16_compute_stays_within_bfloat16_tolerance_of_float32(tiny_gpt):
    tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, 50)
    cfg, f32_model, params = tiny_gpt()
    bf16_model = registry.build(dataclasses.replace(cfg, dtype="bfloat16"))
    shapes = jax.eval_shape(bf16_model.init, jax.random.key(0), tokens)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))  # Master params f32.
    f32 = f32_model.apply({"params": params}, tokens)
    bf16 = jax.jit(bf16_model.apply)({"params": params}, tokens)
    assert bf16.dtype == jnp.float32  # Logits leave the model in float32 for the loss.
    np.testing.assert_allclose(bf16, f32, atol=5e-2)
    assert not np.array_equal(bf16, f32)  # The bf16 path really computed in bf16.


def test_bfloat16_embedding_gradient_sums_repeated_ids_in_float32():
    """Embed's values are nn.Embed's bitwise; its table gradient is the float32 sum of the rows'
    cotangents (nn.Embed's bfloat16 scatter-add rounds after every add, and is slow on GPUs)."""
    ids = jnp.array([[0, 0, 0, 1, 0, 2, 0, 0]] * 4, jnp.int32)  # Skewed, as real text's ids are.
    table = jax.random.normal(jax.random.key(0), (3, 8), jnp.float32)
    cot = jax.random.normal(jax.random.key(1), (4, 8, 8), jnp.float32).astype(jnp.bfloat16)
    ours, ref = Embed(3, 8, dtype=jnp.bfloat16), nn.Embed(3, 8, dtype=jnp.bfloat16)
    params = {"params": {"embedding": table}}
    assert jnp.array_equal(ours.apply(params, ids), ref.apply(params, ids))
    grad = jax.grad(lambda t: jnp.vdot(ours.apply({"params": {"embedding": t}}, ids)
                                       .astype(jnp.float32), cot.astype(jnp.float32)))(table)
    want = np.zeros((3, 8))
    np.add.at(want, np.asarray(ids).ravel(), np.asarray(cot, np.float64).reshape(-1, 8))
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must be integers"):
        ours.apply(params, ids.astype(jnp.float32))


def test_auto_attention_is_xla_off_cuda_and_cudnn_is_checked_before_compiling(tiny_gpt):
    from gpt_jax import config as config_lib
    from gpt_jax.models.layers import attention_implementation

    cfg = tiny_gpt()[0]
    assert attention_implementation(dataclasses.replace(cfg, dtype="bfloat16")) == "xla"  # No GPU.
    assert attention_implementation(dataclasses.replace(cfg, attention_impl="xla")) == "xla"
    c = base.get_config()
    c.model.attention_impl = "cudnn"  # float32: cuDNN's flash attention needs bf16/fp16.
    with pytest.raises(config_lib.ConfigError, match="attention_impl=cudnn needs"):
        config_lib.validate(c)


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True}, {"attention_dropout": 0.3}])
def test_document_mask_blocks_cross_document_attention(tiny_gpt, overrides):
    """With segment ids, a later document's logits do not depend on an earlier document's tokens
    (in each row, whatever the attention path); without them, they do."""
    overrides = dict(overrides)
    scan = overrides.pop("scan_layers", False)
    cfg, model, params = tiny_gpt(**overrides)
    if scan:  # The same weights, stacked (no second, scanned init).
        model, params = registry.build(dataclasses.replace(cfg, scan_layers=True)), stacked(params)
    eot = 0
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 1, cfg.vocab_size)
    ends = [5, 9]  # Row b's first document ends at ends[b].
    tokens = tokens.at[0, ends[0]].set(eot).at[1, ends[1]].set(eot)
    changed = tokens.at[0, :ends[0]].add(1).at[1, :ends[1]].add(1)  # Earlier documents only.
    dropout = "attention_dropout" in overrides  # The explicit-weights path, same masks twice.
    rngs = {"dropout": jax.random.key(2)} if dropout else None

    @jax.jit
    def logits(t, u):  # Masked and unmasked logits of both token arrays: one compile.
        def apply(x, segments):
            return model.apply({"params": params}, x, deterministic=not dropout, rngs=rngs,
                               segment_ids_BT=segments)
        return [(apply(x, step.document_segment_ids(x, eot)), apply(x, None)) for x in (t, u)]

    (masked_a, plain_a), (masked_b, plain_b) = logits(tokens, changed)
    for masked, a, b in ((True, masked_a, masked_b), (False, plain_a, plain_b)):
        a, b = np.asarray(a), np.asarray(b)
        for row, end in enumerate(ends):
            later_a, later_b = a[row, end + 1:], b[row, end + 1:]
            if masked:
                np.testing.assert_allclose(later_a, later_b, atol=1e-6)
            else:
                assert not np.allclose(later_a, later_b, atol=1e-4)
            assert not np.allclose(a[row, :end], b[row, :end], atol=1e-4)
