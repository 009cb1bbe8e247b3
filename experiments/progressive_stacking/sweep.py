"""Progressive stacking (a 2-layer model grown to 4 layers) against the 4-layer model trained from
scratch, at equal training compute, on shakespeare_char.py:cpu. README.md has the question."""

from gpt_jax.sweep import Sweep

BASE = {"sample.num_samples": 0, "log.every": 25, "log.tensorboard": False}
# FLOPs per token (6·N + attention, gpt_jax/models/gpt.py): 4 layers 5,168,640, 2 layers
# 2,609,664. 1,000 steps at 2 layers + 1,495 at 4 = 2,000 steps at 4 layers (0.99995×).
POINTS = [
    {"train.num_steps": 2000, "optim.decay_steps": 2000},  # 4 layers from scratch.
    {"train.num_steps": 2495, "optim.decay_steps": 2495, "train.grow_at": "1000"},  # Equal FLOPs.
    {"train.num_steps": 2000, "optim.decay_steps": 2000, "train.grow_at": "1000"},  # Equal steps.
]


def get_sweep() -> Sweep:
    return Sweep(config="configs/shakespeare_char.py:cpu", base=BASE, points=POINTS,
                 seeds=(0, 1, 2),
                 names=["4 layers from scratch", "2→4 layers, equal FLOPs",
                        "2→4 layers, equal steps (0.75× FLOPs)"])
