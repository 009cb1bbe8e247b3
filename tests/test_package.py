"""The project as an installed package: the wheel holds gpt_jax and its recipes (not tests,
tools or experiments), and `python -m gpt_jax.train` runs from another directory, finding the
default recipe and `--config=configs/NAME.py` in the package."""

import json
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # Built from a copy of the project's files: an in-tree build leaves build/ behind, and its
    # stale copies could end up in the wheel.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    # No build isolation and no dependencies: the environment's setuptools and packages, offline.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(source)], check=True, capture_output=True)
    (path,) = out.glob("gpt_jax-*.whl")
    return path


def test_the_wheel_holds_the_package_and_its_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("gpt_jax/train.py", "gpt_jax/models/registry.py", "configs/base.py",
                 "configs/quickstart.py", "configs/shakespeare_char.py"):
        assert want in names
    assert not [n for n in names if n.startswith(("tests/", "tools/", "experiments/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gpt-jax-train = gpt_jax.train:run_main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_installed_train_runs_from_any_directory(wheel, tmp_path, corpus):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    overrides = [f"--config.data.path={corpus}", f"--config.data.cache_dir={tmp_path / 'cache'}",
                 "--config.train.num_steps=2", "--config.train.eval_every=2",
                 "--config.train.eval_batches=1", "--config.sample.num_samples=0",
                 "--config.model.num_layers=1", "--config.data.seq_len=16",
                 "--config.train.batch_size=2", "--config.log.tensorboard=False"]
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for config in ([], ["--config=configs/shakespeare_char.py:cpu"]):
        r = subprocess.run([sys.executable, "-m", "gpt_jax.train", *config, *overrides,
                            f"--workdir={tmp_path / 'run'}{len(config)}"], cwd=elsewhere,
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "trained to step 2" in r.stderr
        saved = json.loads((tmp_path / f"run{len(config)}" / "config.json").read_text())
        assert saved["data"]["tokenizer"] == ("char" if config else "byte")  # The recipe's.
