"""Hugging Face GPT-2 ⇄ gpt_jax: equal logits both ways, equal greedy generations, the CLI round
trip, checkpoint.init_from=hf:DIR, and one-line refusals."""

import dataclasses
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from configs import base
from gpt_jax.config import ModelConfig
from gpt_jax.interop import hf_gpt2
from gpt_jax.models.gpt import GPT
from gpt_jax.parallel import sharding
from gpt_jax.training import checkpoint, trainer


def load_tool():
    path = pathlib.Path(__file__).resolve().parent.parent / "tools" / "convert_hf.py"
    spec = importlib.util.spec_from_file_location("convert_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_hf = load_tool()

V = 100  # The tiny HF model's vocabulary (bos/eos ids inside it).
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))


def hf_model(seed: int = 0, **overrides) -> transformers.GPT2LMHeadModel:
    """A tiny random GPT2LMHeadModel (offline), every weight perturbed so that biases and
    LayerNorm parameters are not their zero/one init and a mapping mistake shows."""
    torch.manual_seed(seed)
    kwargs = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=32, bos_token_id=0,
                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**kwargs, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()  # No dropout.


def state_dict(model: transformers.GPT2LMHeadModel) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def model_config(**fields) -> ModelConfig:
    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 32
    c.model.max_seq_len = 32
    for k, v in fields.items():
        c.model[k] = v
    return ModelConfig.from_config(c, c.model.vocab_size or V)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Our model's init with every leaf perturbed (biases and norms included)."""
    params = nn.meta.unbox(GPT(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def our_logits(cfg: ModelConfig, params, tokens_BT: np.ndarray) -> np.ndarray:
    logits_BTV = GPT(cfg).apply({"params": params}, jnp.asarray(tokens_BT))
    return np.asarray(logits_BTV)[..., : cfg.vocab_size]  # Padded ids are masked anyway.


def hf_logits(model: transformers.GPT2LMHeadModel, tokens_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BT)).logits.numpy()


def tokens(vocab: int, shape=(2, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_hf_model_imports_with_equal_logits(scan_layers):
    hf = hf_model()
    fields = hf_gpt2.model_fields_from_hf(hf.config)
    assert fields["activation"] == "gelu_tanh" and fields["bias"] and fields["tie_embeddings"]
    cfg = model_config(**fields, vocab_multiple=64, scan_layers=scan_layers)  # V 100 → 128.
    params = hf_gpt2.params_from_hf(state_dict(hf), cfg)
    assert ("h" in params) == scan_layers
    np.testing.assert_allclose(our_logits(cfg, params, tokens(V)), hf_logits(hf, tokens(V)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("bias,activation,scan_layers,tie", [
    (False, "gelu", False, True),  # nanoGPT's recipe: no biases, exact GELU.
    (True, "gelu_tanh", False, True),  # GPT-2's.
    (False, "gelu_tanh", True, True),
    (True, "gelu", True, False),  # Untied LM head.
])
def test_gpt_jax_model_exports_with_equal_logits(tmp_path, bias, activation, scan_layers, tie):
    cfg = model_config(bias=bias, activation=activation, scan_layers=scan_layers,
                       tie_embeddings=tie, vocab_size=70, vocab_multiple=16)  # Padded to 80.
    params = random_params(cfg)
    hf_gpt2.save_hf(params, cfg, tmp_path)
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # No missing, unexpected or mismatched weights.
    hf.eval()
    assert hf.config.n_layer == 2 and hf.config.vocab_size == 70
    np.testing.assert_allclose(our_logits(cfg, params, tokens(70)), hf_logits(hf, tokens(70)),
                               atol=1e-4, rtol=0)
    back = hf_gpt2.params_from_hf(state_dict(hf), cfg)  # Zero biases go back into bias=False.
    expect = jax.tree.map(np.array, params)
    expect["wte"]["embedding"][70:] = 0  # Padded rows are not exported; they import as zeros.
    if not tie:
        expect["lm_head"]["kernel"][:, 70:] = 0
    jax.tree.map(np.testing.assert_array_equal, back, expect)


def greedy(cfg: ModelConfig, params, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by full recomputation: the model is causal, so position t's logits on a
    zero-padded buffer depend only on tokens ≤ t (one compiled shape for every step)."""
    forward = jax.jit(lambda buf_1T: GPT(cfg).apply({"params": params}, buf_1T))
    buf = np.zeros((1, len(prompt) + new), np.int32)
    buf[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + new):
        buf[0, t] = int(np.argmax(np.asarray(forward(buf))[0, t - 1]))
    return buf[0].tolist()


def test_greedy_generation_matches_transformers(tmp_path):
    cfg = model_config(bias=True, activation="gelu_tanh", vocab_size=V, vocab_multiple=64)
    params = random_params(cfg, seed=3)
    hf_gpt2.save_hf(params, cfg, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = [5, 17, 42, 8]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert greedy(cfg, params, prompt, 20) == theirs[0].tolist()


def tiny_run_config(corpus, cache_dir):
    c = base.get_config()
    c.data.path, c.data.cache_dir, c.data.tokenizer = str(corpus), str(cache_dir), "char"
    c.data.seq_len = 16
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 32
    c.train.batch_size, c.train.num_steps, c.train.eval_every, c.train.eval_batches = 4, 2, 2, 1
    c.train.final_eval = "none"
    c.optim.warmup_steps, c.optim.decay_steps = 1, 10
    c.log.progress, c.log.tensorboard, c.sample.num_samples = False, False, 0
    return c


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_cli_export_then_import_round_trip(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    trainer.run(tiny_run_config(corpus, tmp_path / "cache"), run)
    out = tmp_path / "hf"
    assert convert_hf.main(["export", f"--workdir={run}", f"--out={out}"]) == 0
    assert "exported step 2" in capsys.readouterr().out
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()
    saved = json.loads((run / "config.json").read_text())
    assert hf.config.n_layer == 2 and hf.config.vocab_size == saved["model"]["vocab_size"]
    assert hf.config.activation_function == "gelu"  # Exact GELU, the base config's.
    assert (out / "gpt_jax_tokenizer.json").read_text() == (run / "tokenizer.json").read_text()

    cfg = ModelConfig.from_config(ml_collections.ConfigDict(saved), saved["model"]["vocab_size"])
    params = jax.device_get(checkpoint.restore_params(
        run / "checkpoints", 2, checkpoint.abstract_params(cfg)))
    toks = tokens(cfg.vocab_size, (2, 16))
    np.testing.assert_allclose(our_logits(cfg, params, toks), hf_logits(hf, toks), atol=1e-4, rtol=0)

    (out / "vocab.json").write_text("{}")  # HF tokenizer files travel along on import …
    imported = tmp_path / "imported"
    assert convert_hf.main(["import", f"--hf={out}", f"--workdir={imported}"]) == 0
    assert (imported / "hf_tokenizer" / "vocab.json").read_text() == "{}"
    # … and the run's own tokenizer comes back where a workdir keeps it.
    assert (imported / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    config = json.loads((imported / "config.json").read_text())
    assert config["data"]["tokenizer"] == "char"
    assert config["model"]["bias"] and config["model"]["activation"] == "gelu"
    assert config["model"]["d_model"] == 32 and config["model"]["max_seq_len"] == 16
    # Written where init_from reads it, not where a training run resumes from.
    assert not (imported / "checkpoints").exists()
    assert convert_hf.main(["import", f"--hf={out}", f"--workdir={imported}"]) == 2  # No clobbering.
    assert "already holds a model" in capsys.readouterr().err
    again = tmp_path / "again"  # Exporting the imported workdir gives the files back.
    assert convert_hf.main(["export", f"--workdir={imported}", f"--out={again}"]) == 0
    assert (again / "vocab.json").read_text() == "{}"
    assert (again / "gpt_jax_tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    a, b = (transformers.GPT2LMHeadModel.from_pretrained(d).eval() for d in (out, again))
    np.testing.assert_array_equal(hf_logits(a, toks), hf_logits(b, toks))


def test_init_from_hf_and_from_an_imported_workdir(corpus, tmp_path):
    hf = hf_model(seed=1)
    hf.save_pretrained(tmp_path / "hf")  # transformers' own writer.
    assert convert_hf.main(["import", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'imp'}"]) == 0
    for source, vocab_multiple, max_seq_len in ((f"hf:{tmp_path / 'hf'}", 1, None),
                                                (str(tmp_path / "imp"), 64, 32)):
        c = tiny_run_config(corpus, tmp_path / "cache")
        c.model.vocab_size, c.model.vocab_multiple = V, vocab_multiple
        c.model.max_seq_len = max_seq_len  # None: data.seq_len 16, fewer than HF's 32 positions.
        c.model.bias, c.model.activation = True, "gelu_tanh"
        c.checkpoint.init_from = source
        r = trainer.setup(c, tmp_path / f"run{vocab_multiple}")
        manager = checkpoint.make_manager(checkpoint.checkpoint_dir(r.workdir), keep=1)
        with sharding.activation_context(r.mesh, r.rules):
            state, start = trainer.initial_state(r, manager, None)
        assert start == 0
        want = hf_gpt2.params_from_hf(state_dict(hf), r.model.cfg)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), want)
    with pytest.raises(checkpoint.CheckpointError, match=r"has model\.vocab_multiple=64 but this run "
                                                         r"has model\.vocab_multiple=1; set --config"):
        checkpoint.load_params(str(tmp_path / "imp"), None,
                               dataclasses.replace(r.model.cfg, vocab_multiple=1))


def test_refusals_are_one_line_and_name_the_fix(tmp_path, capsys):
    cfg = model_config(bias=True, activation="gelu_tanh", vocab_size=V)
    with pytest.raises(checkpoint.CheckpointError, match=r"hf:.*nope: no such folder"):
        checkpoint.load_params(f"hf:{tmp_path / 'nope'}", None, cfg)
    assert convert_hf.main(["import", f"--hf={tmp_path / 'nope'}", f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such folder" in err and len(err.splitlines()) == 1

    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    wide = model_config(bias=True, activation="gelu_tanh", vocab_size=V, d_model=64)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"model\.d_model=32 \(n_embd\) but this model has model\.d_model=64; "
                             r"set --config\.model\.d_model=32"):
        checkpoint.load_params(f"hf:{tmp_path / 'hf'}", None, wide)
    long = model_config(bias=True, activation="gelu_tanh", vocab_size=V, max_seq_len=64)
    with pytest.raises(checkpoint.CheckpointError, match="32 positions .* at most 32"):
        checkpoint.load_params(f"hf:{tmp_path / 'hf'}", None, long)
    no_bias = model_config(bias=False, activation="gelu_tanh", vocab_size=V)
    with pytest.raises(hf_gpt2.InteropError, match="non-zero but model.bias=False .* model.bias=True"):
        hf_gpt2.params_from_hf(state_dict(hf), no_bias)
    sd = state_dict(hf)
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"][:, :64]
    with pytest.raises(hf_gpt2.InteropError, match=r"c_fc.weight has shape \(32, 64\), .* \(32, 128\)"):
        hf_gpt2.params_from_hf(sd, cfg)
    with pytest.raises(hf_gpt2.InteropError, match="scale_attn_by_inverse_layer_idx"):
        hf_gpt2.model_fields_from_hf(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(hf_gpt2.InteropError, match="exportable ones"):
        hf_gpt2.hf_config_from_model(model_config(activation="swish_nonexistent"))


def test_an_imported_gpt2_vocabulary_model_names_the_gpt2_tokenizer(tmp_path):
    """A 50257-token model is OpenAI's BPE: the workdir's tokenizer.json names tiktoken's gpt2,
    so `python -m gpt_jax.sample` can decode in it (where tiktoken's file is available)."""
    hf = hf_model(vocab_size=hf_gpt2.GPT2_VOCAB_SIZE, n_embd=16, n_layer=1, n_head=2)
    hf.save_pretrained(tmp_path / "hf")
    assert convert_hf.main(["import", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w'}"]) == 0
    assert json.loads((tmp_path / "w" / "tokenizer.json").read_text()) == {"name": "gpt2"}
    assert json.loads((tmp_path / "w" / "config.json").read_text())["data"]["tokenizer"] == "gpt2"
