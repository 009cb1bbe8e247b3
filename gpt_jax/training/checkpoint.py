"""Orbax checkpoints in WORKDIR/checkpoints: async saves, newest-N plus best retention, restore
with fallback past unreadable checkpoints.

A checkpoint holds three items: `state` (params, optimizer state, step, dropout key), `data` (the
Grain iterator's position) and `config` (the resolved config as JSON). Orbax writes each step
into a temporary folder and renames it when complete, so a kill mid-save never leaves a
checkpoint that looks valid, and retention only deletes after a newer save has committed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from gpt_jax import config as config_lib
from gpt_jax.config import ModelConfig
from gpt_jax.data import tokenizers
from gpt_jax.models.gpt import GPT
from gpt_jax.parallel import distributed, sharding

VAL_METRIC = "val/loss"
# A parameters-only checkpoint (a model imported by tools/convert_hf.py) sits in WORKDIR/params/.
PARAMS_DIR = "params"
HF_PREFIX = "hf:"  # checkpoint.init_from=hf:PATH converts a Hugging Face GPT-2 on the fly.
# Model fields that change parameter shapes: resuming across a change in one of them cannot work.
SHAPE_FIELDS = ("num_layers", "num_heads", "d_model", "mlp_ratio", "vocab_size", "vocab_multiple",
                "max_seq_len", "bias", "tie_embeddings", "scan_layers")


class CheckpointError(ValueError):
    """A checkpoint that cannot serve this run; the message says which and what to do."""


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).resolve() / "checkpoints"


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


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The resolved config a checkpoint was written with; fields added to configs/base.py since
    then read their defaults, which is what that run had."""
    raw = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return config_lib.saved_run_config(json.dumps(raw)).to_dict()


def differing_fields(saved_model: dict, ours: dict, fields: tuple[str, ...]) -> list[str]:
    """The `fields` whose saved value differs from this run's, in order."""
    return [f for f in fields if saved_model.get(f) != ours.get(f)]


def check_compatible(saved: dict, config_model: dict, step: int) -> None:
    """Raises a one-line CheckpointError naming the first shape-changing field that differs."""
    if differ := differing_fields(saved["model"], config_model, SHAPE_FIELDS):
        field = differ[0]
        raise CheckpointError(
            f"the checkpoint at step {step} has model.{field}={saved['model'].get(field)!r} but "
            f"this run has model.{field}={config_model.get(field)!r}; resume with the "
            "checkpoint's value, or start a new run in another --workdir."
        )


# Fields whose change makes a resumed run differ from an uninterrupted one (warned about).
TRAINING_FIELDS = ("data", "optim", "train")


def check_structure(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
    """Raises a one-line CheckpointError if the saved state's tree differs from this run's (e.g.
    an optimizer setting that changes the optimizer state). Reading the metadata may raise other
    errors: those mean the checkpoint is unreadable."""
    saved = ocp.StandardCheckpointer().metadata(
        pathlib.Path(manager.directory) / str(step) / "state").item_metadata
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
            saved = saved_config(manager, step)
        except Exception as e:  # Any failure to read means "unreadable".
            _set_aside(manager, step, e)
            continue
        check_compatible(saved, config["model"], step)
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
    folder = pathlib.Path(manager.directory) / str(step) / "data"
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


def params_source(path: str) -> tuple[pathlib.Path, int | None]:
    """(checkpoint folder, step or None for "choose") of `path`: a training workdir (its
    checkpoints/), a workdir made by `tools/convert_hf.py import` (its params/), either folder
    itself, or one step's folder."""
    p = pathlib.Path(path).expanduser().resolve()
    if (p / "state").is_dir():  # One step's folder.
        return p.parent, int(p.name)
    for sub in ("checkpoints", PARAMS_DIR):
        if (p / sub).is_dir():
            return p / sub, None
    if not p.is_dir():
        raise CheckpointError(f"{path}: no such folder; give a workdir, its checkpoints/ or "
                              "params/ folder, or one step's folder.")
    return p, None


def select_step(manager: ocp.CheckpointManager, which: int | str | None) -> int:
    """The step `which` names: an int, "best" (lowest val loss), or None / "newest"."""
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"{manager.directory} holds no checkpoint.")
    if which in (None, "newest"):
        return manager.latest_step()
    if which == "best":
        best = manager.best_step()
        if best is None:
            raise CheckpointError(f"no checkpoint in {manager.directory} has a val loss, so none is "
                                  "best; choose newest or a step.")
        return best
    if int(which) not in steps:
        raise CheckpointError(f"{manager.directory} has no checkpoint of step {which}; it has "
                              f"{sorted(steps)}.")
    return int(which)


def restore_params(directory: pathlib.Path, step: int, abstract_params: Any) -> Any:
    """Only the parameters of the checkpoint `step` (not the optimizer state, a multiple of their
    size), placed as `abstract_params` (ShapeDtypeStructs with shardings) says."""
    target = {"params": abstract_params}
    restored = ocp.PyTreeCheckpointer().restore(
        pathlib.Path(directory) / str(step) / "state",
        args=ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))
    return restored["params"]


def save_params(workdir: str | pathlib.Path, params: Any, config_json: str) -> pathlib.Path:
    """Writes a parameters-only checkpoint (step 0, with its config) to WORKDIR/params/, which
    `checkpoint.init_from=WORKDIR` reads. It is not in checkpoints/, so a training run in that
    workdir never takes it for a state to resume."""
    directory = pathlib.Path(workdir).resolve() / PARAMS_DIR
    manager = make_manager(directory, keep=1)
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}),
        config=ocp.args.JsonSave(json.loads(config_json))), force=True)
    manager.wait_until_finished()
    manager.close()
    return directory


def load_params(path: str, abstract_params: Any, model_cfg: ModelConfig) -> Any:
    """Parameters to start a new run from (checkpoint.init_from), placed like `abstract_params`:
    another run's checkpoint (a workdir, its checkpoints/ or one step folder; a folder holds
    several: the newest), an imported workdir (params/), or `hf:PATH`, a Hugging Face GPT-2
    folder or hub name converted on the fly. The optimizer state, step and data position are not
    taken: this starts a new run from those weights."""
    if path.startswith(HF_PREFIX):
        return _load_hf_params(path[len(HF_PREFIX):], abstract_params, model_cfg)
    try:
        directory, step = params_source(path)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint.init_from={e} Or: auto, scratch, hf:PATH.") from e
    manager = make_manager(directory, keep=1, read_only=True)
    try:
        step = select_step(manager, step)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint.init_from={path!r}: {e}") from e
    _check_starts(saved_config(manager, step)["model"], model_cfg, f"{path} (step {step})")
    return restore_params(directory, step, abstract_params)


# Model fields that keep the shapes but change the function the weights were trained for.
FUNCTION_FIELDS = ("activation", "norm_eps")


def _check_starts(saved_model: dict, model_cfg: ModelConfig, source: str) -> None:
    """Raises a one-line CheckpointError naming the first shape-changing field in which this run
    differs from the checkpoint it starts from; warns about function-changing ones (allowed: a
    deliberate change when fine-tuning)."""
    ours = dataclasses.asdict(model_cfg)
    if differ := differing_fields(saved_model, ours, SHAPE_FIELDS):
        field = differ[0]
        raise CheckpointError(
            f"checkpoint.init_from={source} has model.{field}={saved_model[field]!r} but this run "
            f"has model.{field}={ours[field]!r}; set --config.model.{field}={saved_model[field]!r} "
            "to start from it.")
    for field in differing_fields(saved_model, ours, FUNCTION_FIELDS):
        logging.warning("checkpoint.init_from=%s was trained with model.%s=%r and this run "
                        "has %r: the weights start under another function; set "
                        "--config.model.%s=%r to keep it.", source, field, saved_model[field],
                        ours[field], field, saved_model[field])


def abstract_params(cfg: ModelConfig) -> Any:
    """The parameter tree of `cfg`'s model as ShapeDtypeStructs on the default device (nothing
    allocated): the target a checkpoint's parameters are restored into."""
    model = GPT(cfg)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def load_trained(path: str | pathlib.Path, which: int | str | None = None
                 ) -> tuple[dict, ModelConfig, Any, int]:
    """(saved config, model hyperparameters, params on the default device, step) of checkpoint
    `which` (None/"newest", "best" or a step) of a run: a workdir, its checkpoints/ or params/
    folder, or one step's folder. Only the parameters are read. For sampling and export."""
    directory, step = params_source(str(path))
    manager = make_manager(directory, keep=1, read_only=True)
    step = select_step(manager, which if step is None else step)
    # The config saved with these parameters, not config.json: it is there also when the path is
    # a checkpoints/ or step folder.
    config = saved_config(manager, step)
    vocab_size = config["model"]["vocab_size"]
    if vocab_size is None:  # Configs from before the vocab was resolved: the tokenizer decides.
        vocab_size = tokenizers.load_tokenizer(directory.parent / "tokenizer.json").vocab_size
    cfg = ModelConfig.from_config(ml_collections.ConfigDict(config), vocab_size)
    return config, cfg, restore_params(directory, step, abstract_params(cfg)), step


def _load_hf_params(source: str, abstract_params: Any, model_cfg: ModelConfig) -> Any:
    """`checkpoint.init_from=hf:SOURCE`: an HF GPT-2 converted to this run's layout."""
    where = f"checkpoint.init_from={HF_PREFIX}{source}"
    try:
        from gpt_jax.interop import hf_gpt2  # torch and transformers only on this path.

        params = hf_gpt2.import_params(source, model_cfg)
    except ImportError as e:
        raise CheckpointError(f"{where} needs torch and transformers ({e}); pip install -r "
                              "requirements-dev.txt.") from e
    except ValueError as e:  # InteropError: the message names the field and the fix.
        raise CheckpointError(f"{where}: {e}") from e

    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape) for k, v in flat}

    got, want = shapes(params), shapes(abstract_params)
    for name in sorted(set(got) | set(want)):
        if got.get(name) != want.get(name):
            raise CheckpointError(f"{where} gives {name} {got.get(name, 'absent')} but this run "
                                  f"has {want.get(name, 'absent')}; its model.* settings differ.")
    return jax.tree.map(lambda a, s: sharding.put_replicated_host(np.asarray(a, s.dtype), s.sharding),
                        params, abstract_params)


def _set_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
    directory = pathlib.Path(manager.directory)
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
