"""gpt_jax/cli.py: the one-line errors every command ends with, and the library noise it drops."""

import errno
import logging

import pytest

from gpt_jax import cli


def test_os_errors_name_the_path_and_the_fix():
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")
    assert cli.os_error(missing) == "/x/y: No such file or directory; check the path."
    readonly = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")
    assert cli.os_error(readonly).endswith("the file system is read-only: choose a writable path.")
    assert cli.os_error(OSError("odd")) == "odd."
    assert cli.os_error(OSError("a sentence of our own.")) == "a sentence of our own."


def test_errors_become_one_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as e, cli.errors_as_one_line():
        raise ValueError("two\n  lines")
    assert e.value.code == 1 and capsys.readouterr().err == "error: two lines\n"
    with pytest.raises(SystemExit), cli.errors_as_one_line():
        raise PermissionError(errno.EACCES, "Permission denied", "/root/x")
    assert capsys.readouterr().err.startswith("error: /root/x: Permission denied; check its")
    with pytest.raises(KeyError), cli.errors_as_one_line():  # A bug keeps its traceback.
        raise KeyError("bug")


def test_a_traceback_on_request(capsys, monkeypatch):
    monkeypatch.setenv("GPT_JAX_TRACEBACK", "1")
    with pytest.raises(SystemExit), cli.errors_as_one_line():
        raise ValueError("deep inside")
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: deep inside\n")


def record(pathname: str, msg: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("x", level, pathname, 1, msg, None, None)


def test_library_noise_is_dropped_and_the_rest_kept():
    assert cli._noise(record("/jax/_src/xla_bridge.py", "Unable to initialize backend 'tpu': …"))
    gpu = record("/jax/_src/xla_bridge.py", "An NVIDIA GPU may be present on this …", logging.WARNING)
    assert not cli._noise(gpu) and cli.jax_fallback_warning(gpu)  # Dropped by train only.
    assert cli._noise(record("/site/orbax/checkpoint/checkpoint.py",
                             "Metadata file does not exist: /w/checkpoints/3/state/_CHECKP…",
                             logging.WARNING))
    assert not cli._noise(record("/site/orbax/checkpoint/x.py", "Save failed", logging.ERROR))
    assert not cli._noise(record("/gpt_jax/training/loop.py", "Unable to initialize backend"))


def test_recipes_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shakespeare = cli.recipes_dir() / "shakespeare_char.py"
    assert cli.resolve_config_args(["prog", "--config=configs/shakespeare_char.py:cpu", "--x=1"]) == [
        "prog", f"--config={shakespeare}:cpu", "--x=1"]
    assert cli.resolve_config_args(["--config=gpt2.py:small"]) == [
        f"--config={cli.recipes_dir() / 'gpt2.py'}:small"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "gpt2.py").write_text("")  # A file here wins over the recipe.
    assert cli.resolve_config_args(["--config=configs/gpt2.py"]) == ["--config=configs/gpt2.py"]
    assert cli.resolve_config_args(["--config=configs/nope.py"]) == ["--config=configs/nope.py"]


def test_write_atomically_writes_all_or_leaves_what_was_there(tmp_path):
    a, blocker = tmp_path / "a.json", tmp_path / "blocker"
    a.write_text("old")
    blocker.write_text("a file where a folder must go")
    with pytest.raises(OSError):
        cli.write_atomically({a: "new", blocker / "b.json": "new"})
    assert a.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "blocker"]
    cli.write_atomically({a: "new", tmp_path / "sub" / "b.json": "b"})
    assert a.read_text() == "new" and (tmp_path / "sub" / "b.json").read_text() == "b"


@pytest.mark.slow  # Three commands (~12 s).
def test_a_configs_package_in_the_current_folder_does_not_hide_the_recipes(tmp_path):
    """`python -m` puts the current folder first on sys.path; a research project's own configs/
    package there must not replace gpt_jax's recipes, the base config every command checks
    against, or `from configs import base` in a copy of a recipe."""
    import subprocess
    import sys

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("")
    (tmp_path / "configs" / "other.py").write_text("X = 1\n")
    (tmp_path / "mine.py").write_text(
        "from configs import base\n\n\ndef get_config():\n    c = base.get_config()\n"
        "    c.model.num_heads = 3\n    return c\n")
    env = {"PYTHONPATH": str(cli.recipes_dir().parent), "PATH": "/usr/bin:/bin"}
    for argv, want in (
            (["gpt_jax.train", "--config=configs/shakespeare_char.py:cpu",
              "--config.model.num_heads=3"], "error: model.num_heads=3 does not divide"),
            (["gpt_jax.train", "--config=mine.py"], "error: model.num_heads=3 does not divide"),
            (["gpt_jax.sample", f"--workdir={tmp_path}"], "error: ")):
        r = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True,
                           text=True, env=env)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith(want), r.stderr[-2000:]
