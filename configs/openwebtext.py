"""GPT-2 reproduction: GPT-2 small (124M) on OpenWebText, nanoGPT's config/train_gpt2.py.

nanoGPT's recipe, mirrored: 12 layers, 12 heads, d 768, T 1024, no biases and exact GELU (its
train.py defaults), dropout 0, vocab 50257 padded to 50304; AdamW lr 6e-4 → 6e-5 (cosine over
600,000 steps, 2,000 warmup), β2 0.95, weight decay 0.1, clip 1.0, bfloat16; 491,520 tokens per
step (480 sequences: nanoGPT's 12 per GPU × 5 accumulation × 8 GPUs), random windows
(get_batch); eval every 1,000 steps on 2,400 val sequences (its 200 × 12). Expected: val loss
≈ 2.85 after the 600k steps (nanoGPT's README; 8 × A100 40GB, ~4 days), in line with GPT-2 124M
itself after fine-tuning on OpenWebText (its zero-shot val loss is 3.12).

Prepare the data once (needs network and `pip install datasets`; ~9B gpt2 tokens, ~17 GB as
uint16 shards; val_fraction 0.0005 as nanoGPT's test split, ~4.5M val tokens):

    python -m gpt_jax.data.prepare --source=hf:Skylion007/openwebtext --tokenizer=gpt2 \\
        --val_fraction=0.0005 --out=~/.cache/gpt_jax/openwebtext

(`--source` also takes a local copy: a folder, a glob or JSONL files; see gpt_jax/data/prepare.py),
then train (one GPU accumulates 40 micro-batches of 12; on 8 GPUs pass
--config.train.grad_accum_steps=5 for nanoGPT's 12 per GPU):

    python -m gpt_jax.train --config=configs/openwebtext.py --workdir=runs/owt

Elsewhere: --config.data.prepared=DIR. `:medium|large|xl` take GPT-2's bigger shapes with the
same recipe (no published target). data.document_mask=True keeps attention inside each
document (nanoGPT does not; the 2.85 is without it).
"""

import ml_collections

from configs import gpt2

PREPARED = "~/.cache/gpt_jax/openwebtext"  # Where the prepare command above writes.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = gpt2.get_config(arg or "small")  # Shapes, T 1024, vocab padding, bf16, AdamW β2 0.95.
    c.data.prepared = PREPARED
    c.data.tokenizer = "gpt2"  # What the folder is prepared with (the folder's tokenizer rules).
    c.data.sampling = "random"  # nanoGPT's get_batch.
    c.model.vocab_size = None  # The folder's vocabulary: gpt2's 50257, padded to 50304.
    c.model.bias = False  # nanoGPT's train.py default, which train_gpt2.py keeps.
    c.model.activation = "gelu"  # nanoGPT's nn.GELU(): exact erf.
    c.model.dropout = c.model.attention_dropout = 0.0
    c.optim.lr = 6e-4
    c.optim.min_lr = 6e-5
    c.optim.warmup_steps = 2000
    c.optim.decay_steps = 600_000  # lr_decay_iters: a shorter run keeps the schedule.
    c.optim.beta1, c.optim.beta2 = 0.9, 0.95
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.num_steps = 600_000
    c.train.batch_size = 480
    c.train.grad_accum_steps = 40
    c.train.eval_every = 1000
    c.train.eval_batches = 5  # × 480 sequences = nanoGPT's eval_iters 200 × batch 12.
    c.train.final_eval = "full"
    c.checkpoint.every = 1000
    c.log.every = 10
    return c
