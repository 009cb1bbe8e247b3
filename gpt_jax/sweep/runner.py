"""Runs a sweep's points: each an ordinary `python -m gpt_jax.train` process (then its evals),
sequentially or N at a time with the devices split between them; writes a SLURM job array.

A run is done when its metrics.jsonl has the final val row (step train.num_steps) and each eval
its record; a launch skips done runs, and an interrupted one (killed, preempted, a failed step)
is simply started again: training resumes from its newest checkpoint. Two launches never train
one run at once: the run's workdir lock (gpt_jax/training/lock.py) refuses the second, which
reports the run as busy and goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from gpt_jax import cli
from gpt_jax.sweep.declare import Point, Sweep, value_arg

SWEEP_LOG = "sweep.jsonl"  # Beside the runs: one line per launch (start, end, host, outcome).
EVALS = "evals"  # In a run's workdir: evals/NAME.jsonl, evaluate's record of each Eval.


class SweepError(ValueError):
    """A sweep file or launch that cannot work; the message names the fix, in one line."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A sweep file's declaration and where its runs live."""

    sweep: Sweep
    file: pathlib.Path  # The sweep file.
    root: pathlib.Path  # The runs' workdirs: ROOT/<run name>.
    repo: pathlib.Path  # The folder the runs start in (configs/ … resolve there).

    @property
    def name(self) -> str:
        return self.file.parent.name

    def workdir(self, point: Point) -> pathlib.Path:
        return self.root / point.name


def load(path: str, root: str | None = None) -> Loaded:
    """The sweep of `path` (a file defining get_sweep() → Sweep); its runs under `root`,
    default the sweep file's folder's runs/."""
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise SweepError(f"{path}: no such sweep file; give experiments/NAME/sweep.py")
    spec = importlib.util.spec_from_file_location(f"_sweep_{file.parent.name}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        get = getattr(module, "get_sweep", None)
        if get is None:
            raise SweepError(f"{path} defines no get_sweep(); define one returning a "
                             "gpt_jax.sweep.Sweep (see experiments/README.md)")
        sweep = get()
    except SweepError:
        raise
    except Exception as e:  # The file's own error: one line, with its line number.
        raise SweepError(f"{path}: {cli.brief(e, line=-1)}; fix the sweep file") from None
    if not isinstance(sweep, Sweep):
        raise SweepError(f"{path}: get_sweep() returned {type(sweep).__name__}, not a Sweep")
    repo = cli.recipes_dir().parent
    return Loaded(sweep, file.resolve(), pathlib.Path(root).expanduser().resolve() if root
                  else file.resolve().parent / "runs", repo)


def config_of(loaded: Loaded, point: Point) -> ml_collections.ConfigDict:
    """The run's config, built here as the train command will build it and validated, so a bad
    override or value stops the launch before anything runs."""
    from gpt_jax import config as config_lib

    path, _, variant = loaded.sweep.config.partition(":")
    file = (loaded.repo / path) if not os.path.isabs(path) else pathlib.Path(path)
    if not file.is_file():
        raise SweepError(f"Sweep.config={loaded.sweep.config!r}: no file {file}; give a config "
                         "file relative to the repository (configs/NAME.py[:VARIANT])")
    cli.use_own_recipes()
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config(variant) if variant else module.get_config()
    except Exception as e:
        raise SweepError(f"Sweep.config={loaded.sweep.config!r}: {cli.brief(e, line=-1)}") from None
    for key, value in loaded.sweep.overrides(point).items():
        if msg := cli.unknown_config_key(key, flag=""):
            raise SweepError(f"run {point.name}: {msg}")
        group, _, field = key.rpartition(".")
        try:
            setattr(config[group] if group else config, field, value)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise SweepError(f"run {point.name}: {key}={value!r}: {cli.brief(e, line=-1)}") from None
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise SweepError(f"run {point.name}: {e}") from None
    if config.train.final_eval == "none":  # The final val row marks a run done.
        raise SweepError(f"run {point.name}: train.final_eval=none leaves no final val row, which "
                         "marks a sweep's run done and which its report reads; use full or batches")
    return config


# Fields that may differ between a run's config.json and its sweep's config today: they do not
# change what is trained (logging, sampling, checkpoint cadence, evaluation, input threads, the
# mesh); `finetune.base` is pinned to a step folder when a run starts (gpt_jax/training/resume.py).
_FREE_GROUPS = ("log", "sample", "mesh")
_FREE_FIELDS = {
    "checkpoint": ("every", "keep"),
    "data": ("num_threads", "prefetch", "cache_dir", "verify_shards"),
    "train": ("eval_every", "eval_batches", "eval_decode", "final_eval", "eval_tasks",
              "eval_tasks_fewshot", "eval_tasks_limit", "eval_tasks_source", "memory_check",
              "tune_host_malloc"),
    "finetune": ("base",),
}


def stale_field(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> str | None:
    """The first field (`group.field: saved → now`) in which the run's config.json differs from
    `config`, the sweep's config for it, in what is trained; None if none does, or the run has no
    config.json yet. Fields the run resolved from None (the vocabulary size, the position table)
    are skipped. A run that grows (train.grow_at) saves the config of its current depth, which
    is compared with that phase's (gpt_jax/finetune/grow.py)."""
    path = workdir / "config.json"
    if not path.is_file():
        return None
    from gpt_jax import config as config_lib
    from gpt_jax.finetune import grow

    saved = json.loads(path.read_text())
    starts = [0, *(g + 1 for g in config_lib.grow_steps(config))]
    phases = [config] + ([grow.phase_config(config, s) for s in starts] if len(starts) > 1 else [])
    changes = [_first_change(saved, phase) for phase in phases]
    if None in changes:
        return None
    # Named from the phase of the saved depth, if any: its first difference is the real one.
    depth = saved.get("model", {}).get("num_layers")
    return next((c for c, p in zip(changes, phases, strict=True) if p.model.num_layers == depth),
                changes[0])


def _first_change(saved: dict, config: ml_collections.ConfigDict) -> str | None:
    for group, fields in config.to_dict().items():
        if group in _FREE_GROUPS or not isinstance(fields, dict):
            continue
        for field, value in fields.items():
            if field in _FREE_FIELDS.get(group, ()):
                continue
            old = saved.get(group, {}).get(field, value)
            if value is not None and old != value:  # 1e-3 == 0.001, 2 == 2.0: the same.
                return f"{group}.{field}: {old!r} → {value!r}"
    return None


def train_command(loaded: Loaded, point: Point) -> list[str]:
    """The run's training command (the README of an experiment shows the same)."""
    args = [sys.executable, "-m", "gpt_jax.train", f"--config={loaded.sweep.config}",
            f"--workdir={loaded.workdir(point)}"]
    args += [f"--config.{k}={value_arg(v)}" for k, v in loaded.sweep.overrides(point).items()]
    return args


def eval_command(loaded: Loaded, point: Point, name: str, args: Sequence[str]) -> list[str]:
    workdir = loaded.workdir(point)
    return [sys.executable, "-m", "gpt_jax.evaluate", f"--workdir={workdir}",
            f"--out={workdir / EVALS / name}.jsonl", *args]


def final_row(workdir: pathlib.Path, num_steps: int) -> dict[str, Any] | None:
    """The run's final val row (step num_steps, with val/loss), or None if it has none yet."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # A line cut by a kill.
            continue
        if row.get("step") == num_steps and "val/loss" in row:
            found = row
    return found


def eval_record(workdir: pathlib.Path, name: str) -> dict[str, Any] | None:
    """The newest record of the run's eval `name`, or None."""
    path = workdir / EVALS / f"{name}.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # A line cut by a kill.
            continue
    return rows[-1] if rows else None


def has_eval(workdir: pathlib.Path, name: str, num_steps: int) -> bool:
    """Whether the run's eval `name` has a record of its final checkpoint (another launch may
    have scored an earlier one while the final save was being written)."""
    record = eval_record(workdir, name)
    if record is None:
        return False
    # An Eval of another checkpoint (--checkpoint=best, a step) scores what it names.
    return record.get("checkpoint") != "newest" or record.get("step") == num_steps


def status(loaded: Loaded, point: Point, num_steps: int) -> str:
    """done | evals (trained, an eval missing) | partial (a checkpoint to resume) | new."""
    workdir = loaded.workdir(point)
    if final_row(workdir, num_steps) is not None:
        missing = [e for e in loaded.sweep.evals if not has_eval(workdir, e.name, num_steps)]
        return "evals" if missing else "done"
    checkpoints = workdir / "checkpoints"
    return "partial" if checkpoints.is_dir() and any(checkpoints.iterdir()) else "new"


def device_groups(parallel: int) -> list[dict[str, Any]]:
    """How `parallel` runs share this machine: each slot's environment (CUDA_VISIBLE_DEVICES of
    its share of the GPUs) or CPU cores (its share of this process's). One slot: all of it."""
    if parallel == 1:
        return [{}]
    gpus = _visible_gpus()
    if gpus:
        if len(gpus) % parallel:
            raise SweepError(f"--parallel={parallel} does not divide the {len(gpus)} visible GPUs; "
                             "give a divisor so every run gets the same devices")
        share = len(gpus) // parallel
        return [{"env": {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * share:(i + 1) * share])}}
                for i in range(parallel)]
    if not hasattr(os, "sched_getaffinity"):  # macOS: no affinity; the runs share the cores.
        return [{} for _ in range(parallel)]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < parallel:
        raise SweepError(f"--parallel={parallel} exceeds the {len(cores)} CPU cores this process "
                         "may use; give at most that many")
    share = len(cores) // parallel
    return [{"cores": cores[i * share:(i + 1) * share]} for i in range(parallel)]


def _visible_gpus() -> list[str]:
    """GPU ids this process may use, without starting jax (which would hold them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


@dataclasses.dataclass
class _Job:
    point: Point
    steps: list[list[str]]  # Commands still to run, in order.
    log: pathlib.Path
    slot: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    log_from: int = 0  # Where this launch's output of the current command starts in the log.


def run(loaded: Loaded, points: Sequence[Point], parallel: int,
        say: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Trains and evaluates every run of `points` that is not done, `parallel` at a time;
    returns the names of the runs by outcome: done (already), ran, failed, busy, stopped (by a
    signal: it saved a checkpoint and resumes at the next launch)."""
    configs = {p.name: config_of(loaded, p) for p in points}  # Every run checked first.
    for p in points:
        if changed := stale_field(loaded.workdir(p), configs[p.name]):
            raise SweepError(f"run {p.name} in {loaded.root} was made with another config "
                             f"({changed}); move its workdir away to rerun it, or restore the "
                             "sweep's setting")
    slots = device_groups(parallel)
    outcome: dict[str, list[str]] = {"done": [], "ran": [], "failed": [], "busy": [],
                                     "stopped": []}
    pending = []
    for p in points:
        state = status(loaded, p, configs[p.name].train.num_steps)
        if state == "done":
            outcome["done"].append(p.name)
            continue
        steps = [] if state == "evals" else [train_command(loaded, p)]
        num_steps = configs[p.name].train.num_steps
        steps += [eval_command(loaded, p, e.name, e.args) for e in loaded.sweep.evals
                  if state != "evals" or not has_eval(loaded.workdir(p), e.name, num_steps)]
        log = loaded.root / "logs" / f"{p.name}.log"
        pending.append(_Job(p, steps, log, slot=-1))
        say(f"{p.name}: {state}" + (" (resuming from its checkpoint)" if state == "partial" else ""))
    loaded.root.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    launch = {"start": _now(), "host": platform.node(), "cpus": cpus,
              "cpu": _cpu_model(), "parallel": parallel, "runs": [j.point.name for j in pending]}
    begin, running, free = time.time(), [], list(range(len(slots)))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # A scheduler's kill: stop as Ctrl-C.
    try:
        while pending or running:
            while pending and free:
                job = pending.pop(0)
                job.slot = free.pop(0)
                _start(job, slots[job.slot], loaded.repo, say)
                running.append(job)
            time.sleep(0.2)
            for job in list(running):
                code = job.proc.poll()
                if code is None:
                    continue
                if code == 0 and job.steps:  # Its evals next, in the same slot.
                    _start(job, slots[job.slot], loaded.repo, say)
                    continue
                running.remove(job)
                free.append(job.slot)
                kind = ("ran" if code == 0 else "busy" if _locked(job.log, job.log_from)
                        else "stopped" if code in _STOPPED else "failed")
                outcome[kind].append(job.point.name)
                say(f"{job.point.name}: {'finished' if code == 0 else kind} in "
                    f"{time.time() - job.started:.0f} s" + ("" if code == 0 else f" (exit {code}; "
                                                            f"see {job.log})"))
    except KeyboardInterrupt:
        launch["interrupted"] = True
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        with _no_interrupts():  # Stopping the runs and the launch's record are not cut short.
            for job in running:  # They save a checkpoint and resume at the next launch.
                if job.proc and job.proc.poll() is None:
                    job.proc.terminate()
            for job in running:
                if job.proc:
                    job.proc.wait()
            launch.update(end=_now(), seconds=round(time.time() - begin, 1),
                          **{k: len(v) for k, v in outcome.items()})
            with open(loaded.root / SWEEP_LOG, "a") as f:
                f.write(json.dumps(launch) + "\n")
    return outcome


# Exit codes of a run stopped by SIGTERM or SIGINT: 128 + the signal (it saved a checkpoint), or
# killed by it before its handler was installed (−signal). Either resumes at the next launch.
_STOPPED = (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _no_interrupts():
    """SIGINT and SIGTERM ignored inside."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _start(job: _Job, slot: dict[str, Any], repo: pathlib.Path, say: Callable[[str], None]) -> None:
    command = job.steps.pop(0)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **slot.get("env", {}), "PYTHONUNBUFFERED": "1"}
    cores = slot.get("cores")
    with open(job.log, "a") as log:
        job.log_from = log.tell()
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        job.proc = subprocess.Popen(
            command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    if not job.started:
        job.started = time.time()
        say(f"{job.point.name}: started" + (f" on cores {cores}" if cores else "")
            + (f" on GPUs {slot['env']['CUDA_VISIBLE_DEVICES']}" if "env" in slot else ""))


def _locked(log: pathlib.Path, start: int) -> bool:
    """Whether the command whose output starts at byte `start` of `log` was refused because
    another launch holds the run's workdir (training's one-line error, gpt_jax/training/lock.py)."""
    with open(log, "rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").strip().splitlines()
    # Another launch training the run may write to the same log in between: any line counts.
    return any(line.startswith("error: ") and "is in use by another" in line for line in lines)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def slurm_script(loaded: Loaded, points: Sequence[Point], extra: Sequence[str],
                 concurrent: int | None) -> str:
    """A SLURM job array: task K runs the sweep's K-th run (`--point=K`) as one job step, which
    skips itself when done and resumes when interrupted, so the array can be resubmitted as it
    is. Preemption as tools/slurm/train.sbatch: SIGTERM 120 s before the time limit, the run
    saves, the launch exits 130, and the task requeues itself. GPT_JAX_ENV (a virtualenv) or
    GPT_JAX_SETUP (a command) prepare the environment, as there."""
    if any(c.isspace() or c in "\"'$`\\" for c in str(loaded.root)):
        raise SweepError(f"--root={loaded.root}: #SBATCH lines cannot quote it; give a root path "
                         "without spaces or quotes")
    if concurrent is not None and concurrent < 1:
        raise SweepError(f"--slurm_concurrent={concurrent}: give at least 1 (or leave it out)")
    (loaded.root / "logs").mkdir(parents=True, exist_ok=True)  # SLURM does not make --output's.
    limit = f"%{concurrent}" if concurrent else ""
    sweep = f"{shlex.quote(str(loaded.file))} --root={shlex.quote(str(loaded.root))}"
    lines = ["#!/bin/bash",
             f"# {len(points)} runs of {loaded.file}. After they finish:",
             f"#   python -m gpt_jax.sweep {sweep} --report",
             f"#SBATCH --job-name={loaded.name}",
             f"#SBATCH --array=0-{len(points) - 1}{limit}",
             "#SBATCH --ntasks=1",
             "#SBATCH --signal=TERM@120",
             "#SBATCH --requeue",
             "#SBATCH --open-mode=append",
             f"#SBATCH --output={loaded.root}/logs/slurm-%A_%a.out",
             *[f"#SBATCH {arg}" for arg in extra],
             "set -uo pipefail",
             f"cd {shlex.quote(str(loaded.repo))} || exit 1",
             'if [ -n "${GPT_JAX_ENV:-}" ]; then',
             "  # shellcheck source=/dev/null",
             '  source "${GPT_JAX_ENV}/bin/activate" || { echo "error: cannot activate '
             'GPT_JAX_ENV=${GPT_JAX_ENV}" >&2; exit 1; }',
             "fi",
             'if [ -n "${GPT_JAX_SETUP:-}" ]; then',
             '  eval "${GPT_JAX_SETUP}" || { echo "error: GPT_JAX_SETUP failed: ${GPT_JAX_SETUP}" >&2; '
             "exit 1; }",
             "fi",
             "# The Python that wrote this script, unless an environment was set up above.",
             f"python={shlex.quote(sys.executable)}",
             'if [ -n "${GPT_JAX_ENV:-}${GPT_JAX_SETUP:-}" ]; then python=python; fi',
             f'srun --ntasks=1 "${{python}}" -m gpt_jax.sweep {sweep} '
             '--point="${SLURM_ARRAY_TASK_ID}"',
             "status=$?",
             "# Stopped by the signal (130: the launch; 143: before it could catch it): requeue.",
             'if [ "${status}" -eq 130 ] || [ "${status}" -eq 143 ]; then',
             '  scontrol requeue "${SLURM_JOB_ID}"',
             "fi",
             'exit "${status}"']
    return "\n".join(lines) + "\n"
