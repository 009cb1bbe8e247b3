"""Meshes, logical rules and multi-process runs. The 8-device equivalence tests live in
tests/multidevice/ and run here in a subprocess (XLA fixes the CPU device count at import)."""

import json
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
from gpt_jax.parallel import distributed, sharding
from gpt_jax.parallel import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
TEXT = "".join(f"def h{i}(y):\n    return y - {i % 13} * {i % 5}\n\n" for i in range(500))


def mesh_cfg(**sizes) -> ml_collections.ConfigDict:
    c = base.get_config().mesh
    for k, v in sizes.items():
        c[k] = v
    return c


def test_eight_device_equivalence_and_shardings():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "multidevice")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout


@pytest.mark.parametrize(("sizes", "devices", "want"), [
    ({}, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
    ({"fsdp": -1}, 8, {"data": 1, "fsdp": 8, "tensor": 1}),  # data's default -1 yields.
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"data": 1, "fsdp": 16, "tensor": 4}, 64, {"data": 1, "fsdp": 16, "tensor": 4}),
])
def test_axis_sizes(sizes, devices, want):
    ici, dcn = mesh_lib.axis_sizes(mesh_cfg(**sizes), devices)
    assert ici == want and dcn == {"data": 1, "fsdp": 1, "tensor": 1}


def test_dcn_sizes_multiply_per_node():
    ici, dcn = mesh_lib.axis_sizes(mesh_cfg(dcn_data=2, fsdp=-1), 8, num_granules=2)
    assert ici == {"data": 1, "fsdp": 4, "tensor": 1} and dcn["data"] == 2


@pytest.mark.parametrize(("sizes", "devices", "granules", "match"), [
    ({"data": 3}, 8, 1, r"mesh\.data=3, mesh\.fsdp=1, mesh\.tensor=1: the product is 3 but the "
                        r"device count is 8"),
    ({"fsdp": -1, "tensor": -1}, 8, 1, "at most one mesh size may be -1"),
    ({"fsdp": 3, "data": -1}, 8, 1, "not a multiple of 3"),
    ({"tensor": 0}, 8, 1, "must be ≥ 1 or -1"),
    ({"dcn_data": 3}, 8, 2, "number of nodes"),
])
def test_mesh_mismatch_errors(sizes, devices, granules, match):
    with pytest.raises(ConfigError, match=match):
        mesh_lib.axis_sizes(mesh_cfg(**sizes), devices, granules)


def test_mesh_mismatch_is_one_line_from_the_cli(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
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


def test_rules_from_config_and_their_errors():
    rules = dict(sharding.logical_rules(mesh_cfg()))
    assert rules["batch"] == ("data", "fsdp") and rules["embed"] == ("fsdp",)
    assert rules["heads"] == rules["mlp"] == rules["vocab"] == ("tensor",)
    assert rules["kv"] is None and rules["length"] is None
    bad = mesh_cfg()
    bad.rules.embed = "fsdp,model"
    with pytest.raises(ConfigError, match=r"mesh\.rules\.embed='fsdp,model'"):
        sharding.logical_rules(bad)
    bad.rules.embed = "fsdp,fsdp"
    with pytest.raises(ConfigError, match="distinct"):
        sharding.logical_rules(bad)


def test_mesh_spec_keeps_only_dividing_axes():
    rules = sharding.logical_rules(mesh_cfg())
    shape = {"data": 2, "fsdp": 2, "tensor": 2}
    spec, dropped = sharding.mesh_spec(("vocab", "embed"), (65, 128), shape, rules)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert dropped == ["tensor=2 does not divide vocab (65)"]
    spec, _ = sharding.mesh_spec(("batch", "length", "embed"), (4, 4, 8), {**shape, "data": 3}, rules)
    assert spec == jax.sharding.PartitionSpec("fsdp", None, None)  # 4 % 3 ≠ 0: data dropped.
    spec, _ = sharding.mesh_spec(("batch", "length", "embed"), (8, 4, 8),
                                 {"data": 1, "fsdp": 1, "tensor": 1}, rules)
    assert spec == jax.sharding.PartitionSpec(None, None, None)


def test_distributed_detection(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert distributed._detected() is None
    monkeypatch.setenv("SLURM_NTASKS", "1")  # One task: nothing to join.
    assert distributed._detected() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed._detected() == "SLURM_NTASKS=4"
    distributed.initialize(mesh_cfg(distributed="off"))  # Off wins: no coordinator contacted.
    assert jax.process_count() == 1


def train_losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path):
    """2 processes × 2 devices train to step 6 (FSDP over 4), save, resume to 9 on a DCN mesh
    (data across the processes, FSDP within each); a 1-process 4-device run straight to 9 logs
    the same losses and val loss."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    flags = [f"--config.data.path={corpus}", f"--config.data.cache_dir={tmp_path / 'cache'}",
             "--config.data.tokenizer=char", "--config.data.seq_len=16", "--config.model.num_layers=2",
             "--config.model.num_heads=2", "--config.model.d_model=32", "--config.train.batch_size=8",
             "--config.train.eval_every=3", "--config.train.eval_batches=2", "--config.log.every=1",
             "--config.log.progress=false", "--config.checkpoint.every=3", "--config.optim.warmup_steps=1",
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
    a, b = train_losses(multi), train_losses(single)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([a[s] for s in range(1, 13)], [b[s] for s in range(1, 13)], rtol=1e-5)
    val = [json.loads(x).get("val/loss") for x in (multi / "metrics.jsonl").read_text().splitlines()]
    val_single = [json.loads(x).get("val/loss") for x in (single / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([v for v in val if v], [v for v in val_single if v], rtol=1e-5)


def test_launcher_passes_on_a_failure(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "launch_local.py"), "--num_processes=2",
                          "--devices_per_process=1", "--", "--config.model.num_heads=5",
                          f"--workdir={tmp_path / 'w'}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "error: model.num_heads=5 does not divide model.d_model=128" in out.stderr
