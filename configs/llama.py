"""Llama-shaped models: the `gpt` architecture with the Llama block (RoPE, RMSNorm, SwiGLU,
grouped-query attention, no biases, untied head unless the shape ties it), for training, planning
and Hugging Face interop (tools/convert_hf.py imports LlamaForCausalLM into these settings).

  :tiny  2 layers, d 64, 4 heads, 2 kv heads, F 172, T 256, byte tokenizer: trains on a CPU.
  :1b    Llama 3.2 1B's shape: 16 layers, d 2048, 32 heads, 8 kv heads, F 8192, vocab 128256, tied.
  :8b    Llama 3 8B's shape: 32 layers, d 4096, 32 heads, 8 kv heads, F 14336, vocab 128256.

The 1b/8b shapes use RoPE theta 500000 without Llama 3.1's frequency scaling (rope_type llama3),
which is not implemented: the Llama 3 8B checkpoint (rope_type default) converts, 3.1/3.2 ones
are refused by tools/convert_hf.py. Their vocabulary needs its tokenizer (data.tokenizer=hf:PATH).
"""

import ml_collections

from configs import base

VARIANTS = ("tiny", "1b", "8b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for llama.py; use one of {VARIANTS}")
    c = base.get_config()
    m = c.model
    m.positions, m.norm, m.mlp, m.bias = "rope", "rmsnorm", "swiglu", False
    m.tie_embeddings = False
    m.norm_eps = 1e-5
    c.optim.beta2 = 0.95  # Llama's AdamW: β2 0.95, weight decay 0.1, clip 1.0.
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    if variant == "tiny":
        m.num_layers, m.num_heads, m.num_kv_heads, m.d_model, m.mlp_dim = 2, 4, 2, 64, 172
        c.data.seq_len = 256
    else:
        m.rope_theta = 500000.0
        m.vocab_size = 128256
        m.vocab_multiple = 64
        m.dtype = "bfloat16"
        c.data.seq_len = 8192 if variant == "8b" else 2048
        m.max_seq_len = c.data.seq_len
        if variant == "1b":
            m.num_layers, m.num_heads, m.num_kv_heads, m.d_model, m.mlp_dim = 16, 32, 8, 2048, 8192
            m.tie_embeddings = True
        else:
            m.num_layers, m.num_heads, m.num_kv_heads, m.d_model, m.mlp_dim = 32, 32, 8, 4096, 14336
    return c
