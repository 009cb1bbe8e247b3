"""Multi-device and multi-process runs, and joining a distributed run. The 8-device equivalence
tests live in tests/multidevice/ and run here in a subprocess (XLA fixes the CPU device count at
import); the one-process mesh and sharding unit tests are in test_sharding.py."""

import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import base
from gpt_jax.config import ConfigError
from gpt_jax.parallel import distributed

REPO = pathlib.Path(__file__).resolve().parent.parent


def mesh_cfg(**sizes) -> ml_collections.ConfigDict:
    c = base.get_config().mesh
    for k, v in sizes.items():
        c[k] = v
    return c


@pytest.mark.slow
def test_eight_device_equivalence_and_shardings():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "--runslow", str(REPO / "tests" / "multidevice")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout


@pytest.mark.slow
def test_mesh_mismatch_is_one_line_from_the_cli(corpus, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [sys.executable, "-m", "gpt_jax.train", f"--config.data.path={corpus}",
         f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.mesh.data=3",
         f"--workdir={tmp_path / 'w'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: mesh.data=3") and "device count is 2" in last, out.stderr[-2000:]
    assert not (tmp_path / "w").exists()  # Refused before anything was written.


@pytest.mark.parametrize(("env", "reason"), [
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS=4"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE=2"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "JAX_COORDINATOR_ADDRESS"),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "a multi-host TPU pod"),
    ({"SLURM_NTASKS": "1"}, None),  # One task: nothing to join.
    ({"TPU_WORKER_HOSTNAMES": "a"}, None),
])
def test_distributed_detection(monkeypatch, env, reason):
    """mesh.distributed=auto joins what the environment describes. This process already uses
    its devices, so joining fails at once, and the one-line error names what was detected."""
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    jax.devices()  # The backend is up: jax.distributed.initialize refuses without connecting.
    if reason is None:
        distributed.initialize(mesh_cfg())  # Nothing detected: a no-op.
    else:
        with pytest.raises(ConfigError, match=rf"could not join the distributed run \({reason}\)"
                           ) as e:
            distributed.initialize(mesh_cfg())
        assert "\n" not in str(e.value)
    distributed.initialize(mesh_cfg(distributed="off"))  # Off wins whatever is detected.
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_match_one_process(corpus, tmp_path, metrics_rows):
    """2 processes × 2 devices train to step 6 (FSDP over 4), save, resume to 9 on a DCN mesh
    (data across the processes, FSDP within each); a 1-process 4-device run straight to 9 logs
    the same losses and val loss."""
    flags = [f"--config.data.path={corpus}", f"--config.data.cache_dir={tmp_path / 'cache'}",
             "--config.data.tokenizer=char", "--config.data.seq_len=16", "--config.model.num_layers=2",
             "--config.model.num_heads=2", "--config.model.d_model=32", "--config.train.batch_size=8",
             "--config.train.eval_every=3", "--config.train.eval_batches=2", "--config.log.every=1",
             "--config.log.progress=lines", "--config.checkpoint.every=3", "--config.optim.warmup_steps=1",
             "--config.optim.decay_steps=9", "--config.mesh.fsdp=-1", "--config.sample.num_samples=1",
             "--config.sample.max_new_tokens=8"]
    launch = [sys.executable, str(REPO / "tools" / "launch_local.py"), "--num_processes=2",
              "--devices_per_process=2", "--"]
    multi = tmp_path / "multi"
    for steps, mesh in ((6, []), (9, ["--config.mesh.dcn_data=2"])):
        out = subprocess.run([*launch, *flags, *mesh, f"--config.train.num_steps={steps}",
                              f"--workdir={multi}"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from" in out.stderr and "mesh data=2 fsdp=2 tensor=1 (4 devices, 2 process" in out.stderr
    assert sorted(p.name for p in (multi / "checkpoints" / "9" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert out.stdout.count("-" * 40) == 1  # Process 0 prints the sample …
    assert f"[process 1] {'-' * 40}" not in out.stderr  # … and process 1 does not.

    single = tmp_path / "single"
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "gpt_jax.train", *flags, "--config.train.num_steps=9",
                          f"--workdir={single}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    # Elastic: the 2-process workdir resumes in 1 process (4 devices) and goes on to step 12, as
    # the 1-process run does.
    logs = {}
    for workdir in (multi, single):
        out = subprocess.run([sys.executable, "-m", "gpt_jax.train", *flags, "--config.train.num_steps=12",
                              "--config.optim.decay_steps=12", f"--workdir={workdir}"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-4000:]
        logs[workdir] = out.stderr
    assert "written by 2 process(es), this run has 1" in logs[multi]
    def column(workdir, key):
        return {r["step"]: r[key] for r in metrics_rows(workdir) if key in r}

    a, b = column(multi, "train/loss"), column(single, "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([a[s] for s in range(1, 13)], [b[s] for s in range(1, 13)], rtol=1e-5)
    val, val_single = column(multi, "val/loss"), column(single, "val/loss")
    assert sorted(val) == sorted(val_single) and {3, 6, 9, 12} <= set(val)
    np.testing.assert_allclose([val[s] for s in val], [val_single[s] for s in val], rtol=1e-5)


@pytest.mark.slow
def test_launcher_passes_on_a_failure(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "launch_local.py"), "--num_processes=2",
                          "--devices_per_process=1", "--", "--config.model.num_heads=5",
                          f"--workdir={tmp_path / 'w'}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "error: model.num_heads=5 does not divide model.d_model=128" in out.stderr
