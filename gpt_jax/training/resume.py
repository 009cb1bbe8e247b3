"""Where a run starts: the workdir's newest readable checkpoint (resume), or step 0 from fresh
parameters or from those `checkpoint.init_from` names."""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from gpt_jax import config as config_lib
from gpt_jax.data import tokenizers
from gpt_jax.parallel import distributed
from gpt_jax.training import checkpoint, remote, step, weights
from gpt_jax.training.build import Run


def check(r: Run) -> None:
    """Refuses, before anything compiles, a start that `initial_state` would refuse after: from
    metadata only (step numbers, saved configs, the tokenizer), nothing restored or created."""
    init_from, directory = r.config.checkpoint.init_from, r.checkpoints
    steps = sorted(checkpoint.open_to_read(directory).all_steps()) if directory.is_dir() else []
    if steps:
        _refuse_resume(r, steps, checkpoint.open_to_read(directory))
    elif init_from.startswith(weights.HF_PREFIX):
        weights.check_hf_source(init_from[len(weights.HF_PREFIX):], r.hparams)
    elif init_from not in ("auto", "scratch"):
        weights.check_params_source(init_from, r.hparams)


def _refuse_resume(r: Run, steps: list[int], manager: ocp.CheckpointManager) -> None:
    if r.config.checkpoint.init_from == "scratch":
        raise config_lib.ConfigError(
            f"{r.where} already has checkpoints (steps {steps}); resume with "
            "checkpoint.init_from=auto or start in a new --workdir.")
    if steps[0] > r.config.train.num_steps:  # Even the oldest is past it.
        raise config_lib.ConfigError(
            f"the workdir's checkpoints are at steps {steps}, past train.num_steps="
            f"{r.config.train.num_steps}; raise train.num_steps to train on.")
    try:
        saved = checkpoint.saved_config(manager, steps[-1])
    except checkpoint.CheckpointError:
        raise
    except Exception:  # Unreadable: restore_latest sets it aside and tries the previous one.
        return
    checkpoint.require_compatible(saved, r.config.to_dict(), steps[-1])
    _check_tokenizer(r)


def _check_tokenizer(r: Run) -> None:
    tokenizer_path = r.workdir / "tokenizer.json"
    if tokenizer_path.exists() and (tokenizers.load_tokenizer(tokenizer_path).to_dict()
                                    != r.data.tokenizer.to_dict()):
        raise checkpoint.CheckpointError(
            f"this run's data gives another tokenizer than {r.where}/tokenizer.json, which the "
            "checkpoints were trained with; resume with the same data.* settings.")


def initial_state(r: Run, manager: ocp.CheckpointManager, train_it: Any
                  ) -> tuple[step.TrainState, int]:
    """(state, step): resumed from the workdir's newest readable checkpoint (the data iterator
    put back in place), or a new state per checkpoint.init_from. Writes the run's tokenizer.json
    once the workdir is known to be this run's."""
    init_from = r.config.checkpoint.init_from
    if manager.all_steps():
        if init_from == "scratch":
            raise config_lib.ConfigError(
                f"{r.where} already has checkpoints (steps {sorted(manager.all_steps())}); "
                "resume with checkpoint.init_from=auto or start in a new --workdir.")
        state, start = _resume(r, manager, train_it)
    else:
        state, start = _start(r, init_from), 0
    if distributed.is_primary():
        tokenizers.save_tokenizer(r.data.tokenizer, r.workdir / "tokenizer.json")
    return state, start


def _resume(r: Run, manager: ocp.CheckpointManager, train_it: Any) -> tuple[step.TrainState, int]:
    config = r.config.to_dict()
    state, start, saved = checkpoint.restore_latest(manager, r.abstract_state, train_it, config)
    _check_tokenizer(r)
    if start > r.config.train.num_steps:
        raise config_lib.ConfigError(
            f"the workdir's checkpoint is at step {start}, past train.num_steps="
            f"{r.config.train.num_steps}; raise train.num_steps to train on.")
    for change in checkpoint.changed_fields(saved, config):
        logging.warning("resuming with a changed setting, so the run is no longer the one "
                        "an uninterrupted run would have been: %s", change)
    logging.info("resumed from %s at step %d", r.checkpoints, start)
    return state, start


def _start(r: Run, init_from: str) -> step.TrainState:
    state = r.init_state()
    if init_from not in ("auto", "scratch"):
        params = weights.load_params(init_from, r.abstract_state.params, r.hparams)
        logging.info("parameters taken from %s", init_from)
        return state.replace(params=params)
    if (remote.path(r.where) / weights.PARAMS_DIR).is_dir():  # An imported model's workdir.
        logging.warning("%s holds imported parameters (%s/), which a run only starts from when "
                        "asked; this one starts from scratch. To start from them: "
                        "--config.checkpoint.init_from=%s", r.where, weights.PARAMS_DIR,
                        r.where)
    return state
