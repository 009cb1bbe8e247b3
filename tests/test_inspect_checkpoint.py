"""tools/inspect_checkpoint.py: the checkpoint table and the parameter tree."""

import importlib.util
import json
import os
import pathlib
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from gpt_jax.data import pipeline
from gpt_jax.training import checkpoint

TOOL = pathlib.Path(__file__).resolve().parent.parent / "tools" / "inspect_checkpoint.py"


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch):
    """main() quiets Orbax's read-only warnings for the command's process; in this one, the
    filters would outlive the test."""
    from gpt_jax import cli

    monkeypatch.setattr(cli, "quiet_orbax_reads", lambda: None)


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
    with pytest.raises(SystemExit) as e:
        load_tool().main([str(tmp_path / "missing")])
    assert e.value.code == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'missing'}: no such folder; give a "
                                       "workdir, its checkpoints/ or params/ folder, or one step's "
                                       "folder.\n")


def _argv(*args) -> list[str]:
    return [sys.executable, str(TOOL), *map(str, args)]


def _halve(relative: str):
    """Truncates a file of the run to half its size (a write cut short)."""
    def damage(run: pathlib.Path) -> None:
        path = run / relative
        os.truncate(path, path.stat().st_size // 2)
    return damage


def _write(relative: str, text: str):
    return lambda run: (run / relative).write_text(text)


def _empty_checkpoints(run: pathlib.Path) -> None:
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()


# id, argv(trained run, tmp_path, damaged_run), words the error line must hold. Each row is one subprocess
# (~1.5 s); rows whose path a default row already takes run with --runslow.
ROWS = [
    pytest.param(lambda run, tmp, damaged: _argv(), ("required: workdir", "usage:"), id="no-argument"),
    pytest.param(lambda run, tmp, damaged: _argv(tmp / "nope"),
                 ("nope: no such folder", "give a workdir"), id="missing"),
    pytest.param(lambda run, tmp, damaged: _argv(run / "config.json"),
                 ("is a file, not a folder", "give a workdir"), id="a-file", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _argv(tmp),
                 ("is not a training run", "give a run's workdir"), id="not-a-run", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _argv(damaged(_empty_checkpoints)),
                 ("holds no checkpoint yet", "inspect it after the first save"), id="checkpoints-empty"),
    pytest.param(lambda run, tmp, damaged: _argv(run, "--step=9"),
                 ("no checkpoint of step 9", "choose one of 2, 4 with --step"), id="step-absent"),
    pytest.param(lambda run, tmp, damaged: _argv(run, "--step=abc"),
                 ("--step", "'abc' is not a step number", "--step=1000"), id="step-abc",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _argv(run, "extra"),
                 ("unrecognized arguments: extra", "usage:"), id="stray-argument",
                 marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _argv(damaged(_halve("checkpoints/4/state/_METADATA"))),
                 ("parameter tree of checkpoint step 4", "missing or damaged",
                  "inspect another step with --step (2)"), id="metadata-truncated"),
    pytest.param(lambda run, tmp, damaged: _argv(damaged(_write("checkpoints/4/state/_METADATA",
                                                                "garbage"))),
                 ("parameter tree of checkpoint step 4", "missing or damaged", "--step (2)"),
                 id="metadata-garbage", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _argv(damaged(damaged.truncate_arrays)),
                 ("parameter tree of checkpoint step 4", "missing or damaged", "--step (2)"),
                 id="array-index-truncated", marks=pytest.mark.slow),
    pytest.param(lambda run, tmp, damaged: _argv(damaged(_write("checkpoints/4/metrics/metrics",
                                                                "{garbage"))),
                 ("4/metrics/metrics is damaged", "move that file out of the way"),
                 id="metrics-garbage", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("argv, words", ROWS)
def test_bad_invocations_are_refused_in_one_line(argv, words, trained_run, tmp_path, damaged_run,
                                                 bad_invocation):
    """Every bad invocation: exit ≠ 0, one `error:` line naming the problem and the fix, no
    traceback, nothing changed, and no half table on stdout."""
    r = bad_invocation(argv(trained_run, tmp_path, damaged_run), *words,
                       protect=(trained_run, tmp_path))
    assert r.stdout == ""


def test_a_step_folder_is_inspected(trained_run, capsys):
    """One step's folder (what weights.params_source takes) shows that step's tree."""
    assert load_tool().main([str(trained_run / "checkpoints" / "2")]) == 0
    out = capsys.readouterr().out
    assert "parameters at step 2" in out and "wte/embedding" in out
