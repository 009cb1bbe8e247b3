"""tools/slurm/train.sbatch, run with stand-ins for srun and scontrol: an array task runs its own
point, a preempted run (exit 143) requeues itself, and the script is shellcheck-clean."""

import os
import pathlib
import shutil
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "tools" / "slurm" / "train.sbatch"


@pytest.fixture
def slurm(tmp_path):
    """run(*args, status=0, **env) → (rc, srun's argv, scontrol's argv or None, stderr): the
    script under bash with fake srun (records its argv, exits `status`) and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\n'
                        'exit "${FAKE_STATUS:-0}"\n' if name == "srun" else
                        f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\n')
        tool.chmod(0o755)

    def run(*args, status=0, **env):
        for name in ("srun", "scontrol"):
            (tmp_path / f"{name}.args").unlink(missing_ok=True)
        full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
                "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "FAKE_STATUS": str(status), **env}
        r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full)
        read = lambda n: ((tmp_path / f"{n}.args").read_text().splitlines()
                          if (tmp_path / f"{n}.args").exists() else None)
        return r.returncode, read("srun"), read("scontrol"), r.stderr

    return run


def test_a_single_run_passes_its_flags(slurm):
    rc, srun, scontrol, _ = slurm("--config=configs/gpt2.py:small", "--workdir=/shared/r")
    assert rc == 0 and scontrol is None
    assert srun[-4:] == ["--config.mesh.dcn_data=2", "--config.mesh.fsdp=-1",
                         "--config=configs/gpt2.py:small", "--workdir=/shared/r"]


def test_an_array_task_runs_its_own_point(slurm, tmp_path):
    (tmp_path / "points.txt").write_text(
        "# lr sweep\n--config.optim.lr=1e-3 --workdir=runs/a\n\n--config.optim.lr=3e-3 --workdir=runs/b\n")
    rc, srun, _, _ = slurm("--config.train.num_steps=10", SLURM_ARRAY_TASK_ID="1",
                           POINTS="points.txt")  # Relative to the submit directory.
    assert rc == 0
    assert srun[-3:] == ["--config.optim.lr=3e-3", "--workdir=runs/b", "--config.train.num_steps=10"]
    rc, srun, _, err = slurm(SLURM_ARRAY_TASK_ID="2", POINTS="points.txt")
    assert rc == 1 and "has no point 2" in err
    rc, _, _, err = slurm(SLURM_ARRAY_TASK_ID="0")
    assert rc == 1 and "needs POINTS=FILE" in err


def test_a_preempted_run_requeues_and_a_failure_does_not(slurm):
    rc, _, scontrol, _ = slurm("--workdir=/shared/r", status=143)
    assert rc == 143 and scontrol == ["requeue", "77"]
    rc, _, scontrol, _ = slurm("--workdir=/shared/r", status=1)
    assert rc == 1 and scontrol is None


def test_the_environment_is_activated_first(slurm, tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'echo activated > "{tmp_path}/activated"\n')
    assert slurm("--workdir=r", GPT_JAX_ENV=str(tmp_path / "venv"))[0] == 0
    assert (tmp_path / "activated").read_text() == "activated\n"
    rc, srun, _, err = slurm("--workdir=r", GPT_JAX_ENV=str(tmp_path / "nope"))
    assert rc == 1 and srun is None and "cannot activate" in err


def test_shellcheck_clean_or_at_least_parsed():
    """shellcheck (requirements-dev.txt installs it from PyPI); only bash -n, the issue's
    fallback, where it is missing."""
    tool = shutil.which("shellcheck")
    r = subprocess.run([tool, str(SCRIPT)] if tool else ["bash", "-n", str(SCRIPT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
