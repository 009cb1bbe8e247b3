"""Metric sinks (metrics.jsonl, TensorBoard), the train-line logger, and peak FLOP/s for MFU (the
model's FLOPs per token come from its architecture, gpt_jax/models/registry.py)."""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging
from tensorboardX import SummaryWriter

# Dense bf16 peak FLOP/s per device, by the substring jax reports in `device_kind`. The first match
# wins, so more specific names come first. Override with log.peak_flops.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e / "TPU v5 lite"
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops_per_device(device: jax.Device, override: float) -> float | None:
    """Peak FLOP/s of one device: the override if > 0, else the table; None when unknown (CPU)."""
    if override > 0:
        return override
    for name, flops in PEAK_FLOPS:
        if name.lower() in device.device_kind.lower():
            return flops
    return None


class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard.

    `resume_after=N` (a run resumed from the checkpoint of step N) first moves the rows of steps
    after N, written before the interruption, to metrics.rolledback.jsonl, so metrics.jsonl has
    each step once; TensorBoard drops its events after N the same way (purge_step).
    """

    def __init__(self, workdir: pathlib.Path, tensorboard: bool, resume_after: int = 0,
                 active: bool = True):
        """`active=False` (every process but 0 of a multi-process run) writes nothing."""
        self._file, self._tb = None, None
        if not active:
            return
        path = workdir / "metrics.jsonl"
        if resume_after > 0 and path.exists():
            _roll_back(path, resume_after, workdir / "metrics.rolledback.jsonl")
        self._file = open(path, "a")  # noqa: SIM115 — closed in close().
        purge = resume_after + 1 if resume_after > 0 else None
        self._tb = SummaryWriter(str(workdir / "tb"), purge_step=purge) if tensorboard else None

    @staticmethod
    def keep_previous(workdir: pathlib.Path) -> None:
        """A run from scratch in a used workdir keeps the earlier metrics as metrics.prevN.jsonl."""
        old = workdir / "metrics.jsonl"
        if old.exists():
            n = 1
            while (workdir / f"metrics.prev{n}.jsonl").exists():
                n += 1
            old.rename(workdir / f"metrics.prev{n}.jsonl")
            logging.warning("%s held an earlier run's metrics; kept as metrics.prev%d.jsonl",
                            workdir, n)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self._file is None:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            row[k] = _to_python(v)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class TrainLogger:
    """Writes train lines one step late, so logging never stalls the device.

    `queue(step, metrics)` holds the device arrays of a log step; `flush()` (called after the next
    step is dispatched) fetches them, adds throughput since the previous fetch, and writes them.
    """

    def __init__(self, writer: MetricsWriter, bar: tqdm.tqdm, tokens_per_step: int,
                 flops_per_step: float, peak_flops: float | None):
        self._writer, self._bar = writer, bar
        self._tokens_per_step, self._flops_per_step = tokens_per_step, flops_per_step
        self._peak_flops = peak_flops
        self._pending: tuple[int, Any] | None = None
        self.restart_clock(0)
        self.last: dict[str, Any] = {}
        self._throughputs: list[float] = []

    def median_tokens_per_sec(self) -> float | None:
        """Median of the logged training throughputs (None before two log lines)."""
        return float(np.median(self._throughputs)) if self._throughputs else None

    def restart_clock(self, step: int) -> None:
        """Throughput counts from here (after a compile or an eval, which are not training)."""
        self._tick, self._tick_step = time.perf_counter(), step

    def queue(self, step: int, device_metrics: dict[str, Any]) -> None:
        self.flush()
        self._pending = (step, device_metrics)

    def flush(self) -> None:
        if self._pending is None:
            return
        step, device_metrics = self._pending
        self._pending = None
        m = jax.device_get(device_metrics)  # Waits for that step only; the next one is queued.
        now = time.perf_counter()
        steps = step - self._tick_step
        m["tokens_per_sec"] = m["gflops_per_sec"] = m["mfu"] = None
        if steps > 0:  # None for the step that holds the compile.
            steps_per_sec = steps / (now - self._tick)
            m["tokens_per_sec"] = steps_per_sec * self._tokens_per_step
            self._throughputs.append(m["tokens_per_sec"])
            m["gflops_per_sec"] = steps_per_sec * self._flops_per_step / 1e9
            if self._peak_flops is not None:
                m["mfu"] = steps_per_sec * self._flops_per_step / self._peak_flops
        self.restart_clock(step)
        self._writer.write(step, m)
        self._bar.set_postfix(
            loss=f"{float(m['train/loss']):.4f}",
            tok_s="n/a" if m["tokens_per_sec"] is None else f"{m['tokens_per_sec']:.0f}",
            mfu="n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%",
        )
        self.last = m


def _roll_back(path: pathlib.Path, step: int, rolled: pathlib.Path) -> None:
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            after = json.loads(line)["step"] > step
        except (ValueError, KeyError, TypeError):  # A line cut by the kill: not a metric.
            after = True
        (drop if after else keep).append(line if line.endswith("\n") else line + "\n")
    if drop:
        with open(rolled, "a") as f:
            f.writelines(drop)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)  # Atomic: a kill here leaves the old or the new file, never half of one.


def _to_python(v: Any) -> Any:
    if isinstance(v, np.ndarray | np.generic | jax.Array):
        v = np.asarray(v).item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable.
    return v
