"""`python -m gpt_jax.sample`: a run's newest / best / chosen checkpoint, its tokenizer, clear errors."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from gpt_jax.generate import SamplingParams, generate
from gpt_jax.sample import RunError, load_run
from gpt_jax.training import loop
from gpt_jax.training.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def shared_runs():
    """Runs trained once per module, by the first test that asks (function-scoped fixtures such
    as tiny_config cannot feed a module-scoped one)."""
    return {}


@pytest.fixture
def workdir(tiny_config, tmp_path, shared_runs):
    """A finished 20-step run with checkpoints (and evals) at steps 10 and 20."""
    if "run" not in shared_runs:
        c = tiny_config(**{"train.num_steps": 20, "train.eval_every": 10, "checkpoint.every": 10,
                           "sample.num_samples": 0})
        loop.run(c, tmp_path / "run")
        shared_runs["run"] = tmp_path / "run"
    return shared_runs["run"]


def sample(workdir, *args):
    return subprocess.run([sys.executable, "-m", "gpt_jax.sample", f"--workdir={workdir}", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # A subprocess per sample; the library calls are tested by default.
def test_cli_samples_with_the_runs_tokenizer(workdir, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("def f1")
    r = sample(workdir, f"--prompt=FILE:{prompt_file}", "--num_samples=2", "--max_new_tokens=30",
               "--seed=1", "--top_k=5", "--top_p=0.9", "--checkpoint=best")
    assert r.returncode == 0, r.stderr
    texts = r.stdout.split("-" * 40 + "\n")[1:]
    assert len(texts) == 2 and all(t.startswith("def f1") for t in texts)
    assert all(len(t.rstrip("\n")) >= 6 for t in texts)
    # The CLI is generate() on the best checkpoint: the same seed gives the same text.
    tok, model, params, _ = load_run(workdir, "best")
    outs = generate(model, params, [tok.encode("def f1")] * 2, 30, jax.random.key(1),
                    SamplingParams(0.8, 5, 0.9))
    assert [tok.decode(o.tolist()) for o in outs] == [t.removesuffix("\n") for t in texts]


def test_loads_the_chosen_checkpoint(workdir, metrics_rows):
    tok, model, params_10, step = load_run(workdir, "10")
    assert step == 10
    _, _, params_new, newest = load_run(workdir, "newest")
    assert newest == 20
    val = {m["step"]: m["val/loss"] for m in metrics_rows(workdir) if "val/loss" in m}
    assert load_run(workdir, "best")[3] == min((10, 20), key=val.__getitem__)
    assert not np.allclose(params_10["wte"]["embedding"], params_new["wte"]["embedding"])
    out = generate(model, params_new, [tok.encode("def")], 5, jax.random.key(0),
                   SamplingParams(temperature=0.0))[0]
    assert tok.decode(out.tolist()).startswith("def")


def test_errors_are_one_line(workdir, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint of step 7"):
        load_run(workdir, "7")
    with pytest.raises(RunError, match="no tokenizer.json; give the --workdir of a training run"):
        load_run(tmp_path, "newest")
    (tmp_path / "params").mkdir()  # What tools/convert_hf.py import writes, here without tokenizer.
    with pytest.raises(RunError, match=r"imported model but no tokenizer\.json .*vocab\.json \+ "
                                       r"merges\.txt"):
        load_run(tmp_path, "newest")
    r = sample(workdir, "--checkpoint=oldest")
    assert r.returncode != 0 and "newest, best or a step number" in r.stderr.strip().splitlines()[-1]


def _sample_argv(workdir, *flags) -> list[str]:
    return [sys.executable, "-m", "gpt_jax.sample", f"--workdir={workdir}", *flags]


def _write(relative: str, text: str):
    return lambda run: (run / relative).write_text(text)


def _remove(pattern: str):
    return lambda run: [shutil.rmtree(p) for p in run.glob(pattern)]


def _unreadable(run: pathlib.Path) -> None:
    run.chmod(0)


LONG = "def f1(x):\n    return x * 1 + 1\n\n" * 3  # ~100 characters: the model's context is 16.

# id, argv(trained run, tmp_path, damaged_run), words the error line must hold. Each row is a separate
# `python -m gpt_jax.sample` (~1.5 s): the cheap, distinct paths run by default, the rest with
# --runslow (same code as a default row, or one more checkpoint read).
SAMPLE_ROWS = [
    pytest.param(lambda run, tmp, damaged: [sys.executable, "-m", "gpt_jax.sample"],
                 ("--workdir is missing", "--workdir=runs/"), id="no-workdir"),
    pytest.param(lambda run, tmp, damaged: _sample_argv(tmp / "nope"),
                 ("nope: no such folder", "give the workdir of a training run"), id="workdir-missing"),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run / "config.json"),
                 ("is a file, not a folder", "give the workdir"), id="workdir-is-a-file",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run / "checkpoints"),
                 ("has no tokenizer.json", "give the --workdir of a training run"), id="not-a-run",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(damaged(_remove("checkpoints"))),
                 ("has no checkpoints/ folder", "train until it saves one"), id="no-checkpoints"),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--checkpoint=abc"),
                 ("--checkpoint='abc'", "newest, best or a step number"), id="checkpoint-abc",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--checkpoint=99"),
                 ("no checkpoint of step 99", "[2, 4]", "choose one"), id="checkpoint-99"),
    pytest.param(lambda run, tmp, damaged: _sample_argv(damaged(_remove("checkpoints/*/metrics")),
                                                        "--checkpoint=best"),
                 ("none is best", "choose newest or a step"), id="best-without-evals",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--prompt="),
                 ("--prompt is empty", "at least one character"), id="empty-prompt"),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, f"--prompt=FILE:{tmp / 'missing.txt'}"),
                 ("--prompt=FILE:", "missing.txt", "no such file", "check the path"),
                 id="prompt-file-missing", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--prompt=Z"),
                 ("--prompt", "'Z'", "not in the char tokenizer's vocab"), id="prompt-char-unknown",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--stop="),
                 ("--stop is empty", "leave the flag out"), id="empty-stop", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--num_samples=0"),
                 ("--num_samples=0 is out of range", "an integer ≥ 1"), id="num_samples-0"),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--max_new_tokens=-1"),
                 ("--max_new_tokens=-1 is out of range", "an integer ≥ 1"), id="max_new_tokens--1",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--temperature=-1"),
                 ("--temperature=-1.0 is out of range", "a number ≥ 0"), id="temperature--1",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--top_k=-1"),
                 ("--top_k=-1 is out of range", "an integer ≥ 0"), id="top_k--1",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--top_p=0"),
                 ("--top_p=0.0 is out of range", "(0, 1]"), id="top_p-0", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--top_p=1.5"),
                 ("--top_p=1.5 is out of range", "(0, 1]"), id="top_p-1.5", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--num_samples=abc"),
                 ("--num_samples=abc", "invalid literal for int()", "--helpshort"), id="num_samples-abc",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "--bogus=1"),
                 ("unknown command line flag 'bogus'", "--helpshort"), id="unknown-flag",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(run, "extra"),
                 ("unexpected arguments ['extra']", "--name=value"), id="stray-argument",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(damaged(damaged.truncate_arrays)),
                 ("parameters of checkpoint step 4", "cannot be read", "choose another of its steps: 2"),
                 id="arrays-truncated", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(damaged(_write("checkpoints/4/config/metadata",
                                                                       "{garbage"))),
                 ("config saved with checkpoint step 4", "cannot be read", "choose another of its steps: 2"),
                 id="checkpoint-config-garbage", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(damaged(_write("checkpoints/4/metrics/metrics",
                                                                       "{garbage"))),
                 ("4/metrics/metrics is damaged", "move that file out of the way"),
                 id="checkpoint-metrics-garbage", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(damaged(_write("tokenizer.json", "{garbage"))),
                 ("tokenizer.json is not JSON", "put back the tokenizer.json"), id="tokenizer-garbage"),
    pytest.param(lambda run, tmp, damaged: _sample_argv(damaged(_write("tokenizer.json",
                                                                       '{"name": "char"}'))),
                 ("tokenizer.json does not describe a tokenizer", "put back the tokenizer.json"),
                 id="tokenizer-fields-missing", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(damaged(_write("tokenizer.json",
                                                                       '{"name": "byte"}')),
                                                        "--prompt=z"),
                 ("--prompt holds token 122", "model lacks", "leave that text out"),
                 id="tokenizer-larger-than-model", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _sample_argv(damaged(_unreadable)),
                 ("permission denied", "check its permissions"), id="workdir-unreadable",
                 marks=pytest.mark.not_as_root("root reads a chmod 000 folder")),
]


@pytest.mark.parametrize("argv, words", SAMPLE_ROWS)
def test_bad_invocations_are_refused_in_one_line(argv, words, trained_run, tmp_path, damaged_run,
                                                 bad_invocation):
    """Every bad invocation: exit ≠ 0, one `error:` line naming the problem and the fix, no
    traceback, and neither the run nor its damaged copy changed (sampling writes nothing)."""
    try:
        bad_invocation(argv(trained_run, tmp_path, damaged_run), *words,
                       protect=(trained_run, tmp_path))
    finally:
        if (tmp_path / "run").exists():
            (tmp_path / "run").chmod(0o755)  # So that pytest can remove it.


@pytest.mark.slow  # test_generate's test_cache_slides_past_the_context_limit covers the window by default.
def test_a_prompt_longer_than_the_context_is_sampled(trained_run):
    """The model has 16 positions; the sampler slides its window over a longer prompt."""
    r = subprocess.run(_sample_argv(trained_run, f"--prompt={LONG}", "--max_new_tokens=8",
                                    "--temperature=0"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("-" * 40 + "\n")[1]
    assert text.startswith(LONG) and len(text.rstrip("\n")) >= len(LONG.rstrip("\n"))



@pytest.mark.slow
def test_a_tokenizer_smaller_than_the_model_still_samples(damaged_run):
    """A tokenizer of 4 characters under the run's 25-token model (what model.vocab_size above
    the tokenizer's allows): the sample prints, with a warning for the ids it lacks."""
    run = damaged_run(_write("tokenizer.json", json.dumps({"name": "char", "chars": "\n ()"})))
    r = subprocess.run(_sample_argv(run, "--max_new_tokens=40", "--temperature=2"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\ufffd" in r.stdout and "token id(s) that tokenizer.json lacks" in r.stderr


def test_out_of_device_memory_is_one_line(trained_run, monkeypatch, capsys):
    """A batch too large for the device (XLA's RESOURCE_EXHAUSTED while sampling) is one line
    naming the flags that shrink it; sampling is faked to fail, as a real OOM needs a device."""
    from gpt_jax import sample

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GB.")

    monkeypatch.setattr("gpt_jax.generate.generate", out_of_memory)  # What main imports.
    # Not the command's process: its log filters would outlive this test.
    monkeypatch.setattr(sample.cli, "quiet_orbax_reads", lambda: None)
    own = flags.FlagValues()  # The command's flags, apart from this process's.
    sample._define_flags(own)
    own(["sample", f"--workdir={trained_run}", "--num_samples=512"])
    monkeypatch.setattr(sample, "FLAGS", own)
    with pytest.raises(SystemExit) as e:
        sample.main(["sample"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: out of device memory drawing 512 × 200 tokens")
    assert err[-1].endswith("lower --num_samples or --max_new_tokens.")


def test_importing_the_sample_module_defines_no_flags():
    """load_run and the rest import without the command's flags, which would clash with
    train's (--workdir) in a program that uses both."""
    r = subprocess.run([sys.executable, "-c", "from gpt_jax import sample, train\n"
                        "train.define_flags()\nassert 'checkpoint' not in sample.FLAGS"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
