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


def test_plan_refuses_a_corpus_dependent_vocab(tmp_path):
    out, _ = plan(tmp_path, "--config.data.tokenizer=char")
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("error: the vocabulary")
