"""Workdirs on cloud storage (gpt_jax/training/remote.py), against a local GCS server (conftest's
fake_gcs): real gs:// URLs, written by gcsfs (etils.epath) and TensorStore (Orbax)."""

import importlib.util
import json
import pathlib
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from gpt_jax.training import remote


@pytest.mark.parametrize("url, words", [
    ("ftp://host/run", ["ftp://", "gs://"]),
    ("gs://", ["no folder", "gs://BUCKET/FOLDER"]),
    ("gs://bucket", ["no folder"]),
    ("gs:///run", ["no folder"]),
    ("s3://bucket/run", ["gs://", "mount", "mountpoint-s3"]),
    ("az://container/run", ["mount", "blobfuse2"]),
])
def test_url_problem_names_the_fix(url, words):
    problem = remote.url_problem(url, "--workdir")
    assert problem is not None and "\n" not in problem
    for word in words:
        assert word in problem


def test_a_gs_url_with_gcsfs_installed_is_accepted():
    if importlib.util.find_spec("gcsfs") is None:
        pytest.skip("gcsfs is not installed")
    assert remote.url_problem("gs://bucket/run", "--workdir") is None


def _read(fs, url: str) -> str:
    return fs.cat(url.removeprefix("gs://")).decode()


def _lease() -> types.SimpleNamespace:
    """What Mirror.start_uploading needs of a held lock.LeaseLock."""
    return types.SimpleNamespace(lost=threading.Event())


def test_mirror_pulls_uploads_what_changed_and_never_deletes(fake_gcs):
    url = fake_gcs.url("mirror")
    fs = fake_gcs.fs
    root = url.removeprefix("gs://")
    fs.pipe({f"{root}/metrics.jsonl": b'{"step": 1}\n', f"{root}/tb/events.1": b"e1",
             f"{root}/checkpoints/1/state": b"array", f"{root}/.lock": b"{}"})
    with remote.Mirror(url, upload_every_s=3600) as mirror:
        mirror.pull()
        local = mirror.local
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        assert files == ["metrics.jsonl", "tb/events.1"]  # Not checkpoints/ nor the lock.
        (local / "config.json").write_text("{}")
        mirror.upload(force=True)  # Not started: a process that does not hold the lease.
        assert not fs.exists(f"{root}/config.json")
        mirror.start_uploading(_lease())
        mirror.upload(force=True)
        assert _read(fs, f"{url}/config.json") == "{}"
        generation = fs.info(f"{root}/tb/events.1")["generation"]
        with open(local / "metrics.jsonl", "a") as f:
            f.write('{"step": 2}\n')
        mirror.upload()  # Within upload_every_s of the last: nothing goes.
        assert _read(fs, f"{url}/metrics.jsonl") == '{"step": 1}\n'
        (local / "metrics.jsonl").rename(local / "metrics.prev1.jsonl")
        (local / "tb" / "events.1").unlink()  # As a /tmp cleaner would.
        assert mirror.finish() is None
        assert _read(fs, f"{url}/metrics.prev1.jsonl") == '{"step": 1}\n{"step": 2}\n'
        assert _read(fs, f"{url}/metrics.jsonl") == '{"step": 1}\n'  # Never deleted there.
        assert fs.info(f"{root}/tb/events.1")["generation"] == generation  # Not sent again.
        assert _read(fs, f"{url}/checkpoints/1/state") == "array"  # Left alone.
    assert not local.exists()


def test_a_failed_last_upload_keeps_the_local_files_and_names_them(fake_gcs, monkeypatch, caplog):
    with remote.Mirror(fake_gcs.url("kept"), upload_every_s=0) as mirror:
        mirror.start_uploading(_lease())
        (mirror.local / "metrics.jsonl").write_text("row\n")

        def refuse(*args, **kwargs):
            raise OSError("the store is unreachable")

        monkeypatch.setattr(type(mirror.url), "write_bytes", refuse)
        mirror.try_upload()  # During training: a warning, the run goes on.
        problem = mirror.finish()
    assert (mirror.local / "metrics.jsonl").read_text() == "row\n"
    assert str(mirror.local) in problem and "unreachable" in problem and "\n" not in problem
    assert str(mirror.local) in caplog.text  # The warning during training names it too.


def test_a_lost_lease_stops_uploads_and_keeps_the_files(fake_gcs):
    lease = _lease()
    url = fake_gcs.url("lost")
    with remote.Mirror(url, upload_every_s=0) as mirror:
        mirror.start_uploading(lease)
        (mirror.local / "metrics.jsonl").write_text("row\n")
        lease.lost.set()
        with pytest.raises(remote.LeaseLostError, match=str(mirror.local)):
            mirror.try_upload()
        assert mirror.finish() is not None
    assert not fake_gcs.fs.exists(f"{url.removeprefix('gs://')}/metrics.jsonl")
    assert (mirror.local / "metrics.jsonl").exists()


def _tiny(tiny_config, **overrides):
    # The schedule and the last eval independent of num_steps: a run to 10 then 20 is one run
    # to 20 interrupted at 10.
    return tiny_config(**{"train.num_steps": 20, "train.eval_every": 10, "checkpoint.every": 10,
                          "optim.decay_steps": 20, "train.final_eval": "batches",
                          "log.upload_every_s": 0.0, "sample.num_samples": 0, **overrides})


def _rows(text: str) -> list[dict]:
    skip = ("tokens_per_sec", "mfu", "gflops_per_sec", "time")
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in text.splitlines()]


@pytest.mark.slow  # Three tiny runs, ~25 s.
def test_a_gs_workdir_trains_resumes_and_matches_a_local_run(fake_gcs, tiny_config, tmp_path):
    from gpt_jax.training import loop, weights

    url = fake_gcs.url("run")
    loop.run(_tiny(tiny_config, **{"train.num_steps": 10}), url)
    assert fake_gcs.fs.exists(f"{url.removeprefix('gs://')}/checkpoints/10")
    loop.run(_tiny(tiny_config), url)  # Resumes from step 10 at the URL.
    local = tmp_path / "local"
    loop.run(_tiny(tiny_config), local)
    assert _rows(_read(fake_gcs.fs, f"{url}/metrics.jsonl")) == _rows(
        (local / "metrics.jsonl").read_text())
    assert json.loads(_read(fake_gcs.fs, f"{url}/config.json")) == json.loads(
        (local / "config.json").read_text())
    assert fake_gcs.fs.ls(f"{url.removeprefix('gs://')}/tb")
    assert not fake_gcs.fs.exists(f"{url.removeprefix('gs://')}/.lock")  # Released.
    _, _, remote_params, step = weights.load_trained(url)
    _, _, local_params, _ = weights.load_trained(local)
    assert step == 20
    for a, b in zip(*(sorted(pathlib.PurePath(str(k)).as_posix() for k in p) for p in
                      (remote_params, local_params)), strict=True):
        assert a == b
    import jax

    for a, b in zip(jax.tree.leaves(remote_params), jax.tree.leaves(local_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # Resume is bitwise.


@pytest.mark.slow  # Two commands, ~15 s.
def test_train_and_sample_commands_take_a_gs_workdir(fake_gcs, tiny_config, train_command,
                                                       bad_invocation, tmp_path):
    import os

    from gpt_jax.training import lock

    env = {**os.environ, **fake_gcs.env}
    url = fake_gcs.url("cli")
    argv = train_command(url, _tiny(tiny_config, **{"train.num_steps": 10}))
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"workdir {url}" in r.stderr
    r = subprocess.run([sys.executable, "-m", "gpt_jax.sample", f"--workdir={url}",
                        "--prompt=def", "--max_new_tokens=8"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"# {url}, checkpoint step 10" in r.stderr and r.stdout.startswith("-" * 40 + "\ndef")
    with lock.LeaseLock(url):  # Another run holds the workdir: refused, nothing written.
        before = fake_gcs.fs.find(url.removeprefix("gs://"), detail=True)
        bad_invocation(argv, "in use by another training run", f"pid {os.getpid()}", env=env,
                       timeout=300)
        after = fake_gcs.fs.find(url.removeprefix("gs://"), detail=True)
    assert {k: v["generation"] for k, v in after.items() if not k.endswith("/.lock")} == {
        k: v["generation"] for k, v in before.items() if not k.endswith("/.lock")}


@pytest.mark.parametrize("argv, words", [
    (["-m", "gpt_jax.train", "--workdir=ftp://host/run"], ["ftp://", "local path"]),
    (["-m", "gpt_jax.sample", "--workdir=gs://", "--prompt=a"], ["no folder"]),
    (["tools/inspect_checkpoint.py", "gs://bucket/run"], ["local folders", "gcloud storage cp"]),
    (["tools/convert_hf.py", "export", "--workdir=gs://b/run", "--out=/tmp/x"], ["local folders"]),
])
def test_commands_refuse_a_url_they_cannot_use_in_one_line(argv, words, bad_invocation):
    bad_invocation([sys.executable, *argv], *words, cwd=pathlib.Path(__file__).parent.parent)


@pytest.mark.slow  # A killed command, its resume, and a local run: ~40 s.
def test_a_killed_gs_run_keeps_every_row_to_its_checkpoint_and_resumes_exactly(
        fake_gcs, tiny_config, train_command, tmp_path):
    import os
    import signal

    from gpt_jax.training import loop

    env = {**os.environ, **fake_gcs.env}
    url = fake_gcs.url("killed")
    # Only saves upload; many steps after the kill point, so the kill lands mid-run.
    config = _tiny(tiny_config, **{"log.upload_every_s": 3600.0, "train.num_steps": 60,
                                   "optim.decay_steps": 60})
    proc = subprocess.Popen(train_command(url, config), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:  # Past the save of step 10.
        if line.startswith("step 15/60"):
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    saved = [int(p.rsplit("/", 1)[1]) for p in fake_gcs.fs.ls(
        f"{url.removeprefix('gs://')}/checkpoints") if p.rsplit("/", 1)[1].isdigit()]
    rows = _rows(_read(fake_gcs.fs, f"{url}/metrics.jsonl"))
    assert saved and max(r["step"] for r in rows) >= max(saved)  # Rows reach the checkpoint.
    subprocess.run(train_command(url, config), check=True, capture_output=True, env=env,
                   timeout=300)
    local = tmp_path / "local"
    loop.run(config, local)
    assert _rows(_read(fake_gcs.fs, f"{url}/metrics.jsonl")) == _rows(
        (local / "metrics.jsonl").read_text())
