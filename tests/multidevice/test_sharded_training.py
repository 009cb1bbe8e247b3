"""On 8 simulated CPU devices (run by tests/test_parallel.py with XLA_FLAGS set): one training step
under DP, FSDP, TP, FSDP×TP and DP×FSDP×TP equals the 1-device step, for GPT-2, for the
architecture variants and for adapters (LoRA, a soft prompt); the shardings are the ones the
rules say; a run resumes on a different mesh."""


import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from gpt_jax.data.batch import lm_batch
from gpt_jax.parallel import sharding
from gpt_jax.training import build, loop

assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"

TEXT = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 11}\n\n" for i in range(400))
MESHES = {  # name: (data, fsdp, tensor)
    "dp": (8, 1, 1),
    "fsdp": (1, 8, 1),
    "tp": (1, 1, 8),
    "fsdp_tp": (1, 4, 2),
    "dp_fsdp_tp": (2, 2, 2),
}
VARIANTS = {  # name: model.* overrides (tests/test_variants.py checks their numerics).
    "gpt2": {},
    # 2 kv heads: under tp (8) they cannot split, and stay whole.
    "llama": {"model.norm": "rmsnorm", "model.mlp": "swiglu", "model.positions": "rope",
              "model.num_kv_heads": 2, "model.qk_norm": True, "model.bias": False},
    "additive": {"model.attention": "additive", "model.positions": "alibi",
                 "model.num_kv_heads": 4, "model.additive_chunk": 8},
    "lstm": {"model.arch": "lstm", "model.lstm_hidden": 32},  # Tied: a 32 → 64 projection.
    # Adapters on a (here random) base: only they train (gpt_jax/finetune/).
    "lora": {"finetune.lora_rank": 4, "finetune.base": "not read by one step"},
    "prompt": {"finetune.prompt_tokens": 4, "finetune.base": "not read by one step",
               "model.max_seq_len": 24},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


def make_config(corpus, mesh, **extra):
    c = base.get_config()
    c.data.path, c.data.cache_dir = str(corpus), str(corpus.parent / "cache")
    c.data.tokenizer, c.data.seq_len, c.data.sampling = "char", 16, "random"
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 8, 64
    c.model.vocab_multiple = 8  # Shards over tensor=8.
    c.model.bias = True
    c.train.batch_size, c.train.num_steps = 16, 4
    c.train.eval_every, c.train.eval_batches = 2, 1
    c.optim.warmup_steps, c.optim.lr = 1, 1e-2
    c.log.progress, c.log.tensorboard, c.log.every = "lines", False, 1
    c.checkpoint.every, c.sample.num_samples = 2, 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    for key, value in extra.items():
        group, field = key.split(".")
        c[group][field] = value
    return c


@pytest.fixture(scope="module")
def stepped(corpus, tmp_path_factory):
    """stepped(mesh_name, accum, scan, variant) → (state after one step, init params, loss,
    params), cached."""
    cache = {}

    def get(name, accum, scan=False, variant="gpt2"):
        key = (name, accum, scan, variant)
        if key not in cache:
            mesh, devices = ((1, 1, 1), jax.devices()[:1]) if name == "one" else (
                MESHES[name], jax.devices()[:8])
            workdir = tmp_path_factory.mktemp(f"{name}_{accum}_{scan}_{variant}")
            cache[key] = one_step(corpus, workdir, mesh, devices, accum, scan, VARIANTS[variant])
        return cache[key]

    return get


def one_step(corpus, workdir, mesh, devices, accum, scan, variant):
    config = make_config(corpus, mesh, **{"train.grad_accum_steps": accum,
                                          "model.scan_layers": scan, **variant})
    r = build.setup(config, workdir, devices=devices)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, r.hparams.vocab_size, (16, 17)).astype(np.int32)
    weights = rng.uniform(0.0, 1.0, (16, 16)).astype(np.float32)  # A mask-like weighting.
    weights[::3, :8] = 0.0
    with sharding.activation_context(r.mesh, r.rules):
        state = r.init_state()
        init_params = jax.tree.map(np.asarray, state.params)
        train_step, _ = build.compile_steps(r)
        batch = sharding.global_batch(lm_batch(windows, weights), build.batch_sharding(r), 16)
        state, metrics = train_step(state, batch)
    return state, init_params, float(metrics["train/loss"]), jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize(("name", "accum", "scan", "variant"),
                         [(n, 1, False, "gpt2") for n in MESHES]
                         + [("dp_fsdp_tp", 2, False, "gpt2"), ("fsdp_tp", 1, True, "gpt2"),
                            ("fsdp_tp", 1, False, "llama"), ("tp", 1, False, "llama"),
                            ("dp_fsdp_tp", 1, True, "additive"), ("dp", 1, False, "lstm"),
                            ("dp_fsdp_tp", 2, False, "lstm"), ("fsdp_tp", 1, False, "lora"),
                            ("dp_fsdp_tp", 2, True, "lora"), ("fsdp_tp", 1, False, "prompt")])
def test_sharded_step_equals_one_device(stepped, name, accum, scan, variant):
    _, init1, loss1, params1 = stepped("one", accum, scan, variant)
    _, init8, loss8, params8 = stepped(name, accum, scan, variant)
    jax.tree.map(np.testing.assert_array_equal, init8, init1)  # Same init whatever the mesh.
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params8, params1)


EXPECTED = {  # parameter path → spec, per mesh (axes of size 1 are left out of specs).
    "fsdp": {
        "wte/embedding": P(None, "fsdp"),
        "h_0/attn/qkv/kernel": P("fsdp", None, None, None),
        "h_0/attn/out/kernel": P(None, None, "fsdp"),
        "h_0/mlp/fc/kernel": P("fsdp", None),
        "h_0/mlp/proj/kernel": P(None, "fsdp"),
        "h_0/ln_1/scale": P(None),
    },
    "tp": {
        "wte/embedding": P("tensor", None),
        "h_0/attn/qkv/kernel": P(None, None, "tensor", None),
        "h_0/attn/qkv/bias": P(None, "tensor", None),
        "h_0/attn/out/kernel": P("tensor", None, None),
        "h_0/mlp/fc/kernel": P(None, "tensor"),
        "h_0/mlp/proj/kernel": P("tensor", None),
    },
    "fsdp_tp": {
        "wte/embedding": P("tensor", "fsdp"),
        "h_0/attn/qkv/kernel": P("fsdp", None, "tensor", None),
        "h_0/mlp/fc/kernel": P("fsdp", "tensor"),
        "h_0/mlp/proj/kernel": P("tensor", "fsdp"),
        "h_0/mlp/proj/bias": P("fsdp"),
    },
    "dp": {"wte/embedding": P(None, None), "h_0/attn/qkv/kernel": P(None, None, None, None)},
}


def by_path(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in flat}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_param_and_optimizer_shardings_follow_the_rules(stepped, name):
    state = stepped(name, 1)[0]
    params = by_path(state.params)
    mu = by_path(state.opt_state.inner_state[1][0].mu)  # apply_if_finite → chain → adamw's Adam.
    for path, spec in EXPECTED[name].items():
        assert params[path].sharding.spec == spec, path
        assert mu[path].sharding.spec == spec, f"Adam moment of {path}"
    assert state.step.sharding.is_fully_replicated
    if name == "fsdp_tp":  # Stacked layers: the leading `layers` axis stays whole.
        scanned = by_path(stepped(name, 1, True)[0].params)
        assert scanned["h/mlp/fc/kernel"].sharding.spec == P(None, "fsdp", "tensor")
    shard_bytes = params["h_0/mlp/fc/kernel"].addressable_shards[0].data.nbytes
    full_bytes = params["h_0/mlp/fc/kernel"].nbytes
    assert shard_bytes == full_bytes // (1 if name == "dp" else 8)


def test_resume_on_another_mesh_continues_the_run(corpus, tmp_path, metrics_rows):
    """Orbax reshards a checkpoint written under FSDP into a TP run; the result matches a run that
    stayed on one mesh (within float tolerance: reductions differ)."""
    def losses(workdir):
        return {r["step"]: r["train/loss"] for r in metrics_rows(workdir) if "train/loss" in r}

    split = tmp_path / "split"
    loop.run(make_config(corpus, MESHES["fsdp"], **{"train.num_steps": 4,
                                                      "optim.decay_steps": 8}), split)
    loop.run(make_config(corpus, MESHES["tp"], **{"train.num_steps": 8,
                                                    "optim.decay_steps": 8}), split)
    straight = tmp_path / "straight"
    loop.run(make_config(corpus, MESHES["dp"], **{"train.num_steps": 8,
                                                    "optim.decay_steps": 8}), straight)
    a, b = losses(split), losses(straight)
    assert sorted(a) == list(range(1, 9))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-4)


def test_kv_cache_decoding_with_params_sharded_on_the_training_mesh(stepped, corpus, tmp_path):
    """Greedy decoding from FSDP×TP-sharded params equals decoding from the same params on one
    device (ragged prompts, past the 16-token window)."""
    from gpt_jax.generate import SamplingParams, generate

    state = stepped("fsdp_tp", 1)[0]
    r = build.setup(make_config(corpus, MESHES["fsdp_tp"]), tmp_path, devices=jax.devices()[:8])
    prompts = [np.array([5, 3, 9]), np.array([7])]
    greedy = SamplingParams(temperature=0.0)
    with sharding.activation_context(r.mesh, r.rules):
        sharded = generate(r.model, state.params, prompts, 20, jax.random.key(0), greedy)
    local = jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]), state.params)
    single = generate(r.model, local, prompts, 20, jax.random.key(0), greedy)
    assert [a.tolist() for a in sharded] == [b.tolist() for b in single]
