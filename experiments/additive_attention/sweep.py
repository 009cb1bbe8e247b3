"""Dot-product against additive (Bahdanau) attention on shakespeare_char.py:cpu: quality and cost
(tokens/s, wall time). README.md has the question and result."""

from gpt_jax.sweep import Sweep, axis

BASE = {"sample.num_samples": 0, "log.every": 25, "log.tensorboard": False}


def get_sweep() -> Sweep:
    return Sweep(config="configs/shakespeare_char.py:cpu", base=BASE,
                 points=axis("model.attention", ["dot_product", "additive"]), seeds=(0, 1, 2),
                 labels={"model.attention": ""})
