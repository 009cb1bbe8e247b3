"""Adapters (gpt_jax/finetune/, models/layers.LoRA, the GPT's soft prompt): LoRA computes the base
model exactly at step 0 and merges into it; a soft prompt is the embeddings it replaces; only
adapters train, the base stays bitwise, checkpoints hold the adapters; sample, evaluate, merge
and resume read them on their base."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.finetune import adapters, lora
from gpt_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = {  # The GPT options LoRA must follow: fused QKV or not, scanned layers, a gate.
    "gpt2": {},
    "gqa_scan": {"num_kv_heads": 2, "scan_layers": True},
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "mlp_dim": 48, "positions": "rope",
              "num_kv_heads": 1},
}


def with_adapters(tiny_gpt, seed: int = 1, **fields):
    """(base hparams, base params, adapted hparams, adapted model, its params = base + fresh
    adapters) for a tiny GPT with `fields` of the finetune group (and model fields)."""
    model_fields = {k: v for k, v in fields.items() if k not in registry.FINETUNE_FIELDS}
    hparams, _, base = tiny_gpt(**model_fields)
    ft = {k: v for k, v in fields.items() if k in registry.FINETUNE_FIELDS}
    adapted = dataclasses.replace(hparams, **{"lora_alpha": 16.0, "lora_targets": "attention,mlp",
                                              **ft})
    model = registry.build(adapted)
    fresh = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed),
                                              jnp.zeros((1, 16), jnp.int32))["params"])
    mask = adapters.trainable_mask(fresh, adapted)
    return hparams, base, adapted, model, adapters.join(adapters.split(fresh, mask)[0], base)


def logits(hparams, params, x):
    """The model's logits, compiled whole (faster here than op by op)."""
    return jax.jit(registry.build(hparams).apply)({"params": params}, x)


def tokens(B=2, T=16, V=50, seed=3):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@pytest.mark.slow  # ~10 s a variant (eager and compiled models).
@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_starts_as_the_base_exactly_and_merges_into_it(tiny_gpt, variant):
    hparams, base, adapted, _, params = with_adapters(tiny_gpt, lora_rank=4, **VARIANTS[variant])
    x = tokens()
    # Op by op, so each side runs the same kernels (compiled whole, XLA may fuse the two graphs
    # differently and round in the last bit).
    np.testing.assert_array_equal(registry.build(adapted).apply({"params": params}, x),
                                  registry.build(hparams).apply({"params": base}, x))
    params = jax.tree_util.tree_map_with_path(  # Trained-looking adapters: B no longer zero.
        lambda path, p: jax.random.normal(jax.random.key(len(str(path))), p.shape) * 0.1
        if adapters.is_adapter(path) else p, params)
    merged, plain = lora.merge(params, adapted)
    assert plain.lora_rank == 0 and not any(
        adapters.is_adapter(path) for path, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
    unmerged = logits(adapted, params, x)
    assert float(jnp.max(jnp.abs(unmerged - logits(hparams, base, x)))) > 1e-3  # They act.
    np.testing.assert_allclose(logits(plain, merged, x), unmerged, atol=1e-5, rtol=0)


def test_lora_targets_pick_the_projections(tiny_gpt):
    _, _, _, _, params = with_adapters(tiny_gpt, lora_rank=2, lora_targets="q,v,proj")
    block = params["h_0"]
    assert sorted(k for k in block["attn"] if k.startswith("lora_")) == ["lora_q", "lora_v"]
    assert sorted(k for k in block["mlp"] if k.startswith("lora_")) == ["lora_proj"]
    assert block["attn"]["lora_q"]["a"].shape == (32, 2)
    assert block["attn"]["lora_q"]["b"].shape == (2, 4, 8)
    np.testing.assert_array_equal(block["attn"]["lora_q"]["b"], 0)


@pytest.mark.parametrize("positions", [pytest.param("learned", marks=pytest.mark.slow), "rope"])
def test_soft_prompt_is_the_embeddings_it_stands_for(tiny_gpt, positions):
    """A soft prompt set to the embeddings of tokens u gives the base model's logits on u + x."""
    P = 3
    hparams, base, _, model, params = with_adapters(
        tiny_gpt, prompt_tokens=P, positions=positions, max_seq_len=32)
    u = jnp.asarray([7, 1, 30])
    params = {**params, "soft_prompt": base["wte"]["embedding"][u]}
    x = tokens(T=12)
    want = logits(hparams, base, jnp.concatenate([jnp.broadcast_to(u, (2, P)), x], axis=1))[:, P:]
    np.testing.assert_allclose(logits(model.cfg, params, x), want, atol=2e-6, rtol=0)


@pytest.mark.slow  # Greedy by the full forward pass compiles once per length.
def test_soft_prompt_decodes_as_it_scores(tiny_gpt):
    from gpt_jax.generate import SamplingParams, generate

    _, _, _, model, params = with_adapters(tiny_gpt, prompt_tokens=3, max_seq_len=32)
    params = {**params, "soft_prompt": jax.random.normal(jax.random.key(5), (3, 32))}
    prompts = [np.array([5, 6, 7, 8, 9]), np.array([10, 11])]
    out = generate(model, params, prompts, 6, jax.random.key(0), SamplingParams(0.0))
    for prompt, row in zip(prompts, out, strict=True):
        seq = list(prompt)
        for _ in range(6):  # Greedy by the full forward pass, which prepends the prompt itself.
            seq.append(int(jnp.argmax(model.apply({"params": params}, jnp.asarray([seq]))[0, -1])))
        assert row.tolist() == seq
    with pytest.raises(ValueError, match="soft prompt of 3 embeddings decodes at most 29"):
        generate(model, params, prompts, 25, jax.random.key(0))


def test_scoring_leaves_room_for_the_soft_prompt(tiny_gpt):
    from gpt_jax.eval import scoring

    _, _, _, model, params = with_adapters(tiny_gpt, prompt_tokens=3, max_seq_len=32)
    scoring.Scorer(model, params, max_len=29, batch_size=2)
    with pytest.raises(ValueError, match="29 learned positions"):
        scoring.Scorer(model, params, max_len=30, batch_size=2)


@pytest.mark.parametrize("method", [{"finetune.lora_rank": 4}, pytest.param(
    {"finetune.prompt_tokens": 4}, marks=pytest.mark.slow)])
def test_only_adapters_train(tiny_config, method):
    """Frozen parameters come out of the train step bitwise; the optimizer holds moments for the
    adapters alone; the adapters move; checkpoints would hold only them."""
    from gpt_jax.training import build

    c = tiny_config(**method, **{"model.vocab_size": 40, "model.max_seq_len": 40,
                                 "finetune.base": "unused-here", "optim.warmup_steps": 0})
    r = build.setup_without_data(c)
    train_step, _ = build.compile_steps(r)
    state = r.init_state()
    before = jax.tree.map(np.asarray, state.params)
    x = np.random.default_rng(0).integers(0, 40, (8, 33))
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": np.ones((8, 32), np.float32)}
    for _ in range(2):
        state, _ = train_step(state, batch)
    moved = []
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                jax.tree.leaves(state.params), strict=True):
        if adapters.is_adapter(path):
            moved.append(not np.array_equal(old, new))
        else:
            np.testing.assert_array_equal(old, new, err_msg=jax.tree_util.keystr(path))
    assert moved and any(moved)
    adapter_leaves = len(jax.tree.leaves(adapters.split(state.params, r.trainable)[0]))
    moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if np.ndim(leaf) > 0 and any(getattr(k, "name", None) == "mu" for k in path)]
    assert len(moments) == adapter_leaves
    saved = adapters.saved(state, r.trainable)
    assert len(jax.tree.leaves(saved.params)) == adapter_leaves


@pytest.mark.parametrize("overrides, words", [
    ({"finetune.lora_rank": 4, "finetune.lora_targets": "q,wo", "checkpoint.init_from": "/x"},
     ["'wo'", "lora_targets"]),
    ({"finetune.lora_rank": 4, "finetune.lora_targets": "gate", "checkpoint.init_from": "/x"},
     ["gate", "swiglu"]),
    ({"finetune.lora_rank": 4, "finetune.lora_alpha": 0.0, "checkpoint.init_from": "/x"}, ["lora_alpha"]),
    ({"finetune.lora_rank": -1}, ["lora_rank"]),
    ({"finetune.prompt_tokens": 4}, ["init_from"]),
    ({"finetune.prompt_tokens": 4, "checkpoint.init_from": "/x"}, ["max_seq_len"]),
    ({"finetune.prompt_tokens": 4, "checkpoint.init_from": "/x", "model.max_seq_len": 64,
      "data.document_mask": True}, ["document_mask"]),
    ({"finetune.lora_rank": 4, "checkpoint.init_from": "/x", "model.arch": "lstm"},
     ["model.arch=gpt"]),
    ({"finetune.lora_rank": 4, "checkpoint.init_from": "/x", "train.grow_at": "10"},
     ["grow"]),
    ({"finetune.prompt_tokens": 4, "checkpoint.init_from": "/x", "model.max_seq_len": 40,
      "sample.max_new_tokens": 36}, ["sample.max_new_tokens"]),
])
def test_bad_finetune_settings_are_refused(tiny_config, overrides, words):
    from gpt_jax import config as config_lib

    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(tiny_config(**overrides))
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, small_run):
    """A 6-step base run, and 6 LoRA steps from it (checkpoints every 3)."""
    from gpt_jax.training import loop

    root = tmp_path_factory.mktemp("lora")

    def config(**overrides):
        return small_run(root, **{"model.max_seq_len": 24, **overrides})

    loop.run(config(), root / "base")
    lora_config = config(**{"checkpoint.init_from": str(root / "base"), "finetune.lora_rank": 4})
    out = loop.run(lora_config, root / "lora")
    return root, config, lora_config, out


@pytest.mark.slow  # Two short training runs (the module fixture).
def test_a_lora_run_saves_adapters_on_a_pinned_base(lora_runs):
    from gpt_jax.training import weights

    root, _, _, _ = lora_runs
    saved = json.loads((root / "lora" / "config.json").read_text())
    assert saved["finetune"]["base"] == str((root / "base" / "checkpoints" / "6").resolve())
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(root / "lora" / "checkpoints" / "6" / "state")
    names = [jax.tree_util.keystr(k) for k, _ in
             jax.tree_util.tree_flatten_with_path(meta.item_metadata["params"])[0]]
    assert names and all("lora_" in n for n in names)
    _, _, base, _ = weights.load_trained(root / "base")
    _, hparams, tuned, _ = weights.load_trained(root / "lora")
    assert hparams.lora_rank == 4
    mask = adapters.trainable_mask(tuned, hparams)
    frozen = adapters.split(tuned, mask)[1]
    jax.tree.map(np.testing.assert_array_equal, frozen, base)
    assert any(np.any(np.asarray(b) != 0) for b in jax.tree.leaves(adapters.split(tuned, mask)[0]))


@pytest.mark.slow
def test_lora_resumes_bitwise(lora_runs, tmp_path):
    """6 LoRA steps straight equal 3 steps, a stop, and 3 more (the base read again)."""
    from gpt_jax.training import loop, weights

    root, _, lora_config, straight = lora_runs
    short = lora_config.copy_and_resolve_references()
    short.train.num_steps = 3
    loop.run(short, tmp_path / "w")
    again = loop.run(lora_config, tmp_path / "w")
    assert again["train/loss"] == straight["train/loss"]
    a = weights.load_trained(root / "lora")[2]
    b = weights.load_trained(tmp_path / "w")[2]
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_merge_tool_and_hf_export(lora_runs, tmp_path, tool):
    """tools/merge_lora.py writes a plain model whose logits are the LoRA run's (to 1e-5), which
    exports to Hugging Face and loads in transformers with equal logits."""
    pytest.importorskip("transformers")
    import torch
    import transformers

    from gpt_jax.training import weights

    root = lora_runs[0]
    tool("merge_lora").main([f"--from={root / 'lora'}", f"--to={tmp_path / 'merged'}"])
    _, hparams, tuned, _ = weights.load_trained(root / "lora")
    _, plain, merged, _ = weights.load_trained(tmp_path / "merged")
    assert plain.lora_rank == 0
    x = tokens(V=hparams.vocab_size)
    want = registry.build(hparams).apply({"params": tuned}, x)
    got = registry.build(plain).apply({"params": merged}, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    tool("convert_hf").main(["export", f"--workdir={tmp_path / 'merged'}",
                             f"--out={tmp_path / 'hf'}"])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(np.asarray(x), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(want)[..., :hparams.vocab_size], atol=1e-4,
                               rtol=0)


@pytest.mark.slow
def test_sample_and_evaluate_read_adapters_on_their_base(lora_runs, tmp_path):
    root = lora_runs[0]
    for command in (["gpt_jax.sample", f"--workdir={root / 'lora'}", "--prompt=de",
                     "--max_new_tokens=5"],
                    ["gpt_jax.evaluate", f"--workdir={root / 'lora'}", "--split=val"]):
        r = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    rows = (root / "lora" / "eval.jsonl").read_text().splitlines()
    final = [row for row in map(json.loads, (root / "lora" / "metrics.jsonl").open())
             if "val/loss" in row][-1]
    assert json.loads(rows[-1])["text"][0]["loss"] == pytest.approx(final["val/loss"], rel=1e-6)


@pytest.mark.slow  # Two short training runs (the module fixture).
def test_merge_tool_refusals(lora_runs, tmp_path, bad_invocation):
    root = lora_runs[0]
    tool = [sys.executable, str(ROOT / "tools" / "merge_lora.py")]
    bad_invocation([*tool, f"--from={root / 'base'}", f"--to={tmp_path / 'm'}"],
                   "no LoRA adapters", protect=[root / "base"], absent=[tmp_path / "m"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    bad_invocation([*tool, f"--from={root / 'lora'}", f"--to={tmp_path / 'full'}"],
                   "not empty", protect=[tmp_path / "full"])
    bad_invocation([*tool, f"--from={tmp_path / 'nope'}", f"--to={tmp_path / 'm'}"],
                   "nope", absent=[tmp_path / "m"])
    bad_invocation([sys.executable, str(ROOT / "tools" / "convert_hf.py"), "export",
                    f"--workdir={root / 'lora'}", f"--out={tmp_path / 'hf'}"],
                   "merge_lora.py", protect=[root / "lora"], absent=[tmp_path / "hf"])


@pytest.mark.slow  # Two short training runs (the module fixture).
def test_a_base_of_another_tokenizer_is_refused(lora_runs, tmp_path, bad_invocation, cli_flags):
    root, config, _, _ = lora_runs
    c = config(**{"checkpoint.init_from": str(root / "base"), "finetune.lora_rank": 4,
                  "data.tokenizer": "byte", "model.vocab_size": 256})
    bad_invocation([sys.executable, "-m", "gpt_jax.train", *cli_flags(c),
                    f"--workdir={tmp_path / 'w'}"], "tokenizer", cwd=ROOT,
                   absent=[tmp_path / "w" / "checkpoints"])


def test_the_base_is_pinned_to_a_step(trained_run, tmp_path):
    """finetune.base records a step folder (absolute), which a resume accepts from that step or
    its run's workdir (whatever the run saved since), and no other step."""
    pinned = adapters.base_reference(str(trained_run))
    assert pinned == str((trained_run / "checkpoints" / "4").resolve())
    assert adapters.same_base(str(trained_run), pinned)
    assert adapters.same_base(pinned, pinned)
    assert not adapters.same_base(str(trained_run / "checkpoints" / "2"), pinned)
    (tmp_path / "hf").mkdir()
    assert adapters.base_reference(f"hf:{tmp_path / 'hf'}") == f"hf:{(tmp_path / 'hf').resolve()}"
    assert adapters.base_reference("hf:gpt2") == "hf:gpt2"  # A hub name stays a name.
