"""Sweeps declared next to their experiments (declare.py), run locally or as a SLURM array
(runner.py), and reported as a CSV, a markdown table and plots (report.py, plots.py).
`python -m gpt_jax.sweep experiments/NAME/sweep.py [--report]` (__main__.py)."""

from gpt_jax.sweep.declare import Eval, Sweep, axis, chain, product, zipit

__all__ = ["Eval", "Sweep", "axis", "chain", "product", "zipit"]
