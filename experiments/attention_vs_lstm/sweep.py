"""Self-attention (GPT-2 block) against an LSTM at equal training compute on
shakespeare_char.py:cpu, with the val loss at each context position. README.md has the rest."""

from gpt_jax.sweep import Eval, Sweep

BASE = {"sample.num_samples": 0, "log.every": 25, "log.tensorboard": False}
# The LSTM of shakespeare_char.py:cpu_lstm widened to d 230: 4.82 → 5.17 training MFLOPs per token,
# the Transformer's (both count matmuls only; gpt_jax/models/lstm.py), so the same steps and
# batch are the same compute. 863,190 parameters against the Transformer's 804,096.
LSTM = {"model.arch": "lstm", "model.num_layers": 2, "model.d_model": 230}


def get_sweep() -> Sweep:
    return Sweep(config="configs/shakespeare_char.py:cpu", base=BASE, points=[{}, LSTM],
                 seeds=(0, 1, 2), names=["Transformer", "LSTM (equal FLOPs)"],
                 evals=[Eval("context", ("--per_position",))])
