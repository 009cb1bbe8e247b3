"""Runs one training as P processes on this machine, each with D CPU devices: a multi-host run in
miniature (JAX's distributed runtime over 127.0.0.1, gloo collectives between processes).

    python tools/launch_local.py --num_processes=2 --devices_per_process=2 -- \
        --config=configs/shakespeare_char.py:cpu --config.mesh.fsdp=-1 --workdir=/tmp/mp

Everything after `--` goes to `python -m gpt_jax.train` in every process, plus the coordinator
address, the process count and each process's id (mesh.coordinator_address, mesh.num_processes,
mesh.process_id). Process 0's output passes through (its stderr line by line, so with
log.progress=auto it logs lines rather than a bar); the others' lines are prefixed with their id.
SIGINT / SIGTERM go to every process (they save a checkpoint and exit together).

If a process fails (exits with an error, or prints its `error:` line) the others are stopped at
once: SIGTERM, then SIGKILL after --grace_s. With a peer gone they cannot save or go on (they
wait for it in a collective, where a signal's Python handler never runs). The launcher then exits
with the failure's status, its last line the failing process's `error:` line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpt_jax import cli  # noqa: E402 — after the path.

COMMAND = "python tools/launch_local.py"
flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
flags.DEFINE_integer("devices_per_process", 1, "CPU devices in each process.", lower_bound=1)
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1; 0 picks a free one.",
                     lower_bound=0, upper_bound=65535)
flags.DEFINE_float("grace_s", 3.0, "After a failure, seconds the others get to end on SIGTERM "
                   "before SIGKILL.", lower_bound=0.0)
FLAGS = flags.FLAGS
_POLL_S = 0.05


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
    """The environment of one process: CPU only, `devices` devices, the repo importable."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    # A device count forced for the launcher's own shell would override JAX_NUM_CPU_DEVICES.
    xla = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = xla.strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _child_setup() -> None:
    """In the child before exec. Its own process group: a Ctrl-C at the terminal reaches only the
    launcher, which forwards it once (a second SIGINT would abort a process mid-save). And Linux
    kills it if the launcher dies (even by SIGKILL), so no process is left waiting on a
    collective with peers that are gone."""
    os.setpgrp()
    # Not Linux: no prctl, but the launcher's own signal handling still stops the children.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Launch:
    """The processes of one launch, their relayed output and the first failure."""

    def __init__(self, train_args: list[str], num_processes: int, devices_per_process: int,
                 port: int):
        address = f"127.0.0.1:{port or free_port()}"
        env = child_env(devices_per_process)
        self.lock = threading.Lock()
        self.errors: dict[int, str] = {}  # Process → its `error:` line.
        self.failed: int | None = None  # The first process that failed.
        self.procs: list[subprocess.Popen] = []
        self.relays: list[threading.Thread] = []
        for i in range(num_processes):
            cmd = [sys.executable, "-m", "gpt_jax.train", *train_args,
                   f"--config.mesh.coordinator_address={address}",
                   f"--config.mesh.num_processes={num_processes}", f"--config.mesh.process_id={i}"]
            # Process 0's stdout (its samples) passes through; every stderr is read line by line
            # to catch its `error:` line, which tells of a failure before the process has ended.
            p = subprocess.Popen(cmd, env=env, stdout=None if i == 0 else subprocess.PIPE,
                                 stderr=subprocess.PIPE if i == 0 else subprocess.STDOUT,
                                 preexec_fn=_child_setup)
            self.procs.append(p)
            stream = p.stderr if i == 0 else p.stdout
            t = threading.Thread(target=self._relay, args=(i, stream), daemon=True)
            t.start()
            self.relays.append(t)

    def _relay(self, i: int, stream) -> None:
        for line in iter(stream.readline, b""):
            prefix = f"[process {i}] " if i else ""
            if line.startswith(b"error:"):
                with self.lock:
                    self.errors.setdefault(i, cli.one_line(line.decode(errors="replace")))
                    self.failed = i if self.failed is None else self.failed
                prefix = f"[process {i}] "  # The launcher's last line repeats it, unprefixed.
            with self.lock:
                sys.stderr.buffer.write(prefix.encode() + line)
                sys.stderr.buffer.flush()

    def signal_all(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def first_failure(self, exits: bool = True) -> int | None:
        """The first process known to have failed: by its `error:` line, or (if `exits`) by a
        non-zero exit status."""
        with self.lock:
            if self.failed is None and exits:
                self.failed = next((i for i, p in enumerate(self.procs)
                                    if p.poll() not in (None, 0)), None)
            return self.failed

    def say(self, text: str) -> None:
        """A line of the launcher's own on stderr, between the relayed ones."""
        with self.lock:
            print(text, file=sys.stderr, flush=True)

    def stop(self, grace_s: float) -> None:
        """SIGTERM to every process still running, SIGKILL to those left after `grace_s`."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        self.signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()


def launch(train_args: list[str], num_processes: int, devices_per_process: int, port: int = 0,
           grace_s: float = 3.0) -> tuple[int, str | None]:
    """Starts the processes and waits for them: (exit status, the `error:` line to end with, or
    None). The status is 0 if every process succeeded, else the first failure's (128 + signal
    for one ended by a signal)."""
    run = _Launch(train_args, num_processes, devices_per_process, port)
    signalled: list[int] = []

    def forward(signum, frame) -> None:
        del frame
        signalled.append(signum)
        run.signal_all(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    failed = None
    while run.running():
        # After a forwarded signal the processes stop together, each in its own time (a status
        # of 128 + signal is theirs, not a failure: only an `error:` line is); else the first
        # failure stops them all.
        if (failed := run.first_failure(exits=not signalled)) is not None:
            run.say(f"launch_local: process {failed} failed; stopping the others.")
            run.stop(grace_s)
            break
        time.sleep(_POLL_S)
    for t in run.relays:
        t.join(timeout=5)
    failed = run.first_failure()
    if failed is None:
        return 0, None
    code = run.procs[failed].returncode
    if failed in run.errors:  # Its own status, or 1 where it was stopped after its error line.
        return (code if code > 0 else 1), run.errors[failed]
    status = 128 - code if code < 0 else code
    if signalled:  # Stopped by the forwarded signal: the processes said what they saved.
        return status, None
    return status, (f"error: process {failed} exited with status {status} without an error line "
                    "(its output is above); fix what it reports and launch again.")


def main(argv: list[str]) -> None:
    train_args = argv[1:]
    if not train_args:
        cli.fail(f"no training flags: give them after `--`, e.g. {COMMAND} --num_processes=2 -- "
                 "--config=configs/quickstart.py")
    status, error = launch(train_args, FLAGS.num_processes, FLAGS.devices_per_process,
                           FLAGS.port, FLAGS.grace_s)
    if error:
        print(error, file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(COMMAND))
