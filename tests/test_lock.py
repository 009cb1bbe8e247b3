"""The workdir lock: one run holds a workdir; a second is refused naming the holder; a dead
holder's lock is taken over with a warning; a refused run writes nothing."""

import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from gpt_jax.training import lock, loop
from gpt_jax.training.preemption import Preempted

REPO = pathlib.Path(__file__).resolve().parent.parent

# Takes the lock of the workdir argv[1] in its own process, says so, and holds it until killed.
HOLDER = """
import sys, time
from gpt_jax.training import lock
lock.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder():
    """start(workdir) → a process that holds the workdir's lock (killed at teardown)."""
    procs = []

    def start(workdir: pathlib.Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line == "held\n", (line, proc.stderr.read() if proc.poll() is not None else "")
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def snapshot(folder: pathlib.Path) -> dict:
    """Every file and folder beneath `folder`: its bytes (files) and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None,
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_acquire_records_the_holder_and_release_lets_go(tmp_path, caplog):
    with lock.WorkdirLock(tmp_path) as held:
        assert held.held
        record = json.loads((tmp_path / lock.LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["since"].endswith("Z") and record["command"]
        with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()} "):
            lock.WorkdirLock(tmp_path).acquire()  # Another open file: refused, same process too.
    assert not held.held
    assert list(tmp_path.iterdir()) == []  # A clean end leaves nothing behind.
    with lock.WorkdirLock(tmp_path):
        pass
    assert warnings(caplog) == []  # Nothing was taken over.


def test_a_second_holder_is_refused_in_one_line_naming_the_first(tmp_path, holder):
    first = holder(tmp_path)
    before = (tmp_path / lock.LOCK_NAME).read_bytes()
    with pytest.raises(lock.WorkdirLockedError) as e:
        lock.WorkdirLock(tmp_path).acquire()
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{tmp_path} is in use by another training run (pid {first.pid} on host " \
           f"{socket.gethostname()}, since " in msg
    assert "--workdir" in msg
    assert (tmp_path / lock.LOCK_NAME).read_bytes() == before  # The holder's record is intact.


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path, holder, caplog):
    first = holder(tmp_path)
    first.send_signal(signal.SIGKILL)
    first.wait()
    with lock.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    [warning] = warnings(caplog)
    assert f"took over the workdir lock of pid {first.pid} on host {socket.gethostname()}" in warning
    assert "no longer running" in warning


# Takes and releases the lock of argv[1] for argv[2] seconds; inside, claims a marker file that
# only one holder may have at a time. Prints (times held, clashes).
CONTENDER = """
import os, sys, time
from gpt_jax.training import lock
marker, held, clashes = os.path.join(sys.argv[1], "inside"), 0, 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        workdir_lock = lock.WorkdirLock(sys.argv[1])
        workdir_lock.acquire()
    except lock.WorkdirLockedError:
        continue
    held += 1
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.unlink(marker)
    except FileExistsError:
        clashes += 1
    workdir_lock.release()
print(held, clashes)
"""


def test_runs_taking_and_releasing_at_once_never_hold_it_together(tmp_path):
    # A release removes the file: a run that locked it just then (the removed file, with the
    # record still in it) must start over, neither holding it nor taking it over.
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), "1.0"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    results = [tuple(map(int, out.split())) for out, _ in outs]
    assert all(held > 0 for held, _ in results), results
    assert sum(clashes for _, clashes in results) == 0, results
    assert not [err for _, err in outs if "took over" in err], outs


def test_a_record_from_another_host_is_taken_over_saying_it_cannot_be_checked(tmp_path, caplog):
    stale = {"host": "node-17", "pid": 4242, "since": "2026-11-30T14:00:00Z", "command": "x"}
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps(stale))
    with lock.WorkdirLock(tmp_path):
        pass
    [warning] = warnings(caplog)
    assert "pid 4242 on host node-17 (since 2026-11-30T14:00:00Z), another host" in warning
    assert "make sure it has ended" in warning


def test_an_unwritable_workdir_is_a_one_line_config_error(tmp_path):
    missing = tmp_path / "not-made"
    with pytest.raises(lock.ConfigError, match="cannot create the workdir lock"):
        lock.WorkdirLock(missing).acquire()


def test_only_process_0_locks_and_every_process_stops_if_it_cannot(tmp_path, holder):
    with lock.hold(tmp_path, primary=False):
        assert not (tmp_path / lock.LOCK_NAME).exists()
    holder(tmp_path)
    with pytest.raises(lock.WorkdirLockedError, match="process 0 could not lock"), \
            lock.hold(tmp_path, primary=False, any_process=lambda failed: True):
        pytest.fail("entered a workdir process 0 could not lock")
    with pytest.raises(lock.WorkdirLockedError, match="in use"), lock.hold(tmp_path):
        pytest.fail("entered a held workdir")


def test_a_refused_run_writes_nothing_into_the_workdir(tmp_path, tiny_config, holder):
    workdir = tmp_path / "run"
    workdir.mkdir()
    for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
        (workdir / name).write_text(f"the first run's {name}\n")
    (workdir / "checkpoints").mkdir()
    first = holder(workdir)
    before = snapshot(workdir)
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {first.pid} "):
        loop.run(tiny_config(), workdir)
    assert snapshot(workdir) == before


def test_a_run_releases_the_lock_when_it_fails(tmp_path, tiny_config):
    # Windows longer than the corpus allows: Loop refuses them, inside the lock.
    with pytest.raises(lock.ConfigError, match="data.seq_len=2048"):
        loop.run(tiny_config(**{"data.seq_len": 2048}), tmp_path)
    assert not (tmp_path / lock.LOCK_NAME).exists()  # Released, its file removed.
    with lock.WorkdirLock(tmp_path):
        pass


@pytest.mark.slow  # A real loop: ~6 s, most of it the compile.
def test_a_preempted_run_releases_the_lock(tmp_path, tiny_config):
    workdir = tmp_path / "run"

    def sigterm_once_training():  # Only inside the loop, where SIGTERM means "save and stop".
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = workdir / "metrics.jsonl"
            if metrics.exists() and "train/loss" in metrics.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    threading.Thread(target=sigterm_once_training, daemon=True).start()
    with pytest.raises(Preempted):
        loop.run(tiny_config(**{"train.num_steps": 100_000, "sample.num_samples": 0}), workdir)
    assert not (workdir / lock.LOCK_NAME).exists()
    with lock.WorkdirLock(workdir):
        pass


@pytest.mark.slow
def test_cli_refuses_a_second_run_and_resumes_after_kill_9(tmp_path, tiny_config, train_command):
    workdir = tmp_path / "run"
    config = tiny_config(**{"train.num_steps": 100_000, "checkpoint.every": 10,
                            "sample.num_samples": 0})
    first = subprocess.Popen(train_command(workdir, config), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (workdir / "checkpoints" / "10").is_dir():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)  # Frozen, still holding the lock: nothing may change.
        before = snapshot(workdir)
        second = subprocess.run(train_command(workdir, config), cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode != 0
        assert "Traceback" not in second.stderr
        errors = [line for line in second.stderr.splitlines() if "error" in line.lower()]
        assert errors == [f"error: {workdir} is in use by another training run (pid {first.pid} "
                          f"on host {socket.gethostname()}, since "
                          f"{json.loads((workdir / '.lock').read_text())['since']}); wait for it "
                          "to end, or use another --workdir."], second.stderr
        assert snapshot(workdir) == before
    finally:
        first.kill()
        first.wait()
    last = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    third = subprocess.run(
        train_command(workdir, tiny_config(**{"train.num_steps": last + 5, "checkpoint.every": 10,
                                              "sample.num_samples": 0})),
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert f"resumed from {workdir / 'checkpoints'} at step {last}" in third.stderr
    assert f"took over the workdir lock of pid {first.pid}" in third.stderr
    assert not (workdir / lock.LOCK_NAME).exists()


# --- A workdir on cloud storage: the lease (conftest's fake_gcs serves gs://). ---


@pytest.fixture
def short_lease(monkeypatch):
    """A lease of 2 s (renewed every 0.5 s) read back after 0.05 s, so tests need not wait long."""
    monkeypatch.setattr(lock, "LEASE_S", 2.0)
    monkeypatch.setattr(lock, "_SETTLE_S", 0.05)


def _lease(fake_gcs, url: str) -> dict:
    return json.loads(fake_gcs.fs.cat(f"{url.removeprefix('gs://')}/.lock"))


def test_a_lease_records_its_holder_is_renewed_and_removed_on_release(fake_gcs, short_lease):
    url = fake_gcs.url("lease")
    with lock.hold(url) as held:
        assert isinstance(held, lock.LeaseLock) and held.held
        first = _lease(fake_gcs, url)
        assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
        deadline = time.monotonic() + 10
        while _lease(fake_gcs, url)["renewed"] == first["renewed"]:  # Renewed: still live.
            assert time.monotonic() < deadline, "not renewed"
            time.sleep(0.1)
        assert _lease(fake_gcs, url)["since"] == first["since"]
        assert not held.lost.is_set()
    assert not fake_gcs.fs.exists(f"{url.removeprefix('gs://')}/.lock")


def test_a_live_lease_refuses_a_second_run_naming_the_first(fake_gcs, short_lease):
    url = fake_gcs.url("lease")
    with lock.LeaseLock(url):
        time.sleep(2.5)  # Past one lease length: the renewals keep it live.
        with pytest.raises(lock.WorkdirLockedError) as e:
            lock.LeaseLock(url).acquire()
    message = str(e.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message and ".lock" in message


def test_a_lapsed_lease_is_taken_over_with_a_warning(fake_gcs, short_lease, caplog):
    url = fake_gcs.url("lease")
    dead = {"host": "gone-host", "pid": 4242, "since": "2026-11-30T00:00:00Z", "command": "x",
            "renewed": time.time() - 5, "token": "dead"}
    fake_gcs.fs.pipe(f"{url.removeprefix('gs://')}/.lock", json.dumps(dead).encode())
    with caplog.at_level(logging.WARNING), lock.LeaseLock(url):
        assert _lease(fake_gcs, url)["pid"] == os.getpid()
    assert any("pid 4242 on host gone-host" in w for w in warnings(caplog))


def test_of_two_runs_writing_a_lease_at_once_only_the_last_writer_goes_on(fake_gcs, short_lease,
                                                                          monkeypatch):
    url = fake_gcs.url("lease")
    other = {"host": "other", "pid": 7, "since": "s", "command": "x", "renewed": time.time(),
             "token": "theirs"}
    def another_run_writes(seconds):  # While this run waits to read its lease back.
        fake_gcs.fs.pipe(f"{url.removeprefix('gs://')}/.lock", json.dumps(other).encode())
        time.sleep(seconds)

    monkeypatch.setattr(lock, "_sleep", another_run_writes)
    with pytest.raises(lock.WorkdirLockedError, match="pid 7 on host other"):
        lock.LeaseLock(url).acquire()
    assert _lease(fake_gcs, url)["token"] == "theirs"  # Theirs is left as it is.


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(fake_gcs, short_lease,
                                                                      caplog):
    url = fake_gcs.url("lease")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = {"host": socket.gethostname(), "pid": int(proc.stdout), "since": "s", "command": "x",
            "renewed": time.time(), "token": "dead",  # Renewed just now, but its pid is gone.
            "machine": lock._machine()}
    fake_gcs.fs.pipe(f"{url.removeprefix('gs://')}/.lock", json.dumps(dead).encode())
    with caplog.at_level(logging.WARNING), lock.LeaseLock(url):
        assert _lease(fake_gcs, url)["pid"] == os.getpid()
    assert any("no longer running" in w for w in warnings(caplog))


def test_a_lease_of_a_dead_pid_in_another_pid_namespace_waits_to_lapse(fake_gcs, short_lease):
    url = fake_gcs.url("lease")
    other = {"host": socket.gethostname(), "pid": 2 ** 22 + 7, "since": "s", "command": "x",
             "renewed": time.time(), "token": "c", "machine": "another-container"}
    fake_gcs.fs.pipe(f"{url.removeprefix('gs://')}/.lock", json.dumps(other).encode())
    with pytest.raises(lock.WorkdirLockedError, match="in use by another training run"):
        lock.LeaseLock(url).acquire()


def test_a_holder_whose_lease_is_taken_marks_it_lost_and_leaves_the_others(fake_gcs,
                                                                           short_lease):
    url = fake_gcs.url("lease")
    held = lock.LeaseLock(url)
    held.acquire()
    theirs = {**_lease(fake_gcs, url), "token": "theirs", "pid": 7}
    fake_gcs.fs.pipe(f"{url.removeprefix('gs://')}/.lock", json.dumps(theirs).encode())
    assert held.lost.wait(timeout=10)
    held.release()
    assert _lease(fake_gcs, url)["token"] == "theirs"  # Not removed: not ours.
