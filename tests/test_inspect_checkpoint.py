"""tools/inspect_checkpoint.py: the checkpoint table and the parameter tree."""

import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np

from configs import base
from gpt_jax.data import pipeline
from gpt_jax.training import checkpoint

TOOL = pathlib.Path(__file__).resolve().parent.parent / "tools" / "inspect_checkpoint.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("inspect_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lists_checkpoints_and_parameters(tmp_path, capsys):
    it = iter(pipeline.train_dataset(np.arange(500, dtype=np.uint16), 8, 2, 0, 0, 1, 1, 1, "random"))
    manager = checkpoint.make_manager(tmp_path / "checkpoints", keep=3)
    state = {"params": {"wte": {"embedding": jnp.ones((10, 4))}, "ln": {"scale": jnp.ones(4)}},
             "step": jnp.zeros((), jnp.int32)}
    for step, loss in ((5, 2.0), (10, 1.5), (15, None)):
        checkpoint.save(manager, step, state, it, json.dumps(base.get_config().to_dict()), loss)
    manager.wait_until_finished()
    assert load_tool().main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    table = {int(line.split()[0]): line.split()[1:] for line in out if line.strip()[:1].isdigit()}
    assert table[5][0] == "2.0000" and table[10][0] == "1.5000" and table[15][0] == "-"
    assert table[10][-1] == "best" and table[15][-1] == "newest"
    assert any("wte/embedding" in line and "(10, 4)" in line and "float32" in line for line in out)
    assert out[-1].strip() == "total: 44 parameters (176 B)"


def test_errors_without_checkpoints(tmp_path, capsys):
    assert load_tool().main([str(tmp_path / "missing")]) == 2
    assert "has no checkpoints/ folder" in capsys.readouterr().err
