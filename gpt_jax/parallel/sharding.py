"""Logical axis names → mesh shardings: parameters, optimizer state, batches, activations.

The model names the axes of its parameters and main activations (batch, length, embed, heads, kv,
mlp, vocab, norm); `mesh.rules` in the config maps them to mesh axes. Data, FSDP and tensor
parallelism, and their mixes, are nothing but choices of rules and mesh sizes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax.config import ConfigError
from gpt_jax.parallel.mesh import AXES

# Rule precedence when two dimensions of one array want the same mesh axis: batch first (an
# activation's embed dimension then stays whole under FSDP), tensor-parallel axes before embed
# (a kernel's heads/mlp dimension gets `tensor` even if embed is also mapped to it).
LOGICAL_AXES = ("batch", "length", "heads", "mlp", "vocab", "kv", "embed", "norm", "layers")

Rules = tuple[tuple[str, tuple[str, ...] | None], ...]


def logical_rules(mesh_cfg: ml_collections.ConfigDict) -> Rules:
    """`mesh.rules` as Flax logical axis rules, in LOGICAL_AXES precedence order."""
    unknown = sorted(set(mesh_cfg.rules) - set(LOGICAL_AXES))
    if unknown:
        raise ConfigError(f"mesh.rules.{unknown[0]} is not a logical axis; the model names "
                          f"{', '.join(LOGICAL_AXES)}.")
    rules = []
    for name in LOGICAL_AXES:
        text = mesh_cfg.rules.get(name, "")
        axes = tuple(a.strip() for a in text.split(",") if a.strip())
        bad = [a for a in axes if a not in AXES]
        if bad or len(set(axes)) != len(axes):
            raise ConfigError(f"mesh.rules.{name}={text!r}: give distinct mesh axes from "
                              f"{', '.join(AXES)}, comma-separated (empty = replicated).")
        rules.append((name, axes or None))
    return tuple(rules)


def mesh_spec(logical: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
              rules: Rules) -> tuple[P, list[str]]:
    """The PartitionSpec for an array whose dimensions have logical names `logical`.

    Per dimension, each mesh axis the rules give is kept if the kept ones still divide the size;
    the rest are dropped (that dimension is then whole along them) and reported as
    'axis=n does not divide name (size)' strings. Mesh axes of size 1 are left out.
    """
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    out, dropped = [], []
    for name, size, axes in zip(logical, shape, spec, strict=True):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, product = [], 1
        for a in axes:
            if mesh_shape[a] == 1:  # Shards nothing; left out so specs read as what they do.
                continue
            if size % (product * mesh_shape[a]) == 0:
                kept.append(a)
                product *= mesh_shape[a]
            else:
                dropped.append(f"{a}={mesh_shape[a]} does not divide {name} ({size})")
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out), dropped


def param_shardings(boxed_params: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` (abstract) parameters.

    Logs each parameter (once for all layers) with a dimension the rules shard but whose mesh
    axis does not divide it.
    """
    kept_whole: dict[str, str] = {}

    def one(path, leaf) -> NamedSharding:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, P())
        spec, dropped = mesh_spec(leaf.names, leaf.value.shape, mesh.shape, rules)
        if dropped:
            name = re.sub(r"h_\d+/", "h_*/", jax.tree_util.keystr(path, simple=True, separator="/"))
            kept_whole[name] = "; ".join(dropped)
        return NamedSharding(mesh, spec)

    out = jax.tree_util.tree_map_with_path(
        one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for name, why in kept_whole.items():
        logging.info("parameter %s: %s; kept whole along that mesh axis", name, why)
    return out


def state_shardings(abstract_state: Any, param_sh: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings of a TrainState: the optimizer's per-parameter moments follow their parameter;
    counters, the step and keys are replicated.

    A moment is matched to its parameter by tree path (the dict keys that end its path in the
    optimizer state) and shape, not with optax.tree_map_params, which cannot follow the masked
    trees of optax.multi_transform (frozen parameters, gpt_jax/finetune/)."""
    replicated = NamedSharding(mesh, P())
    flat = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    params = {tuple(k.key for k in path): leaf for path, leaf in flat}
    shardings = dict(zip(params, jax.tree.leaves(param_sh), strict=True))

    def follow(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        keys: list[Any] = []
        for k in reversed(path):  # The trailing dict keys: a parameter's path, if any.
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        param = params.get(tuple(keys))
        if param is not None and tuple(param.shape) == tuple(leaf.shape):
            return shardings[tuple(keys)]
        return replicated

    opt_sh = jax.tree_util.tree_map_with_path(follow, abstract_state.opt_state)
    rest = {f: replicated for f in ("step", "dropout_key", "first_nonfinite_step")}
    return abstract_state.replace(params=param_sh, opt_state=opt_sh, **rest)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their sharding (what Orbax restores into and AOT lowers with)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, …] batch: B over the `batch` rule's mesh axes, the rest whole."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


# The mesh `constrain` uses. Deliberately not jax.set_mesh: under a global mesh Flax applies
# constraints to boxed parameters at init, and DenseGeneral boxes a flattened kernel there.
_MESH: contextvars.ContextVar[jax.sharding.Mesh | None] = contextvars.ContextVar("mesh", default=None)


@contextlib.contextmanager
def activation_context(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """Within it, `constrain` (in the model) applies the rules on `mesh`; enter it around every
    call that traces the model (jit, eval_shape, lower)."""
    token = _MESH.set(mesh)
    try:
        with nn.logical_axis_rules(rules):
            yield
    finally:
        _MESH.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint for an activation with logical axis names; a no-op outside
    `activation_context` (or on one device). Mesh axes that do not divide a dimension are left
    out, so odd shapes (a sampling batch of 1, a vocab of 65) still run."""
    mesh = _MESH.get()
    rules = nn.get_logical_axis_rules()
    if mesh is None or mesh.size == 1 or not rules:
        return x
    spec, _ = mesh_spec(logical, x.shape, mesh.shape, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """(index, count): this process feeds rows [index·B/count, (index+1)·B/count) of a global
    batch of `global_shape` placed with `sharding`. Processes that share rows (e.g. tensor
    parallelism across hosts) get the same index."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*index[0].indices(global_shape[0])))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo or global_shape[0] % (hi - lo) or lo % (hi - lo):
        raise ConfigError(f"this process's devices hold batch rows {sorted(rows)[:8]}…, not one "
                          "aligned block; keep each process's devices together on the mesh "
                          "(mesh.dcn_* over nodes).")
    return lo // (hi - lo), global_shape[0] // (hi - lo)


def global_batch(local: Any, sharding: NamedSharding, batch_size: int) -> Any:
    """The global arrays of a batch (a dict of [B, …] arrays, or one array) of `batch_size` rows,
    of which this process holds its rows in `local` (see `process_rows`), each placed with
    `sharding`."""
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        sharding, a, (batch_size, *a.shape[1:])), local)


def replicated_like(params: Any) -> NamedSharding | None:
    """Whole-on-every-device placement on the mesh of `params` (the training run's), for a
    decoder's inputs and outputs, so that every process can read the result; None for params
    that are on no mesh (numpy, or a single device's)."""
    first = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return (NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding)
            else None)


def replicate(x: jax.Array, replicated: NamedSharding | None) -> jax.Array:
    """`x` constrained to `replicated` inside a jitted decoder (unchanged when None)."""
    return x if replicated is None else jax.lax.with_sharding_constraint(x, replicated)


def put_replicated_host(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds whole (e.g. a fixed eval batch)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the largest)."""
    total: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = math.prod(shard) * np.dtype(leaf.dtype).itemsize
        for d in leaf.sharding.device_set:
            total[d] = total.get(d, 0) + nbytes
    return max(total.values(), default=0)
