"""Hugging Face Llama (`LlamaForCausalLM`) ⇄ gpt_jax: configs and parameters.

A Llama block is our `gpt` architecture with model.positions=rope, norm=rmsnorm, mlp=swiglu,
num_kv_heads (grouped-query) and no biases. HF's q_proj/k_proj weights are already in the
rotate-half layout our RoPE uses (positions.rope), so they map without a permutation. Shapes:
D d_model, N heads, K kv heads, H head dim, F mlp width, V vocabulary (Vp padded).

Folders, weights files and tokenizers are read and written as for GPT-2 (hf_gpt2.py).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from gpt_jax.cli import brief
from gpt_jax.interop import hf_gpt2
from gpt_jax.interop.hf_gpt2 import InteropError
from gpt_jax.models.gpt import GPTConfig

MODEL_TYPE = "llama"
# The model.* values that make our gpt architecture a Llama (the rest come from config.json).
LLAMA_BLOCK = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
               "qk_norm": False, "attention": "dot_product", "logit_softcap": 0.0,
               "scale_embeddings": False}


def _block_table(cfg: GPTConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """(HF name within `model.layers.{i}.`, our path within a block, HF shape) of the weights
    that map one to one (transposed); q, k and v are handled apart (fused or split)."""
    D, F = cfg.d_model, cfg.hidden_dim
    return [
        ("input_layernorm.weight", ("ln_1", "scale"), (D,)),
        ("post_attention_layernorm.weight", ("ln_2", "scale"), (D,)),
        ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), (F, D)),
        ("mlp.up_proj.weight", ("mlp", "fc", "kernel"), (F, D)),
        ("mlp.down_proj.weight", ("mlp", "proj", "kernel"), (D, F)),
    ]


def model_fields_from_hf(hf_config: Any) -> dict[str, Any]:
    """The `model.*` config fields of a transformers LlamaConfig; InteropError for what our model
    cannot compute (biases, rope scaling, another activation or head dim)."""
    get = lambda name, default=None: getattr(hf_config, name, default)
    if get("model_type") != MODEL_TYPE:
        raise InteropError(f"model_type={get('model_type')!r} is not 'llama'.")
    for name in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "hidden_size", "intermediate_size", "max_position_embeddings", "vocab_size"):
        hf_gpt2.require_count(name, get(name))
    D, N, K = get("hidden_size"), get("num_attention_heads"), get("num_key_value_heads")
    if get("hidden_act") != "silu":
        raise InteropError(f"hidden_act={get('hidden_act')!r}: our SwiGLU MLP computes silu only.")
    for name in ("attention_bias", "mlp_bias"):
        if get(name, False):
            raise InteropError(f"{name}=True: our Llama block has no biases; this model does not "
                               "convert.")
    if D % N or N % K:
        raise InteropError(f"hidden_size={D}, num_attention_heads={N}, num_key_value_heads={K}: "
                           "heads must divide the width and kv heads the heads.")
    if get("head_dim") not in (None, D // N):
        raise InteropError(f"head_dim={get('head_dim')} is not hidden_size / num_attention_heads "
                           f"= {D // N}, which our attention assumes.")
    rope = dict(get("rope_parameters") or {})
    rope_type = rope.get("rope_type", (get("rope_scaling") or {}).get("rope_type", "default"))
    if rope_type != "default":
        raise InteropError(f"rope_type={rope_type!r} (RoPE scaling) is not implemented; only "
                           "the default rotary embedding converts.")
    theta = rope.get("rope_theta", get("rope_theta", 10000.0))
    return {
        **LLAMA_BLOCK,
        "num_layers": get("num_hidden_layers"),
        "num_heads": N,
        "num_kv_heads": K,
        "d_model": D,
        "mlp_dim": get("intermediate_size"),
        "max_seq_len": get("max_position_embeddings"),
        "vocab_size": get("vocab_size"),
        "tie_embeddings": bool(get("tie_word_embeddings", False)),
        "rope_theta": float(theta),
        "norm_eps": float(get("rms_norm_eps")),
        "init_std": float(get("initializer_range", 0.02)),
    }


def require_llama_block(cfg: GPTConfig) -> None:
    """InteropError unless `cfg` is a Llama block (LLAMA_BLOCK's values)."""
    for field, value in LLAMA_BLOCK.items():
        if getattr(cfg, field) != value:
            raise InteropError(f"model.{field}={getattr(cfg, field)!r}: a Llama has {value!r}, so "
                               "this model has no LlamaForCausalLM equivalent.")


def hf_config_from_model(cfg: GPTConfig) -> Any:
    """A transformers LlamaConfig for the model `cfg` (its real vocabulary, not the padded one)."""
    import transformers

    require_llama_block(cfg)
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        initializer_range=cfg.init_std,
        attention_bias=False,
        mlp_bias=False,
        # Ids inside a small vocab: HF's defaults (1, 2) may be out of range.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def params_to_hf(params: Mapping[str, Any], cfg: GPTConfig) -> dict[str, np.ndarray]:
    """A LlamaForCausalLM state dict (float32 numpy, contiguous) from our parameters. Only the
    real `cfg.vocab_size` rows are written; a tied model writes no lm_head.weight."""
    require_llama_block(cfg)
    params = nn.meta.unbox(params)
    D, N, K, H, V = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size
    leaf, array = hf_gpt2.leaf, hf_gpt2.as_array
    out = {"model.embed_tokens.weight": array(leaf(params, ("wte", "embedding")),
                                              (cfg.padded_vocab_size, D), "wte/embedding")[:V],
           "model.norm.weight": array(leaf(params, ("ln_f", "scale")), (D,), "ln_f/scale")}
    for i, block in enumerate(hf_gpt2.layers(params, cfg)):
        p = f"model.layers.{i}."
        if K == N:
            qkv_D3NH = array(leaf(block, ("attn", "qkv", "kernel")), (D, 3, N, H), "qkv")
            q_DNH, k_DKH, v_DKH = qkv_D3NH[:, 0], qkv_D3NH[:, 1], qkv_D3NH[:, 2]
        else:
            q_DNH = array(leaf(block, ("attn", "q", "kernel")), (D, N, H), "q")
            kv_D2KH = array(leaf(block, ("attn", "kv", "kernel")), (D, 2, K, H), "kv")
            k_DKH, v_DKH = kv_D2KH[:, 0], kv_D2KH[:, 1]
        out[p + "self_attn.q_proj.weight"] = q_DNH.reshape(D, N * H).T
        out[p + "self_attn.k_proj.weight"] = k_DKH.reshape(D, K * H).T
        out[p + "self_attn.v_proj.weight"] = v_DKH.reshape(D, K * H).T
        out[p + "self_attn.o_proj.weight"] = array(
            leaf(block, ("attn", "out", "kernel")), (N, H, D), "out").reshape(N * H, D).T
        for hf_name, path, hf_shape in _block_table(cfg):
            ours = array(leaf(block, path), hf_shape[::-1], "/".join(path))
            out[p + hf_name] = ours.T if ours.ndim == 2 else ours
    if not cfg.tie_embeddings:
        kernel_DV = array(leaf(params, ("lm_head", "kernel")), (D, cfg.padded_vocab_size),
                          "lm_head/kernel")
        out["lm_head.weight"] = kernel_DV[:, :V].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def params_from_hf(state_dict: Mapping[str, Any], cfg: GPTConfig) -> dict[str, Any]:
    """Our parameters (numpy, the layout `cfg.scan_layers` names) from a LlamaForCausalLM state
    dict; the embedding padded with zero rows to `cfg.padded_vocab_size` (masked in the logits)."""
    require_llama_block(cfg)
    D, N, K, H, V, L = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size,
                        cfg.num_layers)
    sd = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    wanted = {"model.embed_tokens.weight", "model.norm.weight"}
    wanted |= {f"model.layers.{i}.{name}" for i in range(L) for name, *_ in _block_table(cfg)}
    wanted |= {f"model.layers.{i}.self_attn.{n}.weight" for i in range(L) for n in attn}
    if not cfg.tie_embeddings:
        wanted.add("lm_head.weight")
    if missing := sorted(wanted - set(sd)):
        raise InteropError(f"the HF weights have no {missing[0]} ({len(missing)} missing); they "
                           "are not a Llama with this config (num_hidden_layers, "
                           "tie_word_embeddings).")
    if extra := sorted(set(sd) - wanted - {"lm_head.weight"}):
        raise InteropError(f"the HF weights hold {extra[0]}, which a Llama with this config does "
                           f"not have ({len(extra)} unexpected); its config.json does not fit them.")

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return hf_gpt2.as_array(sd[name], shape, name)

    wte_VD = get("model.embed_tokens.weight", (V, D))
    params: dict[str, Any] = {
        "wte": {"embedding": np.pad(wte_VD, ((0, cfg.padded_vocab_size - V), (0, 0)))},
        "ln_f": {"scale": get("model.norm.weight", (D,))},
    }
    blocks = []
    for i in range(L):
        p = f"model.layers.{i}."
        q_DNH = get(p + "self_attn.q_proj.weight", (N * H, D)).T.reshape(D, N, H)
        k_DKH = get(p + "self_attn.k_proj.weight", (K * H, D)).T.reshape(D, K, H)
        v_DKH = get(p + "self_attn.v_proj.weight", (K * H, D)).T.reshape(D, K, H)
        attn_params = ({"qkv": {"kernel": np.stack([q_DNH, k_DKH, v_DKH], axis=1)}} if K == N
                       else {"q": {"kernel": q_DNH},
                             "kv": {"kernel": np.stack([k_DKH, v_DKH], axis=1)}})
        attn_params["out"] = {"kernel": get(p + "self_attn.o_proj.weight", (D, N * H)).T.reshape(
            N, H, D)}
        block: dict[str, Any] = {"attn": attn_params}
        for hf_name, path, hf_shape in _block_table(cfg):
            value = get(p + hf_name, hf_shape)
            hf_gpt2.set_path(block, path, value.T if value.ndim == 2 else value)
        blocks.append(block)
    return hf_gpt2.with_blocks_and_head(params, blocks, sd, wte_VD, cfg)


def read_local_config(source: str) -> Any:
    """The LlamaConfig of a local HF folder (with every refusal that needs no weights)."""
    folder = hf_gpt2.check_folder(source)
    transformers = hf_gpt2.conversion_extras()
    try:
        hf_config = transformers.LlamaConfig.from_pretrained(folder)
    except OSError:
        raise
    except Exception as e:  # Values LlamaConfig refuses; transformers raises many kinds.
        raise InteropError(f"{folder / 'config.json'} is not a Llama config transformers reads "
                           f"({brief(e, 300)}).") from e
    model_fields_from_hf(hf_config)
    return hf_config


def load_hf(source: str) -> tuple[Any, dict[str, np.ndarray]]:
    """(LlamaConfig, state dict of float32 numpy arrays) from a local folder."""
    hf_config = read_local_config(source)
    return hf_config, hf_gpt2.read_weights(pathlib.Path(source).expanduser())


def save_hf(params: Mapping[str, Any], cfg: GPTConfig, out_dir: str | pathlib.Path) -> Any:
    """Writes config.json and model.safetensors that LlamaForCausalLM.from_pretrained loads;
    returns the LlamaConfig."""
    import safetensors.numpy

    hf_config = hf_config_from_model(cfg)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    safetensors.numpy.save_file(params_to_hf(params, cfg), str(out / hf_gpt2.WEIGHTS_NAME),
                                metadata={"format": "pt"})
    return hf_config


def check_fits(hf_config: Any, cfg: GPTConfig, source: str) -> None:
    """InteropError naming the first model field where `cfg` cannot take the HF Llama's weights
    as they are (checkpoint.init_from=hf:): the Llama block, then its shape."""
    from gpt_jax.models import gpt, registry

    require_llama_block(cfg)
    fields = model_fields_from_hf(hf_config)
    try:
        gpt.ARCH.require_compatible(
            {"arch": "gpt", **fields}, registry.model_fields(cfg), source,
            "set --config.model.{field}={value!r}.",
            fields=("num_layers", "num_heads", "num_kv_heads", "d_model", "mlp_dim", "vocab_size",
                    "tie_embeddings"))
    except registry.IncompatibleModelError as e:
        raise InteropError(str(e)) from None
    if cfg.rope_theta != fields["rope_theta"]:
        raise InteropError(f"{source} has rope_theta={fields['rope_theta']} but this model "
                           f"model.rope_theta={cfg.rope_theta}; set --config.model.rope_theta="
                           f"{fields['rope_theta']}.")


def check_local_source(source: str, cfg: GPTConfig) -> None:
    """What `import_params` refuses before reading any weight (a training run's pre-compile
    check of checkpoint.init_from=hf:)."""
    check_fits(read_local_config(source), cfg, source)


def import_params(source: str, cfg: GPTConfig) -> dict[str, Any]:
    """Our parameters for the model `cfg` from a local HF Llama folder, checked to fit."""
    hf_config, state_dict = load_hf(source)
    check_fits(hf_config, cfg, source)
    return params_from_hf(state_dict, cfg)
