"""Progressive stacking: gpt_jax/finetune/grow.py (grown states, the train.grow_at schedule),
tools/grow.py, and training across a growth (training/loop.py)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from gpt_jax import config as config_lib
from gpt_jax.finetune import grow
from gpt_jax.training import build, checkpoint, loop, weights

REPO = pathlib.Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "grow.py"


def model_config(layers: int, scan: bool = False, **train):
    """A tiny GPT config that builds without data (vocabulary 40)."""
    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = layers, 2, 16
    c.model.vocab_size, c.model.scan_layers = 40, scan
    c.data.seq_len, c.data.tokenizer = 8, "char"
    c.train.update(train)
    return c


def leaves(tree) -> dict:
    return {grow._name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def layer(tree: dict, name: str, i: int, scan: bool) -> np.ndarray:
    """Layer i of the leaf `name` (a path with h_I for the layer): unrolled or scanned."""
    return tree[name.replace("h_I", "h")][i] if scan else tree[name.replace("h_I", f"h_{i}")]


def random_state(r: build.Run, seed: int = 0):
    """A state of `r`'s shapes, every float leaf random (moments too, so that each copy shows),
    every integer leaf 7 (the step, the optimizer's counts): no init to compile."""
    rng = np.random.default_rng(seed)

    def fill(s):
        if jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(s.shape), s.dtype)
        return jnp.full(s.shape, 7, s.dtype)

    return jax.tree.map(fill, r.abstract_state)


@pytest.fixture(scope="module")
def trained_and_fresh():
    """scan → (a random 2-layer state, the 4-layer run)."""
    return {scan: (random_state(build.setup_without_data(model_config(2, scan))),
                   build.setup_without_data(model_config(4, scan))) for scan in (False, True)}


@pytest.mark.parametrize("old,new,mode,want", [
    (2, 4, "stacked", [0, 1, 0, 1]),
    (2, 4, "interleaved", [0, 0, 1, 1]),
    (3, 6, "interleaved", [0, 0, 1, 1, 2, 2]),
    (2, 3, "stacked", [0, 1, 0]),
    (2, 3, "interleaved", [0, 0, 1]),
    (2, 8, "stacked", [0, 1] * 4),
])
def test_source_layers(old, new, mode, want):
    assert grow.source_layers(old, new, mode) == want


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("mode", ["stacked", "interleaved"])
def test_grown_layers_copy_params_and_moments(trained_and_fresh, scan, mode):
    state, new = trained_and_fresh[scan]
    grown = grow.grow_state(state, new, mode, "carry", "copy")
    assert grow.num_layers(grown.params) == 4
    old, got = leaves(state), leaves(grown)
    src = grow.source_layers(2, 4, mode)
    names = [n for n in got if "h_0/" in n or "/h/" in n or n.startswith("params/h/")]
    names = {n.replace("h_0/", "h_I/").replace("/h/", "/h_I/").replace("params/h/", "params/h_I/")
             for n in names}
    assert any("/mu/" in n for n in names) and any("/nu/" in n for n in names)
    for name in names:  # Parameters and their Adam moments: layer i is old layer src[i].
        for i in range(4):
            np.testing.assert_array_equal(layer(got, name, i, scan), layer(old, name, src[i], scan),
                                          err_msg=f"{name} layer {i}")
    if mode == "stacked":  # The check: layer i + L equals layer i.
        for name in names:
            for i in range(2):
                np.testing.assert_array_equal(layer(got, name, i + 2, scan),
                                              layer(got, name, i, scan))
    for name, value in got.items():  # Embeddings, ln_f, their moments, counts, step, key.
        if "h_" not in name and "/h/" not in name and not name.startswith("params/h/"):
            np.testing.assert_array_equal(value, old[name], err_msg=name)
    assert int(grown.step) == 7
    shardings = jax.tree.leaves(new.state_shardings)
    assert [x.sharding for x in jax.tree.leaves(grown)] == shardings


# Scanned by --runslow only: its logits compile (~4 s); the copy tests cover scanned trees.
@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["unrolled", "scanned"])
@pytest.mark.parametrize("mode", ["stacked", "interleaved"])
def test_preserve_silences_the_repeats_outputs(trained_and_fresh, scan, mode):
    state, new = trained_and_fresh[scan]
    copied = leaves(grow.grow_state(state, new, mode, "carry", "copy"))
    preserved = grow.grow_state(state, new, mode, "carry", "preserve")
    got = leaves(preserved)
    repeats = [1, 3] if mode == "interleaved" else [2, 3]
    outputs = ("params/h_I/attn/out/kernel", "params/h_I/mlp/proj/kernel")
    for name in outputs:
        for i in range(4):
            want = 0 if i in repeats else layer(copied, name, i, scan)
            np.testing.assert_array_equal(layer(got, name, i, scan), want)
    silenced = {name.replace("h_I", "h" if scan else f"h_{i}") for name in outputs
                for i in repeats}
    for name, value in got.items():  # Everything else (moments included) as in copy.
        if name not in silenced:
            np.testing.assert_array_equal(value, copied[name], err_msg=name)
    if scan and mode == "stacked":  # Once (two compiles): the grown model computes the old one.
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 8)), jnp.int32)
        old_model = build.setup_without_data(model_config(2, scan)).model
        np.testing.assert_allclose(new.model.apply({"params": preserved.params}, tokens),
                                   old_model.apply({"params": state.params}, tokens),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_reset_restarts_adam_and_keeps_the_schedule(trained_and_fresh, scan):
    state, new = trained_and_fresh[scan]
    grown = grow.grow_state(state, new, "stacked", "reset", "copy")
    old, got = leaves(state), leaves(grown)
    moments = [n for n in got if "/mu/" in n or "/nu/" in n]
    assert moments and all(not got[n].any() for n in moments)
    adam = {n[:n.index("/mu/")] + "/count" for n in moments if "/mu/" in n}  # Beside them.
    counts = [n for n in got if n.endswith("count")]
    assert adam and adam < set(counts) and all(got[n] == 0 for n in adam)
    assert all(got[n] == old[n] and old[n] > 0 for n in set(counts) - adam)
    assert int(grown.step) == int(state.step)
    np.testing.assert_array_equal(layer(got, "params/h_I/mlp/fc/kernel", 3, scan),
                                  layer(old, "params/h_I/mlp/fc/kernel", 1, scan))


def test_only_the_depth_may_change(trained_and_fresh):
    state, _ = trained_and_fresh[False]
    c = model_config(4)
    c.model.d_model = 32
    wider = build.setup_without_data(c)
    with pytest.raises(ValueError, match="only the depth may change"):
        grow.grow_state(state, wider, "stacked", "carry", "copy")


def test_schedule_depths_and_phase_configs():
    c = model_config(8, grow_at="10,20")
    assert [grow.depth_at(c, s) for s in (0, 1, 10, 11, 20, 21, 99)] == [2, 2, 2, 4, 4, 8, 8]
    assert [s for s in range(30) if grow.grows_after(c, s)] == [10, 20]
    p = grow.phase_config(c, 15)
    assert (p.model.num_layers, p.train.grow_at) == (4, "10")
    assert grow.phase_config(c, 10).model.num_layers == 2 and not grow.phase_config(c, 10).train.grow_at
    assert grow.phase_config(c, 21) == c.copy_and_resolve_references()
    for s in (0, 15, 21):  # Each phase's config (a checkpoint's) is valid on its own.
        config_lib.validate(grow.phase_config(c, s))
    c.train.grow_factor = 4
    c.train.grow_at = "10"
    assert [grow.depth_at(c, s) for s in (10, 11)] == [2, 8]


@pytest.mark.parametrize("fields,words", [
    ({"train.grow_at": "10,x"}, "comma-separated step numbers"),
    ({"train.grow_at": "20,10"}, "ascending"),
    ({"train.grow_at": "0"}, "≥ 1"),
    ({"train.grow_at": "5,5"}, "each named once"),
    ({"train.grow_at": "5,9", "model.num_layers": 6}, "not divisible by train.grow_factor^2=4"),
    ({"train.grow_factor": 1}, "train.grow_factor=1"),
    ({"train.grow_mode": "twice"}, "train.grow_mode"),
    ({"train.grow_optimizer": "keep"}, "train.grow_optimizer"),
    ({"train.grow_init": "zero"}, "train.grow_init"),
    ({"train.grow_at": "5", "model.arch": "lstm"}, "model.arch='lstm'"),
    ({"train.grow_at": "5", "finetune.lora_rank": 4, "checkpoint.init_from": "/base"},
     "grow the base"),
])
def test_bad_schedules_are_one_line_config_errors(fields, words):
    c = model_config(4)
    for key, value in fields.items():
        group, field = key.split(".")
        c[group][field] = value
    with pytest.raises(config_lib.ConfigError, match=words.replace("^", r"\^")):
        config_lib.validate(c)


def run_config(corpus, tmp_path, layers, steps, **extra):
    """A tiny char run (T 16) that logs, evaluates and checkpoints like the tests compare."""
    c = base.get_config()
    c.data.path, c.data.cache_dir, c.data.tokenizer = str(corpus), str(tmp_path / "cache"), "char"
    c.data.seq_len = 16
    c.model.num_layers, c.model.num_heads, c.model.d_model = layers, 2, 32
    c.train.batch_size, c.train.num_steps, c.train.eval_every, c.train.eval_batches = 4, steps, 1, 1
    c.train.final_eval = "batches"
    c.optim.warmup_steps, c.optim.decay_steps = 1, 8
    c.checkpoint.every, c.log.every, c.log.progress, c.log.tensorboard = 100, 1, "lines", False
    c.sample.num_samples = 0
    for key, value in extra.items():
        group, field = key.split(".")
        c[group][field] = value
    return c


def final_params(workdir) -> dict:
    return leaves(weights.load_trained(workdir)[2])


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2, 3, 5], ids=["before_growth", "at_growth", "after_growth"])
def test_resume_across_a_scheduled_growth_is_bitwise(corpus, tmp_path, stop, metrics_rows):
    grows = {"train.grow_at": "3", "train.grow_optimizer": "carry"}
    straight = loop.run(run_config(corpus, tmp_path, 4, 8, **grows), tmp_path / "a")
    loop.run(run_config(corpus, tmp_path, 4, stop, **grows), tmp_path / "b")
    resumed = loop.run(run_config(corpus, tmp_path, 4, 8, **grows), tmp_path / "b")
    assert resumed["val/loss"] == straight["val/loss"] and np.isfinite(straight["val/loss"])
    assert metrics_rows(tmp_path / "a", timing=False) == metrics_rows(tmp_path / "b", timing=False)
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # The growth step's checkpoint holds the old depth, and its config says so.
    manager = checkpoint.open_to_read(tmp_path / "a" / "checkpoints")
    assert sorted(manager.all_steps()) == [3, 8]
    saved = checkpoint.saved_config(manager, 3)
    assert (saved["model"]["num_layers"], saved["train"]["grow_at"]) == (2, "")
    assert checkpoint.saved_config(manager, 8)["model"]["num_layers"] == 4
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model"]["num_layers"] == 4


@pytest.mark.slow
def test_scheduled_growth_with_scanned_layers_and_reset(corpus, tmp_path):
    c = run_config(corpus, tmp_path, 4, 6, **{"train.grow_at": "1,3", "model.scan_layers": True,
                                              "train.grow_optimizer": "reset",
                                              "train.grow_mode": "interleaved"})
    out = loop.run(c, tmp_path / "run")
    assert np.isfinite(out["val/loss"])
    manager = checkpoint.open_to_read(tmp_path / "run" / "checkpoints")
    depths = {s: checkpoint.saved_config(manager, s)["model"]["num_layers"]
              for s in manager.all_steps()}
    assert depths == {1: 1, 3: 2, 6: 4}


@pytest.mark.slow
def test_tool_grows_a_run_that_then_trains_on(corpus, tmp_path, metrics_rows):
    loop.run(run_config(corpus, tmp_path, 2, 4), tmp_path / "small")
    out = subprocess.run([sys.executable, str(TOOL), "--from=small", "--to=big", "--layers=4"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)  # Relative.
    assert out.returncode == 0, out.stderr[-3000:]
    assert "from 2 to 4 layers" in out.stdout
    small, big = final_params(tmp_path / "small"), final_params(tmp_path / "big")
    for name, value in big.items():  # Stacked; the repeats' residual outputs zero (preserve).
        if "h_" in name:
            i = int(name.split("h_")[1].split("/")[0])
            want = small[name.replace(f"h_{i}/", f"h_{i % 2}/")]
            silenced = i >= 2 and ("attn/out/" in name or "mlp/proj/" in name)
            np.testing.assert_array_equal(value, 0 * want if silenced else want, err_msg=name)
        else:
            np.testing.assert_array_equal(value, small[name])
    assert json.loads((tmp_path / "big" / "config.json").read_text())["model"]["num_layers"] == 4
    assert (tmp_path / "big" / "tokenizer.json").read_bytes() == (
        tmp_path / "small" / "tokenizer.json").read_bytes()
    before = metrics_rows(tmp_path / "big")
    assert before == metrics_rows(tmp_path / "small")
    result = loop.run(run_config(corpus, tmp_path, 4, 8), tmp_path / "big")
    rows = metrics_rows(tmp_path / "big")
    assert rows[:len(before)] == before  # The curves go on from the small run's.
    losses = [r["train/loss"] for r in rows[len(before):] if "train/loss" in r]
    assert [r["step"] for r in rows[len(before):] if "train/loss" in r] == [5, 6, 7, 8]
    assert np.all(np.isfinite(losses)) and np.isfinite(result["val/loss"])


@pytest.mark.slow
def test_scheduled_growth_on_a_two_device_mesh_equals_one_device(corpus, tmp_path, cli_flags,
                                                                   metrics_rows):
    c = run_config(corpus, tmp_path, 4, 5, **{"train.grow_at": "2"})
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for name, mesh in (("one", ["--config.mesh.data=1"]), ("fsdp", ["--config.mesh.fsdp=2",
                                                                     "--config.mesh.data=1"])):
        run_env = env if name == "fsdp" else {k: v for k, v in env.items() if k != "XLA_FLAGS"}
        out = subprocess.run([sys.executable, "-m", "gpt_jax.train",
                              f"--workdir={tmp_path / name}", *cli_flags(c), *mesh],
                             capture_output=True, text=True, env=run_env, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
    one, fsdp = (metrics_rows(tmp_path / n, timing=False) for n in ("one", "fsdp"))
    assert [r["step"] for r in one] == [r["step"] for r in fsdp]
    for a, b in zip(one, fsdp, strict=True):
        for key in ("train/loss", "val/loss"):
            if key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=f"step {a['step']}")


def copy_with_saved_config(trained_run, tmp_path, change) -> pathlib.Path:
    """A copy of trained_run whose checkpoints' saved configs went through `change`."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for meta in run.glob("checkpoints/*/config/metadata"):
        saved = json.loads(meta.read_text())
        change(saved)
        meta.write_text(json.dumps(saved))
    return run


def _lora(saved):
    saved["finetune"] = {**saved.get("finetune", {}), "lora_rank": 4}


def _lstm(saved):
    saved["model"]["arch"] = "lstm"


# Two rows by default (each a process start); --runslow runs them all.
@pytest.mark.parametrize("case,words", [
    ("to_not_empty", ["--to=", "not an empty folder"]),
    pytest.param("to_inside_from", ["inside --from"], marks=pytest.mark.slow),
    pytest.param("no_checkpoints", ["not a training workdir"], marks=pytest.mark.slow),
    pytest.param("layers_not_more", ["--layers=1 must exceed the 1 layers"],
                 marks=pytest.mark.slow),
    ("lora", ["grow the base instead"]),
    pytest.param("lstm", ["model.arch='lstm'"], marks=pytest.mark.slow),
    pytest.param("bad_step", ["no checkpoint of step 3"], marks=pytest.mark.slow),
    pytest.param("bad_mode", ["--mode", "invalid choice"], marks=pytest.mark.slow),
    pytest.param("bad_layers", ["--layers", "not a number of layers"], marks=pytest.mark.slow),
])
def test_bad_invocations_are_refused_in_one_line(case, words, trained_run, tmp_path,
                                                 bad_invocation):
    run, to, args = trained_run, tmp_path / "new", ["--layers=2"]
    if case == "to_not_empty":
        to.mkdir()
        (to / "notes.txt").write_text("mine")
    elif case == "to_inside_from":
        run = tmp_path / "copy"
        shutil.copytree(trained_run, run)
        to = run / "grown"
    elif case == "no_checkpoints":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "layers_not_more":
        args = ["--layers=1"]
    elif case in ("lora", "lstm"):
        run = copy_with_saved_config(trained_run, tmp_path, _lora if case == "lora" else _lstm)
    elif case == "bad_step":
        args += ["--checkpoint=3"]
    elif case == "bad_mode":
        args += ["--mode=twice"]
    elif case == "bad_layers":
        args = ["--layers=two"]
    protect = [run] + ([to] if to.exists() else [])
    absent = [] if to.exists() else [to]
    bad_invocation([sys.executable, TOOL, f"--from={run}", f"--to={to}", *args], *words,
                   protect=protect, absent=absent)
