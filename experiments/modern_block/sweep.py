"""GPT-2's block against the modern one (RMSNorm + SwiGLU + RoPE + QK-norm) at equal parameters,
on nanoGPT's character-level Tiny Shakespeare CPU recipe. README.md has the question and result."""

from gpt_jax.sweep import Sweep

# shakespeare_char.py:cpu (4 layers, d 128, T 64, batch 12, 2,000 steps); no sample at the end.
BASE = {"sample.num_samples": 0, "log.every": 25, "log.tensorboard": False}
# The modern block with full multi-head attention (4 kv heads) and SwiGLU width 346: 803,328
# parameters against GPT-2's 804,096 (its position table and LayerNorm means are gone).
MODERN = {"model.norm": "rmsnorm", "model.mlp": "swiglu", "model.mlp_dim": 346,
          "model.positions": "rope", "model.qk_norm": True}


def get_sweep() -> Sweep:
    return Sweep(config="configs/shakespeare_char.py:cpu", base=BASE,
                 points=[{}, MODERN], seeds=(0, 1, 2),
                 names=["GPT-2 block", "modern block"])
