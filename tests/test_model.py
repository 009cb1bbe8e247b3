"""Model: shapes, dtypes, causality, init statistics, reference numerics, parameter counts."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base, gpt2
from gpt_jax.config import ModelConfig
from gpt_jax.models.gpt import GPT, count_params
from gpt_jax.models.layers import MLP, CausalSelfAttention
from gpt_jax.training import optim, step


def tiny_cfg(**overrides) -> ModelConfig:
    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 4, 32
    c.data.seq_len = 16
    for k, v in overrides.items():
        c.model[k] = v
    return ModelConfig.from_config(c, vocab_size=overrides.get("vocab_size", 50))


def init(cfg: ModelConfig, T: int = 16):
    variables = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
    return nn.meta.unbox(variables["params"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_shape_and_dtype(dtype):
    cfg = tiny_cfg(dtype=dtype, vocab_multiple=64)
    params = init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, cfg.vocab_size)
    logits = GPT(cfg).apply({"params": params}, tokens)
    assert logits.shape == (3, 16, 64)  # 50 padded up to a multiple of 64.
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # Master params f32.
    assert np.all(np.asarray(logits[..., 50:]) < -1e30)  # Padded ids can never win.


def test_causality():
    """Changing tokens after position t leaves logits at positions ≤ t unchanged."""
    cfg = tiny_cfg()
    params = init(cfg)
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    t = 7
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1) % cfg.vocab_size)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(a[:, : t + 1]), np.asarray(b[:, : t + 1]))
    assert not np.allclose(np.asarray(a[:, t + 1 :]), np.asarray(b[:, t + 1 :]))


def test_loss_at_init_is_uniform():
    cfg = tiny_cfg(vocab_size=256, num_layers=4)
    params = init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
    logits = GPT(cfg).apply({"params": params}, tokens[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    assert abs(float(loss) - math.log(256)) < 0.05


def test_gpt2_init_statistics():
    cfg = tiny_cfg(num_layers=8, d_model=256, num_heads=4)
    params = init(cfg)
    assert np.std(params["wte"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(params["h_0"]["mlp"]["fc"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert np.std(params["h_0"]["mlp"]["proj"]["kernel"]) == pytest.approx(residual_std, rel=0.05)
    assert np.std(params["h_3"]["attn"]["out"]["kernel"]) == pytest.approx(residual_std, rel=0.05)


def _attention_reference(x, qkv_w, qkv_b, out_w, out_b):
    """Float64 NumPy causal multi-head attention with the module's parameter layout."""
    x = x.astype(np.float64)
    qkv = np.einsum("btd,dknh->btknh", x, qkv_w) + qkv_b
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    H = q.shape[-1]
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    T = x.shape[1]
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", w, v)
    return np.einsum("btnh,nhd->btd", out, out_w) + out_b


def test_attention_matches_float64_reference():
    cfg = tiny_cfg(bias=True)
    attn = CausalSelfAttention(cfg)
    x = jax.random.normal(jax.random.key(2), (2, 16, cfg.d_model))
    params = nn.meta.unbox(attn.init(jax.random.key(3), x)["params"])
    # Non-zero biases so they are checked too.
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(4), p.shape), params)
    got = attn.apply({"params": params}, x)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    want = _attention_reference(
        np.asarray(x), p64["qkv"]["kernel"], p64["qkv"]["bias"], p64["out"]["kernel"],
        p64["out"]["bias"],
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_attention_dropout_path_equals_fused_path_when_rate_is_zero_at_eval():
    """The explicit-weights path (used for attention dropout) computes the same attention."""
    cfg = tiny_cfg(attention_dropout=0.5)
    attn = CausalSelfAttention(cfg)
    x = jax.random.normal(jax.random.key(2), (2, 16, cfg.d_model))
    params = attn.init(jax.random.key(3), x)["params"]
    fused = attn.apply({"params": params}, x, deterministic=True)
    dropped = attn.apply({"params": params}, x, deterministic=False,
                         rngs={"dropout": jax.random.key(5)})
    assert fused.shape == dropped.shape
    assert not np.allclose(np.asarray(fused), np.asarray(dropped))
    no_drop = CausalSelfAttention(tiny_cfg(attention_dropout=1e-9))
    near = no_drop.apply({"params": params}, x, deterministic=False,
                         rngs={"dropout": jax.random.key(5)})
    np.testing.assert_allclose(np.asarray(fused), np.asarray(near), atol=1e-5)


def test_mlp_standalone():
    cfg = tiny_cfg()
    x = jnp.ones((2, 5, cfg.d_model))
    variables = MLP(cfg).init(jax.random.key(0), x)
    assert MLP(cfg).apply(variables, x).shape == (2, 5, cfg.d_model)
    kernels = nn.meta.unbox(variables["params"])
    assert kernels["fc"]["kernel"].shape == (cfg.d_model, 4 * cfg.d_model)


def test_logical_axis_names_on_every_parameter():
    cfg = tiny_cfg(bias=True, tie_embeddings=False)
    variables = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in boxed)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["h_0"]["attn"]["qkv"]["kernel"]) == ("embed", None, "heads", "kv")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")


def test_gpt2_small_has_124m_parameters():
    c = gpt2.get_config("small")
    c.model.vocab_multiple = 1  # The published count is for the unpadded 50257 vocab.
    cfg = ModelConfig.from_config(c, vocab_size=256)
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    assert count_params(shapes["params"]) == 124_439_808


def test_untied_head_adds_a_matrix():
    tied, untied = tiny_cfg(), tiny_cfg(tie_embeddings=False)
    assert count_params(init(untied)) - count_params(init(tied)) == 50 * 32


def test_tiny_model_overfits_one_batch():
    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 64
    c.data.seq_len = 32
    c.optim.lr, c.optim.warmup_steps, c.optim.min_lr = 3e-3, 10, 3e-3
    c.optim.weight_decay = 0.0
    c.train.num_steps = 150
    cfg = ModelConfig.from_config(c, vocab_size=64)
    model = GPT(cfg)
    params = init(cfg, 32)
    state = step.new_train_state(model.apply, params, optim.make_optimizer(c), jax.random.key(0))
    train_step = jax.jit(step.make_train_step(model, optim.make_schedule(c), 1, False))
    batch = jax.random.randint(jax.random.key(7), (4, 33), 0, 64)
    state, first = train_step(state, batch)
    for _ in range(149):
        state, last = train_step(state, batch)
    assert float(last["train/loss"]) < 0.1 * float(first["train/loss"])


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_give_the_same_loss_and_gradients(policy):
    tokens = jax.random.randint(jax.random.key(3), (2, 17), 0, 50)

    def loss_and_grads(cfg):
        model = GPT(cfg)
        params = nn.meta.unbox(model.init(jax.random.key(0), tokens[:, :-1])["params"])

        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        grad_fn = jax.value_and_grad(loss)
        return str(jax.make_jaxpr(grad_fn)(params)), jax.jit(grad_fn)(params)

    plain, (want_loss, want_grads) = loss_and_grads(tiny_cfg())
    remat, (got_loss, got_grads) = loss_and_grads(tiny_cfg(remat=policy))
    assert "remat" not in plain and remat.count("remat") >= 2  # One per block.
    assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)  # Same checkpoints.
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads,
                 want_grads)


def test_scanned_layers_equal_unrolled_outputs_and_gradients():
    """scan_layers stacks h_0 … h_{L-1} on a leading `layers` axis; same function, same gradients."""
    tokens = jax.random.randint(jax.random.key(4), (2, 17), 0, 50)
    unrolled, scanned = GPT(tiny_cfg(bias=True)), GPT(tiny_cfg(bias=True, scan_layers=True))
    params = nn.meta.unbox(unrolled.init(jax.random.key(0), tokens[:, :-1])["params"])
    boxed = scanned.init(jax.random.key(0), tokens[:, :-1])["params"]
    assert boxed["h"]["attn"]["qkv"]["kernel"].names == ("layers", "embed", None, "heads", "kv")
    layers = [params[f"h_{i}"] for i in range(2)]
    stacked = {k: v for k, v in params.items() if not k.startswith("h_")}
    stacked["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)

    def loss(model, p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    want, want_g = jax.value_and_grad(lambda p: loss(unrolled, p))(params)
    got, got_g = jax.value_and_grad(lambda p: loss(scanned, p))(stacked)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for i in range(2):
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7),
                     got_g["h"], want_g[f"h_{i}"])
    np.testing.assert_allclose(got_g["wte"]["embedding"], want_g["wte"]["embedding"], rtol=1e-5,
                               atol=1e-7)


def test_weight_decay_on_matrices_only_whatever_their_rank():
    params = nn.meta.unbox(GPT(tiny_cfg(bias=True, scan_layers=True)).init(
        jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
    mask = optim.decay_mask(params)
    assert mask["h"]["attn"]["qkv"]["kernel"] and mask["wte"]["embedding"]
    assert not mask["h"]["attn"]["qkv"]["bias"]  # 3-D per layer, 4-D stacked: still a bias.
    assert not mask["h"]["ln_1"]["scale"] and not mask["ln_f"]["scale"]


def test_chunked_cross_entropy_equals_the_plain_one():
    chunk = 4
    cfg = tiny_cfg(vocab_multiple=64)  # Padded ids must stay masked chunk by chunk.
    model, params = GPT(cfg), init(cfg)
    batch_BT1 = jax.random.randint(jax.random.key(5), (3, 17), 0, cfg.vocab_size)
    weights_BT = jax.random.uniform(jax.random.key(6), (3, 16))

    def loss(p, loss_chunk):
        total, count = step.model_loss(p, model, batch_BT1, weights_BT, None, loss_chunk)
        return total / count

    want, want_grads = jax.value_and_grad(loss)(params, 0)
    got, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads,
                 want_grads)
    # The logits of one chunk at a time: no [B, T, V] array anywhere in the compiled step.
    hlo = jax.jit(jax.grad(loss), static_argnums=1).lower(params, chunk).as_text()
    assert f"3x{chunk}x64" in hlo and "3x16x64" not in hlo


def test_bfloat16_compute_stays_within_bfloat16_tolerance_of_float32():
    tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, 50)
    params = init(tiny_cfg())  # float32 master params, shared by both.
    f32 = GPT(tiny_cfg()).apply({"params": params}, tokens)
    bf16 = GPT(tiny_cfg(dtype="bfloat16")).apply({"params": params}, tokens)
    assert bf16.dtype == jnp.float32  # Logits leave the model in float32 for the loss.
    np.testing.assert_allclose(bf16, f32, atol=5e-2)
    assert not np.array_equal(bf16, f32)  # The bf16 path really computed in bf16.


def test_auto_attention_is_xla_off_cuda_and_cudnn_is_checked_before_compiling():
    from gpt_jax import config as config_lib
    from gpt_jax.models.layers import attention_implementation

    assert attention_implementation(tiny_cfg(dtype="bfloat16")) == "xla"  # No CUDA GPU here.
    assert attention_implementation(tiny_cfg(attention_impl="xla")) == "xla"
    c = base.get_config()
    c.model.attention_impl = "cudnn"  # float32: cuDNN's flash attention needs bf16/fp16.
    with pytest.raises(config_lib.ConfigError, match="attention_impl=cudnn needs"):
        config_lib.validate(c)


def test_document_segment_ids_start_after_each_end_of_text():
    tokens = jnp.array([[5, 0, 7, 8, 0, 0, 3], [0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(step.document_segment_ids(tokens, eot_id=0),
                                  [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True}, {"attention_dropout": 0.3}])
def test_document_mask_blocks_cross_document_attention(overrides):
    """With segment ids, a later document's logits do not depend on an earlier document's tokens
    (in each row, whatever the attention path); without them, they do."""
    cfg = tiny_cfg(**overrides)
    model, params = GPT(cfg), init(cfg)
    eot = 0
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 1, cfg.vocab_size)
    ends = [5, 9]  # Row b's first document ends at ends[b].
    tokens = tokens.at[0, ends[0]].set(eot).at[1, ends[1]].set(eot)
    changed = tokens.at[0, :ends[0]].add(1).at[1, :ends[1]].add(1)  # Earlier documents only.
    dropout = "attention_dropout" in overrides  # The explicit-weights path, same masks twice.
    rngs = {"dropout": jax.random.key(2)} if dropout else None

    @functools.partial(jax.jit, static_argnums=1)
    def apply(t, masked):
        segments = step.document_segment_ids(t, eot) if masked else None
        return model.apply({"params": params}, t, deterministic=not dropout, rngs=rngs,
                           segment_ids_BT=segments)

    def logits(t, masked):
        return np.asarray(apply(t, masked))

    for masked in (True, False):
        a, b = logits(tokens, masked), logits(changed, masked)
        for row, end in enumerate(ends):
            later_a, later_b = a[row, end + 1:], b[row, end + 1:]
            if masked:
                np.testing.assert_allclose(later_a, later_b, atol=1e-6)
            else:
                assert not np.allclose(later_a, later_b, atol=1e-4)
            assert not np.allclose(a[row, :end], b[row, :end], atol=1e-4)
