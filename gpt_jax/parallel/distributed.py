"""Joining a multi-process run (`jax.distributed.initialize`), and what only one process does.

mesh.distributed=auto joins when a run is configured (mesh.coordinator_address, or
JAX_COORDINATOR_ADDRESS in the environment) or detected: SLURM with several tasks, Open MPI, a
multi-host TPU pod. JAX then fills in whatever the config leaves unset from that environment.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gpt_jax.config import ConfigError

# Environment variables whose value (an int > 1) means "this process is one of several".
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _detected() -> str | None:
    """The name of a multi-process environment around this process, if any."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    for var in _CLUSTER_SIZE_VARS:
        if os.environ.get(var, "1").isdigit() and int(os.environ.get(var, "1")) > 1:
            return f"{var}={os.environ[var]}"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "a multi-host TPU pod"
    return None


def initialize(mesh_cfg: ml_collections.ConfigDict) -> None:
    """Joins the distributed run the config or environment describes; call before any other JAX
    call that touches devices. A no-op for a single process, or if already initialized."""
    mode = mesh_cfg.distributed
    explicit = mesh_cfg.coordinator_address is not None
    reason = "mesh.coordinator_address" if explicit else _detected()
    if mode == "off" or (mode == "auto" and reason is None):
        return
    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(
            coordinator_address=mesh_cfg.coordinator_address,
            num_processes=mesh_cfg.num_processes,
            process_id=mesh_cfg.process_id,
        )
    except (ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"could not join the distributed run ({reason or 'mesh.distributed=on'}): {first}; set "
            "mesh.coordinator_address, mesh.num_processes and mesh.process_id, or "
            "mesh.distributed=off for one process.") from e
    logging.info("process %d of %d (%s); %d local and %d global devices", jax.process_index(),
                 jax.process_count(), reason or "mesh.distributed=on", jax.local_device_count(),
                 jax.device_count())


def is_primary() -> bool:
    """Process 0 writes the workdir's files (metrics, TensorBoard, config, tokenizer, samples)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (one small collective; for one process,
    just `flag`)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(jax.numpy.int32(flag)).any())


def primary_int(value: int) -> int:
    """Process 0's `value` on every process (a choice all must share, e.g. a checkpoint step
    read while its run may still be saving)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def must_sync_each_step() -> bool:
    """Whether to wait for each step before dispatching the next: CPU runs over several devices.

    XLA:CPU runs each device's part of a program on a shared thread pool, and a collective waits
    until every participant has a thread. With a few dozen collective programs queued by async
    dispatch, threads fill up with participants of different programs and the rendezvous never
    completes: 8 simulated devices in one process abort after 40 s ("Expected 8 threads to join
    the rendezvous"), 2 processes × 2 devices (gloo) hang. Both seen with jax 0.10.2 during the
    full eval's burst of ~150 programs. Simulated CPU meshes are for tests and laptops, so the
    lost overlap costs nothing that matters; one device, and GPUs and TPUs, stay asynchronous.
    """
    return jax.devices()[0].platform == "cpu" and jax.device_count() > 1
