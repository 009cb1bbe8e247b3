"""Folding LoRA adapters into the projections they adapt: W + (alpha / r) · A B, so a merged
model is a plain GPT (sampled, evaluated, exported to Hugging Face like any other).

The adapters live beside their projections (gpt_jax/models/layers.py, `LoRA`): attn/lora_q,
lora_k, lora_v (into qkv's slice 0, 1, 2 when K = N, else q, and kv's slice 0, 1), attn/lora_out,
mlp/lora_fc, lora_gate, lora_proj. Under scan_layers every array has a leading layers axis L.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

# Adapter name → (the projection it adapts, the slice of that kernel's fused axis or None,
# how many leading kernel axes are its inputs).
_TARGETS = {"lora_out": ("out", None, 2), "lora_fc": ("fc", None, 1),
            "lora_gate": ("gate", None, 1), "lora_proj": ("proj", None, 1)}


def _kernel_of(module: dict, name: str) -> tuple[str, int | None, int]:
    if name in _TARGETS:
        return _TARGETS[name]
    i = "qkv".index(name[-1])  # lora_q, lora_k, lora_v.
    if "qkv" in module:
        return "qkv", i, 1
    return ("q", None, 1) if i == 0 else ("kv", i - 1, 1)


def delta(a: jax.Array, b: jax.Array, n_in: int, scale: float) -> jax.Array:
    """scale · A B as a kernel [L?, in…, out…] from A [L?, in…, r] and B [L?, r, out…]."""
    lead = a.ndim - n_in - 1
    in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
    a2 = a.reshape(*a.shape[:lead], math.prod(in_shape), a.shape[-1])
    b2 = b.reshape(*b.shape[:lead], b.shape[lead], math.prod(out_shape))
    d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return scale * d.reshape(*a.shape[:lead], *in_shape, *out_shape)


def merge(params: dict, hparams: Any) -> tuple[dict, Any]:
    """(params with every LoRA update folded into its kernel and no adapter left, the
    hyperparameters without LoRA). Float32 throughout; a soft prompt, if any, stays."""
    if not hparams.lora_rank:
        return params, hparams
    scale = hparams.lora_alpha / hparams.lora_rank

    def walk(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: walk(v) for k, v in node.items()}
        for name in [k for k in node if k.startswith("lora_")]:
            adapter = node.pop(name)
            target, index, n_in = _kernel_of(node, name)
            kernel = node[target]["kernel"]
            d = delta(adapter["a"], adapter["b"], n_in, scale).astype(kernel.dtype)
            if index is not None:  # The fused axis follows the leading and input axes.
                lead = adapter["a"].ndim - n_in - 1  # 1 under scan_layers.
                at = (slice(None),) * (lead + n_in) + (index,)
                kernel = kernel.at[at].add(d)
            else:
                kernel = kernel + d
            node[target] = {**node[target], "kernel": kernel}
        return node

    merged = walk(params)
    return merged, dataclasses.replace(hparams, lora_rank=0, lora_targets="")
