"""tools/plan.py: an AOT plan on simulated devices, without allocating the model."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def plan(tmp_path, *flags):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), "--config=configs/quickstart.py",
                          f"--json={tmp_path / 'plan.json'}", *flags], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    return out, (json.loads((tmp_path / "plan.json").read_text())
                 if (tmp_path / "plan.json").exists() else None)


@pytest.mark.slow  # ~6 s: compiling for 4 simulated devices, whatever the model size.
def test_plan_reports_per_device_memory_and_flops(tmp_path):
    # One layer and 32 positions: a small compile for the 4 simulated devices.
    out, p = plan(tmp_path, "--config.mesh.fsdp=4", "--hbm_gb=80", "--config.model.num_layers=1",
                  "--config.data.seq_len=32")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fits" in out.stdout and p["devices"] == 4 and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    g = p["per_device_gb"]
    # FSDP over 4: each device holds a quarter of the float32 params and twice that in Adam moments.
    assert g["params"] == pytest.approx(p["parameters"] * 4 / 4 / 1e9, rel=0.02)
    assert g["optimizer_state"] == pytest.approx(2 * g["params"], rel=0.02)
    assert g["total"] >= g["arguments"] > 0 and p["fits"]
    flops = p["flops_per_step"]
    assert flops["xla_per_device"] == pytest.approx(flops["model_6N_plus_attention"] / 4, rel=0.3)


@pytest.mark.slow  # Compiles the quickstart step for 2 simulated devices in a subprocess.
def test_plan_that_does_not_fit_exits_2(tmp_path):
    out, p = plan(tmp_path, "--config.mesh.tensor=2", "--hbm_gb=0.001")
    assert out.returncode == 2 and "DOES NOT FIT" in out.stdout and not p["fits"]


@pytest.fixture
def scratch(tmp_path):
    """tmp_path with a config file that does not parse and a file where a folder goes."""
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "plan.json").mkdir()
    return tmp_path


def _plan(*args):
    return lambda tmp: [sys.executable, "tools/plan.py", *(a.format(tmp=tmp) for a in args)]


_Q = "--config=configs/quickstart.py"
# id, argv(tmp), words the error line must hold. Each row is a subprocess that stops before jax
# is imported (~0.3 s) unless it says otherwise; none may write the --json file.
PLAN_ROWS = [
    pytest.param(_plan("--config=configs/nope.py"),
                 ("--config=configs/nope.py", "no such file", "configs/quickstart.py"),
                 id="config-missing"),
    pytest.param(_plan("--config={tmp}/syntax.py"),
                 ("syntax.py", "SyntaxError", "line 1", "fix the config file"), id="config-syntax-error"),
    pytest.param(_plan("--config=configs/gpt2.py:huge"), ("unknown size 'huge'", "use one of"),
                 id="config-unknown-variant"),
    pytest.param(_plan(_Q, "--config.model=1"), ("config group 'model' is not a field", "--config.model."),
                 id="override-names-a-group"),
    pytest.param(_plan(_Q, "--num_devices=-3"), ("--num_devices=-3", "non-negative", "--helpshort"),
                 id="num-devices-negative"),
    pytest.param(_plan(_Q, "--num_devices=x"), ("--num_devices=x", "--helpshort"), id="num-devices-x"),
    pytest.param(_plan(_Q, "--hbm_gb=0"), ("--hbm_gb must be > 0", "--helpshort"), id="hbm-gb-0"),
    pytest.param(_plan(_Q, "extra"), ("unexpected arguments 'extra'", "--helpshort"),
                 id="stray-argument"),
    pytest.param(_plan(_Q, "--json={tmp}/plan.json"), ("plan.json is a folder", "give a file path"),
                 id="json-is-a-folder"),
    pytest.param(_plan(_Q, "--json={tmp}/afile/plan.json"), ("afile is a file", "choose another --json"),
                 id="json-under-a-file"),
    # jax imported (~2 s each): refused by the config's checks before anything is compiled.
    pytest.param(_plan(_Q, "--config.data.tokenizer=char", "--json={tmp}/out.json"),
                 ("the vocabulary",), id="corpus-dependent-vocab", marks=pytest.mark.slow),
    pytest.param(_plan(_Q, "--config.mesh.fsdp=3", "--num_devices=2", "--json={tmp}/out.json"),
                 ("not a multiple of 3", "choose sizes"), id="mesh-does-not-divide"),
]


@pytest.mark.parametrize("argv, words", PLAN_ROWS)
def test_bad_invocations_are_refused_in_one_line(argv, words, scratch, bad_invocation):
    """Every bad invocation: exit ≠ 0, one `error:` line naming the problem and the fix, no
    traceback, and no --json written."""
    bad_invocation(argv(scratch), *words, protect=[scratch], absent=[scratch / "out.json"], cwd=REPO)
