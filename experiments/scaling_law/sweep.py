"""A scaling law on CPU-sized models: 5 model sizes × 3 token budgets × 3 seeds of character-level
GPTs on Tiny Shakespeare (shakespeare_char.py:cpu's data, batch and optimizer), fitted to
Chinchilla's L(N, D) = E + A/N^α + B/D^β by `python -m gpt_jax.sweep.scaling`. README.md has
the question and result."""

from gpt_jax.sweep import Sweep, axis, product, scaling, zipit

# Each budget has its own full cosine schedule (decay_steps = num_steps; Chinchilla's point that a
# schedule longer than the run overstates its loss), with a 50-step warmup.
BASE = {"sample.num_samples": 0, "log.every": 25, "log.tensorboard": False,
        "optim.warmup_steps": 50}
SIZES = zipit(axis("model.num_layers", [2, 2, 2, 3, 4]),
              axis("model.d_model", [32, 48, 64, 96, 128]),
              axis("model.num_heads", [2, 2, 2, 3, 4]))
# Tokens: steps × batch 12 × T 64 = 192k, 384k, 768k.
BUDGETS = zipit(axis("train.num_steps", [250, 500, 1000]),
                axis("optim.decay_steps", [250, 500, 1000]))


def get_sweep() -> Sweep:
    return Sweep(config="configs/shakespeare_char.py:cpu", base=BASE,
                 points=product(SIZES, BUDGETS), seeds=(0, 1, 2),
                 labels={"model.num_layers": "L", "model.d_model": "d", "model.num_heads": None,
                         "train.num_steps": "steps", "optim.decay_steps": None},
                 analyses=[scaling.report])
