"""Plots of runs' metrics (matplotlib, headless Agg backend): val loss against step, tokens and
training FLOPs with one line per configuration (the mean over its seeds, a 95% t-interval
shaded), and the final loss (and the sweep's evals) per configuration with error bars.

PNG files carry no timestamp and SVG ids a fixed salt, so the same runs give the same files.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # Headless: no display on clusters or in CI.
import matplotlib.pyplot as plt
import numpy as np

from gpt_jax.sweep.report import EVAL_PREFIX, aggregate, mean_ci, read_rows

X_AXES = (("step", "step"), ("tokens", "tokens"), ("flops", "training FLOPs"))
_PNG_META = {"Software": None}
_SVG_META = {"Date": None, "Creator": None}


def curve(workdir: pathlib.Path, metric: str) -> dict[str, np.ndarray]:
    """A run's rows that have `metric`: arrays of step, tokens, flops and the metric's values.
    A step logged twice (e.g. an eval repeated at the end) keeps its last row."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_rows(workdir):
        if isinstance(row.get(metric), float | int):
            by_step[row["step"]] = row
    steps = sorted(by_step)
    # 0 or a missing count (a row before any training) has no place on the log-scaled axes.
    return {"step": np.asarray(steps, np.float64),
            **{k: np.asarray([by_step[s].get(k) or math.nan for s in steps], np.float64)
               for k in ("tokens", "flops")},
            metric: np.asarray([float(by_step[s][metric]) for s in steps], np.float64)}


def _group_band(curves: Sequence[dict[str, np.ndarray]], x: str, metric: str):
    """Mean and CI of `metric` over runs at the steps all of them logged."""
    common = set(curves[0]["step"].tolist())
    for c in curves[1:]:
        common &= set(c["step"].tolist())
    steps = sorted(common)
    xs, means, halves = [], [], []
    for s in steps:
        idx = [int(np.searchsorted(c["step"], s)) for c in curves]
        xs.append(float(np.mean([c[x][i] for c, i in zip(curves, idx, strict=True)])))
        mean, half, _ = mean_ci([float(c[metric][i]) for c, i in zip(curves, idx, strict=True)])
        means.append(mean)
        halves.append(0.0 if math.isnan(half) else half)
    return np.asarray(xs), np.asarray(means), np.asarray(halves)


def curves_figure(groups: dict[str, list[pathlib.Path]], out: pathlib.Path,
                  metric: str = "val/loss", svg: bool = False) -> list[pathlib.Path]:
    """One figure, three panels: `metric` against step, tokens and training FLOPs; a line per
    group of runs (its seeds), the 95% CI shaded. Returns the files written."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for label, workdirs in groups.items():
        runs = [curve(w, metric) for w in workdirs]
        runs = [c for c in runs if c["step"].size]
        if not runs:
            continue
        color = None
        for ax, (x, name) in zip(axes, X_AXES, strict=True):
            xs, mean, half = _group_band(runs, x, metric)
            if not np.isfinite(xs).any():
                ax.set_title(f"{metric} vs {name} (not logged)")
                continue
            (line,) = ax.plot(xs, mean, label=label, color=color, lw=1.4)
            color = line.get_color()
            ax.fill_between(xs, mean - half, mean + half, color=color, alpha=0.2, lw=0)
    for ax, (x, name) in zip(axes, X_AXES, strict=True):
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        xs = np.concatenate([line.get_xdata() for line in ax.get_lines()] or [np.ones(1)])
        xs = xs[np.isfinite(xs) & (xs > 0)]
        if x != "step" and xs.size and xs.max() > 20 * xs.min():  # Log where it spans decades.
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # No crowded labels.
        ax.grid(alpha=0.3)
        _zoom(ax)
    axes[0].legend(fontsize=8)
    return _save(fig, out, svg)


def _zoom(ax, top: float = 0.9) -> None:
    """Shows the curves' informative part: early steps' loss (≈ log V) would flatten the rest;
    the y-axis ends at the `top` quantile of the values."""
    ys = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [np.zeros(0)])
    ys = ys[np.isfinite(ys)]
    if ys.size:
        low, high = float(ys.min()), float(np.quantile(ys, top))
        pad = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)


def points_figure(rows: Sequence[dict[str, Any]], out: pathlib.Path, svg: bool = False
                  ) -> list[pathlib.Path]:
    """Final (and best) val loss per configuration, mean with its 95% CI as error bars, and
    beside it the sweep's evals (one line per configuration across them) if it has any."""
    groups = aggregate(rows)
    evals = [k for k in (groups[0] if groups else {}) if k.startswith(EVAL_PREFIX)]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(13 if evals else 7, 4.2),
                             constrained_layout=True, squeeze=False)
    ax = axes[0][0]
    labels = [g["configuration"] for g in groups]
    shown = [("final_val_loss", "final")]
    if any(g["best_val_loss"] != g["final_val_loss"] for g in groups):
        shown.append(("best_val_loss", "best"))
    for offset, (col, name) in enumerate(shown):
        means = [g[col][0] for g in groups]
        halves = [0.0 if math.isnan(g[col][1]) else g[col][1] for g in groups]
        ax.errorbar(np.arange(len(groups)) + 0.12 * offset, means, yerr=halves, fmt="o",
                    capsize=4, label=f"{name} val loss")
    ax.set_xticks(np.arange(len(groups)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("val loss (mean ± 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if evals:
        ax = axes[0][1]
        for g in groups:
            means = [g[e][0] for e in evals]
            halves = [0.0 if math.isnan(g[e][1]) else g[e][1] for e in evals]
            ax.errorbar(np.arange(len(evals)), means, yerr=halves, fmt="o-", capsize=4,
                        label=g["configuration"])
        ax.set_xticks(np.arange(len(evals)), [e.removeprefix(EVAL_PREFIX) for e in evals])
        ax.set_ylabel("eval value (mean ± 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out, svg)


def position_curve(record: dict[str, Any] | None) -> np.ndarray | None:
    """An evaluate record's per-position val losses (`--per_position`), or None."""
    for row in (record or {}).get("text") or []:
        if row.get("split") == "val" and "per_position" in row:
            return np.asarray(row["per_position"], np.float64)
    return None


def positions_figure(groups: dict[str, list[np.ndarray]], out: pathlib.Path, title: str,
                     svg: bool = False) -> list[pathlib.Path]:
    """Val loss against context length (tokens seen, log scale): per configuration the mean of
    its runs' per-position losses, the 95% CI shaded."""
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for label, curves in groups.items():
        length = min(c.size for c in curves)
        stacked = np.stack([c[:length] for c in curves])
        stats_L = [mean_ci(stacked[:, t].tolist()) for t in range(length)]
        mean = np.asarray([m for m, _, _ in stats_L])
        half = np.asarray([0.0 if math.isnan(h) else h for _, h, _ in stats_L])
        xs = np.arange(1, length + 1)
        (line,) = ax.plot(xs, mean, label=label, lw=1.4)
        ax.fill_between(xs, mean - half, mean + half, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens seen)")
    ax.set_ylabel("val loss at that position")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _zoom(ax, top=1.0)  # Every position: the first ones, with the least context, included.
    return _save(fig, out, svg)


def _save(fig, out: pathlib.Path, svg: bool) -> list[pathlib.Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out.with_suffix(".png")]
    fig.savefig(written[0], dpi=110, metadata=_PNG_META)
    if svg:
        written.append(out.with_suffix(".svg"))
        with plt.rc_context({"svg.hashsalt": "gpt_jax"}):
            fig.savefig(written[1], metadata=_SVG_META)
    plt.close(fig)
    return written
