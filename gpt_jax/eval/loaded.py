"""A trained run opened for evaluation: its saved config, tokenizer, model and parameters,
placed on a mesh (the run's own `mesh.*` settings, or `--config.mesh.*` overrides).

Only the parameters are read, straight into their shardings (no device holds the whole model
first). The evaluation may change what does not change a parameter's shape: the context
(`seq_len`, longer than training for a model whose positions extrapolate) and the batch size.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import pathlib
from typing import Any

import ml_collections

from gpt_jax import cli
from gpt_jax.data import tokenizers
from gpt_jax.models import registry
from gpt_jax.training import build, weights


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run's checkpoint ready to score: `run` holds the mesh, rules, model and shardings."""

    workdir: Any
    tokenizer: tokenizers.Tokenizer
    run: build.Run
    params: Any
    step: int
    micro_batch: int  # Rows per task-scoring call.

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The saved config with the evaluation's context, batch size and mesh."""
        return self.run.config


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """{"mesh.fsdp": 2, …} of `--config.mesh.FIELD=VALUE` arguments; EvalError for any other
    group (the model and data are the run's) or a malformed one."""
    out = {}
    for arg in args:
        key, eq, value = arg.removeprefix("--config.").partition("=")
        if not eq:
            raise EvalError(f"{arg}: give --config.mesh.FIELD=VALUE, e.g. --config.mesh.fsdp=2.")
        if not key.startswith("mesh."):
            raise EvalError(f"{arg}: evaluation takes only --config.mesh.* overrides (the model "
                            "and data settings are the run's); leave it out.")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # Text, e.g. an address.
    return out


def _apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        node = config
        *groups, field = key.split(".")
        for group in groups:
            node = node[group]
        if field not in node:
            problem = cli.unknown_config_key(key) or f"no field {key}"
            raise EvalError(f"--config.{key}: {problem}")
        try:
            node[field] = value
        except (TypeError, ValueError) as e:
            raise EvalError(f"--config.{key}={value!r}: it takes a value of type "
                            f"{type(node[field]).__name__}, e.g. {node[field]!r}.") from e


def load(workdir: str | pathlib.Path, checkpoint: str = "newest", *, seq_len: int | None = None,
         batch_size: int | None = None, overrides: dict[str, Any] | None = None) -> LoadedRun:
    """Opens checkpoint `checkpoint` (newest | best | a step) of the run in `workdir` on the mesh
    its config (with `overrides`) names. `seq_len` (default: the run's data.seq_len) is the
    context evaluated; longer than the model's max_seq_len needs positions that extrapolate.
    `batch_size` (default: the run's train.batch_size, as training's own evaluation, so the
    losses agree bitwise) is the global rows per step."""
    from gpt_jax import sample
    from gpt_jax.parallel import distributed

    folder, tokenizer = sample.open_run(workdir, checkpoint)
    # A multi-process mesh is joined before anything starts jax's backend (Orbax's reads do):
    # its settings from config.json, where the run wrote one, and the overrides.
    distributed.initialize(_mesh_settings(folder, overrides or {}))
    saved = weights.trained_config(folder, sample.checkpoint_choice(checkpoint))
    config = ml_collections.ConfigDict(saved.config)
    _apply(config, overrides or {})
    arch = registry.get(config.model.arch)
    if arch.reads_pairs:
        raise EvalError(f"{folder} is a sequence-pair run (model.arch={config.model.arch}): "
                        "its metrics are training's val/exact_match, val/bleu …; evaluate scores "
                        "language models.")
    if seq_len is not None:
        _set_context(config, seq_len)
    if batch_size is not None:
        if batch_size < 1:
            raise EvalError(f"--batch_size={batch_size}: give at least 1.")
        config.train.batch_size = batch_size
    # What training held in memory at once: the task scorer's rows, whose float32 logits are
    # [rows, seq_len, vocab] (the eval step's loss_chunk does not apply to them).
    micro_batch = batch_size or config.train.batch_size // config.train.grad_accum_steps
    config.train.grad_accum_steps = 1  # Evaluation has no micro-batches.
    r = build.setup_without_data(config)
    return LoadedRun(folder, tokenizer, r, saved.restore(r.abstract_state.params), saved.step,
                     micro_batch)


def _mesh_settings(folder: Any, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """The mesh group: configs/base.py's, the run's config.json's values, then `overrides`."""
    from gpt_jax import config as config_lib

    config = config_lib.reference_config()
    saved = cli.json_object(folder / "config.json")  # None where absent or unreadable.
    for field, value in ((saved or {}).get("mesh") or {}).items():
        if field in config.mesh:
            with contextlib.suppress(TypeError, ValueError):  # A type this version reads apart.
                config.mesh[field] = value
    _apply(config, overrides)
    return config.mesh


def _set_context(config: ml_collections.ConfigDict, seq_len: int) -> None:
    """data.seq_len = seq_len; the model's max_seq_len grows with it where no parameter's shape
    depends on it (every position scheme but learned)."""
    if seq_len < 2:
        raise EvalError(f"--seq_len={seq_len}: give at least 2 tokens per window.")
    m = config.model
    if seq_len > m.max_seq_len:
        if m.positions == "learned" and m.arch == "gpt":
            raise EvalError(f"--seq_len={seq_len} is longer than the {m.max_seq_len} learned "
                            "positions this model has; give at most that, or evaluate a model "
                            "trained with model.positions=rope, alibi, sinusoidal or none.")
        m.max_seq_len = seq_len
    config.data.seq_len = seq_len
