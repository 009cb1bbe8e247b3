"""Parameters without the training state: reading one checkpoint's parameters (sampling,
export, checkpoint.init_from), writing a parameters-only checkpoint (an imported model), and
taking parameters from a Hugging Face GPT-2 or Llama (`checkpoint.init_from=hf:PATH`).

A parameters-only checkpoint (a model imported by tools/convert_hf.py) sits in WORKDIR/params/,
apart from checkpoints/, so a training run in that workdir never resumes it by mistake.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gpt_jax import cli
from gpt_jax.data import tokenizers
from gpt_jax.finetune import adapters, lora
from gpt_jax.models import registry
from gpt_jax.parallel import sharding
from gpt_jax.training import remote
from gpt_jax.training.checkpoint import (
    CheckpointError,
    make_manager,
    merge_saved_config,
    open_to_read,
    read_saved_config,
    saved_config,
)

PARAMS_DIR = "params"
HF_PREFIX = "hf:"  # checkpoint.init_from=hf:PATH converts a Hugging Face GPT-2/Llama on the fly.


def params_source(path: str) -> tuple[Any, int | None]:
    """(checkpoint folder, step or None for "choose") of `path`: a training workdir (its
    checkpoints/), a workdir made by `tools/convert_hf.py import` (its params/), either folder
    itself, or one step's folder."""
    p = remote.path(path if remote.is_url(path) else pathlib.Path(path).expanduser())
    if (p / "state").is_dir():  # One step's folder.
        return p.parent, int(p.name)
    for sub in ("checkpoints", PARAMS_DIR):
        if (p / sub).is_dir():
            return p / sub, None
    if not p.is_dir():
        problem = " is a file, not a folder" if p.exists() else ": no such folder"
        raise CheckpointError(f"{path}{problem}; give a workdir, its checkpoints/ or params/ "
                              "folder, or one step's folder.")
    return p, None


def select_step(manager: ocp.CheckpointManager, which: int | str | None) -> int:
    """The step `which` names: an int, "best" (lowest val loss), or None / "newest"."""
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"{manager.directory} holds no checkpoint: its run has not saved "
                              "one yet (it does every checkpoint.every steps); give another.")
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
                              f"{sorted(steps)}: choose one of those.")
    return int(which)


def restore_params(directory: pathlib.Path, step: int, abstract_params: Any) -> Any:
    """Only the parameters of the checkpoint `step` (not the optimizer state, a multiple of their
    size), placed as `abstract_params` (ShapeDtypeStructs with shardings) says."""
    target = {"params": abstract_params}
    restored = ocp.PyTreeCheckpointer().restore(
        epath.Path(directory) / str(step) / "state",
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


def load_params(path: str, target: Any, hparams: Any) -> Any:
    """Parameters to start a new run from (checkpoint.init_from), placed like `target`
    (ShapeDtypeStructs with shardings): another run's checkpoint (a workdir, its checkpoints/ or
    one step folder; a folder holds several: the newest; a fine-tuned run's adapters come on
    their base, LoRA merged), an imported workdir (params/), or `hf:PATH`, a Hugging Face GPT-2
    folder or hub name converted on the fly. The optimizer state, step and data position are not
    taken: this starts a new run from those weights."""
    if path.startswith(HF_PREFIX):
        return _load_hf_params(path[len(HF_PREFIX):], target, hparams)
    directory, step = check_params_source(path, hparams)
    manager = make_manager(directory, keep=1, read_only=True)
    config = saved_config(manager, step)
    if not adapters.active(config["finetune"]):
        return restore_params(directory, step, target)
    # A fine-tuned run's adapters on their base, LoRA folded in: the model it computes. A soft
    # prompt is an input, not a weight of that model: it does not carry over.
    theirs = registry.hyperparameters(config)
    if theirs.prompt_tokens:
        logging.warning("checkpoint.init_from=%s has a soft prompt, which this run does not "
                        "take: it starts from that run's base (and LoRA) only.", path)
    saved = TrainedConfig(config, step, directory, manager)
    params, _ = lora.merge(saved.restore(abstract_params(theirs)), theirs)
    params.pop("soft_prompt", None)
    return jax.tree.map(lambda a, s: sharding.put_replicated_host(np.asarray(a, s.dtype),
                                                                  s.sharding), params, target)


def check_params_source(path: str, hparams: Any) -> tuple[pathlib.Path, int]:
    """(checkpoint folder, step) that `load_params(path, …)` reads, checked without reading any
    array (the source exists, holds a checkpoint, and its model fits `hparams`), so a bad
    checkpoint.init_from is refused before the run compiles. Not for hf: sources."""
    try:
        directory, step = params_source(path)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint.init_from={e} Or: auto, scratch, hf:PATH.") from e
    manager = make_manager(directory, keep=1, read_only=True)
    try:
        step = select_step(manager, step)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint.init_from={path!r}: {e}") from e
    _check_starts(saved_config(manager, step)["model"], hparams, f"{path} (step {step})")
    return directory, step


def _check_starts(saved_model: dict, hparams: Any, source: str) -> None:
    """Raises a one-line CheckpointError naming the first shape-changing field in which this run
    differs from the checkpoint it starts from; warns about function-changing ones (allowed: a
    deliberate change when fine-tuning)."""
    arch, ours = registry.arch_of(hparams), registry.model_fields(hparams)
    try:
        arch.require_compatible(saved_model, ours, f"checkpoint.init_from={source}",
                                "set --config.model.{field}={value!r} to start from it.")
    except registry.IncompatibleModelError as e:
        raise CheckpointError(str(e)) from None
    for field in arch.function_changes(saved_model, ours):
        logging.warning("checkpoint.init_from=%s was trained with model.%s=%r and this run "
                        "has %r: the weights start under another function; set "
                        "--config.model.%s=%r to keep it.", source, field, saved_model[field],
                        ours[field], field, saved_model[field])


def abstract_params(hparams: Any) -> Any:
    """The parameter tree of `hparams`' model as ShapeDtypeStructs on this process's first
    device (nothing allocated): the target a checkpoint's parameters are restored into."""
    model = registry.build(hparams)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def load_trained(path: str | pathlib.Path, which: int | str | None = None
                 ) -> tuple[dict, Any, Any, int]:
    """(saved config, model hyperparameters, params on the default device, step) of checkpoint
    `which` (None/"newest", "best" or a step) of a run: a workdir, its checkpoints/ or params/
    folder, or one step's folder. Only the parameters are read. For sampling and export."""
    saved = trained_config(path, which)
    hparams = registry.hyperparameters(saved.config)
    return saved.config, hparams, saved.restore(abstract_params(hparams)), saved.step


@dataclasses.dataclass(frozen=True)
class TrainedConfig:
    """One checkpoint's saved config, read without its arrays; `restore` reads its parameters."""

    config: dict
    step: int
    directory: Any
    manager: ocp.CheckpointManager

    def restore(self, abstract: Any) -> Any:
        """The checkpoint's parameters, placed as `abstract` (ShapeDtypeStructs with shardings)
        says; a one-line CheckpointError if they cannot be read. A run with adapters saved only
        them: its base (finetune.base) is read under them."""
        mask = None
        if adapters.active(self.config["finetune"]):
            mask = adapters.trainable_mask(abstract, registry.hyperparameters(self.config))
        try:
            params = restore_params(self.directory, self.step,
                                    abstract if mask is None else adapters.split(abstract, mask)[0])
        except PermissionError:
            raise
        except Exception as e:
            raise _unreadable("the parameters of", self.manager, self.step, e) from e
        if mask is None:
            return params
        base = self.config["finetune"]["base"]
        try:
            frozen = adapters.load_base(base, abstract, registry.hyperparameters(self.config),
                                        mask)
        except CheckpointError as e:
            raise CheckpointError(f"the adapters of step {self.step} in {self.manager.directory} "
                                  f"apply to the base model {base}, which cannot be read: "
                                  f"{e}") from None
        return adapters.join(params, frozen)


def trained_config(path: str | pathlib.Path, which: int | str | None = None) -> TrainedConfig:
    """The config saved with checkpoint `which` of `path` (as load_trained's), its vocab size and
    context filled in for configs from before they were resolved."""
    directory, step = params_source(str(path))
    manager = open_to_read(directory)
    step = select_step(manager, which if step is None else step)
    # The config saved with these parameters, not config.json: it is there also when the path is
    # a checkpoints/ or step folder. Read and merged apart (saved_config does both): a damaged
    # file and a config this version cannot take need different fixes.
    try:
        raw = read_saved_config(manager, step)
    except PermissionError:
        raise  # Not damage: the caller reports the path and the fix.
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged file.
        raise _unreadable("the config saved with", manager, step, e) from e
    config = merge_saved_config(raw, step, manager.directory)
    if config["model"]["vocab_size"] is None:  # Configs from before the vocab was resolved.
        spec = json.loads((directory.parent / "tokenizer.json").read_text())  # Maybe gs://.
        config["model"]["vocab_size"] = tokenizers.tokenizer_from_dict(spec).vocab_size
    if config["model"]["max_seq_len"] is None:  # Likewise: it was data.seq_len.
        config["model"]["max_seq_len"] = config["data"]["seq_len"]
    return TrainedConfig(config, step, directory, manager)


def _unreadable(what: str, manager: ocp.CheckpointManager, step: int,
                error: Exception) -> CheckpointError:
    """The one-line report of a checkpoint that cannot be read (truncated, garbage, files
    missing): which part, the reader's own words (without TensorStore's JSON spec of the read),
    and the other steps to choose instead."""
    cause = cli.one_line(str(error).split(" [tensorstore_spec")[0]) or type(error).__name__
    cause = re.sub(r'Error opening "\w+" driver: ', "", cause)  # TensorStore's layers.
    if len(cause) > 300:  # The end of a chain of causes is the root one, and names the file.
        cause = "…" + cause[-300:]
    others = [s for s in sorted(manager.all_steps()) if s != step]
    fix = (f"choose another of its steps: {', '.join(map(str, others))}" if others else
           "it holds no other checkpoint: train again, or restore the folder from a copy")
    return CheckpointError(f"{what} checkpoint step {step} in {manager.directory} cannot be read "
                           f"({type(error).__name__}: {cause}); it is damaged or incomplete, so "
                           f"{fix}.")


def check_hf_source(source: str, hparams: Any) -> None:
    """`checkpoint.init_from=hf:SOURCE`'s refusals that need no weights (a missing folder, no
    GPT-2 config, a model of another shape), before the run compiles; the weights are read,
    and checked, at the start."""
    _hf_call(source, hparams, lambda interop: interop.check_local_source(source, hparams))


def _hf_call(source: str, hparams: Any, call: Any) -> Any:
    """call(interop module) for init_from=hf:SOURCE (hf_llama for a Llama folder, else
    hf_gpt2), its errors as one-line CheckpointErrors."""
    where = f"checkpoint.init_from={HF_PREFIX}{source}"
    if registry.arch_of(hparams).name != "gpt":
        raise CheckpointError(f"{where} converts GPT-2 and Llama models, and this run has "
                              f"model.arch={registry.arch_of(hparams).name!r}; use model.arch=gpt.")
    try:
        from gpt_jax.interop import hf_gpt2, hf_llama  # torch and transformers only here.

        llama = hf_gpt2.model_type(source) == hf_llama.MODEL_TYPE
        return call(hf_llama if llama else hf_gpt2)
    except ImportError as e:
        raise CheckpointError(f"{where} needs torch and transformers ({e}); pip install -r "
                              "requirements-dev.txt.") from e
    except ValueError as e:  # InteropError: the message names the field and the fix.
        raise CheckpointError(f"{where}: {e}") from e
    except OSError as e:  # An unreadable file of the folder: one line naming it, like the rest.
        raise CheckpointError(f"{where}: {cli.os_error(e)}") from e


def _load_hf_params(source: str, abstract_params: Any, hparams: Any) -> Any:
    """`checkpoint.init_from=hf:SOURCE`: an HF GPT-2 converted to this run's layout."""
    where = f"checkpoint.init_from={HF_PREFIX}{source}"
    params = _hf_call(source, hparams, lambda interop: interop.import_params(source, hparams))

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
