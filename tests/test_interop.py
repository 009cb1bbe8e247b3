"""Hugging Face GPT-2 ⇄ gpt_jax: equal logits both ways, equal greedy generations, the CLI round
trip, checkpoint.init_from=hf:DIR, and one-line refusals."""

import dataclasses
import errno
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from gpt_jax import sample
from gpt_jax.data.tokenizers import load_tokenizer
from gpt_jax.generate import SamplingParams, generate
from gpt_jax.interop import hf_gpt2
from gpt_jax.models import registry
from gpt_jax.parallel import sharding
from gpt_jax.training import build, checkpoint, loop, resume, weights


def load_tool():
    path = pathlib.Path(__file__).resolve().parent.parent / "tools" / "convert_hf.py"
    spec = importlib.util.spec_from_file_location("convert_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_hf = load_tool()

V = 100  # The tiny HF model's vocabulary (bos/eos ids inside it).


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


def hf_tokenizer() -> transformers.GPT2TokenizerFast:
    """A tiny byte-level BPE (GPT-2's scheme) trained offline, <|endoftext|> = 0, as transformers
    wraps it."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(["hello world, hello there: the quick brown fox jumps over the dog"],
                            tokenizers.trainers.BpeTrainer(vocab_size=64, show_progress=False,
                                                           special_tokens=["<|endoftext|>"]))
    return transformers.GPT2TokenizerFast(tokenizer_object=tok)


def state_dict(model: transformers.GPT2LMHeadModel) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture
def gpt(tiny_gpt):
    """make(seed=0, vocab_size=V, **model_fields) → (hyperparameters, params) of the tiny GPT
    shaped like `hf_model()` (2 heads, 32 positions), every parameter perturbed (biases and norms
    included) so that a mapping mistake shows."""
    def make(seed: int = 0, vocab_size: int = V, scan_layers: bool = False, **fields):
        cfg, _, params = tiny_gpt(vocab_size=vocab_size, seed=seed,
                                  **{"num_heads": 2, "max_seq_len": 32, **fields})
        if scan_layers:  # The scan_layers layout, stacked here (an eager scanned init is slow).
            cfg = dataclasses.replace(cfg, scan_layers=True)
            layers = [params.pop(f"h_{i}") for i in range(cfg.num_layers)]
            params["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        rng = np.random.default_rng(seed + 1)  # NumPy: eager jax.random would compile per shape.
        return cfg, jax.tree.map(
            lambda x: (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32), params)

    return make


def our_logits(cfg, params, tokens_BT: np.ndarray) -> np.ndarray:
    logits_BTV = jax.jit(registry.build(cfg).apply)({"params": params}, tokens_BT)
    return np.asarray(logits_BTV)[..., : cfg.vocab_size]  # Padded ids are masked anyway.


def hf_logits(model: transformers.GPT2LMHeadModel, tokens_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BT)).logits.numpy()


def tokens(vocab: int, shape=(2, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


# Stacked layers: also imported (and compared) in test_gpt_jax_model_exports_with_equal_logits.
@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_hf_model_imports_with_equal_logits(gpt, scan_layers):
    hf = hf_model()
    fields = hf_gpt2.model_fields_from_hf(hf.config)
    assert fields["activation"] == "gelu_tanh" and fields["bias"] and fields["tie_embeddings"]
    cfg, _ = gpt(**fields, vocab_multiple=64, scan_layers=scan_layers)  # V 100 → 128.
    params = hf_gpt2.params_from_hf(state_dict(hf), cfg)
    assert ("h" in params) == scan_layers
    np.testing.assert_allclose(our_logits(cfg, params, tokens(V)), hf_logits(hf, tokens(V)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("bias,activation,scan_layers,tie", [
    (False, "gelu", False, True),  # nanoGPT's recipe: no biases, exact GELU.
    pytest.param(True, "gelu_tanh", False, True, marks=pytest.mark.slow),  # GPT-2's.
    pytest.param(False, "gelu_tanh", True, True, marks=pytest.mark.slow),
    (True, "gelu", True, False),  # Biases, stacked layers, an untied LM head.
])
def test_gpt_jax_model_exports_with_equal_logits(gpt, tmp_path, bias, activation, scan_layers,
                                                 tie):
    cfg, params = gpt(bias=bias, activation=activation, scan_layers=scan_layers,
                      tie_embeddings=tie, vocab_size=70, vocab_multiple=16)  # Padded to 80.
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


def greedy(cfg, params, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by full recomputation: the model is causal, so position t's logits on a
    zero-padded buffer depend only on tokens ≤ t (one compiled shape for every step)."""
    forward = jax.jit(lambda buf_1T: registry.build(cfg).apply({"params": params}, buf_1T))
    buf = np.zeros((1, len(prompt) + new), np.int32)
    buf[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + new):
        buf[0, t] = int(np.argmax(np.asarray(forward(buf))[0, t - 1]))
    return buf[0].tolist()


def test_greedy_generation_matches_transformers(gpt, tmp_path):
    cfg, params = gpt(seed=3, bias=True, activation="gelu_tanh", vocab_multiple=64)
    hf_gpt2.save_hf(params, cfg, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = [5, 17, 42, 8]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert greedy(cfg, params, prompt, 20) == theirs[0].tolist()


@pytest.fixture
def run_config(tiny_config):
    """A 2-step char run of a 1-layer model on conftest's corpus (T 16): no evaluation, samples
    or TensorBoard (fewer compiles)."""
    return lambda: tiny_config(**{
        "model.num_layers": 1, "data.seq_len": 16, "train.batch_size": 4, "train.num_steps": 2,
        "train.eval_every": 100,
        "train.eval_batches": 1, "train.final_eval": "none", "optim.warmup_steps": 1,
        "optim.decay_steps": 10, "log.tensorboard": False, "sample.num_samples": 0})


@pytest.mark.slow  # Both CLI commands end to end; the conversions are tested in process by default.
def test_cli_export_then_import_round_trip(run_config, tmp_path, capsys):
    run = tmp_path / "run"
    loop.run(run_config(), run)
    out = tmp_path / "hf"
    assert convert_hf.main(["export", f"--workdir={run}", f"--out={out}"]) == 0
    assert "exported step 2" in capsys.readouterr().out
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()
    saved = json.loads((run / "config.json").read_text())
    assert hf.config.n_layer == 1 and hf.config.vocab_size == saved["model"]["vocab_size"]
    assert hf.config.activation_function == "gelu"  # Exact GELU, the base config's.
    assert (out / "gpt_jax_tokenizer.json").read_text() == (run / "tokenizer.json").read_text()

    cfg = registry.hyperparameters(ml_collections.ConfigDict(saved))
    params = jax.device_get(weights.restore_params(run / "checkpoints", 2,
                                                   weights.abstract_params(cfg)))
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
    with pytest.raises(SystemExit, match="1"):  # No clobbering.
        convert_hf.main(["import", f"--hf={out}", f"--workdir={imported}"])
    assert "already holds an imported model" in capsys.readouterr().err
    again = tmp_path / "again"  # Exporting the imported workdir gives the files back …
    assert convert_hf.main(["export", f"--workdir={imported}", f"--out={again}"]) == 0
    # … again: an earlier export is replaced whole (the run's extra vocab.json stays the same).
    assert convert_hf.main(["export", f"--workdir={imported}", f"--out={again}"]) == 0
    assert (again / "vocab.json").read_text() == "{}"
    assert (again / "gpt_jax_tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    a, b = (transformers.GPT2LMHeadModel.from_pretrained(d).eval() for d in (out, again))
    np.testing.assert_array_equal(hf_logits(a, toks), hf_logits(b, toks))


@pytest.mark.slow  # Two training starts; the conversions are tested in process by default.
def test_init_from_hf_and_from_an_imported_workdir(run_config, tmp_path):
    hf = hf_model(seed=1)
    hf.save_pretrained(tmp_path / "hf")  # transformers' own writer.
    assert convert_hf.main(["import", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'imp'}"]) == 0
    assert not (tmp_path / "imp" / "tokenizer.json").exists()  # The HF folder has none.
    with pytest.raises(sample.RunError, match=r"imported model but no tokenizer\.json .* import it "
                                              r"again into a new --workdir"):
        sample.load_run(tmp_path / "imp")
    for source, vocab_multiple, max_seq_len in ((f"hf:{tmp_path / 'hf'}", 1, None),
                                                (str(tmp_path / "imp"), 64, 32)):
        c = run_config()
        c.model.num_layers, c.model.vocab_size, c.model.vocab_multiple = 2, V, vocab_multiple
        c.model.max_seq_len = max_seq_len  # None: data.seq_len 16, fewer than HF's 32 positions.
        c.model.bias, c.model.activation = True, "gelu_tanh"
        c.checkpoint.init_from = source
        r = build.setup(c, tmp_path / f"run{vocab_multiple}")
        manager = checkpoint.make_manager(checkpoint.checkpoint_dir(r.workdir), keep=1)
        with sharding.activation_context(r.mesh, r.rules):
            state, start = resume.initial_state(r, manager, None)
        assert start == 0
        want = hf_gpt2.params_from_hf(state_dict(hf), r.hparams)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), want)
    with pytest.raises(checkpoint.CheckpointError, match=r"has model\.vocab_multiple=64 but this run "
                                                         r"has model\.vocab_multiple=1; set --config"):
        weights.load_params(str(tmp_path / "imp"), None,
                            dataclasses.replace(r.hparams, vocab_multiple=1))


def test_refusals_are_one_line_and_name_the_fix(gpt, tmp_path, capsys):
    cfg, _ = gpt(bias=True, activation="gelu_tanh")
    with pytest.raises(checkpoint.CheckpointError, match=r"hf:.*nope: no such folder"):
        weights.load_params(f"hf:{tmp_path / 'nope'}", None, cfg)
    with pytest.raises(SystemExit, match="1"):
        convert_hf.main(["import", f"--hf={tmp_path / 'nope'}", f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such folder" in err and len(err.splitlines()) == 1

    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    # Only the hyperparameters matter here: no model is built.
    wide = dataclasses.replace(cfg, d_model=64)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"hf has model\.d_model=32 but this run has model\.d_model=64; "
                             r"set --config\.model\.d_model=32\.") as e:
        weights.load_params(f"hf:{tmp_path / 'hf'}", None, wide)
    assert "\n" not in str(e.value)
    long = dataclasses.replace(cfg, max_seq_len=64)
    with pytest.raises(checkpoint.CheckpointError, match="32 positions .* at most 32"):
        weights.load_params(f"hf:{tmp_path / 'hf'}", None, long)
    no_bias = dataclasses.replace(cfg, bias=False)
    with pytest.raises(hf_gpt2.InteropError, match="non-zero but model.bias=False .* model.bias=True"):
        hf_gpt2.params_from_hf(state_dict(hf), no_bias)
    sd = state_dict(hf)
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"][:, :64]
    with pytest.raises(hf_gpt2.InteropError, match=r"c_fc.weight has shape \(32, 64\), .* \(32, 128\)"):
        hf_gpt2.params_from_hf(sd, cfg)
    with pytest.raises(hf_gpt2.InteropError, match="scale_attn_by_inverse_layer_idx"):
        hf_gpt2.model_fields_from_hf(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(hf_gpt2.InteropError, match="exportable ones"):
        hf_gpt2.hf_config_from_model(dataclasses.replace(cfg, activation="swish_nonexistent"))


def test_an_imported_gpt2_vocabulary_model_names_the_gpt2_tokenizer(tmp_path):
    """A 50257-token model is OpenAI's BPE: the workdir's tokenizer.json names tiktoken's gpt2,
    so `python -m gpt_jax.sample` can decode in it (where tiktoken's file is available)."""
    hf = hf_model(vocab_size=hf_gpt2.GPT2_VOCAB_SIZE, n_embd=16, n_layer=1, n_head=2)
    hf.save_pretrained(tmp_path / "hf")
    assert convert_hf.main(["import", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w'}"]) == 0
    assert json.loads((tmp_path / "w" / "tokenizer.json").read_text()) == {"name": "gpt2"}
    assert json.loads((tmp_path / "w" / "config.json").read_text())["data"]["tokenizer"] == "gpt2"


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny random GPT2LMHeadModel and its tokenizer, saved by transformers into one folder."""
    tokenizer = hf_tokenizer()
    model = hf_model(seed=2, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model, tokenizer


@pytest.mark.slow  # The import's logits are checked by default (test_hf_model_imports_with_equal_logits).
def test_an_imported_workdir_computes_and_samples_as_transformers(hf_folder, tmp_path):
    """Issue 13: float32 unless --dtype says otherwise, and the HF tokenizer made the workdir's
    own (held whole, so a moved workdir still decodes), through the paths sampling takes."""
    folder, hf, hf_tok = hf_folder
    assert convert_hf.main(["import", f"--hf={folder}", f"--workdir={tmp_path / 'w'}"]) == 0
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["model"]["dtype"] == "float32"
    assert config["data"]["tokenizer"] == f"hf:{(tmp_path / 'w/hf_tokenizer/tokenizer.json').resolve()}"
    (tmp_path / "w").rename(tmp_path / "moved")
    w = tmp_path / "moved"

    _, hparams, params, step = weights.load_trained(w)
    assert step == 0 and hparams.dtype == "float32"
    toks = tokens(hparams.vocab_size)
    np.testing.assert_allclose(our_logits(hparams, params, toks), hf_logits(hf, toks),
                               atol=1e-4, rtol=0)

    tok, model, params, _ = sample.load_run(w)
    prompt = "hello world"
    assert tok.encode(prompt).tolist() == hf_tok.encode(prompt)
    out = generate(model, params, [tok.encode(prompt)], 5, jax.random.key(0),
                   SamplingParams(temperature=0.0))[0]
    assert len(out) == len(tok.encode(prompt)) + 5
    assert tok.decode(out.tolist()) == hf_tok.decode(out.tolist())
    assert tok.decode(out.tolist()).startswith(prompt)


def test_gpt2_vocab_and_merges_convert_to_the_workdirs_tokenizer(hf_folder, tmp_path):
    """A folder with GPT2Tokenizer's vocab.json + merges.txt and no tokenizer.json: converted
    offline; --dtype=bfloat16 is the recipe's dtype on request."""
    folder, _, hf_tok = hf_folder
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "model.safetensors"):
        (old / name).write_bytes((folder / name).read_bytes())
    hf_tok.backend_tokenizer.model.save(str(old))  # vocab.json, merges.txt
    assert convert_hf.main(["import", f"--hf={old}", f"--workdir={tmp_path / 'w'}",
                            "--dtype=bfloat16"]) == 0
    w = tmp_path / "w"
    assert json.loads((w / "config.json").read_text())["model"]["dtype"] == "bfloat16"
    assert sorted(p.name for p in (w / "hf_tokenizer").iterdir()) == [
        "merges.txt", "tokenizer.json", "vocab.json"]
    tok = load_tokenizer(w / "tokenizer.json")
    text = "the quick brown fox, hello"
    assert tok.encode(text).tolist() == hf_tok.encode(text) and tok.decode(tok.encode(text)) == text


@pytest.mark.slow  # Two CLI subprocesses (~10 s): the acceptance commands of issue 13.
def test_cli_import_then_sample(hf_folder, tmp_path):
    folder, _, _ = hf_folder
    w = tmp_path / "imp"
    r = subprocess.run([sys.executable, "tools/convert_hf.py", "import", f"--hf={folder}",
                        f"--workdir={w}"], capture_output=True, text=True, timeout=300,
                       cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and "computing in float32" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "gpt_jax.sample", f"--workdir={w}", "--prompt=hello",
                        "--max_new_tokens=5"], capture_output=True, text=True, timeout=300,
                       cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    (text,) = r.stdout.split("-" * 40 + "\n")[1:]
    assert text.startswith("hello") and len(text.rstrip("\n")) > len("hello")


# ------------------------------------------------------------------------------ bad invocations
# Every refusal of tools/convert_hf.py, as a subprocess (conftest's bad_invocation): one `error:`
# line naming the problem and the fix, no traceback, nothing that existed changed, no output left.
# A row costs one interpreter start (~2 s; ~5 s once torch reads weights): the default suite runs
# the cases, --runslow all.

TOOL = pathlib.Path(__file__).resolve().parent.parent / "tools" / "convert_hf.py"


def _hf_variant(hf: pathlib.Path, folder: pathlib.Path, drop=(), write=None) -> pathlib.Path:
    """A copy of the HF folder `hf` at `folder`, without the files `drop`, with `write` (name →
    bytes) written over it."""
    shutil.copytree(hf, folder)
    for name in drop:
        (folder / name).unlink()
    for name, content in (write or {}).items():
        (folder / name).write_bytes(content)
    return folder


def _truncated(path: pathlib.Path) -> bytes:
    """The bytes of `path` but its last 100: an interrupted download or copy."""
    return path.read_bytes()[:-100]


def _config_with(hf: pathlib.Path, **fields) -> bytes:
    return json.dumps({**json.loads((hf / "config.json").read_text()), **fields}).encode()


def _fake_workdir(folder: pathlib.Path, *names: str) -> pathlib.Path:
    """A folder holding `names` (a trailing / makes a folder, with a file in it); a config.json
    is an HF one in a folder without checkpoints/, else a gpt_jax one."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith("/"):
            (folder / name).mkdir()
            (folder / name / "0").write_text("x")
        elif name == "config.json":
            hf = "checkpoints/" not in names and "params/" not in names
            (folder / name).write_text(json.dumps({"model_type": "gpt2"} if hf else {"model": {}}))
        else:
            (folder / name).write_text("x")
    return folder


def _removed(folder: pathlib.Path) -> pathlib.Path:
    shutil.rmtree(folder)
    return folder


def _emptied(folder: pathlib.Path) -> pathlib.Path:
    _removed(folder).mkdir()
    return folder


# (id, setup(hf, tmp) → (--hf, --workdir, extra flags), words of the error line). The workdirs
# are made under tmp/dest, which is protected (no temporary folders left in it either).
IMPORT_ROWS = [
    ("hf-missing", lambda hf, t: (t / "nope", t / "dest/w", []), ["nope", "no such folder",
                                                                  "config.json"]),
    ("hf-a-file", lambda hf, t: (hf / "model.safetensors", t / "dest/w", []),
     ["is a file", "give the folder"]),
    ("no-config", lambda hf, t: (_hf_variant(hf, t / "bad", drop=["config.json"]), t / "dest/w",
                                 []), ["no config.json", "save_pretrained"]),
    ("garbage-config", lambda hf, t: (_hf_variant(hf, t / "bad", write={"config.json": b"{not"}),
                                      t / "dest/w", []),
     ["config.json is not valid json", "give the config.json"]),
    ("not-gpt2", lambda hf, t: (_hf_variant(hf, t / "bad", write={
        "config.json": _config_with(hf, model_type="bert")}), t / "dest/w", []),
     ["model_type='bert'", "GPT-2", "Llama"]),
    ("config-value", lambda hf, t: (_hf_variant(hf, t / "bad", write={
        "config.json": _config_with(hf, n_embd="abc")}), t / "dest/w", []),
     ["n_embd", "give the config.json"]),
    ("no-weights", lambda hf, t: (_hf_variant(hf, t / "bad", drop=["model.safetensors"]),
                                  t / "dest/w", []), ["no model.safetensors", "save_pretrained"]),
    ("truncated-safetensors", lambda hf, t: (_hf_variant(hf, t / "bad", write={
        "model.safetensors": _truncated(hf / "model.safetensors")}), t / "dest/w", []),
     ["model.safetensors is not a complete safetensors file", "incomplete metadata",
      "download or export it again"]),
    ("garbage-pytorch-bin", lambda hf, t: (_hf_variant(
        hf, t / "bad", drop=["model.safetensors"], write={"pytorch_model.bin": b"garbage"}),
        t / "dest/w", []), ["pytorch_model.bin", "truncated", "download or save it again"]),
    ("missing-shard", lambda hf, t: (_hf_variant(
        hf, t / "bad", drop=["model.safetensors"], write={"model.safetensors.index.json": json.dumps(
            {"weight_map": {"wte": "model-00001-of-00002.safetensors"}}).encode()}),
        t / "dest/w", []), ["lacks model-00001-of-00002.safetensors", "download the missing"]),
    ("workdir-a-training-run", lambda hf, t: (hf, t / "dest/run", []),
     ["already holds a training run", "new or empty folder"]),
    ("workdir-an-import", lambda hf, t: (hf, _fake_workdir(t / "dest/imp", "config.json",
                                                           "params/"), []),
     ["already holds an imported model", "new or empty folder"]),
    ("workdir-other-files", lambda hf, t: (hf, _fake_workdir(t / "dest/notes", "notes.txt"), []),
     ["already holds files (notes.txt)", "new or empty folder"]),
    ("workdir-a-file", lambda hf, t: (hf, _fake_workdir(t / "dest", "file") / "file", []),
     ["is a file", "new folder"]),
    ("workdir-under-a-file", lambda hf, t: (hf, _fake_workdir(t / "dest", "file") / "file/w", []),
     ["is a file, not a folder", "choose another --workdir"]),
    pytest.param("workdir-read-only", lambda hf, t: (hf, t / "dest/ro/w", []),
                 ["not writable", "permissions"],
                 marks=pytest.mark.not_as_root("root writes into read-only folders")),
    ("bad-dtype", lambda hf, t: (hf, t / "dest/w", ["--dtype=float16"]),
     ["float16", "--help"]),
    ("empty-hf", lambda hf, t: ("", t / "dest/w", []), ["--hf is empty", "give a path"]),
]
IMPORT_DEFAULT = {"workdir-a-training-run", "workdir-a-file"}


def _rows(rows, default):
    """pytest params of `rows`, slow unless named in `default`."""
    out = []
    for row in rows:
        marks = list(row.marks) if hasattr(row, "marks") else []
        values = row.values if hasattr(row, "values") else row
        if values[0] not in default:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(*values[1:], id=values[0], marks=marks))
    return out


@pytest.mark.parametrize("setup,words", _rows(IMPORT_ROWS, IMPORT_DEFAULT))
def test_import_refuses_bad_invocations_in_one_line(setup, words, hf_folder, trained_run,
                                                    tmp_path, bad_invocation):
    folder, _, _ = hf_folder
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copytree(trained_run, dest / "run")
    (dest / "ro").mkdir()
    (dest / "ro").chmod(0o555)
    hf, workdir, extra = setup(folder, tmp_path)
    protect = [folder, dest] + ([hf] if str(hf) and pathlib.Path(hf).exists() else [])
    absent = [] if pathlib.Path(workdir).exists() else [workdir]
    try:
        bad_invocation([sys.executable, TOOL, "import", f"--hf={hf}", f"--workdir={workdir}",
                        *extra], *words, protect=protect, absent=absent)
    finally:
        (dest / "ro").chmod(0o755)  # So that pytest can remove it.


# (id, setup(run, tmp) → argv after the tool, words of the error line). `run` is a copy of a
# finished run (checkpoints 2 and 4); outputs go under tmp/dest, which is protected.
EXPORT_ROWS = [
    ("workdir-missing", lambda run, t: ["export", f"--workdir={t / 'nope'}",
                                        f"--out={t / 'dest/o'}"], ["nope", "no such folder"]),
    ("workdir-not-a-run", lambda run, t: [
        "export", f"--workdir={_fake_workdir(t / 'notes', 'notes.txt')}", f"--out={t / 'dest/o'}"],
     ["not a gpt_jax workdir", "give a training run's"]),
    ("workdir-an-hf-folder", lambda run, t: [
        "export", f"--workdir={_fake_workdir(t / 'hf', 'config.json')}", f"--out={t / 'dest/o'}"],
     ["is a hugging face folder", "import reads hf folders"]),
    ("run-without-checkpoints", lambda run, t: [
        "export", f"--workdir={_removed(run / 'checkpoints').parent}", f"--out={t / 'dest/o'}"],
     ["no checkpoints/ folder", "export once it has"]),
    ("run-with-empty-checkpoints", lambda run, t: [
        "export", f"--workdir={_emptied(run / 'checkpoints').parent}", f"--out={t / 'dest/o'}"],
     ["holds no checkpoint yet", "export once it has"]),
    ("step-missing", lambda run, t: ["export", f"--workdir={run}", f"--out={t / 'dest/o'}",
                                     "--checkpoint=99"], ["step 99", "[2, 4]"]),
    ("step-not-a-number", lambda run, t: ["export", f"--workdir={run}", f"--out={t / 'dest/o'}",
                                          "--checkpoint=abc"], ["'abc'", "newest, best", "--help"]),
    ("out-is-the-workdir", lambda run, t: ["export", f"--workdir={run}", f"--out={run}"],
     ["run's own workdir", "folder outside it"]),
    ("out-in-its-checkpoints", lambda run, t: ["export", f"--workdir={run}",
                                               f"--out={run / 'checkpoints'}"],
     ["inside the run's checkpoints/", "folder outside it"]),
    ("out-holds-the-workdir", lambda run, t: ["export", f"--workdir={run}", f"--out={t}"],
     ["holds the run's workdir", "folder outside it"]),
    ("out-another-workdir", lambda run, t: [
        "export", f"--workdir={run}",
        f"--out={_fake_workdir(t / 'dest/other', 'config.json', 'checkpoints/', 'metrics.jsonl')}"],
     ["a gpt_jax workdir (checkpoints, metrics.jsonl)", "new or empty folder"]),
    ("out-other-files", lambda run, t: [
        "export", f"--workdir={run}", f"--out={_fake_workdir(t / 'dest/notes', 'notes.txt')}"],
     ["not a hugging face export", "notes.txt", "new or empty folder"]),
    ("out-a-file", lambda run, t: ["export", f"--workdir={run}",
                                   f"--out={_fake_workdir(t / 'dest/f', 'file') / 'file'}"],
     ["is a file", "new folder"]),
    pytest.param("out-read-only", lambda run, t: ["export", f"--workdir={run}",
                                                  f"--out={t / 'dest/ro/o'}"],
                 ["not writable", "permissions"],
                 marks=pytest.mark.not_as_root("root writes into read-only folders")),
    ("no-subcommand", lambda run, t: [], ["required", "{import,export}", "--help"]),
    ("unknown-flag", lambda run, t: ["export", f"--workdir={run}", f"--out={t / 'dest/o'}",
                                     "--bogus"], ["unrecognized arguments: --bogus", "--help"]),
    ("missing-flag", lambda run, t: ["export", f"--workdir={run}"],
     ["required: --out", "--help"]),
]
EXPORT_DEFAULT = {"out-is-the-workdir", "workdir-not-a-run"}  # The rest with --runslow.


@pytest.mark.parametrize("setup,words", _rows(EXPORT_ROWS, EXPORT_DEFAULT))
def test_export_refuses_bad_invocations_in_one_line(setup, words, trained_run, tmp_path,
                                                    bad_invocation):
    run, dest = tmp_path / "run", tmp_path / "dest"
    shutil.copytree(trained_run, run)
    dest.mkdir()
    (dest / "ro").mkdir()
    (dest / "ro").chmod(0o555)
    argv = setup(run, tmp_path)
    try:
        bad_invocation([sys.executable, TOOL, *argv], *words, protect=[run, dest],
                       absent=[dest / "o"])
    finally:
        (dest / "ro").chmod(0o755)


def test_a_failed_conversion_leaves_nothing_half_written(hf_folder, trained_run, tmp_path,
                                                         monkeypatch, capsys):
    """A conversion that fails while writing (here: the disk fills up after the weights) leaves
    no workdir, no temporary folder, and an earlier export as it was; run again, it succeeds."""
    folder, _, _ = hf_folder
    dest = tmp_path / "dest"
    dest.mkdir()
    full = OSError(errno.ENOSPC, "No space left on device", str(dest / "x"))
    save_params = weights.save_params

    def save_then_fill_up(*args):
        save_params(*args)
        raise full

    monkeypatch.setattr(weights, "save_params", save_then_fill_up)
    with pytest.raises(SystemExit, match="1"):
        convert_hf.main(["import", f"--hf={folder}", f"--workdir={dest / 'w' / 'deep'}"])
    assert "disk is full" in capsys.readouterr().err
    assert list(dest.iterdir()) == []  # Neither w/deep, nor w (made for it), nor a temporary.
    monkeypatch.undo()

    out = dest / "hf"
    assert convert_hf.main(["export", f"--workdir={trained_run}", f"--out={out}",
                            "--checkpoint=2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(convert_hf, "_copy_tokenizers", lambda *args: (_ for _ in ()).throw(full))
    with pytest.raises(SystemExit, match="1"):
        convert_hf.main(["export", f"--workdir={trained_run}", f"--out={out}"])
    assert "disk is full" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in dest.iterdir()] == ["hf"]
    monkeypatch.undo()
    assert convert_hf.main(["export", f"--workdir={trained_run}", f"--out={out}"]) == 0  # Step 4.
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


@pytest.mark.slow  # A training start (~12 s: it compiles before it reads the weights).
def test_init_from_a_truncated_hf_folder_is_one_line(hf_folder, tiny_config, train_command,
                                                     tmp_path, bad_invocation):
    """checkpoint.init_from=hf:DIR reads through the same function as import: a truncated
    model.safetensors ends the run with one line, not the reader's traceback."""
    folder, _, _ = hf_folder
    bad = _hf_variant(folder, tmp_path / "bad", write={
        "model.safetensors": _truncated(folder / "model.safetensors")})
    config = tiny_config(**{
        "model.num_layers": 2,
        "model.vocab_size": json.loads((folder / "config.json").read_text())["vocab_size"],
        "model.vocab_multiple": 1, "model.bias": True, "model.activation": "gelu_tanh",
        "data.seq_len": 16, "train.num_steps": 2, "train.batch_size": 4, "optim.warmup_steps": 1,
        "optim.decay_steps": 10, "log.tensorboard": False, "sample.num_samples": 0,
        "checkpoint.init_from": f"hf:{bad}"})
    bad_invocation(train_command(tmp_path / "run", config), "checkpoint.init_from=hf:",
                   "model.safetensors is not a complete safetensors file",
                   "download or export it again", protect=[bad],
                   cwd=pathlib.Path(__file__).resolve().parent.parent)


def test_a_bad_hf_init_from_is_refused_before_the_compile(tiny_config, hf_folder, tmp_path, caplog):
    """A missing folder, or a GPT-2 of another shape than the run's model: refused from its
    config.json alone, before the train step compiles and before any weight is read."""
    import logging

    from gpt_jax.training import loop

    for source, words in ((tmp_path / "nope", "no such folder"), (hf_folder[0], "vocab_size=64")):
        c = tiny_config(**{"checkpoint.init_from": f"hf:{source}"})
        with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(ValueError, match=words):
            loop.run(c, tmp_path / "run")
        assert "compiled" not in caplog.text
        caplog.clear()


@pytest.mark.parametrize("fields, word", [
    ({"mlp": "relu2"}, "model.mlp"), ({"positions": "rope"}, "model.positions"),
    ({"logit_softcap": 30.0}, "model.logit_softcap"), ({"num_kv_heads": 2}, "num_kv_heads"),
])
def test_a_model_gpt2_cannot_express_is_refused_both_ways(fields, word):
    """GPT-2 weights into (import, init_from=hf:) or out of (export) a variant GPT-2 lacks: one
    line naming the field, before any weight moves (an relu2 MLP has GPT-2's very tree)."""
    from configs import base
    from gpt_jax.interop import hf_gpt2
    from gpt_jax.models import registry

    c = base.get_config()
    c.model.update(fields)
    cfg = registry.hyperparameters(c, 64)
    with pytest.raises(hf_gpt2.InteropError, match=word):
        hf_gpt2.require_gpt2_block(cfg, "no")
