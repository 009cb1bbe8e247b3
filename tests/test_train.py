"""End to end: a short run through the loop (and, slow, the real CLI), its workdir files,
determinism, prepared folders."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import openwebtext, shakespeare_char
from gpt_jax.config import ConfigError, to_json
from gpt_jax.data import prepare_stream, tokenizers
from gpt_jax.models import registry
from gpt_jax.parallel import sharding
from gpt_jax.training import build, checkpoint, loop, resume

REPO = pathlib.Path(__file__).resolve().parent.parent


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
    c.train.num_steps, c.log.progress, c.sample.num_samples = 3, "lines", 0
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
        c.checkpoint.every, c.log.every, c.log.progress = 2, 1, "lines"
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


# --- Bad invocations of `python -m gpt_jax.train`: one `error:` line, nothing written. ---

@pytest.fixture
def scratch(tmp_path, corpus):
    """tmp_path with what the bad invocations below point at: broken config files, a file where a
    folder goes, workdirs holding a file of the wrong kind, and `corpus.txt`."""
    files = {"syntax.py": "def get_config(:\n", "raises.py": "def get_config():\n    return 1 / 0\n",
             "noget.py": "x = 1\n", "none.py": "def get_config():\n    return None\n",
             "afile": "not a folder\n", "dirs/config.json/keep": "", "ckfile/checkpoints": "",
             "readonly/keep": "", "unreadable/config.json": "{}\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    yield tmp_path
    (tmp_path / "readonly").chmod(0o755)  # So that pytest can remove them.
    (tmp_path / "unreadable" / "config.json").chmod(0o644)


def _train(*args):
    return lambda tmp: [sys.executable, "-m", "gpt_jax.train",
                        *(str(a).format(tmp=tmp) for a in args)]


def _chmod(name, mode):
    def make(tmp):
        (tmp / name).chmod(mode)
        return _train(f"--workdir={tmp}/{name.split('/')[0]}")(tmp)
    return make


_W = "--workdir={tmp}/w"  # A workdir that must not be made.
_DATA = ("--config.data.path={tmp}/corpus.txt", "--config.data.cache_dir={tmp}/cache",
         "--config.data.tokenizer=char")
# id, argv(tmp), words the error line must hold, paths (under tmp) that must keep their bytes,
# paths that must not exist afterwards. Each row is a subprocess that stops before jax is
# imported (~0.3 s) unless it says otherwise.
TRAIN_ROWS = [
    pytest.param(_train("--config={tmp}/syntax.py", _W),
                 ("syntax.py", "SyntaxError", "line 1", "fix the config file"), (), ("w",),
                 id="config-syntax-error"),
    pytest.param(_train("--config={tmp}/raises.py", _W),
                 ("raises.py", "ZeroDivisionError", "line 2", "fix the config file"), (), ("w",),
                 id="config-raises"),
    pytest.param(_train("--config=configs/nope.py", _W),
                 ("--config=configs/nope.py", "no such file", "configs/quickstart.py"), (), ("w",),
                 id="config-missing"),
    pytest.param(_train("--config=configs/nope.py", "--config.model.num_layers=2", _W),
                 ("--config=configs/nope.py", "no such file"), (), ("w",),
                 id="config-missing-with-override"),
    pytest.param(_train("--config={tmp}", _W), ("is a folder, not a .py file",), (), ("w",),
                 id="config-is-a-folder"),
    pytest.param(_train("--config={tmp}/noget.py", _W), ("defines no get_config()",), (), ("w",),
                 id="config-without-get_config"),
    pytest.param(_train("--config={tmp}/none.py", _W),
                 ("returned NoneType", "return configs/base.py's get_config()"), (), ("w",),
                 id="config-returns-none"),
    pytest.param(_train("--config=configs/shakespeare_char.py:nope", _W),
                 ("unknown variant 'nope'", "use one of"), (), ("w",), id="config-unknown-variant"),
    pytest.param(_train("--config=configs/base.py:x", _W), ("has no variants", "drop ':x'"), (),
                 ("w",), id="config-variant-of-a-file-without"),
    pytest.param(_train("--config.model=3", _W),
                 ("config group 'model' is not a field", "--config.model.", "num_layers"), (), ("w",),
                 id="override-names-a-group"),
    pytest.param(_train("--config.train.num_steps=ten", _W),
                 ("--config.train.num_steps=ten", "--helpshort"), (), ("w",), id="override-wrong-type"),
    pytest.param(_train("--bogus=1", _W), ("unknown command line flag 'bogus'", "--helpshort"), (),
                 ("w",), id="unknown-flag"),
    pytest.param(_train("--workdir"), ("--workdir", "--helpshort"), (), (), id="flag-without-value"),
    pytest.param(_train(_W, "extra"), ("unexpected arguments 'extra'", "--config.GROUP.FIELD=VALUE"),
                 (), ("w",), id="stray-argument"),
    pytest.param(_train("--workdir="), ("--workdir is empty", "runs/quickstart"), (), (),
                 id="workdir-empty"),
    pytest.param(_train("--workdir=ftp://host/run1"), ("ftp://", "local path"), (),
                 (str(REPO / "ftp:"),), id="workdir-a-url"),  # Not a local folder "ftp:/host/run1".
    pytest.param(_train("--workdir={tmp}/afile"), ("afile is a file", "choose another --workdir"),
                 ("afile",), (), id="workdir-is-a-file"),
    pytest.param(_train("--workdir={tmp}/afile/run"), ("afile is a file", "choose another --workdir"),
                 ("afile",), (), id="workdir-under-a-file"),
    pytest.param(_train("--workdir={tmp}/dirs"), ("config.json, a folder", "move it away"),
                 ("dirs",), (), id="workdir-config-json-is-a-folder"),
    pytest.param(_train("--workdir={tmp}/ckfile"), ("checkpoints, a file", "move it away"),
                 ("ckfile",), (), id="workdir-checkpoints-is-a-file"),
    pytest.param(_chmod("readonly", 0o555), ("readonly is not writable", "choose a --workdir"),
                 ("readonly",), (), id="workdir-read-only",
                 marks=pytest.mark.not_as_root("root writes a chmod 555 folder")),
    pytest.param(_chmod("unreadable/config.json", 0), ("cannot read and write", "config.json"),
                 ("unreadable",), (), id="workdir-config-json-unreadable",
                 marks=pytest.mark.not_as_root("root reads a chmod 000 file")),
    pytest.param(_train(_W, "--config.model.num_heads=5"), ("num_heads=5", "does not divide"), (),
                 ("w",), id="bad-value", marks=pytest.mark.slow),  # test_config has one too.
    # Loads the data (jax imported, ~3 s): refused after the workdir was made, which is removed.
    pytest.param(_train("--workdir={tmp}/new/run", *_DATA, "--config.model.vocab_size=3"),
                 ("model.vocab_size=3 is smaller", "raise it"), (), ("new",),
                 id="late-refusal-leaves-no-workdir"),
]


@pytest.mark.parametrize("argv, words, protect, absent", TRAIN_ROWS)
def test_bad_invocations_are_refused_in_one_line(argv, words, protect, absent, scratch,
                                                 bad_invocation):
    """Every bad invocation: exit ≠ 0, one `error:` line naming the problem and the fix, no
    traceback, nothing it found changed and no workdir made."""
    bad_invocation(argv(scratch), *words, protect=[scratch / p for p in protect],
                   absent=[scratch / p for p in absent], cwd=REPO)


@pytest.mark.slow
def test_a_resume_rewrites_a_garbage_config_json_and_sets_garbage_metrics_aside(
        trained_run, tmp_path, cli_flags, metrics_rows):
    """Only the run writes config.json (never reads it) and a metrics line that does not parse is
    one a kill cut: neither stops a resume."""
    from gpt_jax.config import from_json

    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    config = from_json((trained_run / "config.json").read_text())
    (workdir / "config.json").write_text("{garbage")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('garbage\n{"step": 3')
    r = subprocess.run([sys.executable, "-m", "gpt_jax.train", f"--workdir={workdir}",
                        *cli_flags(config), "--config.train.num_steps=6"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert from_json((workdir / "config.json").read_text()).train.num_steps == 6
    assert [m["step"] for m in metrics_rows(workdir) if "train/loss" in m][-1] == 6
    assert "garbage" in (workdir / "metrics.rolledback.jsonl").read_text()


def test_a_failed_process_of_a_joined_run_exits_without_the_shutdown_barrier(monkeypatch):
    """jax.distributed's exit barrier waits for peers that wait for this process in a collective:
    a failing process of a multi-process run leaves with os._exit; a preempted one (every process
    stops together) and a single-process run leave normally."""
    import jax

    from gpt_jax import train
    from gpt_jax.training.preemption import Preempted

    class ExitCalledError(Exception):
        pass

    def exit_now(status):
        raise ExitCalledError(status)

    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    for raised, status in ((SystemExit(1), 1), (RuntimeError("a bug"), 1)):
        with pytest.raises(ExitCalledError) as e, train._exit_at_once_if_joined():
            raise raised
        assert e.value.args == (status,)
    with pytest.raises(Preempted), train._exit_at_once_if_joined():
        raise Preempted(15, 3, REPO)
    with pytest.raises(SystemExit), train._exit_at_once_if_joined():
        raise SystemExit(0)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(SystemExit), train._exit_at_once_if_joined():
        raise SystemExit(1)


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """What a read-only file system or another user's folder looks like to the checks (os.access
    says no, even to root): one line naming the folder or file, for --workdir and the tools'
    outputs. Writable ones pass."""
    from gpt_jax import cli, train

    (tmp_path / "locked").mkdir()
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "plan.json").write_text("{}")
    denied = {tmp_path / "locked", tmp_path / "open" / "plan.json"}
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: pathlib.Path(p) not in denied and real(p, mode))
    cases = [
        (lambda: train.check_workdir(tmp_path / "locked" / "run"), "locked is not writable"),
        (lambda: cli.check_output(tmp_path / "locked", "--out", folder=True),
         "--out=" + str(tmp_path / "locked")),
        (lambda: cli.check_output(tmp_path / "open" / "plan.json", "--json", folder=False),
         "plan.json is not writable"),
    ]
    for check, words in cases:
        with pytest.raises(SystemExit):
            check()
        line = capsys.readouterr().err
        assert line.startswith("error:") and words in line and "choose" in line, line
    train.check_workdir(tmp_path / "open" / "new" / "run")
    cli.check_output(tmp_path / "open" / "new.json", "--json", folder=False)
    cli.check_output(tmp_path / "open" / "a" / "b", "--out", folder=True)
    assert capsys.readouterr().err == "" and not (tmp_path / "open" / "new").exists()
