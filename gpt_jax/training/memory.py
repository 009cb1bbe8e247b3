"""Will the train step fit? XLA's memory analysis of the compiled step against what the devices
have, checked before the first step; and an allocation failure at run time, reported the same way.

Per device, the step needs its arguments (state + batch) + the outputs it does not write in place
(the state is donated) + its temporaries (activations, gradients, XLA buffers). A GPU or TPU
reports its own limit (`memory_stats()["bytes_limit"]`); CPU devices share the host's available
RAM, so there the need of every local device adds up.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax

from gpt_jax.config import ConfigError

# What brings the step's memory down, for the message.
REMEDIES = ("lower train.batch_size (or raise train.grad_accum_steps) or data.seq_len, set "
            "model.remat=full, shard with mesh.fsdp, or use model.dtype=bfloat16")
SKIP = "train.memory_check=False skips this check"
# What the processes whose own devices fit report when another process's do not.
ELSEWHERE = (f"the train step does not fit the devices of another process of this run (its log "
             f"says by how much); {REMEDIES}. ({SKIP}.)")


class DoesNotFitError(ConfigError):
    """The train step needs more memory than the devices have; the message says how much."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes one device needs for a compiled step (XLA's memory analysis)."""

    arguments: int
    outputs_not_aliased: int
    temporaries: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs_not_aliased + self.temporaries


def step_memory(compiled: Any) -> StepMemory:
    """The memory one device needs for `compiled` (a jax AOT-compiled function whose donated
    arguments alias its outputs)."""
    mem = compiled.memory_analysis()
    return StepMemory(mem.argument_size_in_bytes,
                      mem.output_size_in_bytes - mem.alias_size_in_bytes, mem.temp_size_in_bytes)


def describe(need: StepMemory) -> str:
    """'1.2 GB (state and batch 0.4 GB, temporaries 0.8 GB)'."""
    return (f"{_size(need.total)} (state and batch {_size(need.arguments)}, temporaries "
            f"{_size(need.temporaries)})")


def available_bytes(device: jax.Device) -> tuple[int, str] | None:
    """(bytes, what) one device can use: its own limit on a GPU/TPU, the host's available RAM
    shared by this process's devices on a CPU; None when it cannot be told."""
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except jax.errors.JaxRuntimeError:  # A backend that keeps no allocator statistics.
            return None
        limit = stats.get("bytes_limit")
        return None if limit is None else (int(limit), f"{device.device_kind} memory")
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None
    what = "available host RAM"
    if (room := cgroup_room()) is not None and room < avail:  # A container's or job's limit.
        avail, what = room, "memory left under this job's cgroup limit"
    share = max(1, jax.local_device_count())
    return avail // share, what + (f" / {share} CPU devices" if share > 1 else "")


# Per cgroup version: (limit, usage, reclaimable page cache in memory.stat) file names.
_CGROUP_V2 = ("memory.max", "memory.current", "inactive_file")
_CGROUP_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def cgroup_room(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's cgroups may still allocate, or None without a memory limit: a job
    limited below the host's RAM (a container, a SLURM job) is killed at its limit, not the
    host's. Each level from this process's cgroup (read from /proc/self/cgroup) up to the root
    with a limit counts: its limit less its usage, page cache that can be dropped excepted."""
    try:
        lines = pathlib.Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hierarchy == "0" and controllers == "":
            base, names = pathlib.Path(root), _CGROUP_V2
        elif "memory" in controllers.split(","):
            base, names = pathlib.Path(root) / "memory", _CGROUP_V1
        else:
            continue
        folder = base / path.strip("/")
        while True:
            if (room := _level_room(folder, names)) is not None:
                rooms.append(room)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(rooms) if rooms else None


def _level_room(folder: pathlib.Path, names: tuple[str, str, str]) -> int | None:
    limit_name, usage_name, cache_name = names
    try:
        limit = (folder / limit_name).read_text().strip()
        usage = int((folder / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 1 << 60:  # "max", or v1's "no limit" (~2⁶³).
        return None
    cache = 0
    try:
        for stat in (folder / "memory.stat").read_text().splitlines():
            key, _, value = stat.partition(" ")
            if key == cache_name:
                cache = int(value)
    except (OSError, ValueError):
        pass
    return max(int(limit) - max(usage - cache, 0), 0)


def fit_problem(need: StepMemory, device: jax.Device) -> str | None:
    """The one-line reason `need` does not fit `device` (the estimate, the limit, the
    remedies), or None when it fits or the limit cannot be told."""
    have = available_bytes(device)
    if have is None or need.total <= have[0]:
        return None
    return (f"the train step needs {describe(need)} per device, XLA's estimate, but there are "
            f"{_size(have[0])} ({have[1]}); {REMEDIES}. ({SKIP}.)")


def check_fits(need: StepMemory, device: jax.Device) -> None:
    """Raises DoesNotFitError with `fit_problem`'s line when `need` does not fit `device`."""
    if (problem := fit_problem(need, device)) is not None:
        raise DoesNotFitError(problem)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a runtime error is an allocation failure (XLA's RESOURCE_EXHAUSTED)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def out_of_memory(where: str, error: BaseException) -> DoesNotFitError:
    """The one-line report of an allocation failure at `where` (e.g. "step 12")."""
    first = (str(error).strip().splitlines() or ["RESOURCE_EXHAUSTED"])[0][:200]
    return DoesNotFitError(f"out of device memory at {where} ({first}); checkpoints are "
                           f"untouched; {REMEDIES}.")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if float(f"{n:.3g}") < 1000:  # Rounded first: 999.7 MB reads "1 GB", not "1e+03 MB".
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"
