"""`python -m gpt_jax.sample`: a run's newest / best / chosen checkpoint, its tokenizer, clear errors."""

import subprocess
import sys

import jax
import numpy as np
import pytest

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
