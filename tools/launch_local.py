"""Runs one training as P processes on this machine, each with D CPU devices: a multi-host run in
miniature (JAX's distributed runtime over 127.0.0.1, gloo collectives between processes).

    python tools/launch_local.py --num_processes=2 --devices_per_process=2 -- \
        --config=configs/shakespeare_char.py:cpu --config.mesh.fsdp=-1 --workdir=/tmp/mp

Everything after `--` goes to `python -m gpt_jax.train` in every process, plus the coordinator
address, the process count and each process's id (mesh.coordinator_address, mesh.num_processes,
mesh.process_id). Process 0's output passes through as is; the others' lines are prefixed with
their id. SIGINT / SIGTERM go to every process (they save a checkpoint and exit together). If one
process fails the others are stopped, and the launcher exits with the first failure's status.
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

flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
flags.DEFINE_integer("devices_per_process", 1, "CPU devices in each process.", lower_bound=1)
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1; 0 picks a free one.")
flags.DEFINE_float("grace_s", 30.0, "After a failure, seconds the others get to exit on SIGTERM.")
FLAGS = flags.FLAGS


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


def _die_with_parent() -> None:
    """In the child before exec: Linux kills it if the launcher dies (even by SIGKILL), so no
    process is left waiting on a collective with peers that are gone."""
    # Not Linux: no prctl, but the launcher's own signal handling still stops the children.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _relay(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stderr.buffer.write(prefix.encode() + line)
        sys.stderr.buffer.flush()


def launch(train_args: list[str], num_processes: int, devices_per_process: int, port: int = 0,
           grace_s: float = 30.0) -> int:
    """Starts the processes, waits for them, returns the exit status (0 if all succeeded)."""
    address = f"127.0.0.1:{port or free_port()}"
    env = child_env(devices_per_process)
    procs: list[subprocess.Popen] = []
    relays = []
    for i in range(num_processes):
        cmd = [sys.executable, "-m", "gpt_jax.train", *train_args,
               f"--config.mesh.coordinator_address={address}",
               f"--config.mesh.num_processes={num_processes}", f"--config.mesh.process_id={i}"]
        if i == 0:
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
            continue
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=_die_with_parent)
        t = threading.Thread(target=_relay, args=(p.stdout, f"[process {i}] "), daemon=True)
        t.start()
        procs.append(p)
        relays.append(t)

    def forward(signum, frame) -> None:
        del frame
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    status = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and not status:
            status = failed[0]
            print(f"launch_local: a process exited with status {status}; stopping the others.",
                  file=sys.stderr, flush=True)
            forward(signal.SIGTERM, None)
            deadline = time.monotonic() + grace_s
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    for t in relays:
        t.join(timeout=5)
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str]) -> None:
    train_args = argv[1:]
    if not train_args:
        raise app.UsageError("give the training flags after `--`, e.g. -- --config=configs/quickstart.py")
    status = launch(train_args, FLAGS.num_processes, FLAGS.devices_per_process, FLAGS.port,
                    FLAGS.grace_s)
    # A negative status is a signal (Popen's convention); the shell's is 128 + signal.
    sys.exit(128 - status if status < 0 else status)


if __name__ == "__main__":
    app.run(main)
