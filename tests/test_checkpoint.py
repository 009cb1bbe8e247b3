"""Checkpoints: exact resume after an interruption (in process; slow: SIGKILL, SIGTERM and SIGINT
of the CLI), corruption fallback, retention, non-finite losses, and the errors a resume can meet."""

import json
import logging
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from gpt_jax.config import ConfigError, to_json
from gpt_jax.data import pipeline
from gpt_jax.models import registry
from gpt_jax.parallel import sharding
from gpt_jax.training import build, checkpoint, loop, resume, weights
from gpt_jax.training.preemption import Preempted

# What these runs change in tiny_config: a wider model with dropout (so resuming must replay the
# dropout masks), windows at random starts (nanoGPT's sampling), a checkpoint every 10 steps.
CK = {"model.d_model": 64, "model.dropout": 0.1, "data.sampling": "random",
      "train.batch_size": 16, "checkpoint.every": 10, "sample.num_samples": 0}
# The in-process runs: 20 steps, evals at 0, 10, 20 on the fixed batches, a schedule that does
# not depend on train.num_steps (so a run stopped at step 10 is the first half of this one).
FAST = {**CK, "train.num_steps": 20, "train.eval_every": 10, "train.final_eval": "batches",
        "optim.decay_steps": 40, "log.every": 2}
# The CLI runs that are killed and resumed (slow); steps well past the last signal, so that a
# busy machine's late signal still finds the run going.
KILLED = {**CK, "train.num_steps": 100, "train.eval_every": 20, "log.every": 3}


def final_params(workdir, step_num):
    return weights.load_trained(workdir, step_num)[2]


def assert_same_run(workdir, ref_workdir, last_step, metrics_rows):
    got, want = metrics_rows(workdir, timing=False), metrics_rows(ref_workdir, timing=False)
    assert [m["step"] for m in got] == [m["step"] for m in want]  # None missing, none twice.
    assert got == want  # Bitwise: float32 losses, grad norms, lrs, val losses.
    for a, b in zip(jax.tree.leaves(final_params(workdir, last_step)),
                    jax.tree.leaves(final_params(ref_workdir, last_step)), strict=True):
        np.testing.assert_array_equal(a, b)


def map_train_batches(monkeypatch, fn):
    """Makes every training run's data stream pass each batch through fn(index, batch) → batch
    (index 0 is the batch of step 1), through the public seam the loop reads its data from.
    Grain's map_with_index keeps the stream checkpointable: its index is part of the state."""
    real = pipeline.train_dataset

    def train_dataset(*args, **kwargs):
        return real(*args, **kwargs).map_with_index(fn)

    monkeypatch.setattr(pipeline, "train_dataset", train_dataset)


@pytest.fixture(scope="module")
def shared_runs():
    """Runs trained once per module, by the first test that asks (function-scoped fixtures such
    as tiny_config cannot feed a module-scoped one); tests copy a workdir before changing it."""
    return {}


@pytest.fixture
def trained(tiny_config, tmp_path, shared_runs):
    """The workdir of an uninterrupted FAST run (checkpoints at steps 10 and 20)."""
    if "fast" not in shared_runs:
        loop.run(tiny_config(**FAST), tmp_path / "trained")
        shared_runs["fast"] = tmp_path / "trained"
    return shared_runs["fast"]


@pytest.fixture
def copy_of_trained(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "w")
    return tmp_path / "w"


@pytest.mark.slow  # End to end: trains, signals, saves, resumes (~11 s).
def test_sigterm_in_process_saves_then_resume_is_exact(trained, tiny_config, tmp_path,
                                                        monkeypatch, metrics_rows):
    """SIGTERM mid-run (between checkpoint steps) saves the step and stops; the rerun resumes
    from it and ends bitwise where the uninterrupted run did (metrics and parameters)."""

    def sigterm_at_step_7(index, batch):
        if index == 6:  # Fetching the batch of step 7.
            # Only with the loop's handler in place: the default action would end pytest.
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    map_train_batches(monkeypatch, sigterm_at_step_7)
    workdir = tmp_path / "w"
    with pytest.raises(Preempted) as e:
        loop.run(tiny_config(**FAST), workdir)
    assert e.value.step == 7 and e.value.signum == signal.SIGTERM
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["7"]
    assert max(m["step"] for m in metrics_rows(workdir)) < 7
    loop.run(tiny_config(**FAST), workdir)
    assert_same_run(workdir, trained, 20, metrics_rows)


@pytest.fixture
def killed_reference(tiny_config, tmp_path, shared_runs, train_command):
    """(config, workdir) of one uninterrupted CLI run, shared by the interrupted ones."""
    if "killed" not in shared_runs:
        config = tiny_config(**KILLED)
        r = subprocess.run(train_command(tmp_path / "ref", config), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        shared_runs["killed"] = config, tmp_path / "ref"
    return shared_runs["killed"]


def start_and_signal(argv, workdir, after_step, sig, committed=None):
    """Starts the training command `argv` and sends `sig` once metrics.jsonl has a row past
    `after_step` (and, if given, the checkpoint of step `committed` is complete)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [13, 37])
def test_sigkill_then_resume_is_exact(killed_reference, kill_after, tmp_path, metrics_rows,
                                      train_command):
    config, ref = killed_reference
    workdir = tmp_path / "run"
    committed = kill_after // 10 * 10
    code, _, err = start_and_signal(train_command(workdir, config), workdir, kill_after,
                                    signal.SIGKILL, committed)
    assert code == -signal.SIGKILL, err[-3000:]
    r = subprocess.run(train_command(workdir, config), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert_same_run(workdir, ref, 100, metrics_rows)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_then_resumes_exactly(killed_reference, tmp_path, sig, metrics_rows,
                                                     train_command):
    config, ref = killed_reference
    workdir = tmp_path / "run"
    code, _, err = start_and_signal(train_command(workdir, config), workdir, 23, sig)
    assert code == 128 + sig, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{sig.name}: saved a checkpoint at step ") and str(workdir) in last
    saved = int(last.split("step ")[1].split()[0])
    assert saved > 23 and (workdir / "checkpoints" / str(saved)).is_dir()
    r = subprocess.run(train_command(workdir, config), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {saved}" in r.stderr
    assert_same_run(workdir, ref, 100, metrics_rows)


def test_corrupted_newest_checkpoint_falls_back_and_keeps_it(trained, copy_of_trained, tiny_config,
                                                             metrics_rows):
    workdir = copy_of_trained
    # Garbage into every file of the newest checkpoint's state.
    for f in (workdir / "checkpoints" / "20" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    loop.run(tiny_config(**FAST), workdir)  # Resumes from step 10 and trains 11 … 20 again.
    aside = list((workdir / "checkpoints" / "unreadable").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("20-")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20", "unreadable"]
    # The steps after 10 from the first time round are set aside, each step is in once, and the
    # run is the uninterrupted one.
    assert_same_run(workdir, trained, 20, metrics_rows)
    rolled_back = [json.loads(line)["step"]
                   for line in (workdir / "metrics.rolledback.jsonl").read_text().splitlines()]
    assert rolled_back and min(rolled_back) > 10 and max(rolled_back) == 20


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
    assert again.metrics(30) is None and again.metrics(20) == {checkpoint.VAL_METRIC: 1.0}


def test_iterator_state_round_trips_through_a_checkpoint(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)

    def make():
        return iter(pipeline.train_dataset(tokens, 16, 4, 0, 0, 1, 2, 4, "random"))

    it = make()
    for _ in range(7):
        next(it)
    manager = checkpoint.make_manager(tmp_path / "ck", keep=2)
    state = {"x": jnp.ones(3)}
    checkpoint.save(manager, 7, state, it, json.dumps(base.get_config().to_dict()), None)
    manager.wait_until_finished()
    want = [next(it) for _ in range(3)]
    fresh = make()
    assert not np.array_equal(next(make())["inputs"], want[0]["inputs"])  # Not where it starts.
    checkpoint.restore_iterator(manager, 7, fresh)
    for got, expected in zip([next(fresh) for _ in range(3)], want, strict=True):
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def poison_step(monkeypatch, bad_step, value=np.nan):
    """Gives the batch of step `bad_step` loss weights `value` (NaN or inf): that step's loss and
    gradients are non-finite through the public batch contract (Σ w·ℓ / Σ w)."""

    def poison(index, batch):
        if index == bad_step - 1:
            return {**batch, "weights": np.full_like(batch["weights"], value)}
        return batch

    map_train_batches(monkeypatch, poison)


def test_nonfinite_stop_names_the_step_and_keeps_checkpoints(tiny_config, tmp_path, monkeypatch):
    poison_step(monkeypatch, 13)
    with pytest.raises(loop.NonFiniteLossError, match="at step 13; stopped") as e:
        loop.run(tiny_config(**{**FAST, "log.every": 5}), tmp_path / "w")
    assert "The last good checkpoint, step 10, is untouched." in str(e.value)
    assert checkpoint.make_manager(tmp_path / "w" / "checkpoints", 3, True).all_steps() == [10]


def test_nonfinite_skip_drops_the_update_and_counts_it(tiny_config, tmp_path, monkeypatch,
                                                       metrics_rows):
    poison_step(monkeypatch, 2, np.inf)
    workdir = tmp_path / "w"
    # A checkpoint at every step: the parameters after steps 1, 2 and 3.
    loop.run(tiny_config(**{**FAST, "train.num_steps": 3, "train.on_nonfinite": "skip",
                            "log.every": 1, "checkpoint.every": 1}), workdir)
    train = {m["step"]: m for m in metrics_rows(workdir) if "train/loss" in m}
    assert [train[s]["train/nonfinite_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert train[2]["train/loss"] == "nan" and np.isfinite(train[3]["train/loss"])
    # The skipped step did not advance the (warming up) schedule: step 3 has step 2's lr.
    assert train[3]["lr"] == train[2]["lr"] != train[1]["lr"]
    # Step 2's update was dropped: its parameters are step 1's; step 3 trains on.
    p1, p2, p3 = (jax.tree.leaves(final_params(workdir, s)) for s in (1, 2, 3))
    for a, b in zip(p1, p2, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(p2, p3, strict=True))
    assert all(np.isfinite(x).all() for x in p3)


def test_resume_with_another_model_shape_names_the_field(copy_of_trained, tiny_config):
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.d_model=64 but this run has "
                                                         r"model\.d_model=32"):
        loop.run(tiny_config(**{**FAST, "model.d_model": 32}), copy_of_trained)


def test_scratch_refuses_a_workdir_with_checkpoints_and_init_from_a_path(
        trained, copy_of_trained, tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="already has checkpoints"):
        loop.run(tiny_config(**{**FAST, "checkpoint.init_from": "scratch"}), copy_of_trained)
    # A new run from another run's workdir: its newest parameters, at step 0, with a fresh
    # optimizer (what the loop starts from; resume.initial_state is where it gets its state).
    r = build.setup(tiny_config(**{**FAST, "checkpoint.init_from": str(trained)}), tmp_path / "new")
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(r.workdir), keep=3)
    with sharding.activation_context(r.mesh, r.rules):
        state, start = resume.initial_state(r, manager, None)  # No data position to restore.
        fresh = r.init_state()
    assert start == 0 and int(state.step) == 0
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(final_params(trained, 20)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_cli_one_line_errors(tiny_config, tmp_path, train_command):
    config = tiny_config(**{"data.path": str(tmp_path / "nope.txt")})
    missing = subprocess.run(train_command(tmp_path / "w", config), capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nope.txt" in last and "data.path" in last
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError) as e:  # What the CLI prints as its one `error:` line.
        loop.run(tiny_config(**{"data.path": str(tmp_path / "empty.txt")}), tmp_path / "w")
    assert "\n" not in str(e.value) and "empty" in str(e.value)
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow  # ~7 s; test_resume_refusals_come_before_the_compile covers one by default.
def test_resume_refusals_keep_the_checkpoints(copy_of_trained, tiny_config, corpus, tmp_path):
    workdir = copy_of_trained
    ck = workdir / "checkpoints"
    tokenizer = (workdir / "tokenizer.json").read_text()
    # An optimizer change alters the saved state's tree: an error, not "unreadable".
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this run's state"):
        loop.run(tiny_config(**{**FAST, "optim.grad_clip": 0.0}), workdir)
    with pytest.raises(ConfigError, match="past train.num_steps=5"):
        loop.run(tiny_config(**{**FAST, "train.num_steps": 5, "optim.warmup_steps": 2}), workdir)
    other = tmp_path / "other.txt"
    text = corpus.read_text()
    assert "g" not in text
    other.write_text(text.replace("f", "g"))  # Same vocabulary size, other characters.
    with pytest.raises(checkpoint.CheckpointError, match="another tokenizer"):
        loop.run(tiny_config(**{**FAST, "data.path": str(other)}), workdir)
    assert (workdir / "tokenizer.json").read_text() == tokenizer
    assert sorted(p.name for p in ck.iterdir()) == ["10", "20"]  # Nothing set aside or lost.


def test_short_splits_and_bad_prompts_are_config_errors(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="data.seq_len"):
        loop.run(tiny_config(**{**FAST, "data.seq_len": 4000, "train.batch_size": 64}),
                 tmp_path / "a")
    with pytest.raises(ConfigError, match="sample.prompt"):
        loop.run(tiny_config(**{**FAST, "sample.prompt": "Ω", "sample.num_samples": 1}),
                 tmp_path / "b")


def test_init_from_refuses_other_shapes_and_warns_of_another_function(tiny_config, tmp_path,
                                                                      caplog):
    """checkpoint.init_from through weights.load_params: same shapes load (a changed activation
    is said), another shape is refused naming the field and the checkpoint's value."""

    def model(**overrides):
        config = registry.resolve(tiny_config(**overrides), 50)
        return config, registry.hyperparameters(config)

    saved_config, saved = model(**{"model.activation": "gelu_tanh"})
    abstract = weights.abstract_params(saved)
    params = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), abstract)
    weights.save_params(tmp_path / "imported", params, to_json(saved_config))
    source = str(tmp_path / "imported")

    def init_from_warnings():  # Orbax's own warnings aside.
        return [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "checkpoint.init_from=" in r.getMessage()]

    with caplog.at_level(logging.WARNING):
        loaded = weights.load_params(source, abstract, saved)
        assert init_from_warnings() == []
        _, same_shapes = model()
        weights.load_params(source, weights.abstract_params(same_shapes), same_shapes)
    (warning,) = init_from_warnings()  # Allowed (fine-tuning), but said.
    assert "model.activation='gelu_tanh'" in warning and "'gelu'" in warning
    assert all((np.asarray(x) == 0.5).all() for x in jax.tree.leaves(loaded))
    _, wider = model(**{"model.d_model": 64})
    with pytest.raises(checkpoint.CheckpointError, match="set --config.model.d_model=32"):
        weights.load_params(source, weights.abstract_params(wider), wider)


def test_a_config_from_another_code_version_is_refused_not_set_aside(trained_run, tmp_path):
    """A checkpoint whose saved config reads but no longer fits configs/base.py (a field's type
    changed without a mapping) is intact: resume says so and moves nothing to unreadable/."""
    from gpt_jax.config import saved_run_config

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    meta = run / "checkpoints" / "4" / "config" / "metadata"
    saved = json.loads(meta.read_text())
    saved["model"]["num_layers"] = "one"
    meta.write_text(json.dumps(saved))
    c = saved_run_config((run / "config.json").read_text())
    c.train.num_steps = 6
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this version's configs/base.py"):
        loop.run(c, run)  # Refused by resume.check, before the compile.
    manager = checkpoint.make_manager(run / "checkpoints", keep=3)  # And by the restore itself.
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this version's configs/base.py"):
        checkpoint.restore_latest(manager, None, None, c.to_dict())
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]


@pytest.mark.parametrize(("change", "words"), [
    ({"model.d_model": 64}, "model.d_model"),  # Another shape than the checkpoints'.
    pytest.param({"checkpoint.init_from": "scratch"}, "already has checkpoints", marks=pytest.mark.slow),
    pytest.param({"train.num_steps": 1}, "past train.num_steps=1", marks=pytest.mark.slow),
])
def test_resume_refusals_come_before_the_compile(trained_run, tmp_path, caplog, change, words):
    from gpt_jax.config import saved_run_config

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    c = saved_run_config((run / "config.json").read_text())
    for key, value in change.items():
        group, field = key.split(".")
        c[group][field] = value
    with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(ValueError, match=words):
        loop.run(c, run)
    assert "compiled" not in caplog.text and sorted(os.listdir(run / "checkpoints")) == ["2", "4"]


def test_a_missing_init_from_is_refused_before_the_compile(tiny_config, tmp_path, caplog):
    c = tiny_config(**{"checkpoint.init_from": str(tmp_path / "nope")})
    with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(ValueError, match="init_from"):
        loop.run(c, tmp_path / "run")
    assert "compiled" not in caplog.text
