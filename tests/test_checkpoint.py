"""Checkpoints: exact resume after SIGKILL and SIGTERM, corruption fallback, retention, non-finite
losses, and the errors a resume can meet."""

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base
from gpt_jax.config import ConfigError, ModelConfig
from gpt_jax.data import pipeline
from gpt_jax.training import checkpoint, step, trainer

TEXT = "".join(f"def g{i}(a, b):\n    return a ** {i % 5} - b // {i % 3 + 1}\n\n" for i in range(600))
TIMING = ("tokens_per_sec", "mfu", "gflops_per_sec")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def overrides(corpus, cache, **extra):
    o = {
        "data.path": corpus, "data.cache_dir": cache, "data.tokenizer": "char",
        "data.seq_len": 32, "data.sampling": "random", "model.num_layers": 2,
        "model.num_heads": 2, "model.d_model": 64, "model.dropout": 0.1,
        "train.batch_size": 16, "train.num_steps": 60, "train.eval_every": 20,
        "train.eval_batches": 2, "optim.warmup_steps": 5, "log.every": 3,
        "log.progress": False, "checkpoint.every": 10, "sample.num_samples": 0,
    }
    o.update(extra)
    return o


def config_from(o):
    c = base.get_config()
    for key, value in o.items():
        group, field = key.split(".")
        c[group][field] = str(value) if field in ("path", "cache_dir") else value
    return c


def rows(workdir):
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out.append({k: v for k, v in m.items() if k not in TIMING})
    return out


def final_params(workdir, step_num):
    manager = checkpoint.make_manager(workdir / "checkpoints", keep=1, read_only=True)
    restored = manager.restore(step_num, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


def cli(workdir, o):
    args = [f"--config.{k}={v}" for k, v in o.items()]
    return [sys.executable, "-m", "gpt_jax.train", f"--workdir={workdir}", *args]


def start_and_signal(workdir, o, after_step, sig, committed=None):
    """Starts a training process and sends `sig` once metrics.jsonl has a row past `after_step`
    (and, if given, the checkpoint of step `committed` is complete)."""
    proc = subprocess.Popen(cli(workdir, o), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        path = workdir / "metrics.jsonl"
        ready = committed is None or (workdir / "checkpoints" / str(committed)).is_dir()
        if ready and path.exists() and any(
            json.loads(line).get("step", 0) > after_step
            for line in path.read_text().splitlines() if line.endswith("}")
        ):
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, shared by the interrupted ones."""
    tmp = tmp_path_factory.mktemp("ref")
    (tmp / "corpus.txt").write_text(TEXT)
    o = overrides(tmp / "corpus.txt", tmp / "cache")
    r = subprocess.run(cli(tmp / "run", o), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, o


def assert_same_run(workdir, ref_workdir):
    got, want = rows(workdir), rows(ref_workdir)
    assert [m["step"] for m in got] == [m["step"] for m in want]  # None missing, none twice.
    assert got == want  # Bitwise: float32 losses, grad norms, lrs, val losses.
    for a, b in zip(jax.tree.leaves(final_params(workdir, 60)),
                    jax.tree.leaves(final_params(ref_workdir, 60)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kill_after", [13, 37])
def test_sigkill_then_resume_is_exact(reference, kill_after, tmp_path):
    ref, o = reference
    workdir = tmp_path / "run"
    committed = kill_after // 10 * 10
    code, _, _ = start_and_signal(workdir, o, kill_after, signal.SIGKILL, committed)
    assert code == -signal.SIGKILL
    r = subprocess.run(cli(workdir, o), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert_same_run(workdir, ref / "run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_then_resumes_exactly(reference, tmp_path, sig):
    ref, o = reference
    workdir = tmp_path / "run"
    code, _, err = start_and_signal(workdir, o, 23, sig)
    assert code == 128 + sig
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{sig.name}: saved a checkpoint at step ") and str(workdir) in last
    saved = int(last.split("step ")[1].split()[0])
    assert saved > 23 and (workdir / "checkpoints" / str(saved)).is_dir()
    r = subprocess.run(cli(workdir, o), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {saved}" in r.stderr
    assert_same_run(workdir, ref / "run")


def test_corrupted_newest_checkpoint_falls_back_and_keeps_it(corpus, tmp_path):
    o = overrides(corpus, tmp_path / "cache",
                  **{"train.num_steps": 30, "optim.decay_steps": 40, "model.dropout": 0.0})
    trainer.run(config_from(o), tmp_path / "a")
    # Garbage into every file of the newest checkpoint's state.
    for f in (tmp_path / "a" / "checkpoints" / "30" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    o40 = {**o, "train.num_steps": 40}
    trainer.run(config_from(o40), tmp_path / "a")
    aside = list((tmp_path / "a" / "checkpoints" / "unreadable").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("30-")
    trainer.run(config_from(o40), tmp_path / "b")
    assert rows(tmp_path / "a")[-5:] == rows(tmp_path / "b")[-5:]
    steps = [m["step"] for m in rows(tmp_path / "a") if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_retention_keeps_newest_and_best(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    it = iter(pipeline.train_dataset(tokens, 16, 4, 0, 0, 1, 1, 1, "random"))
    manager = checkpoint.make_manager(tmp_path / "ck", keep=2)
    config_json = json.dumps(base.get_config().to_dict())
    val = {10: 3.0, 20: 1.0, 30: 2.0, 40: None, 50: 2.5, 60: None, 70: 2.7}
    for s, loss in val.items():
        checkpoint.save(manager, s, {"x": jnp.full(3, s)}, it, config_json, loss)
        manager.wait_until_finished()
    assert manager.all_steps() == [20, 60, 70]  # Newest two, plus the lowest val loss.
    assert manager.best_step() == 20
    # Read-only inspection sees the same, with the val losses.
    again = checkpoint.make_manager(tmp_path / "ck", keep=2, read_only=True)
    assert again.all_steps() == [20, 60, 70] and again.best_step() == 20


def test_iterator_state_round_trips_through_a_checkpoint(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    make = lambda: iter(pipeline.train_dataset(tokens, 16, 4, 0, 0, 1, 2, 4, "random"))
    it = make()
    for _ in range(7):
        next(it)
    manager = checkpoint.make_manager(tmp_path / "ck", keep=2)
    state = {"x": jnp.ones(3)}
    checkpoint.save(manager, 7, state, it, json.dumps(base.get_config().to_dict()), None)
    manager.wait_until_finished()
    want = [next(it) for _ in range(3)]
    fresh = make()
    manager.restore(7, args=ocp.args.Composite(data=__import__("grain").checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(np.stack([next(fresh) for _ in range(3)]), np.stack(want))


def poison_batch_of_step(monkeypatch, o, bad_step):
    """Makes the loss (and so every gradient) NaN on the batch the run sees at `bad_step`."""
    c = config_from(o)
    r = trainer.setup(c, o["data.cache_dir"] + "/probe")
    it = iter(pipeline.train_dataset(r.data.train_tokens(), c.data.seq_len, c.train.batch_size,
                                     c.train.seed, 0, 1, 1, 1, c.data.sampling))
    row = [next(it) for _ in range(bad_step)][-1][0]
    original = step._loss_fn

    def poisoned(params, model, batch_BT1, key, **kwargs):
        hit = jnp.all(batch_BT1[0] == jnp.asarray(row))
        return original(params, model, batch_BT1, key, **kwargs) * jnp.where(hit, jnp.nan, 1.0)

    monkeypatch.setattr(step, "_loss_fn", poisoned)


def test_nonfinite_stop_names_the_step_and_keeps_checkpoints(corpus, tmp_path, monkeypatch):
    o = overrides(corpus, str(tmp_path / "cache"), **{"train.num_steps": 30, "log.every": 5})
    poison_batch_of_step(monkeypatch, o, 13)
    with pytest.raises(trainer.NonFiniteLossError, match="at step 13; stopped") as e:
        trainer.run(config_from(o), tmp_path / "w")
    assert "The last good checkpoint, step 10, is untouched." in str(e.value)
    assert checkpoint.make_manager(tmp_path / "w" / "checkpoints", 3, True).all_steps() == [10]


def test_nonfinite_skip_drops_the_update_and_counts_it(corpus, tmp_path, monkeypatch):
    o = overrides(corpus, str(tmp_path / "cache"),
                  **{"train.num_steps": 20, "train.on_nonfinite": "skip", "model.dropout": 0.0,
                     "log.every": 1})
    poison_batch_of_step(monkeypatch, o, 13)
    trainer.run(config_from(o), tmp_path / "w")
    counts = {m["step"]: m["train/nonfinite_steps"] for m in rows(tmp_path / "w")
              if "train/loss" in m}
    assert counts[12] == 0 and counts[13] == 1 and counts[20] == 1
    losses = {m["step"]: m["train/loss"] for m in rows(tmp_path / "w") if "train/loss" in m}
    assert losses[13] == "nan" and np.isfinite(losses[20])
    params = final_params(tmp_path / "w", 20)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_resume_with_another_model_shape_names_the_field(corpus, tmp_path):
    o = overrides(corpus, tmp_path / "cache", **{"train.num_steps": 10})
    trainer.run(config_from(o), tmp_path / "w")
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.d_model=64 but this run has "
                                                         r"model\.d_model=32"):
        trainer.run(config_from({**o, "model.d_model": 32}), tmp_path / "w")


def test_scratch_refuses_a_workdir_with_checkpoints_and_init_from_a_path(corpus, tmp_path):
    o = overrides(corpus, tmp_path / "cache", **{"train.num_steps": 10})
    trainer.run(config_from(o), tmp_path / "w")
    with pytest.raises(ConfigError, match="already has checkpoints"):
        trainer.run(config_from({**o, "checkpoint.init_from": "scratch"}), tmp_path / "w")
    warm = {**o, "checkpoint.init_from": str(tmp_path / "w"), "train.num_steps": 1,
            "optim.warmup_steps": 0}
    trainer.run(config_from(warm), tmp_path / "warm")
    first = next(m for m in rows(tmp_path / "warm") if "val/loss" in m)
    scratch = next(m for m in rows(tmp_path / "w") if "val/loss" in m)
    assert first["step"] == 0 and first["val/loss"] < scratch["val/loss"]  # Trained weights.


def test_cli_one_line_errors(corpus, tmp_path):
    missing = subprocess.run(cli(tmp_path / "w", {"data.path": tmp_path / "nope.txt"}),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nope.txt" in last and "data.path" in last
    (tmp_path / "empty.txt").write_text("")
    empty = subprocess.run(cli(tmp_path / "w", {"data.path": tmp_path / "empty.txt"}),
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode != 0 and empty.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_resume_refusals_keep_the_checkpoints(corpus, tmp_path):
    o = overrides(corpus, tmp_path / "cache", **{"train.num_steps": 10})
    trainer.run(config_from(o), tmp_path / "w")
    ck = tmp_path / "w" / "checkpoints"
    tokenizer = (tmp_path / "w" / "tokenizer.json").read_text()
    # An optimizer change alters the saved state's tree: an error, not "unreadable".
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this run's state"):
        trainer.run(config_from({**o, "optim.grad_clip": 0.0}), tmp_path / "w")
    with pytest.raises(ConfigError, match="past train.num_steps=5"):
        trainer.run(config_from({**o, "train.num_steps": 5, "optim.warmup_steps": 2}), tmp_path / "w")
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("g", "h"))  # Same vocabulary size, other characters.
    with pytest.raises(checkpoint.CheckpointError, match="another tokenizer"):
        trainer.run(config_from({**o, "data.path": other}), tmp_path / "w")
    assert (tmp_path / "w" / "tokenizer.json").read_text() == tokenizer
    assert sorted(p.name for p in ck.iterdir()) == ["10"]  # Nothing set aside or lost.


def test_short_splits_and_bad_prompts_are_config_errors(corpus, tmp_path):
    o = overrides(corpus, tmp_path / "cache", **{"train.num_steps": 10})
    with pytest.raises(ConfigError, match="data.seq_len"):
        trainer.run(config_from({**o, "data.seq_len": 4000, "train.batch_size": 64}), tmp_path / "a")
    with pytest.raises(ConfigError, match="sample.prompt"):
        trainer.run(config_from({**o, "sample.prompt": "Ω", "sample.num_samples": 1}), tmp_path / "b")


def test_init_from_refuses_other_shapes_and_warns_of_another_function(caplog):
    cfg = ModelConfig.from_config(base.get_config(), 50)
    saved = dataclasses.asdict(cfg)
    with caplog.at_level(logging.WARNING):
        checkpoint._check_starts(saved, cfg, "w")
        assert caplog.text == ""
        checkpoint._check_starts({**saved, "activation": "gelu_tanh"}, cfg, "w")
    assert "model.activation='gelu_tanh'" in caplog.text  # Allowed (fine-tuning), but said.
    with pytest.raises(checkpoint.CheckpointError, match="set --config.model.d_model=64"):
        checkpoint._check_starts({**saved, "d_model": 64}, cfg, "w")
