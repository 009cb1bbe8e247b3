"""Metric sinks (metrics.jsonl, TensorBoard), the train-line logger (a progress bar on a terminal,
plain lines otherwise), and peak FLOP/s for MFU (the model's FLOPs per token come from its
architecture, gpt_jax/models/registry.py).

Every row is in both files when `MetricsWriter.write` returns, so a hard kill (`kill -9`, a node
lost) loses nothing that was logged. Rows carry `time` (wall seconds since the run's first start,
continued across resumes) and `tokens` (tokens trained on by that step)."""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging


def _import_tensorboardx() -> None:
    """Imports tensorboardX without torch: its writer module imports torch, when installed, only
    to accept torch tensors, which nothing here passes. That import costs every command 1–2 s at
    start; hidden for this import (an ImportError to tensorboardX), torch stays importable."""
    if "torch" in sys.modules:  # Already paid for.
        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]


_import_tensorboardx()
from tensorboardX import summary  # noqa: E402 — after the import above.
from tensorboardX.event_file_writer import EventsWriter  # noqa: E402
from tensorboardX.proto import event_pb2  # noqa: E402

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


class EventFile:
    """TensorBoard scalars written synchronously to one event file under `logdir`.

    tensorboardX's SummaryWriter hands events to a background thread that writes them out every
    flush_secs (120 s by default): a hard kill lost up to two minutes of rows. Here each `write`
    is in the file when it returns. `purge_step=N` writes TensorBoard's restart marker, which
    hides the events of steps ≥ N from earlier files (a resume's rolled-back steps).
    """

    def __init__(self, logdir: pathlib.Path, purge_step: int | None = None):
        logdir.mkdir(parents=True, exist_ok=True)
        # The file's name has the time in seconds; a resume within the same second would reuse
        # (truncate) it, so a nanosecond suffix keeps files apart and in order of creation.
        self._events = EventsWriter(str(logdir / "events"), f".{time.time_ns()}")
        if purge_step is not None:
            self._events.write_event(event_pb2.Event(
                step=purge_step, wall_time=time.time(),
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._events.flush()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """One event per scalar at `step`, flushed to the file."""
        now = time.time()
        for name, value in scalars.items():
            self._events.write_event(event_pb2.Event(step=step, wall_time=now,
                                                     summary=summary.scalar(name, value)))
        self._events.flush()

    def close(self) -> None:
        self._events.close()


class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard.

    `resume_after=N` (a run resumed from the checkpoint of step N) first moves the rows of steps
    after N, written before the interruption, to metrics.rolledback.jsonl, so metrics.jsonl has
    each step once; TensorBoard hides its events after N the same way (purge_step). Every row gets
    `time`: seconds since `started` (this process's start, time.time()) plus the `time` of the
    last row kept from earlier runs of this workdir; `tokens`: step × `tokens_per_step`, or
    after a resume, the last kept row's `tokens` counted on by `tokens_per_step` per step (the
    batch shape may have changed); and `flops`: the training FLOPs to that step, counted on from
    the last kept row's at the rate `set_flops_per_token` gives (the model's, which changes when
    it grows).
    """

    def __init__(self, workdir: pathlib.Path, tensorboard: bool, resume_after: int = 0,
                 active: bool = True, tokens_per_step: int = 0, started: float | None = None,
                 wandb: Any = None):
        """`active=False` (every process but 0 of a multi-process run) writes nothing. `wandb`:
        a callable making the optional third sink (wandb_sink.WandbSink) once the files are
        open, or None."""
        self._file, self._tb, self._wandb = None, None, None
        self._tokens_per_step, self._tokens_at_0 = tokens_per_step, 0
        # Training FLOPs: `flops` at step `step` of the anchor, and per token from there on.
        self._flops_anchor, self._flops_per_token, self._rate_set = (0, 0.0), 0.0, False
        self._resumed_from: tuple[int, float, int] | None = None
        self._started = time.time() if started is None else started
        if not active:
            return
        path = workdir / "metrics.jsonl"
        if resume_after > 0 and path.exists():
            _roll_back(path, resume_after, workdir / "metrics.rolledback.jsonl")
        last = _last_row(path) if resume_after > 0 else {}
        self._started -= float(last.get("time", 0.0))
        if isinstance(last.get("tokens"), int) and last["step"] > 0:
            # Counted on from there: up to the checkpoint at the rate the earlier run logged,
            # then at this run's (a resume may change the batch shape).
            at_resume = last["tokens"] + (resume_after - last["step"]) * last["tokens"] // last["step"]
            self._tokens_at_0 = at_resume - resume_after * tokens_per_step
        # The last kept row's FLOPs; the first set_flops_per_token counts on from there.
        if isinstance(last.get("flops"), float | int) and isinstance(last.get("tokens"), int):
            self._resumed_from = (resume_after, float(last["flops"]), last["tokens"])
            self._flops_anchor = (int(last["step"]), float(last["flops"]))
        self._file = open(path, "a")  # noqa: SIM115 — closed in close().
        purge = resume_after + 1 if resume_after > 0 else None
        self._tb = EventFile(workdir / "tb", purge_step=purge) if tensorboard else None
        self._wandb = wandb() if wandb is not None else None

    @staticmethod
    def keep_previous(workdir: pathlib.Path, shown: str | None = None) -> None:
        """A run from scratch in a used workdir keeps the earlier metrics as metrics.prevN.jsonl.
        `shown`: the workdir as messages name it (a URL workdir's, not its local mirror's)."""
        old = workdir / "metrics.jsonl"
        if old.exists():
            n = 1
            while (workdir / f"metrics.prev{n}.jsonl").exists():
                n += 1
            old.rename(workdir / f"metrics.prev{n}.jsonl")
            logging.warning("%s held an earlier run's metrics; kept as metrics.prev%d.jsonl",
                            shown or workdir, n)

    def set_flops_per_token(self, flops_per_token: float, step: int) -> None:
        """Training FLOPs per token from step `step` on (rows before it keep the old rate). The
        first call sets the rate from the last kept row on: after a resume, the steps between
        that row and the checkpoint ran at it."""
        if self._rate_set:
            self._flops_anchor = (step, self._flops_at(step))
        elif self._resumed_from is not None:
            # From the last kept row to the checkpoint resumed: the tokens trained in between
            # (counted at the earlier run's batch shape, as `tokens` is) at this rate.
            resumed, flops, tokens = self._resumed_from
            at_resume = self._tokens_at_0 + resumed * self._tokens_per_step
            self._flops_anchor = (resumed, flops + (at_resume - tokens) * flops_per_token)
        self._flops_per_token, self._rate_set = float(flops_per_token), True

    def _flops_at(self, step: int) -> float:
        anchor_step, anchor_flops = self._flops_anchor
        return anchor_flops + (step - anchor_step) * self._tokens_per_step * self._flops_per_token

    def elapsed(self) -> float:
        """Wall seconds since the run's first start (what rows record as `time`)."""
        return time.time() - self._started

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """One row for `step` (metrics + time + tokens), in metrics.jsonl and TensorBoard."""
        if self._file is None:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            row[k] = _to_python(v)
        row["time"] = round(self.elapsed(), 3)
        row["tokens"] = self._tokens_at_0 + int(step) * self._tokens_per_step
        row["flops"] = self._flops_at(int(step))
        scalars = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
        if self._tb is not None:  # First: a kill between the two leaves JSONL ⊆ TensorBoard.
            self._tb.write(step, scalars)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(int(step), scalars)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def _last_row(path: pathlib.Path) -> dict[str, Any]:
    """The last row of metrics.jsonl with a `time` and a `step` ({} if none)."""
    if not path.exists():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
            float(row["time"]), int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        return row
    return {}


def show_bar(progress: str, primary: bool) -> bool:
    """Whether this process draws a progress bar: log.progress=bar, or auto on a terminal (a bar
    redirected to a file is megabytes of carriage returns); never on processes other than 0."""
    return primary and (progress == "bar" or (progress == "auto" and sys.stderr.isatty()))


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class TrainLogger:
    """Writes train rows one step late, so logging never stalls the device.

    `queue(step, metrics)` holds the device arrays of a log step; `flush()` (called after the next
    step is dispatched) fetches them, adds throughput since the previous fetch, and writes them:
    to the metrics files, and to the bar's postfix or, without a bar, as a plain line on stdout
    (`lines=True`, on process 0): step, loss, lr, tokens/s, MFU, elapsed and ETA.
    """

    def __init__(self, writer: MetricsWriter, bar: tqdm.tqdm, tokens_per_step: int,
                 flops_per_step: float, peak_flops: float | None, num_steps: int = 0,
                 lines: bool = False):
        self._writer, self._bar, self._lines = writer, bar, lines
        self._tokens_per_step, self._flops_per_step = tokens_per_step, flops_per_step
        self._peak_flops, self._num_steps = peak_flops, num_steps
        self._pending: tuple[int, Any] | None = None
        self._steps_per_sec: float | None = None
        self.restart_clock(0)
        self.last: dict[str, Any] = {}
        self._throughputs: list[float] = []

    def set_flops_per_step(self, flops_per_step: float) -> None:
        """The FLOPs of one step from now on (MFU), e.g. after the model grew."""
        self._flops_per_step = flops_per_step

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
            self._steps_per_sec = steps / (now - self._tick)
            m["tokens_per_sec"] = self._steps_per_sec * self._tokens_per_step
            self._throughputs.append(m["tokens_per_sec"])
            m["gflops_per_sec"] = self._steps_per_sec * self._flops_per_step / 1e9
            if self._peak_flops is not None:
                m["mfu"] = self._steps_per_sec * self._flops_per_step / self._peak_flops
        self.restart_clock(step)
        self._writer.write(step, m)
        tok_s = "n/a" if m["tokens_per_sec"] is None else f"{m['tokens_per_sec']:,.0f}"
        mfu = "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"
        self._bar.set_postfix(loss=f"{float(m['train/loss']):.4f}", tok_s=tok_s, mfu=mfu)
        if self._lines:
            eta = ("n/a" if not self._steps_per_sec
                   else _duration((self._num_steps - step) / self._steps_per_sec))
            print(f"step {step}/{self._num_steps}: loss {float(m['train/loss']):.4f}, "
                  f"lr {float(m['lr']):.3e}, {tok_s} tokens/s, mfu {mfu}, "
                  f"elapsed {_duration(self._writer.elapsed())}, eta {eta}", flush=True)
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
