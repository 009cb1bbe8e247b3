"""Orbax checkpoints in WORKDIR/checkpoints: async saves, newest-N plus best retention, restore
with fallback past unreadable checkpoints. (Parameters alone, for init_from, sampling and export:
weights.py.)

A checkpoint holds three items: `state` (params, optimizer state, step, dropout key), `data` (the
Grain iterator's position) and `config` (the resolved config as JSON). Orbax writes each step
into a temporary folder and renames it when complete, so a kill mid-save never leaves a
checkpoint that looks valid, and retention only deletes after a newer save has committed.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from gpt_jax import cli
from gpt_jax import config as config_lib
from gpt_jax.models import registry
from gpt_jax.parallel import distributed
from gpt_jax.training import remote

VAL_METRIC = "val/loss"


class CheckpointError(ValueError):
    """A checkpoint that cannot serve this run; the message says which and what to do."""


def checkpoint_dir(workdir: str | pathlib.Path) -> Any:
    """WORKDIR/checkpoints: an etils.epath.Path for a URL (gs://…), else an absolute path."""
    return remote.path(workdir) / "checkpoints"


def _val_loss(metrics: dict) -> float:
    """A checkpoint saved without an eval at its step ranks last."""
    return metrics.get(VAL_METRIC, math.inf)


def make_manager(directory: pathlib.Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the newest `keep` checkpoints plus the one with the lowest val loss."""
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=_val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=_val_loss,  # Orbax writes metrics, and answers best_step(), only with a best_fn.
        best_mode="min",
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "config"))


def open_to_read(directory: pathlib.Path) -> ocp.CheckpointManager:
    """A read-only manager of `directory` for the commands that only read (sample, export,
    tools). Orbax reads every step's metrics file when it opens the folder, and one damaged file
    fails the whole opening with a bare JSON error: this names the file and the fix."""
    try:
        return make_manager(directory, keep=1, read_only=True)
    except PermissionError:
        raise  # The caller reports the path and the fix.
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        for path in sorted(epath.Path(directory).glob("*/metrics/metrics")):
            try:
                if not isinstance(json.loads(path.read_text()), dict):
                    raise ValueError("not a JSON object")
            except (ValueError, OSError) as bad:
                raise CheckpointError(
                    f"{path} is damaged ({type(bad).__name__}: {cli.one_line(bad)[:200]}), so "
                    f"{directory} cannot be opened; move that file out of the way (that step's "
                    "val loss becomes unknown).") from e
        raise  # Every metrics file reads: not damage we can name (a bug keeps its traceback).


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         config_json: str, val_loss: float | None) -> None:
    """Starts an async save of `step` (call `manager.wait_until_finished()` before exiting)."""
    metrics = {} if val_loss is None else {VAL_METRIC: float(val_loss)}
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config_json)),
        ),
        metrics=metrics,
        force=True,
    )


def drop_closed_loop_callbacks() -> None:
    """Keeps a failed read to its one error. When one array of a checkpoint cannot be read,
    Orbax closes its event loop while TensorStore still reads the others; each of those, when
    it completes, calls into the closed loop, and Python prints that RuntimeError ("Event loop is
    closed") as a traceback, possibly after the command's error line. It says nothing new: the
    reading commands (sample, tools) drop exactly it; every other unraisable error still shows."""
    default = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            default(unraisable)

    sys.unraisablehook = hook


def read_saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config saved with the checkpoint of `step`, as written. Any exception means the
    checkpoint's config could not be read (Orbax and TensorStore raise many types)."""
    raw = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if not isinstance(raw, dict):
        raise ValueError(f"its config is a JSON {type(raw).__name__}, not an object")
    return raw


def merge_saved_config(raw: dict, step: int, directory: Any) -> dict:
    """`raw` (read_saved_config's) over configs/base.py's defaults: fields added since read
    their defaults, which is what that run had. A CheckpointError if it does not fit this
    version's configs/base.py: the checkpoint is fine, the code changed."""
    try:
        return config_lib.saved_run_config(json.dumps(raw)).to_dict()
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"the config saved with the checkpoint of step {step} in {directory} does not fit "
            f"this version's configs/base.py ({cli.brief(e, typed=True)}); use it with the "
            "gpt_jax version that wrote it, or start a new run in another --workdir.") from None


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """read_saved_config, then merge_saved_config."""
    return merge_saved_config(read_saved_config(manager, step), step, manager.directory)


# Fields whose change makes a resumed run differ from an uninterrupted one (warned about).
TRAINING_FIELDS = ("data", "optim", "train", "finetune")


def check_structure(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
    """Raises a one-line CheckpointError if the saved state's tree differs from this run's (e.g.
    an optimizer setting that changes the optimizer state). Reading the metadata may raise other
    errors: those mean the checkpoint is unreadable."""
    saved = ocp.StandardCheckpointer().metadata(
        epath.Path(manager.directory) / str(step) / "state").item_metadata
    def by_path(tree) -> dict:  # "opt_state/1/0/mu/wte/embedding": leaf, whatever the containers.
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in flat}

    want, got = by_path(abstract_state), by_path(saved)
    if not got:  # Orbax returns no metadata (with a warning) when it cannot parse it.
        raise ValueError("the state's metadata is missing or unreadable")
    for path in sorted(set(want) | set(got)):
        if path not in got or path not in want or tuple(got[path].shape) != tuple(want[path].shape):
            have = "absent" if path not in got else f"shape {tuple(got[path].shape)}"
            need = "absent" if path not in want else f"shape {tuple(want[path].shape)}"
            raise CheckpointError(
                f"the checkpoint at step {step} does not fit this run's state: {path} is {have} "
                f"there and {need} here (an optimizer or model setting changed); resume with "
                "the settings it was saved with, or start a new run in another --workdir."
            )


def changed_fields(saved: dict, config: dict) -> list[str]:
    """'group.field: saved → now' for every training-relevant field that differs."""
    out = []
    for group in TRAINING_FIELDS:
        for field in sorted(set(saved.get(group, {})) | set(config.get(group, {}))):
            a, b = saved.get(group, {}).get(field), config.get(group, {}).get(field)
            if a != b:
                out.append(f"{group}.{field}: {a!r} → {b!r}")
    return out


def require_compatible(saved: dict, config: dict, step: int) -> None:
    """A one-line CheckpointError unless this run's model (`config`) can resume the checkpoint
    of `step`, saved with `saved`: the first shape-changing field that differs, and the fix."""
    try:
        registry.get(config["model"]["arch"]).require_compatible(
            saved["model"], config["model"], f"the checkpoint at step {step}",
            "resume with the checkpoint's value, or start a new run in another --workdir.")
    except registry.IncompatibleModelError as e:
        raise CheckpointError(str(e)) from None


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any,
                   config: dict) -> tuple[Any, int, dict] | None:
    """Restores the newest readable checkpoint: (state, step, saved config); the iterator in place.

    An unreadable checkpoint (truncated, garbage, files missing) is logged and moved aside to
    `checkpoints/unreadable/` (kept, never deleted) so that the run can save that step again;
    the previous one is tried next. A checkpoint that does not fit this run (model shape,
    optimizer state) is an error, not a fallback. Returns None when there is no checkpoint; if
    there were some and none could be read, that is an error too: starting over is the user's
    call (checkpoint.init_from=scratch).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            raw = read_saved_config(manager, step)
        except Exception as e:  # Any failure to read means "unreadable".
            _set_aside(manager, step, e)
            continue
        saved = merge_saved_config(raw, step, manager.directory)  # Read, so never set aside.
        require_compatible(saved, config, step)
        try:
            check_structure(manager, step, abstract_state)
            # State first, the iterator only once the state is in: a failure leaves it untouched.
            state = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
            restore_iterator(manager, step, data_iterator)
        except CheckpointError:
            raise
        except Exception as e:
            _set_aside(manager, step, e)
            continue
        return state, step, saved
    if steps:
        raise CheckpointError(
            f"none of the checkpoints {sorted(steps)} in {manager.directory} could be restored; "
            "they were moved to unreadable/ (kept). Start over with checkpoint.init_from=scratch."
        )
    return None


def restore_iterator(manager: ocp.CheckpointManager, step: int, data_iterator: Any) -> None:
    """Puts the Grain iterator where the checkpoint of `step` left it.

    Each process saves its own position (data/process_P-of-N.json). The pipeline gives every
    process the same global batches, so a position is the number of global batches consumed
    whatever the process count, and a run may resume with another number of processes.
    """
    folder = epath.Path(manager.directory) / str(step) / "data"
    saved = sorted(folder.glob("process_*-of-*.json"))
    count = int(saved[0].stem.rsplit("-of-", 1)[1]) if saved else jax.process_count()
    if count == jax.process_count():
        manager.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return
    states = [json.loads(f.read_text()) for f in saved]
    if any(st != states[0] for st in states) or set(states[0]) != {"next_index"}:
        raise CheckpointError(
            f"the checkpoint at step {step} was written by {count} processes whose data "
            f"positions differ ({states[:2]}…); resume it with {count} processes.")
    logging.warning("the checkpoint at step %d was written by %d process(es), this run has %d; "
                    "the data stream continues at global batch %d", step, count,
                    jax.process_count(), states[0]["next_index"])
    data_iterator.set_state(states[0])


def _set_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
    directory = epath.Path(manager.directory)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if distributed.is_primary():  # Every process failed on the same files; one moves them.
        aside = directory / "unreadable"
        aside.mkdir(exist_ok=True)
        target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        (directory / str(step)).rename(target)
        logging.warning("checkpoint step %d cannot be restored (%s: %s); moved to %s, trying the "
                        "one before", step, type(error).__name__, first_line, target)
    distributed.barrier(f"set aside checkpoint {step}")
    manager.reload()
