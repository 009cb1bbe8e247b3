"""A sweep's report, read only from its runs' metrics.jsonl, config.json and eval records:
results.csv (one row per run), a markdown table (per configuration, the mean ± 95% confidence
interval over seeds, Student's t), and the experiment README's results block.

The table is a function of the CSV alone (`table_from_csv`), so a test can recompute a committed
README's numbers from the committed CSV.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from gpt_jax import cli
from gpt_jax.sweep import runner
from gpt_jax.sweep.declare import Point

# The CSV's metric columns, in order, and how the table shows each: (column, heading, format,
# with a confidence interval).
METRICS = (
    ("final_val_loss", "final val loss", "{:.4f}", True),
    ("best_val_loss", "best val loss", "{:.4f}", True),
    ("params", "params", "{:,.0f}", False),
    ("train_flops", "train FLOPs", "{:.3g}", False),
    ("tokens", "tokens", "{:,.0f}", False),
    ("tokens_per_sec", "tokens/s", "{:,.0f}", True),
    ("wall_s", "wall s", "{:,.0f}", True),
)
EVAL_PREFIX = "eval:"  # CSV columns of the sweep's evals: eval:NAME.
BEGIN = "<!-- results: written by python -m gpt_jax.sweep SWEEP --report; do not edit -->"
END = "<!-- end of results -->"


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided `level` t-interval, n) of the finite `values`; the
    half-width is nan for fewer than two."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if x.size == 0:
        return math.nan, math.nan, 0
    if x.size == 1:
        return float(x[0]), math.nan, 1
    sem = x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(stats.t.ppf(0.5 + level / 2, x.size - 1) * sem), int(x.size)


def read_rows(workdir: pathlib.Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows (lines cut by a kill left out)."""
    rows = []
    path = workdir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def run_summary(workdir: pathlib.Path, num_steps: int) -> dict[str, Any]:
    """One run's report columns from its metrics rows (METRICS' names)."""
    rows = read_rows(workdir)
    final = runner.final_row(workdir, num_steps) or {}
    # Best: over the evaluations of the final one's kind (val/split), the only comparable ones:
    # periodic evals score fixed batches, a full final eval every val token.
    val = [r for r in rows if isinstance(r.get("val/loss"), float | int)
           and r.get("val/split") == final.get("val/split")]
    speeds = [r["tokens_per_sec"] for r in rows if isinstance(r.get("tokens_per_sec"), float | int)]
    last = rows[-1] if rows else {}
    return {
        "final_val_loss": final.get("val/loss"),
        "best_val_loss": min((r["val/loss"] for r in val), default=None),
        "params": final.get("params"),
        "train_flops": last.get("flops"),
        "tokens": last.get("tokens"),
        "tokens_per_sec": float(np.median(speeds)) if speeds else None,
        "wall_s": last.get("time"),
    }


def eval_value(record: dict[str, Any] | None) -> float | None:
    """An evaluate record's number: the val split's loss (else the last text split's), or the
    first task's main metric."""
    if not record:
        return None
    text = record.get("text") or []
    if text:
        chosen = next((t for t in text if t.get("split") == "val"), text[-1])
        return chosen.get("loss")
    for task in record.get("tasks") or []:
        for key in ("acc", "exact_match", "acc_norm"):
            if key in task:
                return task[key]
    return None


def collect(loaded: runner.Loaded, points: Sequence[Point]) -> list[dict[str, Any]]:
    """The CSV rows of the finished runs of `points` (unfinished ones are left out)."""
    keys = list(dict.fromkeys(k for p in points for k in p.overrides))
    out = []
    for p in points:
        workdir = loaded.workdir(p)
        config = json.loads((workdir / "config.json").read_text()) if (
            workdir / "config.json").is_file() else None
        if config is None:
            continue
        num_steps = config["train"]["num_steps"]
        if runner.final_row(workdir, num_steps) is None:
            continue
        row = {"run": p.name, "configuration": p.label, "seed": p.seed}
        row.update({k: p.overrides.get(k, "") for k in keys})
        row.update(run_summary(workdir, num_steps))
        for e in loaded.sweep.evals:
            row[EVAL_PREFIX + e.name] = eval_value(runner.eval_record(workdir, e.name))
        out.append(row)
    return out


def write_csv(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k)) for k in columns})
    cli.write_atomically({path: buf.getvalue()})


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else v  # Full precision: the table is recomputed.


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration (in order of first appearance): n and, for every metric and eval
    column, (mean, CI half-width)."""
    columns = [m[0] for m in METRICS] + [k for k in rows[0] if k.startswith(EVAL_PREFIX)] \
        if rows else []
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["configuration"], []).append(r)
    out = []
    for label, members in groups.items():
        entry: dict[str, Any] = {"configuration": label, "n": len(members)}
        for col in columns:
            entry[col] = mean_ci([_number(str(m.get(col, ""))) for m in members])[:2]
        out.append(entry)
    return out


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results table: one line per configuration, mean ± 95% CI over its seeds."""
    groups = aggregate(rows)
    if not groups:
        return "(no finished runs yet)\n"
    evals = [k for k in groups[0] if k.startswith(EVAL_PREFIX)]
    shown = [(c, h, f, ci) for c, h, f, ci in METRICS
             if any(not math.isnan(g[c][0]) for g in groups)
             # Best is the final where that is the only comparable evaluation (a full final).
             and not (c == "best_val_loss" and all(g[c] == g["final_val_loss"] for g in groups))]
    losses = sum(c in ("final_val_loss", "best_val_loss") for c, _, _, _ in shown)
    head = ["configuration", "seeds", *(h for _, h, _, _ in shown[:losses]),
            *(e.removeprefix(EVAL_PREFIX) for e in evals), *(h for _, h, _, _ in shown[losses:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [g["configuration"], str(g["n"])]
        cells += [_fmt(g[c], f, ci) for c, _, f, ci in shown[:losses]]
        cells += [_fmt(g[e], "{:.4f}", True) for e in evals]
        cells += [_fmt(g[c], f, ci) for c, _, f, ci in shown[losses:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: tuple[float, float], form: str, ci: bool) -> str:
    mean, half = value
    if math.isnan(mean):
        return "n/a"
    if not ci or math.isnan(half):
        return form.format(mean)
    return f"{form.format(mean)} ± {form.format(half)}"


def table_from_csv(path: pathlib.Path) -> str:
    """markdown_table of a results.csv (what `--report` wrote beside it)."""
    return markdown_table(read_csv(path))


def summary_line(rows: Sequence[dict[str, Any]], launches: Sequence[dict[str, Any]]) -> str:
    """Runs, their summed wall time, and the launches' machine and elapsed time."""
    total = sum(_number(str(r.get("wall_s", ""))) or 0.0 for r in rows)
    text = f"{len(rows)} runs; their wall times sum to {total / 60:.1f} min"
    # Relaunches that found every run done did no work; the others' time counts.
    launches = [x for x in launches if x.get("ran") or x.get("failed") or x.get("stopped")]
    if launches:
        elapsed = sum(float(x.get("seconds", 0)) for x in launches)
        hosts = sorted({f"{x.get('cpus')} × {x.get('cpu')}" for x in launches})
        text += (f"; the {len(launches)} launch(es) that ran them took {elapsed / 60:.1f} min "
                 f"together (trainings plus evals; SLURM tasks' times add up) on "
                 f"{'; '.join(hosts)}")
    return text + "."


def update_readme(readme: pathlib.Path, block: str, begin: str = BEGIN, end: str = END) -> bool:
    """Replaces the text between the `begin` and `end` lines in `readme` with `block`; False if
    it has no such markers (nothing is written then)."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    # Whole or not at all: the README's prose is hand-written.
    cli.write_atomically({readme: pattern.sub(lambda _: f"{begin}\n{block}{end}", text, count=1)})
    return True


def readme_block(readme: pathlib.Path, begin: str = BEGIN, end: str = END) -> str | None:
    """The text between the `begin` and `end` lines, or None."""
    text = readme.read_text() if readme.is_file() else ""
    match = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, re.S)
    return match.group(1) if match else None


def launches(root: pathlib.Path) -> list[dict[str, Any]]:
    path = root / runner.SWEEP_LOG
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:  # Cut by a kill, or two SLURM tasks appending at once.
            continue
    return out
