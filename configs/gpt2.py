"""GPT-2 shapes (124M / 350M / 774M / 1.5B), T 1024, vocab 50257 padded to 50304.

Optimisation follows nanoGPT's GPT-2 reproduction: AdamW β2 0.95, lr 6e-4 → 6e-5, 2000 warmup,
weight decay 0.1, ~0.5M tokens per step (512 × 1024, as GPT-3's small models), accumulated over 32
micro-batches of 16 sequences: one H100 runs GPT-2 small so; on a mesh, each micro-batch is split
over the data × fsdp devices (16 must divide by their number; lower train.grad_accum_steps for more
sequences per device, see docs/scaling.md). The data defaults to the offline byte corpus until a
GPT-2 BPE dataset is prepared.
"""

import ml_collections

from configs import base

SIZES = {  # name: (num_layers, num_heads, d_model)
    "small": (12, 12, 768),
    "medium": (24, 16, 1024),
    "large": (36, 20, 1280),
    "xl": (48, 25, 1600),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "small"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for gpt2.py; use one of {tuple(SIZES)}")
    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = SIZES[size]
    c.model.vocab_size = 50257
    c.model.vocab_multiple = 64
    c.model.max_seq_len = 1024
    c.model.bias = True
    c.model.activation = "gelu_tanh"
    c.model.dtype = "bfloat16"
    c.data.seq_len = 1024
    c.optim.lr = 6e-4
    c.optim.min_lr = 6e-5
    c.optim.warmup_steps = 2000
    c.optim.beta2 = 0.95
    c.optim.weight_decay = 0.1
    c.train.num_steps = 600_000
    c.train.batch_size = 512
    c.train.grad_accum_steps = 32
    c.train.eval_every = 1000
    c.train.eval_batches = 200
    return c
