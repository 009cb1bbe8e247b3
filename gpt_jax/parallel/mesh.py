"""The device mesh from the `mesh` config group: axes data, fsdp, tensor over all global devices.

Every mesh axis is dcn_<axis> × <axis>: the DCN factor spans nodes (one process per node on GPUs,
slices on TPUs) and the ICI factor the devices within one. With all DCN factors 1 (one node) the
mesh is `jax.make_mesh`'s, which orders devices for the fastest ICI rings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils

from gpt_jax.config import ConfigError

AXES = ("data", "fsdp", "tensor")


def _fill(sizes: dict[str, int], total: int, what: str, prefix: str) -> dict[str, int]:
    """Replaces the one -1 in `sizes` so that the product is `total`; checks the product."""
    free = [a for a, n in sizes.items() if n == -1]
    fixed = math.prod(n for n in sizes.values() if n != -1)
    shown = ", ".join(f"{prefix}{a}={n}" for a, n in sizes.items())
    if len(free) > 1:
        raise ConfigError(f"{shown}: at most one mesh size may be -1 (all remaining devices); fix "
                          "the others.")
    if free:
        if total % fixed:
            raise ConfigError(f"{shown}: {what} is {total}, not a multiple of {fixed}; choose "
                              f"sizes whose product divides {total}.")
        sizes = {**sizes, free[0]: total // fixed}
    elif fixed != total:
        raise ConfigError(f"{shown}: the product is {fixed} but {what} is {total}; make them "
                          "equal, or set one size to -1 to take the remaining devices.")
    return sizes


def axis_sizes(mesh_cfg: ml_collections.ConfigDict, num_devices: int,
               num_granules: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """Resolves the config's sizes: (ICI sizes per node, DCN sizes), each keyed by axis name.

    `num_granules` is the number of nodes/slices the devices span; the DCN sizes must multiply to
    it when any of them is > 1.
    """
    dcn = {a: mesh_cfg[f"dcn_{a}"] for a in AXES}
    if any(n < 1 for n in dcn.values()):
        raise ConfigError(f"mesh.dcn_* sizes must be ≥ 1, got {dcn}.")
    num_dcn = math.prod(dcn.values())
    if num_dcn > 1:
        _fill({f"dcn_{a}": n for a, n in dcn.items()}, num_granules,
              "the number of nodes (processes or slices)", "mesh.")
    if num_devices % num_dcn:
        raise ConfigError(f"mesh.dcn_* sizes multiply to {num_dcn}, which does not divide the "
                          f"{num_devices} devices; fix mesh.dcn_*.")
    ici = {a: mesh_cfg[a] for a in AXES}
    if any(n < 1 and n != -1 for n in ici.values()):
        raise ConfigError(f"mesh sizes must be ≥ 1 or -1, got {ici}.")
    if ici["data"] == -1 and -1 in (ici["fsdp"], ici["tensor"]):
        ici["data"] = 1  # data=-1 is the default: an explicit -1 elsewhere takes the rest.
    per_node = "the device count" if num_dcn == 1 else "the devices per node"
    ici = _fill(ici, num_devices // num_dcn, f"{per_node}", "mesh.")
    return ici, dcn


def unused_accelerator() -> str | None:
    """A warning, with the install command, when JAX computes on the CPU of a machine with a
    visible NVIDIA GPU or TPU (the CPU-only jax is installed, or its plugin failed to load);
    None otherwise, or when JAX_PLATFORMS=cpu asks for the CPU on purpose. The hardware test is
    JAX's own (its warning, which names no command, is dropped from the log: cli._noise)."""
    if jax.default_backend() != "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        return None
    try:
        from jax._src import hardware_utils  # Private: a newer jax without it gets no hint.

        gpu = hardware_utils.has_visible_nvidia_gpu()
        tpu = not gpu and hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError):
        return None
    if not (gpu or tpu):
        return None
    what, extra = ("an NVIDIA GPU", "cuda13") if gpu else ("a TPU", "tpu")
    return (f"this machine has {what} but JAX runs on the CPU: install jax's {extra} build, pip "
            f"install 'jax[{extra}]=={jax.__version__}' (README, \"GPUs and TPUs\"), or set "
            "JAX_PLATFORMS=cpu to train on the CPU on purpose.")


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Builds the (data, fsdp, tensor) mesh over `devices` (default: every global device).

    Axis types are Auto: Flax Linen's logical sharding constraints need them (Explicit, the
    `jax.make_mesh` default, turns constraints into assertions).
    """
    devices = list(jax.devices() if devices is None else devices)
    # Nodes are TPU slices (ICI within one), else processes (one per host on GPUs).
    by_slice = devices[0].platform == "tpu" and hasattr(devices[0], "slice_index")
    num_granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    ici, dcn = axis_sizes(mesh_cfg, len(devices), num_granules)
    types = (jax.sharding.AxisType.Auto,) * len(AXES)
    if math.prod(dcn.values()) == 1:
        return jax.make_mesh(tuple(ici.values()), AXES, axis_types=types, devices=devices)
    grid = mesh_utils.create_hybrid_device_mesh(
        tuple(ici.values()), tuple(dcn.values()), devices,
        process_is_granule=not by_slice,
    )
    return jax.sharding.Mesh(np.asarray(grid), AXES, axis_types=types)


def describe(mesh: jax.sharding.Mesh) -> str:
    """'data=2 fsdp=2 tensor=2 (8 devices, 1 process)'."""
    sizes = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
    return f"{sizes} ({mesh.size} devices, {jax.process_count()} process(es))"
