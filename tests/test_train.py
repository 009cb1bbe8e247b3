"""End to end: a short run through the loop (and, slow, the real CLI), its workdir files,
determinism, prepared folders."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest

from configs import openwebtext, shakespeare_char
from gpt_jax.config import ConfigError, to_json
from gpt_jax.data import prepare_stream, tokenizers
from gpt_jax.models import registry
from gpt_jax.parallel import sharding
from gpt_jax.training import build, checkpoint, loop, resume


@pytest.fixture(scope="module")
def shared_runs():
    """Runs trained once per module, by the first test that asks (function-scoped fixtures such
    as tiny_config cannot feed a module-scoped one); tests copy a workdir before changing it."""
    return {}


@pytest.fixture
def trained(tiny_config, tmp_path, shared_runs, capsys):
    """(workdir, returned metrics, stdout) of a finished tiny_config() run: 40 steps, evals at 0,
    20 and 40 (full), one sample of the prompt "def" at the end."""
    if "trained" not in shared_runs:
        out = loop.run(tiny_config(**{"sample.prompt": "def"}), tmp_path / "trained")
        shared_runs["trained"] = tmp_path / "trained", out, capsys.readouterr().out
    return shared_runs["trained"]


def test_run_writes_workdir_and_learns(trained, corpus, metrics_rows):
    workdir, out, stdout = trained
    vocab = len(set(corpus.read_text()))
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["vocab_size"] == vocab  # Resolved from the tokenizer.
    assert config["model"]["arch"] == "gpt" and config["train"]["num_steps"] == 40
    assert tokenizers.load_tokenizer(workdir / "tokenizer.json").vocab_size == vocab
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["40"]

    rows = metrics_rows(workdir)
    train = [m for m in rows if "train/loss" in m]
    evals = [m for m in rows if "val/loss" in m]
    assert [m["step"] for m in train] == [1, *range(5, 41, 5)]
    assert {"lr", "tokens_per_sec", "mfu", "grad_norm", "train/nonfinite_steps"} <= set(train[-1])
    assert train[-1]["tokens_per_sec"] > 0 and train[-1]["train/nonfinite_steps"] == 0
    assert [m["step"] for m in evals] == [0, 20, 40]
    assert [m["val/split"] for m in evals] == ["batches", "batches", "full"]
    assert evals[0]["val/loss"] == pytest.approx(math.log(vocab), abs=0.3)
    assert evals[-1]["val/loss"] < 0.75 * evals[0]["val/loss"]
    assert evals[-1]["val/ppl"] == pytest.approx(math.exp(evals[-1]["val/loss"]), rel=1e-6)
    assert out["val/loss"] == evals[-1]["val/loss"] and out["train/loss"] == train[-1]["train/loss"]
    samples = stdout.split("-" * 40 + "\n")[1:]
    assert len(samples) == 1 and samples[0].startswith("def")  # Decoded, from the prompt.
    assert len(samples[0].rstrip("\n")) > len("def")


@pytest.mark.slow
def test_cli_run_writes_workdir_and_learns(tiny_config, corpus, tmp_path, metrics_rows,
                                           train_command):
    """The real CLI: flags → config → a run whose workdir, metrics and sample are complete."""
    workdir = tmp_path / "run"
    c = tiny_config(**{"train.num_steps": 60, "train.eval_every": 30, "sample.max_new_tokens": 30,
                       "sample.prompt": "def"})
    r = subprocess.run(train_command(workdir, c), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["vocab_size"] == len(set(corpus.read_text()))
    # The flags made exactly this config (resolved: the vocabulary and context filled in).
    assert config == json.loads(to_json(registry.resolve(c, config["model"]["vocab_size"])))
    assert (workdir / "tokenizer.json").exists()
    assert list((workdir / "tb").glob("events.out.tfevents.*"))

    rows = metrics_rows(workdir)
    train = [m for m in rows if "train/loss" in m]
    evals = [m for m in rows if "val/loss" in m]
    assert [m["step"] for m in train] == [1, *range(5, 61, 5)]
    assert train[-1]["tokens_per_sec"] > 0
    assert [m["step"] for m in evals] == [0, 30, 60]
    assert evals[-1]["val/split"] == "full"
    assert evals[-1]["val/loss"] < 0.6 * evals[0]["val/loss"]
    samples = r.stdout.split("-" * 40 + "\n")[1:]
    assert len(samples) == 1 and samples[0].startswith("def")  # Decoded, from the prompt.


@pytest.mark.slow
def test_same_seed_same_numbers(tiny_config, tmp_path, metrics_rows):
    a = loop.run(tiny_config(), tmp_path / "a")
    b = loop.run(tiny_config(), tmp_path / "b")
    assert metrics_rows(tmp_path / "a", timing=False) == metrics_rows(tmp_path / "b", timing=False)
    assert a["val/loss"] == b["val/loss"]
    other = loop.run(tiny_config(**{"train.seed": 1}), tmp_path / "c")
    assert other["val/loss"] != a["val/loss"]


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch(tiny_config, tmp_path):
    """Accumulating 4 micro-batches gives the step one full batch gives (float32 rounding)."""
    runs = {}
    for accum in (1, 4):
        c = tiny_config(**{"train.grad_accum_steps": accum, "train.num_steps": 5,
                           "train.eval_every": 5, "optim.warmup_steps": 2,
                           "train.final_eval": "batches", "sample.num_samples": 0})
        runs[accum] = loop.run(c, tmp_path / f"acc{accum}")
    np.testing.assert_allclose(runs[1]["train/loss"], runs[4]["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(runs[1]["val/loss"], runs[4]["val/loss"], rtol=1e-5)


def test_rerun_keeps_earlier_metrics_and_repeats_the_numbers(trained, tiny_config, tmp_path,
                                                            metrics_rows):
    """A finished run run again has nothing to do; without its checkpoints it starts over, keeps
    the earlier metrics aside, and (same config, same seed) writes the same numbers again."""
    workdir = tmp_path / "w"
    shutil.copytree(trained[0], workdir)
    first = (workdir / "metrics.jsonl").read_text()
    config = tiny_config(**{"sample.num_samples": 0})
    loop.run(config, workdir)  # Finished: resumes at step 40, nothing to do.
    assert (workdir / "metrics.jsonl").read_text() == first
    shutil.rmtree(workdir / "checkpoints")  # Now it starts from scratch again.
    again = loop.run(config, workdir)
    assert (workdir / "metrics.prev1.jsonl").read_text() == first
    # Only this run's rows, and bitwise the first run's: losses, grad norms, lrs, val losses.
    assert metrics_rows(workdir, timing=False) == metrics_rows(trained[0], timing=False)
    assert again["val/loss"] == trained[1]["val/loss"]


# Documents for the prepared-folder runs: JSONL records, so each ends with the end-of-text token.
DOCS = [f"Document {i}. " + " ".join(f"word{(i * j) % 37} is {j % 5}" for j in range(60))
        for i in range(60)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A bpe folder of the documents in shards of ~1,500 tokens, so windows cross shards."""
    root = tmp_path_factory.mktemp("prepared")
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    prepare_stream.prepare_folder(str(source), "bpe", root / "bpe", vocab_size=300,
                                  shard_tokens=1500, chunk_bytes=4096, num_workers=1,
                                  show_progress=False)
    return root / "bpe"


def test_prepared_folder_sets_the_vocab_and_the_workdirs_tokenizer(prepared, tmp_path):
    """A char recipe on a bpe folder: the folder's vocabulary and tokenizer, which the workdir
    keeps for decoding, whatever data.tokenizer says."""
    c = shakespeare_char.get_config("cpu")
    c.data.prepared = str(prepared)
    r = build.setup(c, tmp_path / "w")
    assert r.config.model.vocab_size == r.hparams.vocab_size == 300
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(r.workdir), keep=1)
    with sharding.activation_context(r.mesh, r.rules):
        _, start = resume.initial_state(r, manager, None)  # A new run: no data position.
    assert start == 0
    tok = tokenizers.load_tokenizer(tmp_path / "w" / "tokenizer.json")
    assert tok.to_dict() == tokenizers.load_tokenizer(prepared / "tokenizer.json").to_dict()
    assert tok.name == "bpe"


@pytest.mark.slow
def test_prepared_folder_run_shape(prepared, tmp_path, metrics_rows):
    """The acceptance run's shape: shakespeare_char.py:cpu (a char recipe) on a bpe folder."""
    c = shakespeare_char.get_config("cpu")
    c.data.prepared = str(prepared)
    c.model.num_layers = 2
    c.train.num_steps, c.log.progress, c.sample.num_samples = 3, False, 0
    meta = json.loads((prepared / "meta.json").read_text())
    assert len(meta["shards"]) > 2
    out = loop.run(c, tmp_path / "w")
    assert np.isfinite(out["val/loss"])
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["model"]["vocab_size"] == meta["vocab_size"] == 300  # The folder's, not char's.
    # The workdir decodes with the folder's tokenizer (what `python -m gpt_jax.sample` loads).
    tok = tokenizers.load_tokenizer(tmp_path / "w" / "tokenizer.json")
    assert tok.to_dict() == tokenizers.load_tokenizer(prepared / "tokenizer.json").to_dict()
    assert tok.name == "bpe"
    evals = [m for m in metrics_rows(tmp_path / "w") if "val/loss" in m]
    assert evals[-1]["val/split"] == "full" and evals[-1]["val/tokens"] == meta["val_tokens"] - 1


@pytest.mark.slow
def test_openwebtext_pipeline_on_a_local_sample(prepared, tmp_path, metrics_rows):
    """configs/openwebtext.py with a tiny model on a local stand-in (bpe for gpt2, offline): a
    mixture of two folders, document mask on; a resumed run equals an uninterrupted one."""
    other = tmp_path / "other"  # The same documents in other shards: the same tokenizer.
    shutil.copytree(prepared, other)

    def config(num_steps):
        c = openwebtext.get_config(None)
        c.data.prepared = f"{prepared},{other}"
        c.data.mixture_weights = "0.75,0.25"
        c.data.document_mask = True
        c.data.seq_len, c.model.max_seq_len = 32, 32
        c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 32
        c.model.dtype = "float32"
        c.train.batch_size, c.train.grad_accum_steps = 8, 2
        c.train.num_steps, c.train.eval_every, c.train.eval_batches = num_steps, 2, 1
        c.train.final_eval = "batches"
        c.optim.warmup_steps, c.optim.decay_steps = 2, 10
        c.checkpoint.every, c.log.every, c.log.progress = 2, 1, False
        c.sample.num_samples = 0
        return c

    straight = loop.run(config(4), tmp_path / "a")
    loop.run(config(2), tmp_path / "b")
    resumed = loop.run(config(4), tmp_path / "b")
    assert metrics_rows(tmp_path / "a", timing=False) == metrics_rows(tmp_path / "b", timing=False)
    assert resumed["val/loss"] == straight["val/loss"] and np.isfinite(straight["val/loss"])


def test_prepared_folder_problems_are_one_line_config_errors(prepared, tmp_path):
    byte = tmp_path / "byte"
    prepare_stream.prepare_folder(str(prepared.parent / "docs.jsonl"), "byte", byte,
                                  num_workers=1, show_progress=False)
    c = shakespeare_char.get_config("cpu")
    cases = [
        (str(tmp_path / "missing"), False, "not a prepared data folder"),
        (f"{prepared},{byte}", False, "different tokenizers"),
        (str(byte), True, "document_mask=True needs end-of-text tokens"),
    ]
    for folders, mask, match in cases:
        c.data.prepared, c.data.document_mask = folders, mask
        with pytest.raises(ConfigError, match=match) as e:
            build.load_data(c)
        assert "\n" not in str(e.value)


def test_vocab_size_without_data_reads_the_prepared_folder(prepared, tmp_path):
    c = shakespeare_char.get_config("cpu")
    c.data.prepared = str(prepared)
    assert build.vocab_size_without_data(c) == 300
    c = openwebtext.get_config(None)
    c.data.prepared = str(tmp_path / "not_prepared_yet")
    assert build.vocab_size_without_data(c) == 50257  # The gpt2 tokenizer's.


def test_in_process_bpe_takes_data_vocab_size(tiny_config):
    data = build.load_data(tiny_config(**{"data.tokenizer": "bpe", "data.vocab_size": 300}))
    assert data.tokenizer.name == "bpe" and data.tokenizer.vocab_size == 300
    assert data.weights is None and len(data.val_tokens()) > 0
