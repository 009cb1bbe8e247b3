"""The sweep runner (gpt_jax/sweep): declarations expand as written, runs are named stably, a bad
sweep stops in one line before anything runs, done runs are skipped and interrupted ones resume,
and the SLURM array has one task per run. Reports: tests/test_report.py."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from gpt_jax.sweep import Eval, Sweep, axis, chain, product, runner, zipit
from gpt_jax.sweep import __main__ as sweep_main
from gpt_jax.sweep.declare import run_name

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_product_zipit_chain_expand_as_declared():
    lr, layers = axis("optim.lr", [1e-3, 3e-3]), axis("model.num_layers", [2, 4, 6])
    assert product(lr, layers) == [
        {"optim.lr": a, "model.num_layers": b} for a in (1e-3, 3e-3) for b in (2, 4, 6)]
    assert zipit(axis("model.d_model", [64, 128]), axis("model.num_heads", [2, 4])) == [
        {"model.d_model": 64, "model.num_heads": 2}, {"model.d_model": 128, "model.num_heads": 4}]
    assert chain(lr, layers) == [*lr, *layers]
    with pytest.raises(ValueError, match="one length"):
        zipit(lr, layers)
    with pytest.raises(ValueError, match="two axes set"):
        product(lr, axis("optim.lr", [1.0]))
    with pytest.raises(ValueError, match="non-empty list"):
        axis("optim.lr", "0.1")


def test_runs_are_points_times_seeds_in_order():
    sweep = Sweep(config="configs/quickstart.py", points=axis("model.positions", ["rope", "alibi"]),
                  seeds=(3, 1, 2))
    runs = sweep.runs()
    assert [(r.overrides["model.positions"], r.seed) for r in runs] == [
        ("rope", 3), ("rope", 1), ("rope", 2), ("alibi", 3), ("alibi", 1), ("alibi", 2)]
    assert [r.name for r in runs[:2]] == ["positions=rope,seed=3", "positions=rope,seed=1"]
    assert len({r.name for r in runs}) == len(runs)
    assert {r.label for r in runs} == {"positions=rope", "positions=alibi"}
    assert sweep.overrides(runs[1]) == {"model.positions": "rope", "train.seed": 1}


def test_names_are_stable_safe_and_short():
    assert run_name({}, 0) == "base,seed=0"
    assert run_name({"data.path": "/a b/c.txt", "optim.lr": 0.001}, 1) == (
        "path=-a-b-c.txt,lr=0.001,seed=1")
    long = run_name({"data.prepared": "x" * 200}, 0)
    assert len(long) < 100 and long == run_name({"data.prepared": "x" * 200}, 0)
    # Two keys with one last part would make one name: the hash tells them apart.
    a = run_name({"model.dropout": 0.1, "data.dropout": 0.2}, 0)
    b = run_name({"model.dropout": 0.2, "data.dropout": 0.1}, 0)
    assert a != b and "~" in a


def test_labels_and_names():
    sweep = Sweep(config="c.py", points=[{"model.positions": "rope", "optim.decay_steps": 5}],
                  labels={"model.positions": "", "optim.decay_steps": None})
    assert sweep.runs()[0].label == "rope"
    named = Sweep(config="c.py", points=[{}, {"model.mlp": "swiglu"}], names=["a", "b"])
    assert [r.label for r in named.runs()] == ["a", "b"]
    assert named.runs()[0].name == "base,seed=0"


@pytest.mark.parametrize("kwargs, match", [
    ({"points": [{"data.path": "a/b"}, {"data.path": "a:b"}]}, "share the run folder"),
    ({"points": [{"optim.lr": 0.1}, {"optim.lr": "0.1"}]}, "share the run folder"),
    ({"points": [{"optim.lr": 0.1, "model.d_model": 64}, {"optim.lr": 0.2, "model.d_model": 64}],
      "labels": {"optim.lr": None}}, "both labelled 'd_model=64'"),
    ({"points": []}, "points is empty"),
    ({"seeds": (1, 1)}, "distinct seeds"),
    ({"points": [{"train.seed": 1}]}, "Sweep.seeds"),
    ({"points": [{"optim.lr": [1]}]}, "bool, int, float or str"),
    ({"points": [{"optim.lr": 1.0}, {"optim.lr": 1.0}]}, "twice"),
    ({"names": ["a", "b"]}, "one per point"),
    ({"evals": [Eval("x"), Eval("x")]}, "repeat"),
])
def test_bad_declarations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sweep(config="c.py", **kwargs)


def test_bad_eval_names_and_args():
    with pytest.raises(ValueError, match="letters"):
        Eval("a b")
    with pytest.raises(ValueError, match="sets --workdir"):
        Eval("x", ("--workdir=/tmp",))
    with pytest.raises(ValueError, match="a tuple of flags"):
        Eval("x", "--per_position")
    with pytest.raises(ValueError, match="Did you mean: per_position"):
        Eval("x", ("--per_positon",))  # Refused now, not after every run has trained.
    with pytest.raises(ValueError, match="--seq_len=x"):
        Eval("x", ("--seq_len=x",))
    Eval("ok", ("--per_position", "--seq_len=128", "--config.mesh.data=1"))  # Mesh overrides.


def _sweep_file(folder: pathlib.Path, body: str) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.py"
    path.write_text("from gpt_jax.sweep import Eval, Sweep, axis, product\n\n" + body)
    return path


def _tiny_config_file(folder: pathlib.Path, corpus: pathlib.Path) -> pathlib.Path:
    """A recipe for a 1-layer d 32 char model on `corpus` that trains 30 steps in seconds."""
    path = folder / "tiny.py"
    path.write_text(f'''from configs import base


def get_config():
    c = base.get_config()
    c.data.path, c.data.cache_dir, c.data.tokenizer = {str(corpus)!r}, {str(folder / "cache")!r}, "char"
    c.data.seq_len, c.train.batch_size, c.train.num_steps = 16, 4, 30
    c.model.num_layers, c.model.num_heads, c.model.d_model = 1, 2, 32
    c.train.eval_every, c.train.eval_batches, c.checkpoint.every = 10, 1, 10
    c.optim.warmup_steps, c.log.every, c.log.progress = 2, 5, "lines"
    c.log.tensorboard, c.sample.num_samples = False, 0
    return c
''')
    return path


def _tiny_sweep(tmp_path: pathlib.Path, corpus: pathlib.Path, args: str = "") -> pathlib.Path:
    """tmp_path/exp/sweep.py: a Sweep of the tiny recipe (_tiny_config_file) with `args`, the
    Sweep's other arguments as Python source."""
    config = _tiny_config_file(tmp_path, corpus)
    return _sweep_file(tmp_path / "exp", f"def get_sweep():\n    return Sweep(config={str(config)!r}"
                                         + (f", {args}" if args else "") + ")\n")


def _single_run(path: pathlib.Path) -> tuple[runner.Loaded, runner.Point]:
    """The loaded sweep of `path` and its one run."""
    loaded = runner.load(str(path))
    (point,) = loaded.sweep.runs()
    return loaded, point


def _cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt_jax.sweep", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("body, match", [
    (None, "no such sweep file"),
    ("X = 1\n", "defines no get_sweep"),
    ("def get_sweep():\n    return 3\n", "returned int, not a Sweep"),
    ("def get_sweep():\n    return Sweep(config='c.py', seeds=(1, 1))\n", "distinct seeds"),
    ("def get_sweep():\n    raise KeyError('boom')\n", "fix the sweep file"),
])
def test_a_bad_sweep_file_is_one_line(tmp_path, body, match):
    path = tmp_path / "exp" / "sweep.py" if body is None else _sweep_file(tmp_path / "exp", body)
    with pytest.raises(runner.SweepError, match=match):
        runner.load(str(path))


@pytest.mark.parametrize("point, match", [
    ({"model.num_layerz": 2}, "Did you mean \"num_layers\""),
    ({"model.num_layers": "two"}, "model.num_layers='two'"),
    ({"model.positions": "spiral"}, "model.positions"),
    ({"train.num_steps": 0}, "train.num_steps=0 must be"),
    ({"train.final_eval": "none"}, "final_eval=none leaves no final val row"),
])
def test_bad_overrides_are_refused_by_name(tmp_path, corpus, point, match):
    path = _tiny_sweep(tmp_path, corpus, f"points=[{point!r}]")
    loaded = runner.load(str(path))
    with pytest.raises(runner.SweepError, match=match):
        runner.config_of(loaded, loaded.sweep.runs()[0])


def test_a_bad_point_stops_the_launch_in_one_line_before_anything_runs(tmp_path, corpus):
    path = _tiny_sweep(tmp_path, corpus, "points=[{}, {'model.num_layers': -1}]")
    result = _cli(path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: run num_layers=-1,seed=0: model.num_layers=-1")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "exp" / "runs").exists()  # Not even the valid point ran.


def test_dry_run_lists_runs_and_commands(tmp_path, corpus, capsys):
    path = _tiny_sweep(tmp_path, corpus,
                       "points=axis('model.attention', ['dot_product', 'additive']), seeds=(0, 1)")
    sweep_main.main([str(path), "--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[0] attention=dot_product,seed=0: new"
    assert "--config.model.attention=dot_product --config.train.seed=0" in lines[1]
    assert sum(line.startswith("[") for line in lines) == 4
    assert not (tmp_path / "exp" / "runs").exists()


def test_commands_carry_every_override(tmp_path):
    path = _sweep_file(tmp_path / "exp", "def get_sweep():\n    return Sweep(config="
                                         "'configs/quickstart.py', base={'model.qk_norm': True}, "
                                         "points=[{'optim.lr': 0.003}], seeds=(7,))\n")
    loaded = runner.load(str(path))
    (point,) = loaded.sweep.runs()
    command = runner.train_command(loaded, point)
    assert command[1:] == ["-m", "gpt_jax.train", "--config=configs/quickstart.py",
                           f"--workdir={tmp_path / 'exp' / 'runs' / 'lr=0.003,seed=7'}",
                           "--config.model.qk_norm=true", "--config.optim.lr=0.003",
                           "--config.train.seed=7"]
    assert runner.config_of(loaded, point).optim.lr == 0.003


def _fake_run(workdir: pathlib.Path, steps: int, final: bool, checkpoint: bool = False) -> None:
    workdir.mkdir(parents=True)
    rows = [{"step": 0, "val/loss": 4.0}, {"step": steps // 2, "train/loss": 3.0}]
    if final:
        rows.append({"step": steps, "val/loss": 2.0})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9')
    if checkpoint:
        (workdir / "checkpoints" / str(steps // 2)).mkdir(parents=True)


def test_status_done_evals_partial_new(tmp_path):
    path = _sweep_file(tmp_path / "exp", "def get_sweep():\n    return Sweep(config='c.py', "
                                         "seeds=(0, 1, 2, 3), evals=[Eval('x')])\n")
    loaded = runner.load(str(path))
    runs = loaded.sweep.runs()
    _fake_run(loaded.workdir(runs[0]), 10, final=True)
    (loaded.workdir(runs[0]) / "evals").mkdir()
    newest = '{"checkpoint": "newest", "step": %d, "text": []}\n'
    (loaded.workdir(runs[0]) / "evals" / "x.jsonl").write_text(newest % 10 + '{"st')
    _fake_run(loaded.workdir(runs[1]), 10, final=True)
    (loaded.workdir(runs[1]) / "evals").mkdir()  # A record of an earlier checkpoint: not done.
    (loaded.workdir(runs[1]) / "evals" / "x.jsonl").write_text(newest % 5)
    _fake_run(loaded.workdir(runs[2]), 10, final=False, checkpoint=True)
    assert [runner.status(loaded, r, 10) for r in runs] == ["done", "evals", "partial", "new"]
    assert runner.status(loaded, runs[0], 20) == "new"  # More steps asked: not done.


def test_a_run_made_with_another_config_stops_the_launch(tmp_path, corpus):
    loaded, point = _single_run(_tiny_sweep(tmp_path, corpus, "base={'optim.lr': 0.003}"))
    saved = runner.config_of(loaded, point)
    assert runner.stale_field(loaded.workdir(point), saved) is None  # No run yet.
    saved.optim.lr, saved.log.every = 0.001, 7  # log.* may differ: it trains the same.
    _fake_run(loaded.workdir(point), 30, final=True)
    (loaded.workdir(point) / "config.json").write_text(saved.to_json())
    with pytest.raises(runner.SweepError, match=r"another config \(optim.lr: 0.001 → 0.003\)"):
        runner.run(loaded, [point], parallel=1, say=lambda _: None)


def test_a_grown_run_saved_at_a_shallower_depth_is_not_stale(tmp_path, corpus):
    """With train.grow_at, config.json holds the current depth's config; a run interrupted before
    its growth resumes (gpt_jax/finetune/grow.py's phase_config is what it saved)."""
    from gpt_jax.finetune import grow

    loaded, point = _single_run(_tiny_sweep(
        tmp_path, corpus, "base={'model.num_layers': 4, 'train.grow_at': '10'}"))
    config = runner.config_of(loaded, point)
    loaded.workdir(point).mkdir(parents=True)
    for step in (0, 11):
        (loaded.workdir(point) / "config.json").write_text(grow.phase_config(config, step).to_json())
        assert runner.stale_field(loaded.workdir(point), config) is None
    config.optim.lr = 0.5
    assert runner.stale_field(loaded.workdir(point), config) == "optim.lr: 0.001 → 0.5"


def test_an_eval_of_another_checkpoint_is_done_once_recorded(tmp_path):
    (tmp_path / "evals").mkdir()
    record = tmp_path / "evals" / "x.jsonl"
    record.write_text(json.dumps({"checkpoint": "best", "step": 700}) + "\n")
    assert runner.has_eval(tmp_path, "x", 1000)
    record.write_text(json.dumps({"checkpoint": "newest", "step": 700}) + "\n")
    assert not runner.has_eval(tmp_path, "x", 1000)  # An earlier save than the final one.


def test_busy_is_read_from_this_launchs_output_only(tmp_path):
    log = tmp_path / "run.log"
    refused = "error: /x is in use by another training run (pid 1 on host h); wait for it\n"
    log.write_text("$ train\n" + refused)
    assert runner._locked(log, 0)
    start = log.stat().st_size
    log.write_text(log.read_text() + "$ train\nerror: out of memory\n")
    assert not runner._locked(log, start)  # An earlier launch's refusal is not this failure.
    start = log.stat().st_size  # The launch training it writes to the same log meanwhile.
    log.write_text(log.read_text() + "$ train\n" + refused + "step 40/200: loss 2.1\n")
    assert runner._locked(log, start)


def test_report_with_another_root_leaves_the_experiment_alone(tmp_path, capsys):
    exp = tmp_path / "exp"
    path = _sweep_file(exp, "def get_sweep():\n    return Sweep(config='configs/quickstart.py')\n")
    (exp / "README.md").write_text("kept\n")
    loaded = runner.load(str(path), str(tmp_path / "elsewhere"))
    (point,) = loaded.sweep.runs()
    _fake_run(loaded.workdir(point), 10, final=True)
    (loaded.workdir(point) / "config.json").write_text(json.dumps({"train": {"num_steps": 10}}))
    sweep_main.main([str(path), f"--root={tmp_path / 'elsewhere'}", "--report"])
    assert (tmp_path / "elsewhere" / "results.csv").is_file()
    assert sorted(p.name for p in exp.iterdir()) == ["README.md", "sweep.py"]
    assert (exp / "README.md").read_text() == "kept\n"


@pytest.mark.parametrize("args, match", [
    (["--slurm_arg=--gres=gpu:1"], "give --slurm too"),
    (["--report", "--parallel=2"], "leave it out with --report"),
    (["--slurm=x.sh", "--slurm_concurrent=0"], "give at least 1"),
])
def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys, args, match):
    path = _sweep_file(tmp_path / "exp",
                       "def get_sweep():\n    return Sweep(config='configs/quickstart.py')\n")
    with pytest.raises((SystemExit, runner.SweepError)) as e:
        sweep_main.main([str(path), *[a.replace("x.sh", str(tmp_path / "x.sh")) for a in args]])
    said = str(e.value) if e.type is runner.SweepError else capsys.readouterr().err
    assert match in said and len(said.strip().splitlines()) == 1
    assert not (tmp_path / "x.sh").exists()


def test_device_groups_split_gpus_and_cores(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert runner.device_groups(2) == [{"env": {"CUDA_VISIBLE_DEVICES": "0,1"}},
                                       {"env": {"CUDA_VISIBLE_DEVICES": "2,3"}}]
    with pytest.raises(runner.SweepError, match="does not divide the 4 visible GPUs"):
        runner.device_groups(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 5})
    assert runner.device_groups(2) == [{"cores": [0, 1]}, {"cores": [2, 3]}]
    with pytest.raises(runner.SweepError, match="exceeds the 5 CPU cores"):
        runner.device_groups(6)
    assert runner.device_groups(1) == [{}]


def test_slurm_array_has_one_task_per_run_and_is_valid_bash(tmp_path, corpus):
    path = _tiny_sweep(tmp_path, corpus, "points=axis('model.num_layers', [1, 2, 3]), seeds=(0, 1)")
    script = tmp_path / "array.sh"
    sweep_main.main([str(path), f"--slurm={script}", "--slurm_arg=--gres=gpu:1",
                     "--slurm_concurrent=2"])
    text = script.read_text()
    assert "#SBATCH --array=0-5%2\n" in text and "#SBATCH --gres=gpu:1\n" in text
    assert '--point="${SLURM_ARRAY_TASK_ID}"' in text and "#SBATCH --requeue\n" in text
    assert (tmp_path / "exp" / "runs" / "logs").is_dir()  # Where SLURM writes the task logs.
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
    if shellcheck.exists():
        check = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    with pytest.raises(runner.SweepError, match=r"runs 0\.\.5"):
        sweep_main.main([str(path), "--point=6"])


def test_slurm_task_runs_its_point_and_requeues_when_preempted(tmp_path, corpus):
    """The script under bash with stand-ins for srun (records its argv, exits FAKE_STATUS) and
    scontrol: task 3 asks for run 3; exit 130 (stopped by SLURM's signal, saved) requeues."""
    path = _tiny_sweep(tmp_path, corpus, "seeds=(0, 1, 2, 3)")
    script = tmp_path / "array.sh"
    sweep_main.main([str(path), f"--slurm={script}"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", 'exit "${FAKE_STATUS:-0}"'), ("scontrol", "")):
        (bin_dir / name).write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\n'
                                    f"{body}\n")
        (bin_dir / name).chmod(0o755)
    for status, requeued in ((0, False), (1, False), (130, True), (143, True)):
        (tmp_path / "scontrol.args").unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
               "SLURM_ARRAY_TASK_ID": "3", "FAKE_STATUS": str(status)}
        r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        assert r.returncode == status, r.stderr
        srun = (tmp_path / "srun.args").read_text().splitlines()
        # The Python that wrote the script (no GPT_JAX_ENV or GPT_JAX_SETUP here).
        assert srun[:5] == ["--ntasks=1", sys.executable, "-m", "gpt_jax.sweep", str(path)]
        assert srun[-1] == "--point=3"
        assert (tmp_path / "scontrol.args").exists() == requeued
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "77"]


def _wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_points_two_seeds_end_to_end_with_a_killed_run(tmp_path, corpus):
    """A 2 × 2 sweep: one run is killed (SIGKILL) mid-training; the launch goes on with the
    others and fails naming it; the next launch skips the three finished runs, resumes the
    killed one from its checkpoint and writes the report."""
    exp = tmp_path / "exp"
    path = _tiny_sweep(tmp_path, corpus,
                       "base={'train.num_steps': 200, 'checkpoint.every': 20, "
                       "'optim.decay_steps': 200},\n"
                       "        points=axis('model.positions', ['learned', 'rope']), "
                       "seeds=(0, 1), evals=[Eval('T16', ('--seq_len=16',))]")
    launch = subprocess.Popen([sys.executable, "-m", "gpt_jax.sweep", str(path)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = exp / "runs" / "positions=learned,seed=0"
    _wait_for(lambda: (victim / "checkpoints" / "20").is_dir(), 300, "the first checkpoint")
    holder = json.loads((victim / ".lock").read_text())
    os.kill(holder["pid"], signal.SIGKILL)
    out, err = launch.communicate(timeout=600)
    assert launch.returncode == 1, err
    assert "1 run(s) failed: positions=learned,seed=0" in err
    assert "3 ran, 0 already done" in out

    again = _cli(path)
    assert again.returncode == 0, again.stderr
    assert "1 ran, 3 already done" in again.stdout
    log = (exp / "runs" / "logs" / "positions=learned,seed=0.log").read_text()
    assert "resumed from" in log
    for name in ("results.csv", "results.md", "curves.png", "points.png"):
        assert (exp / name).is_file()
    rows = (exp / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("run,configuration,seed,model.positions,")
    assert all(row.split(",")[-1] for row in rows[1:])  # Every run's eval column is filled.
    third = _cli(path)
    assert "0 ran, 4 already done" in third.stdout


@pytest.mark.slow
def test_a_run_another_launch_holds_is_reported_busy(tmp_path, corpus):
    """The workdir lock keeps two launches apart: a run whose workdir is held is not trained
    twice; the launch reports it busy, and it is not counted as failed."""
    from gpt_jax.training import lock

    loaded, point = _single_run(_tiny_sweep(tmp_path, corpus))
    loaded.workdir(point).mkdir(parents=True)
    with lock.WorkdirLock(loaded.workdir(point)):  # As a launch training it would hold it.
        outcome = runner.run(loaded, [point], parallel=1, say=lambda _: None)
    assert outcome == {"done": [], "ran": [], "failed": [], "busy": [point.name], "stopped": []}
    assert not (loaded.workdir(point) / "metrics.jsonl").exists()


@pytest.mark.parametrize("code, kind", [(143, "stopped"), (130, "stopped"), (1, "failed")])
def test_a_run_stopped_by_a_signal_is_not_a_failure(tmp_path, corpus, monkeypatch, code, kind):
    """A run that exits 128 + SIGTERM/SIGINT saved a checkpoint (the loop's preemption path):
    the launch reports it stopped, and a --point task exits 130 so SLURM requeues it."""
    path = _tiny_sweep(tmp_path, corpus)
    monkeypatch.setattr(runner, "train_command",
                        lambda loaded, p: [sys.executable, "-c", f"raise SystemExit({code})"])
    loaded = runner.load(str(path))
    outcome = runner.run(loaded, loaded.sweep.runs(), parallel=1, say=lambda _: None)
    assert outcome[kind] == ["base,seed=0"]
    with pytest.raises(SystemExit) as e:
        sweep_main.main([str(path), "--point=0"])
    assert e.value.code == (130 if kind == "stopped" else 1)
