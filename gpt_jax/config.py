"""Config handling: validation, JSON round trip.

Every default lives in configs/*.py; this module only checks values and derives what follows from
them. Errors are one line that names the field and the fix, raised before anything compiles. The
`model` group's values are checked by the architecture model.arch names (gpt_jax/models/).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib
import types
from typing import Any

import ml_collections

FINAL_EVALS = ("full", "batches", "none")
ON_NONFINITE = ("stop", "skip")
PROGRESS = ("auto", "bar", "lines")
GROW_MODES = ("stacked", "interleaved")  # train.grow_mode.
GROW_OPTIMIZERS = ("carry", "reset")  # train.grow_optimizer.
GROW_INITS = ("preserve", "copy")  # train.grow_init.


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def prepared_folders(config: ml_collections.ConfigDict) -> list[str]:
    """The folders data.prepared names (comma-separated), in order; [] when it is unset."""
    text = config.data.prepared
    if not text:
        return []
    folders = [f.strip() for f in text.split(",")]
    check(all(folders), f"data.prepared={text!r} has an empty entry; give folders separated by "
                         "single commas.")
    return folders


def mixture_weights(config: ml_collections.ConfigDict) -> list[float] | None:
    """data.mixture_weights as floats, one per data.prepared folder; None when it is empty."""
    text = config.data.mixture_weights.strip()
    if not text:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"data.mixture_weights={text!r} is not comma-separated numbers; write "
                          "e.g. '0.7,0.3', one weight per data.prepared folder.") from None
    check(all(math.isfinite(w) and w > 0 for w in weights),
           f"data.mixture_weights={text!r} must all be positive; drop a folder from "
           "data.prepared instead of giving it weight 0.")
    return weights


def grow_steps(config: ml_collections.ConfigDict) -> list[int]:
    """The steps train.grow_at names (after each, the model grows), ascending; [] when empty."""
    text = config.train.grow_at.strip()
    if not text:
        return []
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"train.grow_at={text!r} is not comma-separated step numbers; write "
                          "e.g. '500,1000', or '' for no growth.") from None
    check(steps[0] >= 1 and steps == sorted(set(steps)),
          f"train.grow_at={text!r} must be ascending steps ≥ 1, each named once.")
    return steps


def check(ok: bool, msg: str) -> None:
    """Raises ConfigError(`msg`) unless `ok` (architectures' validate functions use it too)."""
    if not ok:
        raise ConfigError(msg)


def one_of(value: Any, field: str, choices) -> None:
    """Raises a ConfigError naming `field` unless `value` is one of `choices`."""
    check(value in choices, f"{field}={value!r} is not one of {sorted(choices)}; pick one of those.")


# The recipes' folder (configs/), beside gpt_jax in a clone and in site-packages when installed.
RECIPES = pathlib.Path(__file__).resolve().parent.parent / "configs"


@functools.cache
def _base_recipe() -> types.ModuleType:
    """configs/base.py, loaded from RECIPES under a name of its own: another `configs` package
    earlier on sys.path (the current folder's) must not replace the reference of every field."""
    spec = importlib.util.spec_from_file_location("gpt_jax._base_recipe", RECIPES / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_config() -> ml_collections.ConfigDict:
    """configs/base.py's config: every field, with its default (and so its type)."""
    return _base_recipe().get_config()



def _check_types(config, reference, prefix: str = "") -> None:
    """Each field must have its default's type (an int where a float goes is fine; placeholders
    take None). config_flags checks command-line values; this catches config files and JSON."""
    for key in reference:
        field, want, got = f"{prefix}{key}", reference[key], config.get(key, _MISSING)
        check(got is not _MISSING, f"config field {field} is missing; every field is in configs/base.py.")
        if isinstance(want, ml_collections.ConfigDict):
            check(isinstance(got, ml_collections.ConfigDict),
                   f"config field {field} must be a group of fields, got {got!r}.")
            _check_types(got, want, f"{field}.")
            continue
        kind = reference.get_type(key)
        if got is None and want is None:
            continue  # A placeholder left unset.
        ok = (isinstance(got, kind) and not (kind is int and isinstance(got, bool))) or (
            kind is float and isinstance(got, int) and not isinstance(got, bool))
        example = "" if want is None else f" (default {field}={want!r})"
        check(ok, f"{field}={got!r} has type {type(got).__name__}; it takes a value of type "
                   f"{kind.__name__}{example}.")


_MISSING = object()


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every value that would otherwise fail late (or silently) in compilation or training."""
    from gpt_jax.data.corpora import CORPORA
    from gpt_jax.data.pipeline import SAMPLINGS
    from gpt_jax.data.sft import PACKINGS as SFT_PACKINGS
    from gpt_jax.data.tokenizers import check_name as check_tokenizer
    from gpt_jax.models import registry

    _check_types(config, reference_config())
    m, d, o, t = config.model, config.data, config.optim, config.train
    try:
        arch = registry.get(m.arch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    arch.validate(config)
    from gpt_jax.finetune import adapters

    adapters.validate(config)
    for axis in arch.logical_axes:  # Else that axis would silently stay unsharded.
        check(axis in config.mesh.rules,
               f"model.arch={m.arch!r} names the logical axis {axis!r}, which mesh.rules does not "
               f"map; add mesh.rules.{axis} to configs/base.py (\"\" = replicated).")
    check(d.seq_len >= 1, f"data.seq_len={d.seq_len} must be ≥ 1.")
    if arch.reads_pairs:
        _validate_pairs(config)
    else:
        check(d.task is None, f"data.task={d.task!r} makes sequence pairs, which model.arch="
                               f"{m.arch!r} does not read; use model.arch=seq2seq or unset it.")
    try:
        check_tokenizer(d.tokenizer)
    except ValueError as e:
        raise ConfigError(f"data.tokenizer={d.tokenizer!r}: {e}.") from None
    one_of(d.sampling, "data.sampling", SAMPLINGS)
    one_of(d.sft_packing, "data.sft_packing", SFT_PACKINGS)  # Read with an SFT folder only.
    folders, weights = prepared_folders(config), mixture_weights(config)
    if folders:
        check(d.path is None, f"data.prepared={d.prepared!r} and data.path={d.path!r} are both "
                               "set; keep one (data.prepared is already tokenized).")
    elif d.path is None:
        one_of(d.corpus, "data.corpus", CORPORA)
    if weights is not None:
        check(len(weights) == len(folders),
               f"data.mixture_weights has {len(weights)} weight(s) for {len(folders)} "
               f"data.prepared folder(s); give one weight per folder, or \"\" for weights "
               "proportional to their sizes.")
    if not folders and d.tokenizer == "bpe":
        check(d.vocab_size >= 257, f"data.vocab_size={d.vocab_size} is too small for bpe: it "
                                    "needs 256 byte tokens + end-of-text; use ≥ 257 (e.g. 4096).")
    if d.document_mask:
        # Documents end at end-of-text tokens, which only the prepare command writes (an
        # in-process corpus is one stream); the folder's tokenizer is checked once it is read.
        check(bool(folders),
               "data.document_mask=True needs documents separated by end-of-text tokens, which "
               "only prepared folders have; prepare the data with python -m "
               "gpt_jax.data.prepare --tokenizer=bpe|gpt2 and set data.prepared, or set "
               "data.document_mask=False.")
    check(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be in (0, 1).")

    check(t.num_steps >= 1, f"train.num_steps={t.num_steps} must be ≥ 1.")
    check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be ≥ 1.")
    check(t.grad_accum_steps >= 1, f"train.grad_accum_steps={t.grad_accum_steps} must be ≥ 1.")
    check(
        t.batch_size % t.grad_accum_steps == 0,
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps="
        f"{t.grad_accum_steps}; make the batch a multiple of the accumulation steps.",
    )
    check(
        t.loss_chunk >= 0 and (t.loss_chunk == 0 or d.seq_len % t.loss_chunk == 0),
        f"train.loss_chunk={t.loss_chunk} must be 0 (off) or divide data.seq_len={d.seq_len}.",
    )
    check(t.loss_chunk == 0 or arch.split_head,
           f"train.loss_chunk={t.loss_chunk} needs a model with separate hidden and head "
           f"passes, which model.arch={m.arch!r} does not have; set train.loss_chunk=0.")
    check(t.eval_every >= 1, f"train.eval_every={t.eval_every} must be ≥ 1.")
    check(t.eval_batches >= 1, f"train.eval_batches={t.eval_batches} must be ≥ 1.")
    check(t.eval_tasks_fewshot >= 0,
          f"train.eval_tasks_fewshot={t.eval_tasks_fewshot} must be ≥ 0.")
    check(t.eval_tasks_limit == 0 or t.eval_tasks_limit >= 2,
          f"train.eval_tasks_limit={t.eval_tasks_limit} must be 0 (all) or ≥ 2 (a standard "
          "error needs two examples).")
    check(not (t.eval_tasks and registry.get(config.model.arch).reads_pairs),
          f"train.eval_tasks is for language models; model.arch={config.model.arch} reads "
          "sequence pairs (its decoded val metrics are logged): set --config.train.eval_tasks=.")
    check(t.z_loss >= 0, f"train.z_loss={t.z_loss} must be ≥ 0 (0 = off; PaLM used 1e-4).")
    one_of(t.final_eval, "train.final_eval", FINAL_EVALS)
    one_of(t.on_nonfinite, "train.on_nonfinite", ON_NONFINITE)
    _validate_growth(config)
    ck = config.checkpoint
    check(ck.every >= 1, f"checkpoint.every={ck.every} must be ≥ 1.")
    check(ck.keep >= 1, f"checkpoint.keep={ck.keep} must be ≥ 1.")
    check(config.log.every >= 1, f"log.every={config.log.every} must be ≥ 1.")
    one_of(config.log.progress, "log.progress", PROGRESS)
    one_of(config.log.wandb_mode, "log.wandb_mode", ("offline", "online"))
    if config.log.wandb:
        from gpt_jax.training.wandb_sink import missing_problem

        problem = missing_problem()
        check(problem is None, problem or "")
    check(config.log.upload_every_s >= 0,
          f"log.upload_every_s={config.log.upload_every_s} must be ≥ 0 (0: at every row).")

    check(o.lr > 0, f"optim.lr={o.lr} must be > 0.")
    check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr].")
    check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be ≥ 0.")
    decay = o.decay_steps if o.decay_steps is not None else t.num_steps
    check(
        decay > o.warmup_steps,
        f"optim.decay_steps={decay} must exceed optim.warmup_steps={o.warmup_steps}.",
    )
    check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be ≥ 0 (0 disables clipping).")
    for field in ("beta1", "beta2"):
        check(0 <= o[field] < 1, f"optim.{field}={o[field]} must be in [0, 1).")
    s = config.sample
    for field in ("num_samples", "max_new_tokens", "top_k", "temperature"):
        check(s[field] >= 0, f"sample.{field}={s[field]} must be ≥ 0.")
    check(0.0 < s.top_p <= 1.0, f"sample.top_p={s.top_p} must be in (0, 1] (1 disables it).")
    check(s.num_samples == 0 or len(s.prompt) > 0,
           "sample.prompt is empty; give at least one character (e.g. a newline) or set "
           "sample.num_samples=0.")


def _validate_growth(config: ml_collections.ConfigDict) -> None:
    """train.grow_* (progressive stacking, gpt_jax/finetune/grow.py)."""
    t, m = config.train, config.model
    one_of(t.grow_mode, "train.grow_mode", GROW_MODES)
    one_of(t.grow_optimizer, "train.grow_optimizer", GROW_OPTIMIZERS)
    one_of(t.grow_init, "train.grow_init", GROW_INITS)
    check(t.grow_factor >= 2, f"train.grow_factor={t.grow_factor} must be ≥ 2 (the depth "
                              "multiplier at each growth).")
    growths = grow_steps(config)
    if not growths:
        return
    check(m.arch == "gpt", f"train.grow_at grows a GPT's layers; model.arch={m.arch!r} has none "
                           "to copy: set --config.train.grow_at= (empty).")
    # With adapters, finetune/adapters.py's validate refuses growth (grow the base instead).
    scale = t.grow_factor ** len(growths)
    check(m.num_layers % scale == 0,
          f"model.num_layers={m.num_layers} (the final depth) is not divisible by "
          f"train.grow_factor^{len(growths)}={scale} ({len(growths)} growth(s) in "
          f"train.grow_at={t.grow_at!r}), so the first depth is not whole; make "
          f"model.num_layers a multiple of {scale}, or grow fewer times.")


def _validate_pairs(config: ml_collections.ConfigDict) -> None:
    """The data and sample fields of a model that reads sequence pairs (gpt_jax/data/pairs.py)."""
    d, t, s = config.data, config.train, config.sample
    from gpt_jax.data.tasks import TASKS  # Lazily: tasks imports the corpora.

    sources = [f"data.{k}" for k in ("task", "path", "prepared") if d[k]]
    check(len(sources) == 1, f"model.arch={config.model.arch} reads sequence pairs from one of "
                             "data.task (addition | sort | docsig), data.path (a JSONL file) or "
                             f"data.prepared (a pairs folder); {' and '.join(sources) or 'none'} "
                             f"{'are' if len(sources) > 1 else 'is'} set: keep exactly one "
                             "(an empty value unsets one, e.g. --config.data.task=).")
    if d.task:
        one_of(d.task, "data.task", tuple(TASKS))
        check(d.task_examples >= 1, f"data.task_examples={d.task_examples} must be ≥ 1.")
    if d.prepared:
        check("," not in d.prepared, "data.prepared names several folders: sequence pairs are "
                                     "read from one folder (no mixtures); give one.")
    check(d.source_len >= 1, f"data.source_len={d.source_len} must be ≥ 1.")
    check(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be ≥ 2: a target token and its EOS.")
    check(not d.document_mask, "data.document_mask=True is for packed documents; sequence pairs "
                               "are padded, one per row: set it to False.")
    check(t.eval_decode >= 0, f"train.eval_decode={t.eval_decode} must be ≥ 0 (0 = off).")
    check(s.beam_size >= 1, f"sample.beam_size={s.beam_size} must be ≥ 1 (1 = greedy).")
    check(s.length_penalty >= 0, f"sample.length_penalty={s.length_penalty} must be ≥ 0.")


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as pretty JSON (what lands in WORKDIR/config.json)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `to_json`."""
    return ml_collections.ConfigDict(json.loads(text))


def saved_run_config(text: str) -> ml_collections.ConfigDict:
    """A workdir's config.json over configs/base.py's defaults: a run saved before a field
    existed reads that field's default (which is what it ran with), not a KeyError."""
    config = reference_config()
    _merge(config, json.loads(text))
    return config


# Fields whose type changed, with what their old values mean now, so that workdirs and
# checkpoints written before still load: log.progress was a bool (bar or nothing).
_OLD_VALUES = {"log.progress": {True: "auto", False: "lines"}}


def _merge(config: ml_collections.ConfigDict, saved: dict, prefix: str = "") -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
            _merge(config[key], value, f"{prefix}{key}.")
        else:
            old = _OLD_VALUES.get(f"{prefix}{key}")
            config[key] = old.get(value, value) if old and isinstance(value, bool) else value
