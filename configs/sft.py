"""Fine-tuning recipes for a model trained with configs/quickstart.py (its model settings, so
checkpoint.init_from takes it), on a folder `python -m gpt_jax.data.prepare --sft` made:

  :full    supervised fine-tuning of every parameter
  :lora    LoRA of rank 8 (alpha 16) on every attention and MLP projection; the base frozen
  :prompt  soft-prompt tuning: 16 trainable embeddings before every example; the base frozen

All three: one example per row (data.sft_packing=padded, which a soft prompt needs: packed rows
would be compared with another amount of data), 32 tokens (the built-in addition task's examples
take at most 17; for sort or docsig, whose examples are longer, raise data.seq_len to 96 or
more), 32 rows a step, 2000 steps, 50 warmup steps and a cosine decay to 0; the learning rate
lower than pre-training's for every parameter, higher for the few an adapter trains (as Hu et
al. and Lester et al. tuned theirs). Every evaluation also scores the folder's held-out pairs
(tasks/sft/exact_match, greedy completions). Give the base and the data:

    python -m gpt_jax.train --config=configs/sft.py:lora --workdir=runs/sft_lora \\
        --config.checkpoint.init_from=runs/quickstart --config.data.prepared=DIR
"""

import ml_collections

from configs import quickstart

VARIANTS = ("full", "lora", "prompt")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "full"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for sft.py; use one of {VARIANTS}")
    c = quickstart.get_config()
    c.model.max_seq_len = c.data.seq_len  # The base's position table (128), …
    c.data.seq_len = 32  # … of which an addition example takes at most 17.
    c.data.sft_packing = "padded"
    c.train.batch_size = 32
    c.train.num_steps = 2000
    c.optim.decay_steps = 2000
    c.optim.warmup_steps = 50
    c.optim.min_lr = 0.0
    c.train.eval_every = 500
    c.train.final_eval = "full"  # Held-out pairs are few: every one is scored at the end.
    c.train.eval_tasks_limit = 500
    c.sample.num_samples = 0  # The task's exact match says more than a sample of "def ".
    if variant == "full":
        c.optim.lr = 1e-3
    elif variant == "lora":
        c.finetune.lora_rank, c.finetune.lora_alpha = 8, 16.0
        c.optim.lr = 5e-3
    else:
        c.finetune.prompt_tokens = 16
        c.optim.lr = 3e-2
    return c
