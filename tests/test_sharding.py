"""Meshes and shardings on one process (gpt_jax/parallel/mesh.py, sharding.py): mesh sizes,
logical rules, specs, parameter and batch shardings, a process's rows, global batches. The
multi-device and multi-process runs are in test_parallel.py."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from gpt_jax.config import ConfigError
from gpt_jax.data.batch import lm_batch
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.parallel import sharding


def mesh_cfg(**sizes) -> ml_collections.ConfigDict:
    c = base.get_config().mesh
    for k, v in sizes.items():
        c[k] = v
    return c


def one_device_mesh() -> jax.sharding.Mesh:
    return mesh_lib.make_mesh(mesh_cfg(), jax.devices()[:1])


@pytest.mark.parametrize(("sizes", "devices", "want"), [
    ({}, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
    ({"fsdp": -1}, 8, {"data": 1, "fsdp": 8, "tensor": 1}),  # data's default -1 yields.
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"data": 1, "fsdp": 16, "tensor": 4}, 64, {"data": 1, "fsdp": 16, "tensor": 4}),
])
def test_axis_sizes(sizes, devices, want):
    ici, dcn = mesh_lib.axis_sizes(mesh_cfg(**sizes), devices)
    assert ici == want and dcn == {"data": 1, "fsdp": 1, "tensor": 1}


def test_dcn_sizes_multiply_per_node():
    ici, dcn = mesh_lib.axis_sizes(mesh_cfg(dcn_data=2, fsdp=-1), 8, num_granules=2)
    assert ici == {"data": 1, "fsdp": 4, "tensor": 1} and dcn["data"] == 2


@pytest.mark.parametrize(("sizes", "devices", "granules", "match"), [
    ({"data": 3}, 8, 1, r"mesh\.data=3, mesh\.fsdp=1, mesh\.tensor=1: the product is 3 but the "
                        r"device count is 8"),
    ({"fsdp": -1, "tensor": -1}, 8, 1, "at most one mesh size may be -1"),
    ({"fsdp": 3, "data": -1}, 8, 1, "not a multiple of 3"),
    ({"tensor": 0}, 8, 1, "must be ≥ 1 or -1"),
    ({"dcn_data": 3}, 8, 2, "number of nodes"),
])
def test_mesh_mismatch_errors(sizes, devices, granules, match):
    with pytest.raises(ConfigError, match=match) as e:
        mesh_lib.axis_sizes(mesh_cfg(**sizes), devices, granules)
    assert "\n" not in str(e.value)


def test_make_mesh_takes_the_remaining_devices_and_refuses_a_bad_size():
    mesh = mesh_lib.make_mesh(mesh_cfg(fsdp=-1), jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3  # Flax's constraints need Auto.
    assert mesh_lib.describe(mesh).startswith("data=1 fsdp=1 tensor=1 (1 devices")
    with pytest.raises(ConfigError, match=r"^mesh\.data=2, mesh\.fsdp=1, mesh\.tensor=1: the "
                                          r"product is 2 but the device count is 1;") as e:
        mesh_lib.make_mesh(mesh_cfg(data=2), jax.devices()[:1])
    assert "\n" not in str(e.value)


def test_rules_from_config_and_their_errors():
    rules = sharding.logical_rules(mesh_cfg())
    assert [name for name, _ in rules] == list(sharding.LOGICAL_AXES)  # Precedence order.
    rules = dict(rules)
    assert rules["batch"] == ("data", "fsdp") and rules["embed"] == ("fsdp",)
    assert rules["heads"] == rules["mlp"] == rules["vocab"] == ("tensor",)
    assert rules["kv"] is None and rules["length"] is None
    custom = mesh_cfg()
    custom.rules.embed, custom.rules.batch = " tensor , fsdp", "data"
    assert dict(sharding.logical_rules(custom))["embed"] == ("tensor", "fsdp")
    bad = mesh_cfg()
    bad.rules.embed = "fsdp,model"
    with pytest.raises(ConfigError, match=r"mesh\.rules\.embed='fsdp,model'"):
        sharding.logical_rules(bad)
    bad.rules.embed = "fsdp,fsdp"
    with pytest.raises(ConfigError, match="distinct"):
        sharding.logical_rules(bad)
    unknown = mesh_cfg()
    unknown.rules.hidden = "fsdp"
    with pytest.raises(ConfigError, match=r"mesh\.rules\.hidden is not a logical axis"):
        sharding.logical_rules(unknown)


def test_mesh_spec_keeps_a_dimension_whole_where_the_axis_does_not_divide_it():
    rules = sharding.logical_rules(mesh_cfg())
    shape = {"data": 2, "fsdp": 2, "tensor": 2}
    spec, dropped = sharding.mesh_spec(("vocab", "embed"), (65, 128), shape, rules)
    assert spec == P(None, "fsdp")
    assert dropped == ["tensor=2 does not divide vocab (65)"]
    spec, dropped = sharding.mesh_spec(("vocab", "embed"), (64, 128), shape, rules)
    assert spec == P("tensor", "fsdp") and dropped == []
    spec, _ = sharding.mesh_spec(("batch", "length", "embed"), (4, 4, 8), {**shape, "data": 3}, rules)
    assert spec == P("fsdp", None, None)  # 4 % 3 ≠ 0: data dropped, fsdp kept.
    spec, _ = sharding.mesh_spec(("batch", "length", "embed"), (8, 4, 8), shape, rules)
    assert spec == P(("data", "fsdp"), None, None)  # Both: batch before embed takes fsdp.
    spec, dropped = sharding.mesh_spec(("batch", "length", "embed"), (8, 4, 8),
                                       {"data": 1, "fsdp": 1, "tensor": 1}, rules)
    assert spec == P(None, None, None) and dropped == []  # Size-1 axes are left out.


def boxed_params(tiny_gpt, **fields):
    """The tiny GPT's parameters as `nn.LogicallyPartitioned` boxes of ShapeDtypeStructs."""
    _, model, _ = tiny_gpt(**fields)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))[
        "params"]


def specs(shardings) -> dict[str, P]:
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): v.spec for k, v in flat}


def test_param_shardings_of_a_tiny_gpt_on_one_device(tiny_gpt):
    boxed = boxed_params(tiny_gpt, bias=True)
    mesh = one_device_mesh()
    out = sharding.param_shardings(boxed, mesh, sharding.logical_rules(mesh_cfg()))
    unboxed = nn.meta.unbox(boxed)
    assert jax.tree.structure(out) == jax.tree.structure(unboxed)
    for (path, sh), leaf in zip(specs(out).items(), jax.tree.leaves(unboxed), strict=True):
        assert len(sh) == leaf.ndim and all(a is None for a in sh), path  # Nothing to split.
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(out))


def test_param_shardings_follow_the_rules_on_a_2x2x2_mesh(tiny_gpt, caplog):
    """On an abstract (data 2, fsdp 2, tensor 2) mesh: what 8 devices would hold, without them."""
    boxed = boxed_params(tiny_gpt, vocab_size=65, bias=True)  # 65: tensor=2 does not divide it.
    mesh = AbstractMesh((2, 2, 2), mesh_lib.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    caplog.set_level(logging.INFO, logger="absl")  # Whatever absl's verbosity.
    got = specs(sharding.param_shardings(boxed, mesh, sharding.logical_rules(mesh_cfg())))
    want = {
        "wte/embedding": P(None, "fsdp"),  # Vocab kept whole: 65 is odd.
        "wpe/embedding": P(None, "fsdp"),
        "h_0/attn/qkv/kernel": P("fsdp", None, "tensor", None),
        "h_0/attn/qkv/bias": P(None, "tensor", None),
        "h_1/attn/out/kernel": P("tensor", None, "fsdp"),
        "h_0/mlp/fc/kernel": P("fsdp", "tensor"),
        "h_0/mlp/fc/bias": P("tensor"),
        "h_0/mlp/proj/kernel": P("tensor", "fsdp"),
        "h_0/mlp/proj/bias": P("fsdp"),
        "h_0/ln_1/scale": P(None),
        "ln_f/scale": P(None),
    }
    assert {k: got[k] for k in want} == want
    assert "parameter wte/embedding: tensor=2 does not divide vocab (65)" in caplog.text


def test_batch_sharding_and_process_rows_on_one_process():
    mesh = one_device_mesh()
    rules = sharding.logical_rules(mesh_cfg())
    batch_sh = sharding.batch_sharding(mesh, rules)
    assert batch_sh.spec == P(("data", "fsdp"), None)  # Rows over the `batch` rule's axes.
    assert sharding.batch_sharding(mesh, rules, ndim=3).spec == P(("data", "fsdp"), None, None)
    assert sharding.process_rows(batch_sh, (8, 16)) == (0, 1)  # One process feeds every row.
    abstract = AbstractMesh((4, 2, 1), mesh_lib.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    assert sharding.batch_sharding(abstract, rules).shard_shape((16, 32)) == (2, 32)


def test_global_batch_of_a_dict():
    mesh = one_device_mesh()
    batch_sh = sharding.batch_sharding(mesh, sharding.logical_rules(mesh_cfg()))
    weights = np.random.default_rng(0).uniform(size=(4, 8)).astype(np.float32)
    local = lm_batch(np.arange(4 * 9, dtype=np.int32).reshape(4, 9), weights)
    local["segment_ids"] = np.repeat(np.arange(8, dtype=np.int32)[None] // 3, 4, axis=0)
    out = sharding.global_batch(local, batch_sh, 4)  # One sharding for every array of the dict.
    assert sorted(out) == ["inputs", "segment_ids", "targets", "weights"]
    for key, array in out.items():
        assert isinstance(array, jax.Array) and array.sharding == batch_sh
        assert array.dtype == local[key].dtype and array.shape == (4, 8)
        np.testing.assert_array_equal(np.asarray(array), local[key])
    np.testing.assert_array_equal(np.asarray(out["targets"])[:, :-1], local["inputs"][:, 1:])


def test_per_device_bytes_and_replicated_host_arrays():
    mesh = one_device_mesh()
    replicated = NamedSharding(mesh, P())
    a = sharding.put_replicated_host(np.ones((3, 5), np.float32), replicated)
    b = sharding.put_replicated_host(np.zeros((7,), np.int32), replicated)
    assert a.sharding == replicated and np.asarray(a).sum() == 15
    assert sharding.per_device_bytes({"a": a, "b": b}) == 3 * 5 * 4 + 7 * 4


def test_a_cpu_fallback_on_an_accelerator_machine_is_a_warning(monkeypatch):
    from jax._src import hardware_utils

    from gpt_jax.parallel import mesh as mesh_lib

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: False)
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
    assert mesh_lib.unused_accelerator() is None  # No accelerator: nothing to say.
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, None))
    want = f"a TPU but JAX runs on the CPU: install jax's tpu build, pip install 'jax[tpu]=={jax.__version__}"
    assert want in mesh_lib.unused_accelerator()
    monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: True)
    warning = mesh_lib.unused_accelerator()
    assert "an NVIDIA GPU" in warning and "jax[cuda13]" in warning and "JAX_PLATFORMS=cpu" in warning
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # On purpose.
    assert mesh_lib.unused_accelerator() is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("JAX_PLATFORMS")
    assert mesh_lib.unused_accelerator() is None  # It is used.
