"""Hugging Face Llama ⇄ gpt_jax (gpt_jax/interop/hf_llama.py, tools/convert_hf.py): a randomly
initialised transformers LlamaForCausalLM (2 layers, 4 heads, 2 kv heads, an odd vocabulary)
imported gives transformers' logits and greedy generations; an export loads in transformers with
our logits; the round trip is bitwise; what a Llama cannot be is refused in one line."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from gpt_jax.generate import SamplingParams, generate
from gpt_jax.interop import hf_gpt2, hf_llama
from gpt_jax.models import registry
from gpt_jax.training import weights

V = 61  # Odd, and not a multiple of the padding.


def hf_llama_model(tie: bool = False, kv_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32,
        rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # Norm weights off 1, so that a misplaced scale shows.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BT, dtype=torch.long)).logits.float().numpy()


def our_model(hf_model, **overrides):
    from configs import llama

    c = llama.get_config("tiny")
    c.model.update(hf_llama.model_fields_from_hf(hf_model.config))
    c.model.update(overrides)
    c.data.seq_len = c.model.max_seq_len
    cfg = registry.hyperparameters(c)
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    return cfg, hf_llama.params_from_hf(sd, cfg)


def our_logits(cfg, params, tokens_BT: np.ndarray) -> np.ndarray:
    logits = jax.jit(registry.build(cfg).apply)({"params": params}, tokens_BT)
    return np.asarray(logits)[..., : cfg.vocab_size]


TOKENS_BT = np.random.default_rng(0).integers(0, V, (2, 20)).astype(np.int32)


@pytest.mark.parametrize("tie, kv_heads", [(False, 2), (True, 4), (False, 1)])
def test_imported_llama_gives_transformers_logits(tie, kv_heads):
    hf_model = hf_llama_model(tie, kv_heads)
    cfg, params = our_model(hf_model)
    assert cfg.kv_heads == kv_heads and cfg.tie_embeddings == tie
    np.testing.assert_allclose(our_logits(cfg, params, TOKENS_BT), hf_logits(hf_model, TOKENS_BT),
                               atol=1e-4, rtol=0)


@pytest.mark.slow  # The logits above are the numerics; this is the decoding loop on top.
def test_imported_llama_generates_transformers_greedy_tokens():
    hf_model = hf_llama_model()
    cfg, params = our_model(hf_model)
    prompt = TOKENS_BT[0, :5]
    ours = generate(registry.build(cfg), params, [prompt], 12, jax.random.key(0),
                    SamplingParams(temperature=0.0, top_k=0, top_p=1.0))
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor(prompt[None], dtype=torch.long),
                                   max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert np.asarray(ours[0]).tolist() == theirs[0].tolist()


def test_export_loads_in_transformers_and_the_round_trip_is_bitwise(tmp_path):
    hf_model = hf_llama_model()
    cfg, params = our_model(hf_model)
    hf_llama.save_hf(params, cfg, tmp_path / "hf")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(hf_logits(loaded, TOKENS_BT), our_logits(cfg, params, TOKENS_BT),
                               atol=1e-4, rtol=0)
    _, state_dict = hf_llama.load_hf(str(tmp_path / "hf"))
    again = hf_llama.params_from_hf(state_dict, cfg)
    flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v)
                         for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    a, b = flat(params), flat(again)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_cli_imports_a_llama_folder_that_sample_reads(tmp_path, tool):
    hf_model = hf_llama_model()
    hf_model.save_pretrained(tmp_path / "hf")
    convert_hf = tool("convert_hf")
    convert_hf.import_hf(str(tmp_path / "hf"), tmp_path / "run")
    saved, cfg, params, _ = weights.load_trained(tmp_path / "run")
    assert saved["model"]["positions"] == "rope" and cfg.kv_heads == 2
    np.testing.assert_allclose(our_logits(cfg, params, TOKENS_BT), hf_logits(hf_model, TOKENS_BT),
                               atol=1e-4, rtol=0)
    convert_hf.export_hf(tmp_path / "run", tmp_path / "out")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").model_type == "llama"


@pytest.mark.parametrize("fields, words", [
    ({"hidden_act": "gelu"}, "silu"),
    ({"attention_bias": True}, "no biases"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}}, "not implemented"),
    ({"head_dim": 16}, "head_dim"),
])
def test_a_llama_our_model_cannot_compute_is_refused(fields, words):
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, **fields)
    with pytest.raises(hf_gpt2.InteropError, match=words):
        hf_llama.model_fields_from_hf(config)


def test_a_model_that_is_no_llama_does_not_export_as_one():
    from configs import base

    c = base.get_config()
    c.model.update(positions="rope", norm="rmsnorm", mlp="gelu")
    cfg = registry.hyperparameters(c, V)
    with pytest.raises(hf_gpt2.InteropError, match="model.mlp"):
        hf_llama.params_to_hf({}, cfg)  # Refused before any parameter is read.


def test_init_from_an_hf_llama_folder_takes_its_weights_and_refuses_another_shape(tmp_path):
    from gpt_jax.training.checkpoint import CheckpointError

    hf_model = hf_llama_model()
    hf_model.save_pretrained(tmp_path / "hf")
    cfg, want = our_model(hf_model)
    got = weights.load_params(f"hf:{tmp_path / 'hf'}", weights.abstract_params(cfg), cfg)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                            strict=True):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
    other = dataclasses.replace(cfg, num_kv_heads=4)
    with pytest.raises(CheckpointError, match="num_kv_heads"):
        weights.check_hf_source(str(tmp_path / "hf"), other)
