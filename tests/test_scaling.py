"""The Chinchilla fit (gpt_jax/sweep/scaling.py): exact on noise-free data from a known law, its
bootstrap intervals cover the truth under noise, and a sweep report writes the fit files."""

import json

import numpy as np
import pytest

from gpt_jax.sweep import report, scaling

TRUE = {"E": 1.2, "A": 30.0, "B": 400.0, "alpha": 0.35, "beta": 0.45}
N = np.repeat([2e4, 5e4, 1e5, 3e5, 8e5], 9)  # 5 sizes × 3 budgets × 3 seeds.
D = np.tile(np.repeat([2e5, 4e5, 8e5], 3), 5)


def test_fit_recovers_a_known_law():
    f = scaling.fit(N, D, scaling.predict(TRUE, N, D))
    for k, v in TRUE.items():
        assert f[k] == pytest.approx(v, rel=1e-4), k


def test_bootstrap_intervals_cover_the_truth_under_noise():
    rng = np.random.default_rng(1)
    loss = scaling.predict(TRUE, N, D) * np.exp(rng.normal(0, 0.003, N.size))
    point = scaling.fit(N, D, loss)
    ci = scaling.bootstrap(N, D, loss, list(zip(N, D, strict=True)), point, resamples=30)
    for k in ("alpha", "beta", "E"):
        assert ci[k][0] <= TRUE[k] <= ci[k][1], (k, ci[k])
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert ci["n_opt_exponent"][0] <= a <= ci["n_opt_exponent"][1]


def test_report_writes_the_fit_and_the_readme_block(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    loss = scaling.predict(TRUE, N, D) * np.exp(rng.normal(0, 0.003, N.size))
    rows = [{"run": str(i), "configuration": f"{n:.0f},{d:.0f}", "seed": i % 3, "params": n,
             "tokens": d, "final_val_loss": v} for i, (n, d, v) in enumerate(zip(N, D, loss, strict=True))]
    report.write_csv(rows, tmp_path / "results.csv")
    (tmp_path / "README.md").write_text(f"x\n{scaling.FIT_BEGIN}\n{scaling.FIT_END}\n")
    monkeypatch.setattr(scaling, "analyse", lambda rows, resamples=20: _analyse(rows, resamples))
    written = scaling.report(tmp_path)
    assert {p.name for p in written} == {"fit.json", "scaling.png", "README.md"}
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["runs"] == 45 and fit["fit"]["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
    block = report.readme_block(tmp_path / "README.md", scaling.FIT_BEGIN, scaling.FIT_END)
    assert block == scaling.fit_block(fit)
    assert f"| alpha | {fit['fit']['alpha']:.4g} |" in block
    assert (tmp_path / "scaling.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


_analyse = scaling.analyse  # The real one, with fewer resamples (above) to stay quick.
