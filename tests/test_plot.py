"""`python -m gpt_jax.plot`: curves of runs' metrics.jsonl (fake workdirs, no training) as a valid
PNG (and SVG), seeds of one config drawn as one line, and bad input refused in one line."""

import json
import pathlib
import sys

import numpy as np
import pytest

from gpt_jax import plot
from gpt_jax.sweep import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(workdir: pathlib.Path, seed: int = 0, lr: float = 1e-3, steps=(0, 10, 20, 30),
             offset: float = 0.0) -> pathlib.Path:
    """A workdir as training leaves it, for the plot: config.json and metrics.jsonl with an eval
    row and a train row per step (64 tokens and 64e6 FLOPs a step)."""
    workdir.mkdir(parents=True)
    config = {"train": {"seed": seed, "num_steps": steps[-1]}, "optim": {"lr": lr}}
    (workdir / "config.json").write_text(json.dumps(config))
    rows = []
    for s in steps:
        rows.append({"step": s, "val/loss": 3.0 - 0.02 * s + offset, "params": 1000,
                     "tokens": 64 * s, "flops": 64e6 * s})
        if s:
            rows.append({"step": s, "train/loss": 3.1 - 0.02 * s + offset, "tokens": 64 * s,
                         "flops": 64e6 * s})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def legend(svg: pathlib.Path) -> set[str]:
    """The texts of an SVG figure (matplotlib draws text as paths, each after a comment of it)."""
    text = svg.read_text()
    return {part.split(" -->")[0] for part in text.split("<!-- ")[1:]}


def test_a_png_of_the_runs(tmp_path, capsys):
    from PIL import Image

    runs = [fake_run(tmp_path / "a"), fake_run(tmp_path / "b", lr=2e-3, offset=0.1)]
    out = tmp_path / "figs" / "curves.png"  # Its folder is made.
    plot.main([*map(str, runs), f"--out={out}"])
    assert capsys.readouterr().out.splitlines() == [f"wrote {out}"]
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(out) as image:
        image.verify()
    assert not out.with_suffix(".svg").exists()


def test_the_default_out_and_svg_beside_the_png(tmp_path, monkeypatch):
    """--out defaults to ./curves.png; --svg adds curves.svg; the same runs, the same bytes."""
    runs = [str(fake_run(tmp_path / "a")), str(fake_run(tmp_path / "b", offset=0.1))]
    monkeypatch.chdir(tmp_path)
    plot.main([*runs, "--svg", "--metric=train/loss"])
    png, svg = (tmp_path / "curves.png").read_bytes(), (tmp_path / "curves.svg").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and b"<svg" in svg[:1000]
    assert {"train/loss", runs[0], runs[1]} <= legend(tmp_path / "curves.svg")
    plot.main([*runs, "--svg", "--metric=train/loss", "--out=again"])  # No suffix: again.png.
    assert (tmp_path / "again.png").read_bytes() == png
    assert (tmp_path / "again.svg").read_bytes() == svg


def test_seeds_of_one_config_are_one_line(tmp_path):
    """--seeds: runs whose configs differ only in train.seed share a legend entry; another lr,
    its own. Without --seeds, a line per run."""
    a, b = fake_run(tmp_path / "a", seed=0), fake_run(tmp_path / "b", seed=1, offset=0.05)
    c = fake_run(tmp_path / "c", seed=0, lr=2e-3)
    out = tmp_path / "fig.png"
    plot.main([str(a), str(b), str(c), "--seeds", "--svg", f"--out={out}"])
    labels = legend(out.with_suffix(".svg"))
    assert {f"{a} (2 seeds)", str(c)} <= labels and str(b) not in labels
    plot.main([str(a), str(b), str(c), "--svg", f"--out={out}"])
    labels = legend(out.with_suffix(".svg"))
    assert {str(a), str(b), str(c)} <= labels and f"{a} (2 seeds)" not in labels


def test_curve_keeps_the_last_row_of_a_step(tmp_path):
    run = fake_run(tmp_path / "a", steps=(0, 10, 20))
    with open(run / "metrics.jsonl", "a") as f:  # A repeated final eval; a line cut by a kill.
        f.write(json.dumps({"step": 20, "val/loss": 1.5, "tokens": 1280, "flops": 1.28e9}) + "\n")
        f.write('{"step": 30, "val/lo')
    c = plots.curve(run, "val/loss")
    np.testing.assert_array_equal(c["step"], [0, 10, 20])
    np.testing.assert_allclose(c["val/loss"], [3.0, 2.8, 1.5])
    np.testing.assert_array_equal(c["tokens"][1:], [640, 1280])
    np.testing.assert_array_equal(c["flops"][1:], [640e6, 1.28e9])
    assert plots.curve(run, "eval/none")["step"].size == 0


def test_curve_keeps_a_metric_of_zero(tmp_path):
    run = fake_run(tmp_path / "a", steps=(0, 10))
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 20, "train/nonfinite_steps": 0, "tokens": 1280}) + "\n")
    np.testing.assert_array_equal(plots.curve(run, "train/nonfinite_steps")["train/nonfinite_steps"], [0])


@pytest.mark.parametrize("case, words", [
    ("no_metrics", ["has no metrics.jsonl"]),
    ("no_config", ["config.json", "--seeds"]),
    ("unknown_metric", ["--metric=val/acc", "no row"]),
    ("not_png", ["--out=", ".png"]),
])
def test_bad_input_is_refused_in_one_line(tmp_path, bad_invocation, case, words):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "out" / "fig.png"
    args = {"no_metrics": [tmp_path / "cache"],
            "no_config": [run, "--seeds"],
            "unknown_metric": [run, "--metric=val/acc"],
            "not_png": [run]}[case]
    if case == "no_metrics":
        (tmp_path / "cache").mkdir()
    elif case == "no_config":
        (run / "config.json").unlink()
    if case == "not_png":
        out = out.with_suffix(".jpg")
    r = bad_invocation([sys.executable, "-m", "gpt_jax.plot", *args, f"--out={out}"], *words,
                       protect=[run], absent=[out.parent], cwd=pathlib.Path(__file__).parent.parent)
    assert r.returncode == 1 and r.stderr.startswith("error:")
