"""The recorded experiments (experiments/NAME/): each README's results table is the one its
results.csv gives, every `mean ± CI` its prose quotes is in that table, the CSV is what the
committed runs give, and a scaling-law fit block is its fit.json's."""

import json
import pathlib
import re

import pytest

from gpt_jax.sweep import report, runner, scaling

EXPERIMENTS = sorted(p.parent for p in (pathlib.Path(__file__).resolve().parent.parent
                                        / "experiments").glob("*/sweep.py"))
RECORDED = [e for e in EXPERIMENTS if (e / "results.csv").is_file()]


def test_every_experiment_is_indexed_and_documented():
    index = (EXPERIMENTS[0].parent / "README.md").read_text()
    for e in EXPERIMENTS:
        assert f"({e.name}/)" in index, f"experiments/README.md does not link {e.name}/"
        text = (e / "README.md").read_text()
        for heading in ("## Question", "## Setup", "## Results", "## Conclusion", "## Reproduce"):
            assert heading in text, f"{e.name}/README.md lacks {heading}"


@pytest.mark.parametrize("folder", RECORDED, ids=[e.name for e in RECORDED])
def test_readme_table_is_the_csvs(folder):
    block = report.readme_block(folder / "README.md")
    assert block is not None, f"{folder.name}/README.md has no results block"
    table = report.table_from_csv(folder / "results.csv")
    assert block.startswith(table), (f"{folder.name}: the README's table is not its results.csv's; "
                                     "run python -m gpt_jax.sweep experiments/NAME/sweep.py --report")
    assert block == (folder / "results.md").read_text()


@pytest.mark.parametrize("folder", RECORDED, ids=[e.name for e in RECORDED])
def test_numbers_in_the_prose_are_the_tables(folder):
    text = (folder / "README.md").read_text()
    tables = report.readme_block(folder / "README.md") + (
        report.readme_block(folder / "README.md", scaling.FIT_BEGIN, scaling.FIT_END) or "")
    prose = text.replace(tables, "")
    for quoted in re.findall(r"\d[\d,.]* ± [\d,.]*\d", prose):
        assert quoted in tables, f"{folder.name}/README.md quotes {quoted}, which its table lacks"


@pytest.mark.parametrize("folder", RECORDED, ids=[e.name for e in RECORDED])
def test_csv_is_what_the_committed_runs_give(folder, tmp_path):
    loaded = runner.load(str(folder / "sweep.py"))
    rows = report.collect(loaded, loaded.sweep.runs())
    report.write_csv(rows, tmp_path / "results.csv")
    assert (tmp_path / "results.csv").read_text() == (folder / "results.csv").read_text()


@pytest.mark.parametrize("folder", [e for e in RECORDED if (e / "fit.json").is_file()],
                         ids=lambda e: e.name)
def test_scaling_fit_is_the_csvs(folder):
    fit = json.loads((folder / "fit.json").read_text())
    rows = report.read_csv(folder / "results.csv")
    point = scaling.fit([float(r["params"]) for r in rows], [float(r["tokens"]) for r in rows],
                        [float(r["final_val_loss"]) for r in rows])
    for k in scaling.NAMES:
        assert point[k] == pytest.approx(fit["fit"][k], rel=1e-6), k
    assert report.readme_block(folder / "README.md", scaling.FIT_BEGIN,
                               scaling.FIT_END) == scaling.fit_block(fit)


def test_the_index_quotes_each_experiments_table():
    index = (EXPERIMENTS[0].parent / "README.md").read_text()
    for line in index.splitlines():
        link = re.match(r"\| \[(\w+)\]\(\w+/\) \| (.*) \|$", line)
        if not link:
            continue
        block = report.readme_block(EXPERIMENTS[0].parent / link.group(1) / "README.md") or ""
        for quoted in re.findall(r"\d[\d,.]* ± [\d,.]*\d", link.group(2)):
            assert quoted in block, f"experiments/README.md quotes {quoted} for {link.group(1)}"
