"""GPT-3 shapes and recipes (Brown et al. 2020, table 2.1), T 2048, vocab 50257 padded to 50304.

Variants: 125m, 350m, 760m, 1.3b, 2.7b, 6.7b, 13b, 175b. Each trains on 300B tokens with the
paper's batch (in 2048-token sequences) and peak learning rate, Adam β (0.9, 0.95), clipping 1.0,
weight decay 0.1, 375M tokens of warmup and cosine decay to 10% over 260B tokens. These are
planning and scaling configs: the mesh (mesh.*) and micro-batching (train.grad_accum_steps) are
for you to choose for the machine; tools/plan.py tells what fits (docs/scaling.md).
"""

import ml_collections

from configs import base

SIZES = {  # name: (num_layers, num_heads, d_model, batch in sequences, peak lr)
    "125m": (12, 12, 768, 256, 6.0e-4),
    "350m": (24, 16, 1024, 256, 3.0e-4),
    "760m": (24, 16, 1536, 256, 2.5e-4),
    "1.3b": (24, 16, 2048, 512, 2.0e-4),
    "2.7b": (32, 32, 2560, 512, 1.6e-4),
    "6.7b": (32, 32, 4096, 1024, 1.2e-4),
    "13b": (40, 40, 5120, 1024, 1.0e-4),  # The paper's d_model 5140 is a typo for 40 × 128.
    "175b": (96, 96, 12288, 1536, 0.6e-4),
}
SEQ_LEN = 2048
TOTAL_TOKENS, DECAY_TOKENS, WARMUP_TOKENS = 300e9, 260e9, 375e6


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "125m"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for gpt3.py; use one of {tuple(SIZES)}")
    layers, heads, d_model, batch, lr = SIZES[size]
    tokens_per_step = batch * SEQ_LEN
    c = base.get_config()
    c.model.num_layers, c.model.num_heads, c.model.d_model = layers, heads, d_model
    c.model.vocab_size = 50257
    c.model.vocab_multiple = 64
    c.model.max_seq_len = SEQ_LEN
    c.model.bias = True
    c.model.activation = "gelu_tanh"
    c.model.dtype = "bfloat16"
    c.data.seq_len = SEQ_LEN
    c.optim.lr, c.optim.min_lr = lr, lr / 10
    c.optim.beta2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = round(WARMUP_TOKENS / tokens_per_step)
    c.optim.decay_steps = round(DECAY_TOKENS / tokens_per_step)
    c.train.num_steps = round(TOTAL_TOKENS / tokens_per_step)
    c.train.batch_size = batch
    c.train.eval_every = 1000
    c.train.eval_batches = 100
    c.checkpoint.every = 1000
    return c
