"""Chinchilla's parametric scaling law fitted to a sweep's results (Hoffmann et al. 2022, approach
3): L(N, D) = E + A / N^α + B / D^β, N parameters, D training tokens.

As the paper: the Huber loss (δ = 1e-3) of log L̂ − log L, with L̂ = exp(LSE(a − α log N,
b − β log D, e)) (a = log A, b = log B, e = log E), minimised by L-BFGS. Its start comes from a
grid over (α, β), where L is linear in (E, A, B) and a non-negative least-squares solve gives
them (instead of the paper's 5⁵ grid of L-BFGS starts: minutes on a CPU, and the same optimum on
every test we ran). 95% intervals are bootstrap percentiles: runs resampled with replacement within
each (N, D) cell, so every resample keeps the design, each refitted from its own grid start.
Compute-optimal allocation follows: N_opt ∝ C^(β/(α+β)), D_opt ∝ C^(α/(α+β)) with C ≈ 6·N·D.

`python -m gpt_jax.sweep.scaling RESULTS.csv` prints the fit; a sweep that lists `report` in
Sweep.analyses gets fit.json, scaling.png and its README's fit block from every --report.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special

from gpt_jax.sweep import report as report_lib

NAMES = ("E", "A", "B", "alpha", "beta")
FIT_BEGIN = "<!-- fit: written by python -m gpt_jax.sweep SWEEP --report; do not edit -->"
FIT_END = "<!-- end of fit -->"
_DELTA = 1e-3  # Huber δ (Chinchilla).
_EXPONENTS = np.arange(0.05, 2.0001, 0.05)  # The (α, β) grid of starting points.


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    r = special.logsumexp(terms, axis=0) - log_l
    huber = np.where(np.abs(r) <= _DELTA, 0.5 * r**2, _DELTA * (np.abs(r) - 0.5 * _DELTA))
    # Gradient: the Huber derivative through the log-sum-exp's softmax weights.
    dr = np.clip(r, -_DELTA, _DELTA)
    w = np.exp(terms - special.logsumexp(terms, axis=0))
    grad = np.array([np.sum(dr * w[0]), np.sum(dr * w[1]), np.sum(dr * w[2]),
                     -np.sum(dr * w[0] * log_n), -np.sum(dr * w[1] * log_d)])
    return float(np.sum(huber)), grad


def _minimise(start: np.ndarray, data) -> optimize.OptimizeResult:
    return optimize.minimize(_objective, start, args=data, jac=True, method="L-BFGS-B",
                             options={"maxiter": 2000, "gtol": 1e-12, "ftol": 1e-15})


def fit(n: Sequence[float], d: Sequence[float], loss: Sequence[float],
        start: np.ndarray | None = None) -> dict[str, float]:
    """{E, A, B, alpha, beta} of the fit (and `_theta`, its (a, b, e, α, β)); from `start` if
    given, else from the best point of the linear (α, β) grid."""
    data = (np.log(np.asarray(n, np.float64)), np.log(np.asarray(d, np.float64)),
            np.log(np.asarray(loss, np.float64)))
    best = _minimise(start if start is not None else _grid_start(*data), data)
    a, b, e, alpha, beta = best.x
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha),
            "beta": float(beta), "_theta": best.x.tolist()}


def _grid_start(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    """(a, b, e, α, β) of the (α, β) grid point whose non-negative least-squares (E, A, B) fits
    L best in relative error."""
    loss = np.exp(log_l)
    best, start = math.inf, None
    for alpha, beta in itertools.product(_EXPONENTS, _EXPONENTS):
        # Columns scaled by 1/L: relative errors, as the log-space objective weighs them.
        x = np.stack([np.ones_like(loss), np.exp(-alpha * log_n), np.exp(-beta * log_d)], 1)
        coef, err = optimize.nnls(x / loss[:, None], np.ones_like(loss))
        if err < best:
            best = err
            e, a, b = np.log(np.maximum(coef, 1e-12))
            start = np.array([a, b, e, alpha, beta])
    return start


def predict(params: dict[str, float], n, d) -> np.ndarray:
    """L̂(N, D) of a fit."""
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


def bootstrap(n, d, loss, cells: Sequence[object], point: dict, resamples: int = 500,
              seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of each parameter (and of N_opt's exponent β/(α+β)) over
    `resamples` refits of runs resampled within their cells, each from its own grid start (a
    refit started at the point estimate would stay near it where the loss is flat)."""
    n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
    groups: dict[object, list[int]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault(cell, []).append(i)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(members, size=len(members)) for members in groups.values()])
        f = fit(n[idx], d[idx], loss[idx])
        draws.append([f[k] for k in NAMES] + [f["beta"] / (f["alpha"] + f["beta"])])
    draws = np.asarray(draws)
    names = (*NAMES, "n_opt_exponent")
    return {k: (float(np.percentile(draws[:, j], 2.5)), float(np.percentile(draws[:, j], 97.5)))
            for j, k in enumerate(names)}


def analyse(rows: Sequence[dict[str, str]], resamples: int = 500) -> dict:
    """The fit of a results.csv's rows: point estimate, intervals, and the fit's residuals."""
    n = [float(r["params"]) for r in rows]
    d = [float(r["tokens"]) for r in rows]
    loss = [float(r["final_val_loss"]) for r in rows]
    point = fit(n, d, loss)
    intervals = bootstrap(n, d, loss, [(a, b) for a, b in zip(n, d, strict=True)], point,
                          resamples)
    residual = np.log(predict(point, n, d)) - np.log(loss)
    return {"fit": {k: point[k] for k in NAMES},
            "n_opt_exponent": point["beta"] / (point["alpha"] + point["beta"]),
            "ci95": intervals, "runs": len(rows), "resamples": resamples,
            "rms_log_residual": float(np.sqrt(np.mean(residual**2)))}


def figure(rows: Sequence[dict[str, str]], result: dict, out: pathlib.Path) -> list[pathlib.Path]:
    """Final val loss against training tokens, one colour per model size (mean ± 95% CI over
    seeds), with the fitted L(N, D) as lines."""
    from gpt_jax.sweep import plots  # matplotlib only when drawing.

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    sizes = sorted({float(r["params"]) for r in rows})
    for size in sizes:
        mine = [r for r in rows if float(r["params"]) == size]
        budgets = sorted({float(r["tokens"]) for r in mine})
        stats = [report_lib.mean_ci([float(r["final_val_loss"]) for r in mine
                                     if float(r["tokens"]) == b]) for b in budgets]
        bar = ax.errorbar(budgets, [s[0] for s in stats],
                          yerr=[0.0 if math.isnan(s[1]) else s[1] for s in stats], fmt="o",
                          capsize=3, label=f"N = {size:,.0f}")
        xs = np.geomspace(min(budgets) / 1.5, max(budgets) * 1.5, 50)
        ax.plot(xs, predict(result["fit"], size, xs), color=bar[0].get_color(), lw=1, alpha=0.8)
    f = result["fit"]
    ax.set_title(f"L = {f['E']:.3f} + {f['A']:.3g}/N^{f['alpha']:.3f} + {f['B']:.3g}/D^"
                 f"{f['beta']:.3f}", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("final val loss (mean ± 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots._save(fig, out, svg=False)


def fit_block(result: dict) -> str:
    """The README's fit block: each parameter with its bootstrap interval."""
    ci = result["ci95"]
    lines = ["| parameter | fit | 95% bootstrap interval |", "|---|---|---|"]
    for k in NAMES:
        lines.append(f"| {k} | {result['fit'][k]:.4g} | {ci[k][0]:.4g} – {ci[k][1]:.4g} |")
    lines.append(f"| N_opt ∝ C^a: a = β/(α+β) | {result['n_opt_exponent']:.3f} | "
                 f"{ci['n_opt_exponent'][0]:.3f} – {ci['n_opt_exponent'][1]:.3f} |")
    return ("\n".join(lines) + f"\n\n{result['runs']} runs, {result['resamples']} bootstrap "
            f"resamples; RMS of log L̂ − log L: {result['rms_log_residual']:.4f}.\n")


def report(folder: pathlib.Path) -> list[pathlib.Path]:
    """Sweep.analyses entry: fit FOLDER/results.csv → fit.json, scaling.png, README fit block."""
    rows = report_lib.read_csv(folder / "results.csv")
    result = analyse(rows)
    from gpt_jax import cli

    cli.write_atomically({folder / "fit.json": json.dumps(result, indent=1) + "\n"})
    written = [folder / "fit.json", *figure(rows, result, folder / "scaling")]
    if report_lib.update_readme(folder / "README.md", fit_block(result), FIT_BEGIN, FIT_END):
        written.append(folder / "README.md")
    return written


if __name__ == "__main__":
    from gpt_jax import cli

    with cli.errors_as_one_line():
        if len(sys.argv) != 2:
            cli.fail("usage: python -m gpt_jax.sweep.scaling RESULTS.csv")
        print(fit_block(analyse(report_lib.read_csv(pathlib.Path(sys.argv[1])))), end="")
