"""Memory pre-flight: a step that cannot fit stops before anything is allocated or written, with
one line naming the estimate and the limit; an allocation failure at run time reads the same."""

import jax
import pytest

from gpt_jax.parallel import sharding
from gpt_jax.training import loop, memory


def test_a_step_that_fits_passes_and_one_that_does_not_names_estimate_and_limit():
    device = jax.devices()[0]
    have, what = memory.available_bytes(device)
    assert have > 0 and "host RAM" in what  # CPU devices share the host's RAM.
    memory.check_fits(memory.StepMemory(1000, 0, 1000), device)
    with pytest.raises(memory.DoesNotFitError) as e:
        memory.check_fits(memory.StepMemory(10**6, 0, 2 * 10**15), device)
    msg = str(e.value)
    assert "\n" not in msg and "e+" not in msg
    assert msg.startswith("the train step needs 2 PB (state and batch 1 MB, temporaries")
    assert "available host RAM" in msg and "train.batch_size" in msg and "memory_check" in msg


@pytest.fixture
def tiny_limit(monkeypatch):
    """Devices of 1 MB: the tiny model's step (tens of MB) does not fit."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: (10**6, "a 1 MB test limit"))


@pytest.mark.slow  # An end-to-end run.
def test_a_run_that_cannot_fit_stops_before_writing_anything(tiny_config, tmp_path, tiny_limit):
    workdir = tmp_path / "run"
    with pytest.raises(memory.DoesNotFitError, match=r"per device, XLA's estimate, but there "
                                                     r"are 1 MB \(a 1 MB test limit\)"):
        loop.run(tiny_config(), workdir)
    assert list(workdir.iterdir()) == []


@pytest.mark.slow  # A training start (~5 s).
def test_memory_check_false_skips_the_check(tiny_config, tmp_path, tiny_limit):
    last = loop.run(tiny_config(**{"train.memory_check": False, "train.num_steps": 6,
                                   "sample.num_samples": 0}), tmp_path / "run")
    assert last["train/loss"] > 0


@pytest.mark.slow  # An end-to-end run.
def test_an_allocation_failure_at_run_time_is_one_line_and_keeps_checkpoints(
        tiny_config, tmp_path, monkeypatch):
    real, calls = sharding.global_batch, []

    def failing(*args, **kwargs):  # The 13th step's batch "fails to allocate".
        calls.append(1)
        if len(calls) == 13:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating "
                                             "5823700800000 bytes.")
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding, "global_batch", failing)
    workdir = tmp_path / "run"
    config = tiny_config(**{"checkpoint.every": 10, "sample.num_samples": 0})
    with pytest.raises(memory.DoesNotFitError, match=r"^out of device memory at step 1[23] "
                                                     r"\(RESOURCE_EXHAUSTED: Out of memory"):
        loop.run(config, workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10"]


def test_other_runtime_errors_are_not_reported_as_memory():
    assert memory.is_out_of_memory(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: oom"))
    assert not memory.is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: something else"))
    assert not memory.is_out_of_memory(ValueError("RESOURCE_EXHAUSTED"))


def test_a_cgroup_limit_below_the_host_ram_is_the_limit(tmp_path):
    """The process's own cgroup and its parents (v1 and v2), page cache excepted."""
    from gpt_jax.training import memory

    proc = tmp_path / "cgroup"
    assert memory.cgroup_room(str(proc), str(tmp_path)) is None  # No /proc/self/cgroup.

    def level(folder, limit, usage, cache, names):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / names[0]).write_text(f"{limit}\n")
        (folder / names[1]).write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(f"active_file 1\n{names[2]} {cache}\n")

    v2 = ("memory.max", "memory.current", "inactive_file")
    proc.write_text("0::/slurm/job_7/step_0\n")
    level(tmp_path / "slurm" / "job_7" / "step_0", "max", 3 * 2**30, 2**30, v2)
    assert memory.cgroup_room(str(proc), str(tmp_path)) is None  # No limit anywhere.
    level(tmp_path / "slurm" / "job_7", 8 * 2**30, 4 * 2**30, 2**30, v2)  # The job's limit.
    assert memory.cgroup_room(str(proc), str(tmp_path)) == 5 * 2**30
    level(tmp_path, 4 * 2**30, 2**30, 0, v2)  # A tighter limit further up.
    assert memory.cgroup_room(str(proc), str(tmp_path)) == 3 * 2**30

    v1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    proc.write_text("4:memory:/process_api/abc\n3:cpu:/\n")
    level(tmp_path / "memory" / "process_api" / "abc", 9223372036854771712, 5, 0, v1)
    assert memory.cgroup_room(str(proc), str(tmp_path)) is None
    level(tmp_path / "memory" / "process_api" / "abc", 2**30, 2**31, 0, v1)
    assert memory.cgroup_room(str(proc), str(tmp_path)) == 0  # Over the limit already.
