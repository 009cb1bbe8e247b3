"""The model seam: an architecture registered here, in this file only, trains, checkpoints,
resumes bitwise, evaluates and samples through the normal entry points; the registry's
compatibility checks; no caller outside gpt_jax/models/ builds a GPT by hand."""

import dataclasses
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.config import ConfigError
from gpt_jax.data import pipeline
from gpt_jax.generate import SamplingParams, generate
from gpt_jax.models import registry
from gpt_jax.sample import load_run
from gpt_jax.training import build, checkpoint, loop, weights

REPO = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class BigramConfig:
    """A bigram model's hyperparameters: a subset of the `model` config group's fields."""

    vocab_size: int
    max_seq_len: int
    init_std: float


class Bigram(nn.Module):
    """Next-token logits from the current token alone: one [V, V] table."""

    cfg: BigramConfig

    @nn.compact
    def __call__(self, tokens_BT, deterministic=True, segment_ids_BT=None, positions_BT=None):
        V = self.cfg.vocab_size
        init = nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std),
                                            ("vocab", None))
        table_VV = self.param("table", init, (V, V), jnp.float32)
        return table_VV[tokens_BT]


BIGRAM = registry.Architecture(
    name="bigram",
    config_class=BigramConfig,
    module=Bigram,
    flops_per_token=lambda cfg, num_params, seq_len: 6.0 * cfg.vocab_size,
    shape_fields=("vocab_size",),
    logical_axes=("vocab",),
)


@pytest.fixture
def bigram():
    registry.register(BIGRAM)
    yield BIGRAM
    registry.unregister(BIGRAM.name)


def bigram_config(tiny_config, **overrides):
    return tiny_config(**{"model.arch": "bigram", "model.init_std": 0.1, "optim.lr": 0.05,
                          "optim.decay_steps": 30, "checkpoint.every": 10, "train.num_steps": 30,
                          "train.eval_every": 10, "train.final_eval": "batches",
                          "sample.num_samples": 0, **overrides})


def test_a_registered_toy_architecture_trains_resumes_bitwise_evaluates_and_samples(
        bigram, tiny_config, tmp_path, metrics_rows):
    whole, split = tmp_path / "whole", tmp_path / "split"
    loop.run(bigram_config(tiny_config), whole)
    loop.run(bigram_config(tiny_config, **{"train.num_steps": 20}), split)  # Stops at 20 …
    last = loop.run(bigram_config(tiny_config), split)  # … and resumes there.

    assert metrics_rows(split, timing=False) == metrics_rows(whole, timing=False)
    _, hparams, params_whole, step = weights.load_trained(whole)
    _, _, params_split, _ = weights.load_trained(split)
    assert step == 30 and isinstance(hparams, BigramConfig)
    np.testing.assert_array_equal(params_whole["table"], params_split["table"])
    val = [r["val/loss"] for r in metrics_rows(whole) if "val/loss" in r]
    assert val[-1] < val[0] - 0.5 and last["val/loss"] == val[-1]  # It learned.

    # Evaluation through the loop's entry point: every val token, weights masking the padding.
    r = build.setup(bigram_config(tiny_config), whole)
    _, eval_step = build.compile_steps(r)
    full = loop.evaluate(eval_step, params_whole, (jax.tree.map(jnp.asarray, b) for b in
                                                  pipeline.full_eval_batches(
                                                      r.data.val_tokens(), 32, 8)))
    tokens = r.data.val_tokens().read(0, len(r.data.val_tokens()))
    logp = jax.nn.log_softmax(np.asarray(params_whole["table"], np.float64), axis=-1)
    want = -np.mean(np.asarray(logp)[tokens[:-1], tokens[1:]])
    assert full["val/tokens"] == len(tokens) - 1
    assert full["val/loss"] == pytest.approx(want, rel=1e-5)

    # Sampling through the sample CLI's loader; no KV cache, so decoding recomputes.
    tokenizer, model, params, _ = load_run(whole)
    prompt = tokenizer.encode("def f")
    out = generate(model, params, [prompt, prompt[-2:]], 12, jax.random.key(0),
                   SamplingParams(temperature=0.0))
    table = np.asarray(params["table"])
    for row in out:
        for prev, nxt in zip(row[-13:-1], row[-12:], strict=True):
            assert nxt == int(np.argmax(table[prev]))  # Greedy bigram, token after token.


def test_resuming_under_another_architecture_is_refused(bigram, tiny_config, tmp_path):
    workdir = tmp_path / "run"
    loop.run(bigram_config(tiny_config, **{"train.num_steps": 10}), workdir)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"has model\.arch='bigram' but this run has model\.arch='gpt'"):
        loop.run(tiny_config(**{"train.num_steps": 20}), workdir)


def test_unknown_architecture_is_one_line_config_error(tiny_config):
    with pytest.raises(ConfigError, match=r"model\.arch='bigrm' is not one of \[.*'gpt'.*\]"):
        build.setup_without_data(tiny_config(**{"model.arch": "bigrm", "model.vocab_size": 40}))


def test_chunked_loss_needs_an_architecture_with_a_separate_head(bigram, tiny_config):
    with pytest.raises(ConfigError, match="train.loss_chunk=8 needs a model with separate"):
        build.setup_without_data(bigram_config(tiny_config, **{"train.loss_chunk": 8,
                                                               "model.vocab_size": 40}))


def test_hyperparameters_take_each_field_of_the_model_group(tiny_config):
    c = tiny_config(**{"model.num_layers": 3, "model.d_model": 48, "model.num_heads": 3})
    h = registry.hyperparameters(c, vocab_size=37)
    assert (h.num_layers, h.d_model, h.num_heads, h.vocab_size, h.max_seq_len) == (3, 48, 3, 37, 32)
    assert registry.model_fields(h)["arch"] == "gpt"
    fields = {f.name for f in dataclasses.fields(h)}
    assert fields <= set(c.model) | set(registry.FINETUNE_FIELDS), (
        "every hyperparameter is a model.* config field, or an adapter's finetune.* one")
    assert set(registry.FINETUNE_FIELDS) <= set(c.finetune)
    adapted = registry.hyperparameters(tiny_config(**{"finetune.lora_rank": 8}), vocab_size=37)
    assert adapted.lora_rank == 8 and h.lora_rank == 0


def test_compatibility_names_the_first_differing_shape_field():
    gpt = registry.get("gpt")
    ours = {"arch": "gpt", "num_layers": 2, "d_model": 32, "activation": "gelu"}
    assert gpt.mismatch(dict(ours), ours) is None
    assert gpt.mismatch({**ours, "d_model": 64}, ours) == "d_model"
    assert gpt.mismatch({k: v for k, v in ours.items() if k != "arch"}, ours) is None  # Old saves.
    assert gpt.function_changes({**ours, "activation": "relu"}, ours) == ["activation"]
    with pytest.raises(registry.IncompatibleModelError,
                       match=r"^src has model\.d_model=64 but this run has model\.d_model=32; "
                             r"set d_model to 64$"):
        gpt.require_compatible({**ours, "d_model": 64}, ours, "src", "set {field} to {value}")


def test_registering_refuses_a_taken_name_or_class_and_allows_the_same_again(bigram):
    assert registry.register(BIGRAM) is BIGRAM  # A notebook re-running its cell.
    with pytest.raises(ValueError, match="model.arch='gpt' is already registered"):
        registry.register(dataclasses.replace(registry.get("gpt"), flops_per_token=len))
    with pytest.raises(ValueError, match="BigramConfig already belongs to model.arch='bigram'"):
        registry.register(dataclasses.replace(BIGRAM, name="bigram2"))


def test_a_gpt_decoded_without_its_cache_equals_the_uncached_reference(tiny_gpt):
    """The recompute path (architectures without a KV cache), checked on a GPT registered as
    such: greedy tokens equal the KV-cache model's use_cache=False reference, past the window,
    with ragged prompts."""
    from gpt_jax.models.gpt import GPT, GPTConfig

    @dataclasses.dataclass(frozen=True)
    class RecomputeGPTConfig(GPTConfig):
        pass

    arch = dataclasses.replace(registry.get("gpt"), name="gpt_recompute",
                               config_class=RecomputeGPTConfig, module=GPT, decoding="recompute")
    registry.register(arch)
    try:
        hparams, model, params = tiny_gpt(init_std=0.3)  # Peaked logits: varied greedy tokens.
        recompute = registry.build(RecomputeGPTConfig(**dataclasses.asdict(hparams)))
        prompts = [np.array([3, 1, 4, 1, 5]), np.array([9, 2])]
        greedy = SamplingParams(temperature=0.0)
        want = generate(model, params, prompts, 30, jax.random.key(0), greedy, use_cache=False)
        got = generate(recompute, params, prompts, 30, jax.random.key(0), greedy)
        assert len(want[0]) == 35 > hparams.max_seq_len
        for w, g in zip(want, got, strict=True):
            np.testing.assert_array_equal(g, w)
    finally:
        registry.unregister("gpt_recompute")


def test_registering_checks_the_declared_fields():
    with pytest.raises(ValueError, match="not fields of BigramConfig"):
        dataclasses.replace(BIGRAM, shape_fields=("num_layers",))
    with pytest.raises(ValueError, match="decoding='beam'"):
        dataclasses.replace(BIGRAM, decoding="beam")


def test_no_caller_outside_models_builds_a_gpt_by_hand():
    hits = []
    for folder in ("gpt_jax", "tools"):
        for path in (REPO / folder).rglob("*.py"):
            if "models" in path.relative_to(REPO).parts:
                continue
            hits += [f"{path}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                     if re.search(r"\bGPT\(", line)]
    assert hits == []


def test_a_logical_axis_without_a_mesh_rule_is_refused(tiny_config):
    class AxesConfig(BigramConfig):
        pass

    registry.register(dataclasses.replace(BIGRAM, name="bigram_axes", config_class=AxesConfig,
                                          logical_axes=("vocab", "foo")))
    try:
        with pytest.raises(ConfigError, match=r"logical axis 'foo', which mesh.rules does not map"):
            build.setup_without_data(tiny_config(**{"model.arch": "bigram_axes",
                                                    "model.vocab_size": 40}))
    finally:
        registry.unregister("bigram_axes")
