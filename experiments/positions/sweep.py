"""Position schemes (learned, sinusoidal, RoPE, ALiBi, none) trained at T = 64 on
shakespeare_char.py:cpu and evaluated on the val split at T, 2T and 4T. README.md has the rest."""

from gpt_jax.sweep import Eval, Sweep

BASE = {"sample.num_samples": 0, "log.every": 25, "log.tensorboard": False}
POINTS = [
    # A table of 4T rows, so the model runs at 2T and 4T: rows past T are never trained.
    {"model.positions": "learned", "model.max_seq_len": 256},
    # √d_model-scaled embeddings: the sines' amplitude 1 would drown GPT-2's 0.02-scale tokens.
    {"model.positions": "sinusoidal", "model.scale_embeddings": True},
    {"model.positions": "rope"},
    {"model.positions": "alibi"},
    {"model.positions": "none"},
]


def get_sweep() -> Sweep:
    return Sweep(config="configs/shakespeare_char.py:cpu", base=BASE, points=POINTS,
                 seeds=(0, 1, 2), labels={"model.positions": ""},
                 evals=[Eval("loss@128", ("--seq_len=128",)), Eval("loss@256", ("--seq_len=256",))])
