"""Where a run starts: the workdir's newest readable checkpoint (resume), or step 0 from fresh
parameters or from those `checkpoint.init_from` names."""

from __future__ import annotations

import json
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from gpt_jax import config as config_lib
from gpt_jax.data import tokenizers
from gpt_jax.finetune import adapters
from gpt_jax.parallel import distributed
from gpt_jax.training import checkpoint, remote, step, weights
from gpt_jax.training.build import Run


def check(r: Run) -> None:
    """Refuses, before anything compiles, a start that `initial_state` would refuse after: from
    metadata only (step numbers, saved configs, the tokenizer), nothing restored or created. A
    run with adapters also gets its base pinned here (`_pin_base`: r.config.finetune.base)."""
    init_from, directory = r.config.checkpoint.init_from, r.checkpoints
    steps = sorted(checkpoint.open_to_read(directory).all_steps()) if directory.is_dir() else []
    saved = _refuse_resume(r, steps, checkpoint.open_to_read(directory)) if steps else None
    if r.trainable is not None:
        _pin_base(r, saved)
        init_from = r.config.finetune.base
    elif steps:
        return
    hparams = adapters.base_hparams(r.hparams) if r.trainable is not None else r.hparams
    if init_from.startswith(weights.HF_PREFIX):
        weights.check_hf_source(init_from[len(weights.HF_PREFIX):], hparams)
    elif init_from not in ("auto", "scratch"):
        _check_source_tokenizer(r, init_from)  # First: other ids make every other check moot.
        weights.check_params_source(init_from, hparams)


def _pin_base(r: Run, saved: dict | None) -> None:
    """Sets r.config.finetune.base to the checkpoint the adapters apply to: on a resume, the one
    its checkpoints were trained on (a different explicit one is refused); else the step that
    finetune.base, or checkpoint.init_from, names now."""
    f = r.config.finetune
    theirs = saved["finetune"]["base"] if saved is not None else None
    if theirs is None:
        f.base = adapters.base_reference(f.base or r.config.checkpoint.init_from)
        return
    if f.base is not None and not adapters.same_base(f.base, theirs):
        raise config_lib.ConfigError(
            f"finetune.base={f.base} is not the base {theirs} that the adapters in {r.where} "
            "were trained on; leave finetune.base unset to resume on theirs, or start a new run "
            "in another --workdir.")
    f.base = theirs


def _check_source_tokenizer(r: Run, source: str) -> None:
    """Refuses parameters trained with another tokenizer than this run's data gives (the
    tokenizer.json of their run's workdir, where it has one): their ids would mean other
    tokens."""
    try:
        where = weights.params_source(source)[0].parent  # checkpoints/ or params/ → workdir.
    except checkpoint.CheckpointError:
        return  # check_params_source says what is wrong with the path.
    if not (where / "tokenizer.json").exists():
        return
    spec = json.loads((where / "tokenizer.json").read_text())  # A URL workdir's too.
    theirs = tokenizers.tokenizer_from_dict(spec)
    if theirs.to_dict() != r.data.tokenizer.to_dict():
        raise config_lib.ConfigError(
            f"checkpoint.init_from={source} was trained with another tokenizer ({theirs.name}, "
            f"vocab {theirs.vocab_size}; {where}/tokenizer.json) than this run's data gives "
            f"({r.data.tokenizer.name}, vocab {r.data.tokenizer.vocab_size}); tokenize the data "
            f"with that one (e.g. python -m gpt_jax.data.prepare --tokenizer_from={where}).")


def _refuse_resume(r: Run, steps: list[int], manager: ocp.CheckpointManager) -> dict | None:
    """Refuses a resume that cannot work; returns the newest checkpoint's saved config (None if
    it cannot be read: restore_latest then sets that checkpoint aside)."""
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
        return None
    checkpoint.require_compatible(saved, r.config.to_dict(), steps[-1])
    _check_tokenizer(r)
    return saved


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
    state, start, saved = checkpoint.restore_latest(
        manager, adapters.saved(r.abstract_state, r.trainable), train_it, config)
    if r.trainable is not None:  # The checkpoint holds the adapters; the base is read again:
        r.config.finetune.base = saved["finetune"]["base"]  # theirs (an older one's, if fell back).
        base = adapters.load_base(r.config.finetune.base, r.abstract_state.params, r.hparams,
                                  r.trainable)
        state = state.replace(params=adapters.join(state.params, base))
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
    if r.trainable is not None:  # Fresh adapters on the base (LoRA's B = 0: the base's function).
        base = adapters.load_base(r.config.finetune.base, r.abstract_state.params, r.hparams,
                                  r.trainable)
        fresh = adapters.split(state.params, r.trainable)[0]
        params = adapters.init_soft_prompt(adapters.join(fresh, base), r.hparams,
                                           r.config.train.seed)
        logging.info("adapters on the base %s", r.config.finetune.base)
        return state.replace(params=params)
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
