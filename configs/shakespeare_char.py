"""nanoGPT's character-level Tiny Shakespeare recipes (config/train_shakespeare_char.py).

  :gpu  the "baby GPT": 6 layers, 6 heads, d 384, T 256, batch 64, dropout 0.2, 5000 steps, bf16.
  :cpu  nanoGPT's README CPU run: 4 layers, 4 heads, d 128, T 64, batch 12, 2000 steps, no dropout;
        eval on 20 val batches during training and on the whole val split at the end.
  :cpu_llama  :cpu with the modern (Llama-style) block at about GPT-2's size, for comparisons:
        RMSNorm, SwiGLU of width 344 (3·128·344 ≈ 2·128·512 MLP parameters), RoPE, 2 kv heads,
        QK-norm (0.91× :cpu's parameters: fewer kv heads, no position table).
  :cpu_lstm  :cpu's recipe (data, batch, steps, optimizer) for the LSTM baseline at :cpu's
        parameter count: 2 layers of width 222 (embeddings and cells), tied head: 804,750
        parameters against :cpu's 804,096 (4.82 against 5.17 training MFLOPs per token: the
        LSTM has no attention term; --config.model.d_model=230 matches the FLOPs instead, at
        863,190 parameters). README "LSTM baseline" compares them.
"""

import ml_collections

from configs import base

VARIANTS = ("gpu", "cpu", "cpu_llama", "cpu_lstm")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "gpu"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for shakespeare_char.py; use one of {VARIANTS}")
    c = base.get_config()
    c.data.corpus = "shakespeare"
    c.data.tokenizer = "char"
    c.data.sampling = "random"  # nanoGPT's get_batch.
    c.model.bias = False
    c.model.activation = "gelu"
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 100
    c.optim.beta2 = 0.99
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.eval_every = 250
    c.log.every = 10
    c.sample.prompt = "\n"
    c.sample.max_new_tokens = 300
    if variant == "gpu":
        c.model.num_layers, c.model.num_heads, c.model.d_model = 6, 6, 384
        c.model.dropout = c.model.attention_dropout = 0.2
        c.model.dtype = "bfloat16"  # nanoGPT autocasts to bf16 on GPUs that have it.
        c.data.seq_len = 256
        c.train.batch_size = 64
        c.train.num_steps = 5000
        c.optim.decay_steps = 5000  # nanoGPT's lr_decay_iters: a shorter run keeps this schedule.
        c.train.eval_batches = 200
    else:  # cpu, cpu_llama, cpu_lstm
        c.model.num_layers, c.model.num_heads, c.model.d_model = 4, 4, 128
        c.model.dropout = c.model.attention_dropout = 0.0
        c.data.seq_len = 64
        c.train.batch_size = 12
        c.train.num_steps = 2000
        c.optim.decay_steps = 2000  # nanoGPT's lr_decay_iters: a shorter run keeps this schedule.
        c.train.eval_batches = 20
    if variant == "cpu_llama":
        m = c.model
        m.norm, m.mlp, m.mlp_dim, m.positions, m.num_kv_heads, m.qk_norm = (
            "rmsnorm", "swiglu", 344, "rope", 2, True)
    if variant == "cpu_lstm":  # lstm_hidden unset: the cells are d_model wide.
        c.model.arch, c.model.num_layers, c.model.d_model = "lstm", 2, 222
    c.train.final_eval = "full"
    return c
