"""End to end: a short run through the real CLI and loop, its workdir files, determinism."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import base, openwebtext, shakespeare_char
from gpt_jax.config import ConfigError
from gpt_jax.data import prepare_stream, tokenizers
from gpt_jax.training import trainer

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def tiny_config(corpus, cache_dir):
    c = base.get_config()
    c.data.path = str(corpus)
    c.data.cache_dir = str(cache_dir)
    c.data.tokenizer = "char"
    c.data.seq_len = 32
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 32
    c.train.batch_size = 8
    c.train.num_steps = 40
    c.train.eval_every = 20
    c.train.eval_batches = 2
    c.optim.warmup_steps = 5
    c.optim.lr = 3e-3
    c.log.every = 5
    c.log.progress = False
    c.sample.num_samples = 1
    c.sample.max_new_tokens = 20
    return c


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cli_run_writes_workdir_and_learns(corpus, tmp_path):
    workdir = tmp_path / "run"
    overrides = {
        "data.path": corpus, "data.cache_dir": tmp_path / "cache", "data.tokenizer": "char",
        "data.seq_len": 32, "model.num_layers": 2, "model.num_heads": 2, "model.d_model": 32,
        "train.batch_size": 8, "train.num_steps": 60, "train.eval_every": 30,
        "train.eval_batches": 2, "optim.warmup_steps": 5, "optim.lr": 3e-3, "log.every": 5,
        "sample.max_new_tokens": 30, "sample.prompt": "def", "train.final_eval": "full",
    }
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    r = subprocess.run(
        [sys.executable, "-m", "gpt_jax.train", f"--workdir={workdir}", *args],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["vocab_size"] == len(set(TEXT))  # Resolved from the tokenizer.
    assert config["train"]["num_steps"] == 60
    assert (workdir / "tokenizer.json").exists()
    assert list((workdir / "tb").glob("events.out.tfevents.*"))

    rows = read_metrics(workdir)
    train = [m for m in rows if "train/loss" in m]
    evals = [m for m in rows if "val/loss" in m]
    assert [m["step"] for m in train] == [1, *range(5, 61, 5)]
    assert {"lr", "tokens_per_sec", "mfu", "grad_norm"} <= set(train[-1])
    assert train[-1]["tokens_per_sec"] > 0
    assert [m["step"] for m in evals] == [0, 30, 60]
    assert evals[-1]["val/split"] == "full"
    assert evals[0]["val/loss"] == pytest.approx(math.log(len(set(TEXT))), abs=0.3)
    assert evals[-1]["val/loss"] < 0.6 * evals[0]["val/loss"]
    assert evals[-1]["val/ppl"] == pytest.approx(math.exp(evals[-1]["val/loss"]), rel=1e-6)
    assert "def" in r.stdout  # The final sample, decoded, starts with the prompt.


def test_same_seed_same_numbers(corpus, tmp_path):
    a = trainer.run(tiny_config(corpus, tmp_path / "cache"), tmp_path / "a")
    b = trainer.run(tiny_config(corpus, tmp_path / "cache"), tmp_path / "b")
    strip = ("tokens_per_sec", "mfu", "gflops_per_sec")
    rows_a = [{k: v for k, v in m.items() if k not in strip} for m in read_metrics(tmp_path / "a")]
    rows_b = [{k: v for k, v in m.items() if k not in strip} for m in read_metrics(tmp_path / "b")]
    assert rows_a == rows_b
    c = tiny_config(corpus, tmp_path / "cache")
    c.train.seed = 1
    other = trainer.run(c, tmp_path / "c")
    assert other["val/loss"] != a["val/loss"]
    assert a["val/loss"] == b["val/loss"]


def test_grad_accumulation_matches_one_big_batch(corpus, tmp_path):
    """Accumulating 4 micro-batches gives the step one full batch gives (float32 rounding)."""
    runs = {}
    for accum in (1, 4):
        c = tiny_config(corpus, tmp_path / "cache")
        c.train.grad_accum_steps = accum
        c.train.num_steps, c.train.eval_every, c.optim.warmup_steps = 5, 5, 2
        c.train.final_eval = "batches"
        c.sample.num_samples = 0
        runs[accum] = trainer.run(c, tmp_path / f"acc{accum}")
    np.testing.assert_allclose(runs[1]["train/loss"], runs[4]["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(runs[1]["val/loss"], runs[4]["val/loss"], rtol=1e-5)


def test_rerun_in_a_used_workdir_keeps_earlier_metrics(corpus, tmp_path):
    c = tiny_config(corpus, tmp_path / "cache")
    c.train.num_steps, c.train.eval_every, c.sample.num_samples = 10, 10, 0
    trainer.run(c, tmp_path / "w")
    first = (tmp_path / "w" / "metrics.jsonl").read_text()
    trainer.run(c, tmp_path / "w")  # Finished: resumes at step 10 and has nothing to do.
    assert (tmp_path / "w" / "metrics.jsonl").read_text() == first
    shutil.rmtree(tmp_path / "w" / "checkpoints")  # Now it starts from scratch again.
    trainer.run(c, tmp_path / "w")
    assert (tmp_path / "w" / "metrics.prev1.jsonl").read_text() == first
    steps = [m["step"] for m in read_metrics(tmp_path / "w") if "train/loss" in m]
    assert steps == sorted(set(steps))  # No rows from the earlier run mixed in.


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


def test_prepared_folder_run_shape(prepared, tmp_path, capsys):
    """The acceptance run's shape: shakespeare_char.py:cpu (a char recipe) on a bpe folder."""
    c = shakespeare_char.get_config("cpu")
    c.data.prepared = str(prepared)
    c.model.num_layers = 2
    c.train.num_steps, c.log.progress, c.sample.max_new_tokens = 3, False, 10
    meta = json.loads((prepared / "meta.json").read_text())
    assert len(meta["shards"]) > 2
    out = trainer.run(c, tmp_path / "w")
    assert np.isfinite(out["val/loss"])
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["model"]["vocab_size"] == meta["vocab_size"] == 300  # The folder's, not char's.
    # The workdir decodes with the folder's tokenizer (what `python -m gpt_jax.sample` loads).
    tok = tokenizers.load_tokenizer(tmp_path / "w" / "tokenizer.json")
    assert tok.to_dict() == tokenizers.load_tokenizer(prepared / "tokenizer.json").to_dict()
    assert tok.name == "bpe"
    evals = [m for m in read_metrics(tmp_path / "w") if "val/loss" in m]
    assert evals[-1]["val/split"] == "full" and evals[-1]["val/tokens"] == meta["val_tokens"] - 1
    assert capsys.readouterr().out.count("-" * 40) == 1  # The end-of-run sample, decoded.


def test_openwebtext_pipeline_on_a_local_sample(prepared, tmp_path):
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

    straight = trainer.run(config(4), tmp_path / "a")
    trainer.run(config(2), tmp_path / "b")
    resumed = trainer.run(config(4), tmp_path / "b")
    strip = ("tokens_per_sec", "mfu", "gflops_per_sec")
    rows = [[{k: v for k, v in m.items() if k not in strip} for m in read_metrics(tmp_path / w)]
            for w in ("a", "b")]
    assert rows[0] == rows[1]
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
            trainer.load_data(c)
        assert "\n" not in str(e.value)


def test_vocab_size_without_data_reads_the_prepared_folder(prepared, tmp_path):
    c = shakespeare_char.get_config("cpu")
    c.data.prepared = str(prepared)
    assert trainer.vocab_size_without_data(c) == 300
    c = openwebtext.get_config(None)
    c.data.prepared = str(tmp_path / "not_prepared_yet")
    assert trainer.vocab_size_without_data(c) == 50257  # The gpt2 tokenizer's.


def test_in_process_bpe_takes_data_vocab_size(corpus, tmp_path):
    c = tiny_config(corpus, tmp_path / "cache")
    c.data.tokenizer, c.data.vocab_size = "bpe", 300
    data = trainer.load_data(c)
    assert data.tokenizer.name == "bpe" and data.tokenizer.vocab_size == 300
    assert data.weights is None and len(data.val_tokens()) > 0
