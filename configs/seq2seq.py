"""Encoder–decoder Transformers (model.arch=seq2seq) on the built-in offline tasks
(gpt_jax/data/tasks.py), character-level, on a 2-core CPU.

  :addition  "4821+397" → "5218" (operands of 1–4 digits): 2 + 2 layers, d 128, 3,000 steps;
             exact match ≥ 0.9 on the held-out sums within a few minutes.
  :sort      numbers among distractor letters → the numbers, sorted: the same model, T 32.
  :docsig    stdlib docstring → function signature (real text): 3 + 3 layers, d 192, sources cut
             to 256 characters, signatures ≤ 95.
  :vaswani   :addition with the original recipe: post-LN, sinusoidal positions, √d-scaled
             embeddings, ReLU MLP, dropout 0.1.
"""

import ml_collections

from configs import base

VARIANTS = ("addition", "sort", "docsig", "vaswani")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "addition"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for seq2seq.py; use one of {VARIANTS}")
    c = base.get_config()
    c.model.arch = "seq2seq"
    c.model.num_layers, c.model.encoder_layers = 2, 2
    c.model.num_heads, c.model.d_model = 4, 128
    c.data.task = "sort" if variant == "sort" else "docsig" if variant == "docsig" else "addition"
    c.data.task_examples = 100000  # Train draws (addition: 76k distinct); val: 10,000 others.
    c.data.tokenizer = "char"
    c.data.source_len, c.data.seq_len = 16, 8  # "9999+9999" and "19998" + EOS fit.
    c.train.batch_size = 64
    c.train.num_steps = 3000
    c.optim.decay_steps = 3000
    c.optim.lr, c.optim.min_lr = 1e-3, 1e-4
    c.optim.warmup_steps = 200
    c.train.eval_every = 500
    c.train.eval_batches = 10
    c.train.eval_decode = 500  # And every val example (10,000 of them) at the final eval.
    c.sample.num_samples = 3
    if variant == "sort":
        c.data.source_len, c.data.seq_len = 40, 32
    if variant == "docsig":
        c.model.num_layers = c.model.encoder_layers = 3
        c.model.d_model, c.model.num_heads = 192, 6
        c.data.source_len, c.data.seq_len = 256, 96
        c.data.task_examples = 8000  # The stdlib has about that many documented functions.
        c.train.batch_size = 32
        c.train.num_steps = c.optim.decay_steps = 4000
        c.model.dropout = 0.1
        c.train.eval_decode = 200
    if variant == "vaswani":
        m = c.model
        m.norm_position, m.positions, m.scale_embeddings = "post", "sinusoidal", True
        m.mlp, m.activation, m.dropout = "gelu", "relu", 0.1
    return c
