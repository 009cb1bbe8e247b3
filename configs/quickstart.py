"""The default run: a small byte-level GPT on the Python standard library's source (offline).

About two minutes on a 2-core laptop CPU, compile included; the final sample looks like Python.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg  # No variants.
    c = base.get_config()
    c.data.corpus = "pystdlib"
    c.data.tokenizer = "byte"
    c.data.seq_len = 128
    c.model.num_layers, c.model.num_heads, c.model.d_model = 4, 4, 128
    c.train.batch_size = 8
    c.train.num_steps = 2000
    c.optim.decay_steps = 2000  # Fixed, so a shorter run (--config.train.num_steps=N) keeps this schedule.
    c.train.eval_every = 250
    c.train.eval_batches = 10
    c.train.final_eval = "batches"  # The stdlib val split is 1.2M tokens: a full pass takes minutes.
    c.optim.lr = 2e-3
    c.optim.min_lr = 2e-4
    c.sample.prompt = "def "
    c.sample.max_new_tokens = 300
    return c
