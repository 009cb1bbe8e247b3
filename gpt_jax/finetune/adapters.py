"""Adapters and their frozen base: which parameters train, what a checkpoint holds, where the
base comes from.

With LoRA (finetune.lora_rank > 0) or a soft prompt (finetune.prompt_tokens > 0) the model's
parameter tree holds the base model's parameters and the adapters' (`lora_*` modules,
`soft_prompt`). Only the adapters train: the train step takes no gradient through the base
(`stop_gradient`), the optimizer keeps no state for it (`optax.multi_transform` with
`set_to_zero`, optim.py), the step hands the base back unchanged, and checkpoints hold the
adapters alone (`saved`). The base is read again at every start from `finetune.base`, the
checkpoint that `checkpoint.init_from` named when the run began (a step folder, or hf:PATH),
recorded in the run's config so that resuming, sampling and evaluating find the same one.
Without adapters every parameter trains (full fine-tuning) and nothing here changes a thing.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gpt_jax.config import check
from gpt_jax.models import layers, registry
from gpt_jax.parallel import distributed
from gpt_jax.training import remote

TRAIN, FREEZE = "train", "freeze"  # optax.multi_transform labels.


def active(finetune: Mapping[str, Any] | Any) -> bool:
    """Whether a finetune group (or model hyperparameters) adds adapters: LoRA or a soft prompt."""
    get = finetune.get if isinstance(finetune, Mapping) else lambda k: getattr(finetune, k, 0)
    return bool(get("lora_rank") or get("prompt_tokens"))


def is_adapter(path: tuple[Any, ...]) -> bool:
    """Whether the parameter at `path` (a tree path) belongs to an adapter."""
    names = [str(getattr(k, "key", k)) for k in path]
    return any(n.startswith("lora_") or n == "soft_prompt" for n in names)


def labels(params: Any) -> Any:
    """The optax.multi_transform label of every parameter: TRAIN for adapters, FREEZE else."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: TRAIN if is_adapter(path) else FREEZE, params)


def trainable_mask(params: Any, hparams: Any) -> Any | None:
    """A tree of bools (True = trains) for `params`, or None when every parameter trains."""
    if not active(hparams):
        return None
    return jax.tree_util.tree_map_with_path(lambda path, _: is_adapter(path), params)


def split(tree: Any, mask: Any) -> tuple[dict, dict]:
    """(the leaves where `mask` is True, the others), each as nested dicts of only those."""
    def part(keep: bool) -> dict:
        out: dict = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            flag = _at(mask, path)
            if flag == keep:
                node = out
                for k in path[:-1]:
                    node = node.setdefault(k.key, {})
                node[path[-1].key] = leaf
        return out

    return part(True), part(False)


def _at(tree: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        tree = tree[k.key]
    return tree


def join(a: Mapping, b: Mapping) -> dict:
    """The union of two nested dicts of disjoint leaves (what `split` made)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = join(out[k], v) if k in out and isinstance(v, Mapping) else v
    return out


def base_hparams(hparams: Any) -> Any:
    """`hparams` without adapters: the model the base checkpoint holds."""
    return dataclasses.replace(hparams, lora_rank=0, lora_targets="", prompt_tokens=0)


def saved(state: Any, mask: Any | None) -> Any:
    """What a checkpoint of `state` holds: with adapters, the state without the frozen base."""
    return state if mask is None else state.replace(params=split(state.params, mask)[0])


def base_reference(init_from: str) -> str:
    """The checkpoint `checkpoint.init_from` names, pinned: a step folder (absolute), or hf:PATH
    as given. A workdir's newest step now, so the reference holds if its run saves more."""
    from gpt_jax.training import weights  # Imports the training stack.

    if init_from.startswith(weights.HF_PREFIX):  # A local folder: absolute; a hub name as is.
        local = pathlib.Path(init_from[len(weights.HF_PREFIX):]).expanduser()
        return weights.HF_PREFIX + str(local.resolve()) if local.is_dir() else init_from
    directory, step = weights.params_source(init_from)
    # Process 0's choice: the base run may save a newer step between two processes' reads.
    step = distributed.primary_int(weights.select_step(weights.open_to_read(directory), step))
    if remote.is_url(str(directory)):
        return str(directory / str(step))
    return str(pathlib.Path(directory).resolve() / str(step))


def same_base(given: str, pinned: str) -> bool:
    """Whether `given` (a finetune.base or init_from as written) names the pinned base: the same
    step, or the workdir or checkpoints folder it is in (whatever that run has saved since)."""
    from gpt_jax.training import weights

    if given.startswith(weights.HF_PREFIX) or pinned.startswith(weights.HF_PREFIX):
        return base_reference(given) == pinned
    directory, step = weights.params_source(given)
    where = str(directory) if remote.is_url(str(directory)) else str(
        pathlib.Path(directory).resolve())
    return pinned == f"{where}/{step}" if step is not None else pinned.startswith(where + "/")


def load_base(reference: str, abstract_params: Any, hparams: Any, mask: Any) -> dict:
    """The base parameters (the frozen part of `abstract_params`, placed as it says) from the
    checkpoint `reference` names, checked against the model without adapters."""
    from gpt_jax.training import weights

    frozen = split(abstract_params, mask)[1]
    return weights.load_params(reference, frozen, base_hparams(hparams))


def init_soft_prompt(params: dict, hparams: Any, seed: int) -> dict:
    """`params` with the soft prompt set to the embeddings of P vocabulary tokens drawn at random
    (Lester et al. 2021: better than a random start), from the base's token table."""
    if not hparams.prompt_tokens:
        return params
    ids = np.random.default_rng(seed).integers(0, hparams.vocab_size, hparams.prompt_tokens)
    old = params["soft_prompt"]
    rows = jnp.take(params["wte"]["embedding"], jnp.asarray(ids), axis=0)
    return {**params, "soft_prompt": jax.device_put(rows.astype(old.dtype), old.sharding)}


def count(params: Any, mask: Any | None) -> int:
    """Trainable parameters: the adapters' with a mask, else all."""
    tree = params if mask is None else split(params, mask)[0]
    return registry.count_params(tree)


def validate(config: Any) -> None:
    """The finetune group's values; one-line ConfigErrors naming field and fix."""
    f, m = config.finetune, config.model
    check(f.lora_rank >= 0, f"finetune.lora_rank={f.lora_rank} must be ≥ 0 (0 = no LoRA).")
    check(f.prompt_tokens >= 0,
          f"finetune.prompt_tokens={f.prompt_tokens} must be ≥ 0 (0 = no soft prompt).")
    if not active(f):
        return
    check(f.lora_alpha > 0, f"finetune.lora_alpha={f.lora_alpha} must be > 0.")
    check(m.arch == "gpt", f"finetune adapters (LoRA, soft prompts) are for model.arch=gpt, and "
                           f"this run has {m.arch!r}; fine-tune it fully (finetune.lora_rank=0, "
                           "finetune.prompt_tokens=0).")
    check(config.checkpoint.init_from not in ("auto", "scratch") or f.base is not None,
          "finetune adapters train on a trained model: set --config.checkpoint.init_from to its "
          "workdir, a checkpoint folder or hf:PATH.")
    check(not config.train.grow_at, "train.grow_at grows the whole model, and this run trains "
                                    "adapters only; grow the base, then fine-tune it.")
    if f.lora_rank:
        names = [n.strip() for n in f.lora_targets.split(",") if n.strip()]
        check(bool(names), "finetune.lora_targets is empty; name projections (q,k,v,out,fc,"
                           "gate,proj) or groups (attention, mlp).")
        for name in names:
            check(name in layers.LORA_TARGETS or name in layers.LORA_GROUPS,
                  f"finetune.lora_targets names {name!r}, which is none of "
                  f"{', '.join(layers.LORA_TARGETS)} or the groups attention, mlp.")
            check(name != "gate" or m.mlp == "swiglu",
                  f"finetune.lora_targets names gate, which model.mlp={m.mlp!r} does not have; "
                  "drop it (only swiglu has a gate).")
    if f.prompt_tokens:
        check(not config.data.document_mask and config.data.sft_packing != "packed",
              "a soft prompt serves one sequence per row: set data.document_mask=False and "
              "data.sft_packing=padded.")
        limit = m.max_seq_len if m.max_seq_len is not None else config.data.seq_len
        s = config.sample  # The end-of-training sample decodes after the soft prompt.
        need = f.prompt_tokens + len(s.prompt.encode("utf-8")) + s.max_new_tokens
        check(s.num_samples == 0 or need <= limit,
              f"the end-of-training sample needs up to {need} positions (finetune.prompt_tokens "
              f"+ sample.prompt + sample.max_new_tokens) of the {limit} the model has "
              "(model.max_seq_len); lower sample.max_new_tokens or set sample.num_samples=0.")
        if m.positions == "learned":
            check(config.data.seq_len + f.prompt_tokens <= limit,
                  f"data.seq_len={config.data.seq_len} + finetune.prompt_tokens="
                  f"{f.prompt_tokens} exceed the {limit} learned positions (model.max_seq_len); "
                  "set model.max_seq_len to the base model's and data.seq_len ≤ it − "
                  "prompt_tokens.")


def log_counts(params: Any, mask: Any | None) -> None:
    """Logs how many parameters train (with adapters: of how many)."""
    total = registry.count_params(params)
    if mask is not None:
        logging.info("finetune: %s of %s parameters train (the adapters); the base is frozen",
                     f"{count(params, mask):,}", f"{total:,}")

