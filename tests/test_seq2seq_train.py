"""model.arch=seq2seq through the training loop and the commands: pair batches, decoded-output
metrics at eval, resume equality, the sample CLI's beam search, config errors, and (slow) the
addition recipe learning its task."""

import json
import subprocess
import sys

import pytest


@pytest.fixture
def s2s_config(tiny_config):
    """make(**overrides) → tiny_config as a 1 + 1-layer seq2seq on 300 addition examples."""

    def make(**overrides):
        fields = {"model.arch": "seq2seq", "model.num_layers": 1, "model.encoder_layers": 1,
                  "data.path": None, "data.task": "addition", "data.task_examples": 300,
                  "data.source_len": 12, "data.seq_len": 8, "train.eval_decode": 40,
                  "sample.num_samples": 0}
        return tiny_config(**{**fields, **overrides})

    return make


@pytest.mark.slow  # ~15 s: three tiny runs, compiles included.
def test_training_logs_decoded_metrics_and_resumes_like_an_uninterrupted_run(
        s2s_config, tmp_path, metrics_rows):
    from gpt_jax.training import loop

    def config(steps):
        return s2s_config(**{"train.num_steps": steps, "optim.decay_steps": 20,
                             "train.eval_every": 10, "train.final_eval": "batches",
                             "checkpoint.every": 10})

    loop.run(config(10), tmp_path / "split")
    loop.run(config(20), tmp_path / "split")
    result = loop.run(config(20), tmp_path / "whole")
    rows = metrics_rows(tmp_path / "whole", timing=False)
    assert rows == metrics_rows(tmp_path / "split", timing=False)
    evals = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    for key in ("val/exact_match", "val/token_acc", "val/bleu", "val/chrf"):
        assert all(key in r for r in evals), key
    assert 0 <= result["val/exact_match"] <= 1 and 0 <= result["val/token_acc"] <= 1
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["model"]["max_source_len"] == 12 and saved["model"]["vocab_size"] == 12


@pytest.mark.slow  # ~15 s: a CLI run and two sample commands.
def test_cli_trains_to_a_full_eval_and_samples_with_beam_search(s2s_config, tmp_path,
                                                                train_command, metrics_rows,
                                                                bad_invocation):
    workdir = tmp_path / "run"
    r = subprocess.run(train_command(workdir, s2s_config(**{"train.num_steps": 30})),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = [row for row in metrics_rows(workdir) if "val/loss" in row][-1]
    assert final["val/split"] == "full" and "val/exact_match" in final
    for beam in (1, 4):
        r = subprocess.run([sys.executable, "-m", "gpt_jax.sample", f"--workdir={workdir}",
                            "--prompt=12+34", f"--beam_size={beam}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        lines = r.stdout.splitlines()  # One line, empty if the model stops at once.
        assert len(lines) == 1 and set(lines[0]) <= set("0123456789+"), r.stdout
    sample = [sys.executable, "-m", "gpt_jax.sample", f"--workdir={workdir}"]
    for flags, words in ((["--prompt=1+2", "--stop=3"], ["--stop does not apply"]),
                         (["--prompt=1+2", "--beam_size=2", "--temperature=1"], ["give one"]),
                         (["--prompt=1+2", "--num_samples=2"], ["--temperature"]),
                         ([], ["--prompt is missing"])):
        bad_invocation([*sample, *flags], *words, protect=[workdir])


@pytest.mark.parametrize(("overrides", "words"), [
    ({"data.task": None}, ["data.task", "data.path", "keep exactly one"]),
    ({"data.task": "multiply"}, ["data.task='multiply'"]),
    ({"sample.beam_size": 0}, ["sample.beam_size=0"]),
    ({"model.arch": "gpt", "model.encoder_layers": None},
     ["data.task='addition'", "model.arch=seq2seq"]),
    ({"model.arch": "gpt"}, ["model.encoder_layers=1 is for model.arch=seq2seq"]),
    ({"model.arch": "gpt", "model.norm_position": "post", "model.encoder_layers": None},
     ["model.norm_position='post' is for model.arch=seq2seq"]),
])
def test_bad_pair_settings_are_one_line_errors(s2s_config, overrides, words):
    from gpt_jax.config import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(s2s_config(**overrides))
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.slow
def test_the_addition_recipe_learns_held_out_sums(tmp_path, train_command):
    """configs/seq2seq.py:addition reaches exact match ≥ 0.9 on its 10,000 held-out sums."""
    workdir = tmp_path / "s2s"
    r = subprocess.run([sys.executable, "-m", "gpt_jax.train", "--config=configs/seq2seq.py",
                        f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path}/cache",
                        "--config.log.progress=lines"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    final = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if "val/exact_match" in line][-1]
    assert final["val/split"] == "full" and final["val/exact_match"] >= 0.9, final
