"""Sweep reports (gpt_jax/sweep/report.py, plots.py): the mean ± 95% t-interval equals a direct
computation, the CSV holds one row per finished run, the markdown table is a function of the CSV,
the README block is replaced in place, and the plots are valid PNG files."""

import json
import math
import pathlib
import statistics

import pytest

from gpt_jax.sweep import report, runner

# Two-sided 95% Student t quantiles t_{0.975, df}, from a printed table (independent of scipy).
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105}


@pytest.mark.parametrize("values", [[1.0, 2.0], [1.9, 2.1, 2.05], [3.0, 3.0, 3.5, 2.5, 3.1]])
def test_mean_ci_is_the_t_interval(values):
    mean, half, n = report.mean_ci(values)
    direct = T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    assert n == len(values)
    assert mean == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert half == pytest.approx(direct, rel=1e-8)


def test_mean_ci_of_one_and_none():
    assert report.mean_ci([2.0])[:1] == (2.0,) and math.isnan(report.mean_ci([2.0])[1])
    assert report.mean_ci([None, 1.0, math.nan, 3.0])[2] == 2
    assert math.isnan(report.mean_ci([])[0])


def _write_run(workdir: pathlib.Path, seed: int, losses: list[float], steps: int = 20,
               params: int = 1000, extra_eval: float | None = None) -> None:
    """A finished run's files as training writes them: config.json and metrics.jsonl."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"train": {"num_steps": steps, "seed": seed}}))
    rows = []
    for i, loss in enumerate(losses):
        step = i * steps // (len(losses) - 1)
        if step:
            rows.append({"step": step, "train/loss": loss + 0.1, "tokens_per_sec": 100.0 * (seed + 1),
                         "time": float(step), "tokens": step * 10, "flops": step * 1e6})
        rows.append({"step": step, "val/loss": loss, "params": params, "time": step + 0.5,
                     "tokens": step * 10, "flops": step * 1e6})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if extra_eval is not None:
        (workdir / runner.EVALS).mkdir()
        (workdir / runner.EVALS / "long.jsonl").write_text(json.dumps(
            {"text": [{"split": "train", "loss": 9.0}, {"split": "val", "loss": extra_eval}]}) + "\n")


@pytest.fixture
def finished(tmp_path):
    """A sweep of 2 points × 3 seeds (one run unfinished) with runs written under its runs/."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "sweep.py").write_text(
        "from gpt_jax.sweep import Eval, Sweep, axis\n\n"
        "def get_sweep():\n    return Sweep(config='configs/quickstart.py', "
        "points=axis('model.positions', ['rope', 'alibi']), seeds=(0, 1, 2), "
        "evals=[Eval('long')])\n")
    loaded = runner.load(str(exp / "sweep.py"))
    runs = loaded.sweep.runs()
    finals = {}
    for i, p in enumerate(runs[:-1]):
        final = 2.0 + 0.1 * i
        finals[p.name] = final
        _write_run(loaded.workdir(p), p.seed, [4.0, final - 0.05 * (i % 2), final],
                   extra_eval=final + 1)
    _write_run(loaded.workdir(runs[-1]), 2, [4.0, 3.0])  # Interrupted: no final val row.
    rows = (loaded.workdir(runs[-1]) / "metrics.jsonl").read_text().splitlines()
    (loaded.workdir(runs[-1]) / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    return loaded, runs, finals


def test_csv_has_a_row_per_finished_run(finished):
    loaded, runs, finals = finished
    rows = report.collect(loaded, runs)
    assert [r["run"] for r in rows] == [p.name for p in runs[:-1]]
    first = rows[0]
    assert first["final_val_loss"] == finals[first["run"]]
    assert first["best_val_loss"] == finals[first["run"]]  # Seed 0: the last is the lowest.
    assert rows[1]["best_val_loss"] == pytest.approx(finals[rows[1]["run"]] - 0.05)
    assert first["params"] == 1000 and first["train_flops"] == 20e6 and first["tokens"] == 200
    assert first["tokens_per_sec"] == 100.0 and first["wall_s"] == 20.5
    assert first["eval:long"] == pytest.approx(first["final_val_loss"] + 1)
    assert first["model.positions"] == "rope" and first["configuration"] == "positions=rope"


def test_table_is_computed_from_the_csv(finished, tmp_path):
    loaded, runs, finals = finished
    rows = report.collect(loaded, runs)
    report.write_csv(rows, tmp_path / "results.csv")
    table = report.table_from_csv(tmp_path / "results.csv")
    lines = table.splitlines()
    assert lines[0].startswith("| configuration | seeds | final val loss | best val loss | long |")
    rope = [finals[p.name] for p in runs[:3]]
    alibi = [finals[p.name] for p in runs[3:5]]
    for line, values, n in ((lines[2], rope, 3), (lines[3], alibi, 2)):
        mean = statistics.fmean(values)
        half = T975[n - 1] * statistics.stdev(values) / math.sqrt(n)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == str(n)
        assert cells[2] == f"{mean:.4f} ± {half:.4f}"
        assert cells[4] == f"{mean + 1:.4f} ± {half:.4f}"
    assert table == report.markdown_table(rows)  # The CSV loses nothing the table shows.


def test_readme_block_is_replaced_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    assert report.update_readme(readme, "| new |\n")
    assert readme.read_text() == f"# x\n\nbefore\n\n{report.BEGIN}\n| new |\n{report.END}\n\nafter\n"
    assert report.readme_block(readme) == "| new |\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not report.update_readme(plain, "x") and plain.read_text() == "no markers\n"


def test_report_writes_csv_table_plots_and_readme(finished, capsys):
    from gpt_jax.sweep import __main__ as sweep_main

    loaded = finished[0]
    exp = loaded.file.parent
    (exp / "README.md").write_text(f"# exp\n\n{report.BEGIN}\n{report.END}\n")
    sweep_main.main([str(loaded.file), "--report", "--svg"])
    assert "(1 of 6 runs not finished: left out)" in capsys.readouterr().out
    block = report.readme_block(exp / "README.md")
    assert block.startswith(report.table_from_csv(exp / "results.csv"))
    assert "5 runs; their wall times sum to" in block
    for name in ("curves.png", "points.png"):
        data = (exp / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
        from PIL import Image

        Image.open(exp / name).verify()
        assert (exp / name).with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    before = {n: (exp / n).read_bytes() for n in ("results.csv", "results.md", "curves.png")}
    sweep_main.main([str(loaded.file), "--report", "--svg"])  # The same runs: the same files.
    assert before == {n: (exp / n).read_bytes() for n in before}


def test_report_without_finished_runs_is_one_line(tmp_path):
    from gpt_jax.sweep import __main__ as sweep_main

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "sweep.py").write_text("from gpt_jax.sweep import Sweep\n\ndef get_sweep():\n"
                                  "    return Sweep(config='configs/quickstart.py')\n")
    with pytest.raises(runner.SweepError, match="no run of .* has finished"):
        sweep_main.main([str(exp / "sweep.py"), "--report"])


def test_eval_value_reads_val_loss_or_task_metric():
    assert report.eval_value({"text": [{"split": "all", "loss": 2.0}]}) == 2.0
    assert report.eval_value({"text": [], "tasks": [{"name": "t", "acc_norm": 0.3, "acc": 0.5}]}) == 0.5
    assert report.eval_value(None) is None
