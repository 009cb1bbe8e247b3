"""Progressive stacking (Gong et al. 2019): a trained GPT of L layers becomes one of L' > L
layers whose layers are copies of the trained ones, and training goes on.

A GPT's layers are the parameters h_0 … h_{L-1}, or with model.scan_layers one tree h/ whose
leaves have a leading layers axis. New layer i copies old layer `source_layers(L, L')[i]`:
stacked: i mod L (1..L, then 1..L again); interleaved: ⌊i·L/L'⌋ (each layer repeated in place).
Full copies compute another function than the trained model (on shakespeare_char:cpu, 2 → 4
layers stacked, the val loss jumps from 2.06 to 2.66 and takes ~50 steps to come back), so by
default (train.grow_init=preserve) each repeat's residual outputs start at zero: the grown model
computes the trained one's function exactly, and its loss goes on from where it was.

The rest of the state follows by tree path, whatever optax chain training/optim.py builds: a
leaf whose path ends in a parameter's path (Adam's mu and nu, …) is copied like that parameter
(grow_optimizer=carry) or taken from a fresh init (reset: zero moments, and Adam's count beside
them); every other leaf (the step, the schedule's count, the dropout key) carries over, so the lr
schedule goes on.

train.grow_at schedules growths inside one run (training/loop.py): model.num_layers is the final
depth; the run starts at num_layers / grow_factor^(number of growths) layers, and after each
growth step (trained, evaluated and checkpointed at the old depth) grows by grow_factor. A
checkpoint's saved config is `phase_config`: the depth it was saved at and the growths before it,
so sample, evaluate and a resume read it as a plain run of that depth.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from gpt_jax import config as config_lib
from gpt_jax.models import registry
from gpt_jax.training import build, checkpoint, step

MODES = config_lib.GROW_MODES
OPTIMIZERS = config_lib.GROW_OPTIMIZERS
INITS = config_lib.GROW_INITS
_UNROLLED = re.compile(r"h_(\d+)")  # An unrolled layer's parameter tree (scanned: "h").


def depth_at(config: ml_collections.ConfigDict, step_num: int) -> int:
    """The model's depth at step `step_num` of a run with train.grow_at: the depth that trains
    that step and that its checkpoint holds (a growth step is still the old depth)."""
    later = sum(g >= step_num for g in config_lib.grow_steps(config))
    return config.model.num_layers // config.train.grow_factor ** later


def grows_after(config: ml_collections.ConfigDict, step_num: int) -> bool:
    """Whether the model grows after step `step_num` (one of train.grow_at)."""
    return step_num in config_lib.grow_steps(config)


def phase_config(config: ml_collections.ConfigDict, step_num: int) -> ml_collections.ConfigDict:
    """The config of the model at step `step_num`: model.num_layers its depth, train.grow_at the
    growths before it (so the config is valid by itself, and what a checkpoint of that step
    records); the rest, the lr schedule's train.num_steps included, the run's."""
    config = config.copy_and_resolve_references()
    past = [g for g in config_lib.grow_steps(config) if g < step_num]
    config.model.num_layers = depth_at(config, step_num)
    config.train.grow_at = ",".join(map(str, past))
    return config


def phase_run(r: build.Run, step_num: int) -> build.Run:
    """`r` (a run at its final depth, config resolved) as it stands at step `step_num`: its model
    and state at `depth_at(step_num)` on the same mesh, data and workdir; `r` itself when that
    is the final depth and no growth remains."""
    config = phase_config(r.config, step_num)
    if config == r.config:
        return r
    config, hparams = build.build_model(config, config.model.vocab_size)
    model = registry.build(hparams)
    init_state, abstract_state, state_shardings = build.build_state(config, model, r.mesh,
                                                                    r.rules)
    return dataclasses.replace(r, config=config, model=model, hparams=hparams,
                               init_state=init_state, abstract_state=abstract_state,
                               state_shardings=state_shardings)


def run_at_start(r: build.Run) -> build.Run:
    """`r` (at its final depth) as it stands where it starts: at its newest checkpoint's step,
    or step 0. A checkpoint at a growth step holds the old depth: the loop grows it before the
    next step, as an uninterrupted run does, so a resumed run equals one never stopped."""
    if not config_lib.grow_steps(r.config):
        return r
    if late := [g for g in config_lib.grow_steps(r.config) if g >= r.config.train.num_steps]:
        logging.warning("train.grow_at names steps %s, at or past train.num_steps=%d: this run "
                        "ends at %d layers, not model.num_layers=%d (a longer run goes on).", late,
                        r.config.train.num_steps, depth_at(r.config, r.config.train.num_steps),
                        r.config.model.num_layers)
    directory = r.checkpoints
    steps = checkpoint.open_to_read(directory).all_steps() if directory.is_dir() else []
    return phase_run(r, max(steps, default=0))


def source_layers(old: int, new: int, mode: str) -> list[int]:
    """For each of `new` layers, the index of the old layer (of `old`) it copies."""
    config_lib.one_of(mode, "grow mode", MODES)
    if mode == "stacked":
        return [i % old for i in range(new)]
    return [i * old // new for i in range(new)]


def num_layers(params: Any) -> int:
    """The number of layers of a GPT parameter tree (unrolled or scanned)."""
    if "h" in params:
        return jax.tree.leaves(params["h"])[0].shape[0]
    return sum(1 for name in params if _UNROLLED.fullmatch(name))


def _name(path: Any) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def grow_state(state: step.TrainState, into: build.Run, mode: str, optimizer: str,
               init: str) -> step.TrainState:
    """`state` (trained, L layers) grown into the deeper model of `into`, placed with its state
    shardings.

    Layer parameters and (`optimizer`=carry) their optimizer state copy the old layers per
    `mode` (see `source_layers`); other parameters carry over unchanged. With reset, every
    optimizer leaf that mirrors a parameter is the optimizer's fresh init of the grown
    parameters (zero Adam moments, and Adam's count with them, so its bias correction restarts as
    at a fresh start); the other counters (the step, the schedule's count) carry over. With
    `init`=preserve, each repeat's residual outputs start at zero (see `silence_repeats`)."""
    config_lib.one_of(optimizer, "grow optimizer", OPTIMIZERS)
    config_lib.one_of(init, "grow init", INITS)
    target = into.abstract_state
    src = source_layers(num_layers(state.params), num_layers(target.params), mode)
    params = {_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(target.params)[0]}

    def grow(state: step.TrainState) -> step.TrainState:
        old = {_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
        prefixes = {k[:k.index("/mu/") + 4] for k in old if "/mu/" in k}

        def leaf(path: Any, new: Any) -> jax.Array:  # `new`: the grown model's leaf or shape.
            name = _name(path)
            parts = name.split("/")
            # The parameter this leaf mirrors: the longest tail of its path that names one.
            tail = next((i for i in range(1, len(parts)) if "/".join(parts[i:]) in params), None)
            if tail is not None and parts[0] == "opt_state" and optimizer == "reset":
                return new
            if optimizer == "reset" and parts[-1] == "count" and name[:-5] + "mu/" in prefixes:
                return new  # Adam's own count, beside its moments: its bias correction restarts.
            if tail is not None and (m := _UNROLLED.fullmatch(parts[tail])):
                parts[tail] = f"h_{src[int(m[1])]}"
            if (key := "/".join(parts)) not in old:
                raise ValueError(f"{name} of the grown model has no counterpart {key} in the "
                                 "trained state: only the depth may change when growing.")
            value = old[key]
            if tail is not None and parts[tail] == "h":  # Scanned: layers on the leading axis.
                value = jnp.take(value, jnp.asarray(src), axis=0)
            if value.shape != new.shape or value.dtype != new.dtype:
                raise ValueError(f"{name} is {value.dtype}{list(value.shape)} in the trained "
                                 f"state and {new.dtype}{list(new.shape)} in the grown model: "
                                 "only the depth may change when growing.")
            return value

        grown = jax.tree_util.tree_map_with_path(leaf, {"params": target.params})["params"]
        if init == "preserve":
            grown = silence_repeats(grown, src)
        rest = jax.tree_util.tree_map_with_path(
            leaf, target.replace(opt_state=target.tx.init(grown)))
        return rest.replace(params=grown)

    return jax.jit(grow, out_shardings=into.state_shardings)(state)


def silence_repeats(params: Any, src: list[int]) -> Any:
    """`params` of a grown model whose layer i copies old layer src[i], with the residual
    outputs (attn/out, mlp/proj) of each repeat (a layer whose source an earlier one already
    copies) zeroed: those blocks start as the identity, so the model computes the trained one's
    function (Shen et al. 2022's loss-preserving growth), and their other copied weights start
    learning as the outputs move off zero."""
    repeat = [s in src[:i] for i, s in enumerate(src)]

    def silence(path: Any, value: jax.Array) -> jax.Array:
        parts = _name(path).split("/")
        if parts[1:3] not in (["attn", "out"], ["mlp", "proj"]):
            return value
        if m := _UNROLLED.fullmatch(parts[0]):
            return jnp.zeros_like(value) if repeat[int(m[1])] else value
        keep = jnp.asarray([not r for r in repeat], value.dtype)  # Scanned: rows are layers.
        return value * keep.reshape((-1,) + (1,) * (value.ndim - 1))

    return jax.tree_util.tree_map_with_path(silence, params)
