"""The model seam: `model.arch` names an `Architecture` here, and everything outside
gpt_jax/models/ (training, sampling, planning, benchmarks, converters, checkpoints) builds and
describes models only through it.

An architecture brings a frozen hyperparameter dataclass (built from the `model` config group:
each dataclass field takes the `model.<field>` value of the same name, so nothing is copied by
hand), its Flax module, and what the rest of the code needs to know about it: FLOPs per token
(MFU), the fields that change parameter shapes (resume / init_from / converter compatibility),
how it decodes, and its logical axis names (the mesh rules must map each).

The module contract, which the train/eval steps and decoding rely on (the module keeps its
hyperparameters in its `cfg` attribute, and they have a `max_seq_len`: the context decoding keeps):
  `module.apply({"params": p}, inputs_BT, deterministic=…, segment_ids_BT=None,
  positions_BT=None)` → float32 logits [B, T, V'] (V' ≥ vocab_size; extra ids masked): a token
  attends only within its segment (when given), and positions default to 0 … T-1;
  with `split_head`, also `method="hidden"` (→ [B, T, D]) and `method="head"` (hidden → logits),
  used by the chunked cross-entropy; with `decoding == "kv_cache"`, `decode=DecodeState` and
  `mutable=["cache"]` as gpt_jax/generate.py uses them; with `decoding == "recurrent"`,
  `initial_carry(B)` (a zero state) and `method="decode"`: (inputs_BT, carry, real_BT=None) →
  (logits [B, T, V'], the carry after the tokens), the state unchanged where real_BT is False.
  An architecture that `reads_pairs` (seq2seq) also takes `source_BS` and `source_mask_BS`
  [B, S] (gpt_jax/data/pairs.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections

# kv_cache | recompute: gpt_jax/generate.py; recurrent: generate.py carries the model's state
# (`method="decode"`'s carry argument and result) from token to token; encoder_decoder:
# gpt_jax/translate.py.
DECODINGS = ("kv_cache", "recompute", "recurrent", "encoder_decoder")
# The architecture of `model` groups saved before model.arch existed (checkpoints, HF configs).
PRE_REGISTRY_ARCH = "gpt"


# Hyperparameters of a model that live in the `finetune` config group (adapters added to a trained
# model: LoRA and a soft prompt; gpt_jax/finetune/), with the values that mean "none".
FINETUNE_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "prompt_tokens")
ADAPTERS_OFF = {"lora_rank": 0, "lora_alpha": 16.0, "lora_targets": "", "prompt_tokens": 0}


class IncompatibleModelError(ValueError):
    """Parameters made for one model that another cannot take; the message names the field."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field  # The model.* field that differs (callers add their own hints).


def _arch_name(model: Mapping[str, Any]) -> str:
    return model.get("arch", PRE_REGISTRY_ARCH)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One `model.arch` value: its hyperparameters, its module, and what callers need of it."""

    name: str
    config_class: type  # A frozen dataclass; every field is a `model.*` config field.
    module: Callable[[Any], nn.Module]  # module(hyperparameters) → the Flax module.
    # (hyperparameters, non-embedding parameter count or total, seq_len) → training FLOPs/token.
    flops_per_token: Callable[[Any, int, int], float]
    shape_fields: tuple[str, ...]  # Fields that change parameter shapes or names.
    # Those of `shape_fields` that matter for a given `model` group (e.g. a position table's
    # length only where there is a table); None → all of them.
    shape_fields_for: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None
    # A `model` group with its defaults-by-rule made explicit (e.g. "unset = num_heads"), so
    # that two ways of writing the same shapes compare equal.
    normalize: Callable[[Mapping[str, Any]], Mapping[str, Any]] = lambda model: model
    function_fields: tuple[str, ...] = ()  # Same shapes, another function (warned on init_from).
    # kv_cache (DecodeState + a `cache` collection) | recompute | recurrent (initial_carry +
    # method="decode") | encoder_decoder (gpt_jax/translate.py).
    decoding: str = "recompute"
    split_head: bool = False  # Has `hidden` and `head` methods (chunked cross-entropy).
    # Logical axis names its parameters and activations use (each needs a mesh.rules entry).
    logical_axes: tuple[str, ...] = ("batch", "length", "embed", "vocab")
    # Checks the `model` group (and what it depends on) before anything compiles; raises
    # config.ConfigError with a one-line message.
    validate: Callable[[ml_collections.ConfigDict], None] = lambda config: None
    # The hyperparameters to decode with (training-only options off; same parameters).
    for_inference: Callable[[Any], Any] = lambda hparams: hparams
    # Whether training draws dropout masks (the train step then folds a key per step).
    uses_dropout: Callable[[Any], bool] = lambda hparams: False

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise ValueError(f"{self.name}: decoding={self.decoding!r} is not one of {DECODINGS}.")
        names = {f.name for f in dataclasses.fields(self.config_class)}
        if missing := [f for f in (*self.shape_fields, *self.function_fields) if f not in names]:
            raise ValueError(f"{self.name}: {missing} are not fields of "
                             f"{self.config_class.__name__}.")

    @property
    def reads_pairs(self) -> bool:
        """Whether it trains on sequence pairs (gpt_jax/data/pairs.py: a source beside each
        target) rather than on a token stream."""
        return self.decoding == "encoder_decoder"

    def hyperparameters(self, model: Mapping[str, Any],
                        finetune: Mapping[str, Any] | None = None) -> Any:
        """The frozen dataclass from a resolved `model` group (vocab_size and max_seq_len set):
        each of its fields takes the group's value of the same name; the adapter fields
        (FINETUNE_FIELDS: LoRA, soft prompt) come from the `finetune` group, 0/off without one."""
        names = [f.name for f in dataclasses.fields(self.config_class)]
        adapters = {**ADAPTERS_OFF, **{k: v for k, v in (finetune or {}).items()
                                      if k in FINETUNE_FIELDS}}
        values = {n: model[n] if n in model else adapters[n] for n in names
                  if n in model or n in adapters}
        if missing := [n for n in names if n not in values]:
            raise ValueError(f"model.arch={self.name!r} needs model.{missing[0]}, which the config "
                             "lacks; every field is in configs/base.py.")
        return self.config_class(**values)

    def mismatch(self, theirs: Mapping[str, Any], ours: Mapping[str, Any],
                 fields: tuple[str, ...] | None = None) -> str | None:
        """The first of `fields` (default: the shape fields, after `arch`) whose values differ
        between two `model` groups, or None. A group without `arch` predates the registry."""
        if _arch_name(theirs) != _arch_name(ours):
            return "arch"
        if fields is None:
            fields = self.shape_fields_for(ours) if self.shape_fields_for else self.shape_fields
        theirs, ours = self.normalize(theirs), self.normalize(ours)
        for field in fields:
            if theirs.get(field) != ours.get(field):
                return field
        return None

    def require_compatible(self, theirs: Mapping[str, Any], ours: Mapping[str, Any], source: str,
                           fix: str, fields: tuple[str, ...] | None = None) -> None:
        """Raises IncompatibleModelError naming the first differing field (see `mismatch`):
        "{source} has model.F=x but this run has model.F=y; {fix}", where `fix` may use
        {field} and {value} (the source's value)."""
        field = self.mismatch(theirs, ours, fields)
        if field is None:
            return
        value = (lambda m: _arch_name(m) if field == "arch" else m.get(field))
        raise IncompatibleModelError(
            f"{source} has model.{field}={value(theirs)!r} but this run has model.{field}="
            f"{value(ours)!r}; " + fix.format(field=field, value=value(theirs)), field)

    def function_changes(self, theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
        """The function fields (same shapes, another function) that differ."""
        return [f for f in self.function_fields if theirs.get(f) != ours.get(f)]


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Adds `arch` under its name. Registering the same object again is a no-op (a notebook may
    re-run its cell); another architecture under a taken name, or a hyperparameter class that
    another name already has (`arch_of` must be unambiguous), is a ValueError."""
    _load_builtin()
    for other in _REGISTRY.values():
        if other is arch:
            return arch
        if other.name == arch.name:
            raise ValueError(f"model.arch={arch.name!r} is already registered; unregister it "
                             "first or choose another name.")
        if other.config_class is arch.config_class:
            raise ValueError(f"{arch.config_class.__name__} already belongs to model.arch="
                             f"{other.name!r}; give {arch.name!r} a class of its own.")
    _REGISTRY[arch.name] = arch
    return arch


def unregister(name: str) -> None:
    """Removes an architecture (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    """The registered `model.arch` values, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> Architecture:
    """The architecture `name`; ValueError (one line, the choices) when there is none."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"model.arch={name!r} is not one of {sorted(_REGISTRY)}; pick one of those.")
    return _REGISTRY[name]


def resolve(config: ml_collections.ConfigDict, vocab_size: int) -> ml_collections.ConfigDict:
    """A copy of `config` whose model.vocab_size (the tokenizer's `vocab_size` unless the config
    fixes a larger one), model.max_seq_len (None → data.seq_len) and model.max_source_len
    (None → data.source_len) are filled in: what config.json records and what `hyperparameters`
    reads."""
    m = config.model
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        from gpt_jax.config import ConfigError  # Config imports this module lazily too.

        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({vocab_size}); raise it or leave it unset to take the "
                          "tokenizer's.")
    config = config.copy_and_resolve_references()
    config.model.vocab_size = m.vocab_size if m.vocab_size is not None else vocab_size
    if config.model.max_seq_len is None:
        config.model.max_seq_len = config.data.seq_len
    if get(_arch_name(config.model)).reads_pairs and config.model.max_source_len is None:
        config.model.max_source_len = config.data.source_len
    return config


def hyperparameters(config: ml_collections.ConfigDict | Mapping[str, Any],
                    vocab_size: int | None = None) -> Any:
    """The hyperparameters of `config`'s model.arch. `config` is a whole config (resolved here
    with `vocab_size`), a whole resolved config as a dict (e.g. a checkpoint's), or an already
    resolved `model` group (then without adapters: the finetune group is not in it)."""
    finetune = None
    if isinstance(config, ml_collections.ConfigDict) and "model" in config:
        vocab_size = config.model.vocab_size if vocab_size is None else vocab_size
        if vocab_size is None:
            raise ValueError("the model's vocabulary size is unknown: set model.vocab_size or "
                             "pass the tokenizer's.")
        resolved = resolve(config, vocab_size)
        model = resolved.model.to_dict()
        finetune = resolved.finetune.to_dict() if "finetune" in resolved else None
    else:
        if "model" in config:
            model, finetune = dict(config["model"]), config.get("finetune")
        else:
            model = dict(config)
        if vocab_size is not None:
            model["vocab_size"] = vocab_size
    if missing := [f for f in ("vocab_size", "max_seq_len") if model.get(f) is None]:
        raise ValueError(f"model.{missing[0]} is not resolved; build the hyperparameters from a "
                         "whole config (registry.resolve fills it in).")
    return get(_arch_name(model)).hyperparameters(model, finetune)


def build(hparams: Any) -> nn.Module:
    """The Flax module for hyperparameters made by `hyperparameters`."""
    return arch_of(hparams).module(hparams)


def model_fields(hparams: Any) -> dict[str, Any]:
    """`hparams` as a `model` group dict with its `arch` (what compatibility checks compare)."""
    return {"arch": arch_of(hparams).name, **dataclasses.asdict(hparams)}


def arch_of(hparams: Any) -> Architecture:
    """The architecture whose hyperparameter class `hparams` is an instance of."""
    _load_builtin()
    for arch in _REGISTRY.values():
        if type(hparams) is arch.config_class:
            return arch
    raise ValueError(f"{type(hparams).__name__} is no registered architecture's hyperparameters.")


def _load_builtin() -> None:
    # The built-in architectures register themselves on import; imported here, not at the top,
    # because they import this module.
    from gpt_jax.models import gpt, lstm, seq2seq  # noqa: F401


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(x.size for x in jax.tree.leaves(params))
