"""Faults while saving: a checkpoint save that fails stops the run with one line and leaves the
earlier checkpoints restorable."""

import errno

import orbax.checkpoint as ocp
import pytest

from gpt_jax.training import checkpoint, loop


@pytest.mark.slow  # An end-to-end run.
def test_a_failed_save_stops_the_run_and_earlier_checkpoints_resume(tiny_config, tmp_path,
                                                                      monkeypatch,
                                                                      metrics_rows):
    config = tiny_config(**{"checkpoint.every": 10, "train.num_steps": 20,
                            "sample.num_samples": 0})
    real = ocp.CheckpointManager.save

    def disk_full_at_20(self, step, *args, **kwargs):
        if step == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *args, **kwargs)

    workdir = tmp_path / "run"
    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_at_20)
    with pytest.raises(checkpoint.CheckpointError) as e:
        loop.run(config, workdir)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("saving the checkpoint of step 20 failed (OSError: [Errno 28] No space")
    assert "steps [10] are intact" in msg and "run the same command to resume" in msg
    monkeypatch.undo()

    loop.run(config, workdir)  # Resumes from step 10 and finishes.
    whole = tmp_path / "whole"
    loop.run(config, whole)
    assert metrics_rows(workdir, timing=False) == metrics_rows(whole, timing=False)


@pytest.mark.slow  # ~3 s; the synchronous failure is tested by default.
def test_a_save_failing_in_the_background_is_one_line(tiny_config, tmp_path, monkeypatch):
    config = tiny_config(**{"checkpoint.every": 10, "train.num_steps": 10,
                            "sample.num_samples": 0})

    def failed(self):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", failed)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"^saving the checkpoint of (step 10|the newest save) failed "
                             r"\(OSError: \[Errno 30\] Read-only file system\); the run stopped\. "
                             r"Free disk space"):
        loop.run(config, tmp_path / "run")
