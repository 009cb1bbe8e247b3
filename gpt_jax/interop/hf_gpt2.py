"""Hugging Face GPT-2 ⇄ gpt_jax: config and parameter mapping, reading and writing HF folders.

The two models are the same function: GPT-2's pre-LN blocks, learned positions, fused QKV. Only
the storage differs. HF's Conv1D weights are [in, out] like a Flax Dense kernel; `c_attn` packs
q, k, v along its output as [D, 3·D], each D split into heads, which is our DenseGeneral kernel
[D, 3, N, H] flattened; `c_proj` [N·H, D] is our `out` kernel [N, H, D] flattened. So every
weight maps by a reshape, never a transpose (but an untied `lm_head`, [V, D] in torch's Linear).

Our side: a params tree in either layout (`h_0 … h_{L-1}`, or `h` stacked on a leading layers
axis with model.scan_layers), vocab padded to model.vocab_multiple. HF's: a GPT2LMHeadModel state
dict of numpy arrays, keys `transformer.…` and `lm_head.weight`. Models without biases
(model.bias=False, nanoGPT's recipes) export zero biases, which is exact; HF models import with
biases (model.bias=True), or into bias=False only if all their biases are zero.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from absl import logging

from gpt_jax.cli import brief
from gpt_jax.data import tokenizers
from gpt_jax.models import gpt, registry
from gpt_jax.models.gpt import GPTConfig

# HF activation_function → model.activation. HF's "gelu" is the exact (erf) GELU; "gelu_new" and
# "gelu_pytorch_tanh" are the tanh approximation GPT-2 was trained with.
ACTIVATIONS_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                       "relu": "relu"}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
GPT2_VOCAB_SIZE = tokenizers.GPT2_VOCAB_SIZE  # Its last id, 50256, is bos and eos.
WEIGHTS_NAME = "model.safetensors"
# Tokenizer files of an HF folder (GPT2Tokenizer's vocab.json + merges.txt, or the fast one's).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
# Non-parameter buffers that older GPT-2 checkpoints (OpenAI's on the hub) store: the causal mask.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class InteropError(ValueError):
    """A model or folder that cannot be converted; the message says why and what to do."""


def _block_table(cfg: GPTConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...],
                                                 tuple[int, ...]]]:
    """(HF name within `transformer.h.{i}.`, our path within a block, HF shape, our shape)."""
    D, N, H, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.hidden_dim
    return [
        ("ln_1.weight", ("ln_1", "scale"), (D,), (D,)),
        ("ln_1.bias", ("ln_1", "bias"), (D,), (D,)),
        ("attn.c_attn.weight", ("attn", "qkv", "kernel"), (D, 3 * D), (D, 3, N, H)),
        ("attn.c_attn.bias", ("attn", "qkv", "bias"), (3 * D,), (3, N, H)),
        ("attn.c_proj.weight", ("attn", "out", "kernel"), (D, D), (N, H, D)),
        ("attn.c_proj.bias", ("attn", "out", "bias"), (D,), (D,)),
        ("ln_2.weight", ("ln_2", "scale"), (D,), (D,)),
        ("ln_2.bias", ("ln_2", "bias"), (D,), (D,)),
        ("mlp.c_fc.weight", ("mlp", "fc", "kernel"), (D, F), (D, F)),
        ("mlp.c_fc.bias", ("mlp", "fc", "bias"), (F,), (F,)),
        ("mlp.c_proj.weight", ("mlp", "proj", "kernel"), (F, D), (F, D)),
        ("mlp.c_proj.bias", ("mlp", "proj", "bias"), (D,), (D,)),
    ]


def _is_bias(path: tuple[str, ...]) -> bool:
    return path[-1] == "bias"


# ---------------------------------------------------------------------------------------- config


def model_fields_from_hf(hf_config: Any) -> dict[str, Any]:
    """The `model.*` config fields of a transformers GPT2Config. Raises InteropError for what our
    GPT cannot compute (another architecture, another attention scaling, an unknown activation).
    Dropout rates are not taken: they are a training choice, not part of the weights."""
    get = lambda name, default=None: getattr(hf_config, name, default)
    if get("model_type") != "gpt2":
        raise InteropError(f"model_type={get('model_type')!r} is not 'gpt2'; only GPT-2 models "
                           "(GPT2LMHeadModel) convert.")
    activation = get("activation_function")
    if activation not in ACTIVATIONS_FROM_HF:
        raise InteropError(f"activation_function={activation!r} has no model.activation; "
                           f"convertible ones: {sorted(ACTIVATIONS_FROM_HF)}.")
    for name, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if bool(get(name, want)) != want:
            raise InteropError(f"{name}={get(name)!r} is not supported (our attention needs "
                               f"{name}={want}); this model does not convert.")
    # A hand-edited or foreign config.json can hold anything: checked here, before arithmetic.
    for name in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        require_count(name, get(name))
    if get("n_inner") is not None:
        require_count("n_inner", get("n_inner"))
    for name in ("layer_norm_epsilon", "initializer_range"):
        if isinstance(get(name), bool) or not isinstance(get(name), (int, float)):
            raise InteropError(f"{name}={get(name)!r} in config.json is not a number; give the "
                               "config.json that save_pretrained wrote with the weights.")
    d_model, inner = get("n_embd"), get("n_inner") or 4 * get("n_embd")
    if inner % d_model:
        raise InteropError(f"n_inner={inner} is not a multiple of n_embd={d_model}; "
                           "model.mlp_ratio cannot express it.")
    return {
        "num_layers": get("n_layer"),
        "num_heads": get("n_head"),
        "d_model": d_model,
        "mlp_ratio": inner // d_model,
        "max_seq_len": get("n_positions"),
        "vocab_size": get("vocab_size"),
        "bias": True,  # HF GPT-2 always has biases.
        "tie_embeddings": bool(get("tie_word_embeddings", True)),
        "activation": ACTIVATIONS_FROM_HF[activation],
        "norm_eps": float(get("layer_norm_epsilon")),
        "init_std": float(get("initializer_range")),
    }


def require_count(name: str, value: Any) -> None:
    """Raises InteropError unless the HF config field `name` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InteropError(f"{name}={value!r} in config.json is not a positive integer; give the "
                           "config.json that save_pretrained wrote with the weights.")


def require_gpt2_block(cfg: GPTConfig, consequence: str) -> None:
    """InteropError unless `cfg` has GPT-2's block (the variants of configs/base.py at GPT-2's
    values): `consequence` says what that means where it is called."""
    gpt2 = {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False,
            "attention": "dot_product", "logit_softcap": 0.0, "mlp_dim": None,
            "scale_embeddings": False}
    for field, value in gpt2.items():
        if getattr(cfg, field) != value:
            raise InteropError(f"model.{field}={getattr(cfg, field)!r}: GPT-2 has {value!r}, so "
                               f"{consequence}; set --config.model.{field}={value}.")
    if cfg.kv_heads != cfg.num_heads:
        raise InteropError(f"model.num_kv_heads={cfg.num_kv_heads}: GPT-2 has one key/value head "
                           f"per query head, so {consequence}; leave model.num_kv_heads unset.")


def hf_config_from_model(cfg: GPTConfig) -> Any:
    """A transformers GPT2Config for the model `cfg` (the real vocab, not the padded one)."""
    import transformers  # Only conversions need it (requirements-dev.txt).

    if cfg.activation not in ACTIVATIONS_TO_HF:
        raise InteropError(f"model.activation={cfg.activation!r} has no GPT-2 equivalent; "
                           f"exportable ones: {sorted(ACTIVATIONS_TO_HF)}.")
    require_gpt2_block(cfg, "this model has no GPT2LMHeadModel equivalent")
    # <|endoftext|> only exists in GPT-2's own vocabulary; ids outside a small vocab would break
    # HF's generate.
    eos = GPT2_VOCAB_SIZE - 1 if cfg.vocab_size == GPT2_VOCAB_SIZE else None
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=None if cfg.hidden_dim == 4 * cfg.d_model else cfg.hidden_dim,  # None: 4·n_embd.
        activation_function=ACTIVATIONS_TO_HF[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        architectures=["GPT2LMHeadModel"],
    )


# HF config name of each model field checked by check_fits, for messages.
_HF_NAMES = {"num_layers": "n_layer", "num_heads": "n_head", "d_model": "n_embd",
             "mlp_ratio": "n_inner / n_embd", "vocab_size": "vocab_size",
             "tie_embeddings": "tie_word_embeddings", "activation": "activation_function"}


def check_fits(hf_config: Any, cfg: GPTConfig, source: str) -> None:
    """Raises InteropError naming the first model field where the model `cfg` cannot take the HF
    model's weights as they are (the registry's compatibility check, over the fields an HF GPT-2
    fixes). Fewer positions than the HF model are fine (the position table is cropped, as
    nanoGPT's crop_block_size); the layer layout and vocab padding are free."""
    fields = model_fields_from_hf(hf_config)
    require_gpt2_block(cfg, f"{source}'s GPT-2 weights do not fit this model")
    try:
        gpt.ARCH.require_compatible(
            {"arch": "gpt", **fields}, registry.model_fields(cfg), source,
            "set --config.model.{field}={value!r}.",
            fields=("num_layers", "num_heads", "d_model", "mlp_ratio", "vocab_size",
                    "tie_embeddings", "activation"))
    except registry.IncompatibleModelError as e:
        raise InteropError(f"{e} (HF config: {_HF_NAMES[e.field]})") from None
    if cfg.max_seq_len > fields["max_seq_len"]:
        raise InteropError(
            f"{source} has {fields['max_seq_len']} positions (n_positions) but this model has "
            f"model.max_seq_len={cfg.max_seq_len}; set model.max_seq_len (and data.seq_len) to at "
            f"most {fields['max_seq_len']}.")
    if cfg.norm_eps != fields["norm_eps"]:
        logging.warning("%s has layer_norm_epsilon=%g, this model model.norm_eps=%g: the "
                        "outputs will differ slightly", source, fields["norm_eps"], cfg.norm_eps)


# ------------------------------------------------------------------------------------ parameters


def layers(params: Mapping[str, Any], cfg: GPTConfig) -> list[Mapping[str, Any]]:
    """Each block's parameters, from either layout (h_0 … h_{L-1}, or h stacked)."""
    if "h" in params:  # scan_layers: every leaf has a leading layers axis.
        stacked = _map_tree(np.asarray, params["h"])  # Once: device → host.
        count = len(leaf(stacked, ("ln_1", "scale")))
        if count != cfg.num_layers:
            raise InteropError(f"the parameters stack {count} layers but model.num_layers="
                               f"{cfg.num_layers}; give the config they were trained with.")
        return [_map_tree(lambda a, i=i: a[i], stacked) for i in range(count)]
    missing = [f"h_{i}" for i in range(cfg.num_layers) if f"h_{i}" not in params]
    if missing:
        raise InteropError(f"the parameters have no {missing[0]} (model.num_layers="
                           f"{cfg.num_layers}); give the config they were trained with.")
    return [params[f"h_{i}"] for i in range(cfg.num_layers)]


def _map_tree(fn, tree):
    """`fn` on every leaf of a tree of dicts (a small jax.tree.map for plain nested dicts)."""
    return {k: _map_tree(fn, v) for k, v in tree.items()} if isinstance(tree, Mapping) else fn(tree)


def leaf(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise InteropError(f"the parameters have no {'/'.join(path)}; they do not match the "
                               "model config (e.g. model.bias); give the config they were "
                               "trained with.")
        tree = tree[key]
    return tree


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def as_array(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    a = np.asarray(value, dtype=np.float32)
    if a.shape != shape:
        raise InteropError(f"{name} has shape {a.shape}, the model config needs {shape}; give the "
                           "config the parameters were trained with.")
    return a


def params_to_hf(params: Mapping[str, Any], cfg: GPTConfig) -> dict[str, np.ndarray]:
    """A GPT2LMHeadModel state dict (float32 numpy, contiguous) from our parameters.

    Only the real `cfg.vocab_size` rows of the (padded) embedding are written. Biases absent from
    a model.bias=False tree are written as zeros (exact: adding zero). A tied model writes no
    `lm_head.weight` (HF ties it to the embedding on load, as its save_pretrained does)."""
    params = nn.meta.unbox(params)
    D, V = cfg.d_model, cfg.vocab_size
    out = {
        "transformer.wte.weight": as_array(leaf(params, ("wte", "embedding")),
                                         (cfg.padded_vocab_size, D), "wte/embedding")[:V],
        "transformer.wpe.weight": as_array(leaf(params, ("wpe", "embedding")),
                                         (cfg.max_seq_len, D), "wpe/embedding"),
    }
    for i, block in enumerate(layers(params, cfg)):
        for hf_name, path, hf_shape, our_shape in _block_table(cfg):
            if _is_bias(path) and not cfg.bias:
                value = np.zeros(hf_shape, np.float32)
            else:
                value = as_array(leaf(block, path), our_shape, f"h_{i}/{'/'.join(path)}")
            out[f"transformer.h.{i}.{hf_name}"] = value.reshape(hf_shape)
    out["transformer.ln_f.weight"] = as_array(leaf(params, ("ln_f", "scale")), (D,), "ln_f/scale")
    out["transformer.ln_f.bias"] = (as_array(leaf(params, ("ln_f", "bias")), (D,), "ln_f/bias")
                                    if cfg.bias else np.zeros((D,), np.float32))
    if not cfg.tie_embeddings:  # Dense kernel [D, V_padded] → torch Linear weight [V, D].
        kernel_DV = as_array(leaf(params, ("lm_head", "kernel")), (D, cfg.padded_vocab_size),
                           "lm_head/kernel")
        out["lm_head.weight"] = kernel_DV[:, :V].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _canonical_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys as GPT2LMHeadModel names them: OpenAI's hub checkpoints hold a bare GPT2Model
    (`h.0.…`, `wte.weight`) and causal-mask buffers, which carry no parameters."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_BUFFER_SUFFIXES):
            continue
        out[key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"] = value
    return out


def params_from_hf(state_dict: Mapping[str, Any], cfg: GPTConfig) -> dict[str, Any]:
    """Our parameters (numpy, the layout `cfg.scan_layers` names) from a GPT2LMHeadModel state dict.

    The embedding is padded with zero rows to `cfg.padded_vocab_size` (those ids are masked in the
    logits); the position table is cropped to `cfg.max_seq_len` if the HF model has more. With
    model.bias=False, the HF biases must all be zero (a gpt_jax export of such a model)."""
    sd = _canonical_keys(state_dict)
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.num_layers
    table = _block_table(cfg)
    wanted = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
              "transformer.ln_f.bias"}
    wanted |= {f"transformer.h.{i}.{name}" for i in range(L) for name, *_ in table}
    if not cfg.tie_embeddings:
        wanted.add("lm_head.weight")
    missing = sorted(wanted - set(sd))
    if missing:
        raise InteropError(f"the HF weights have no {missing[0]} ({len(missing)} missing); they "
                           "are not a GPT-2 with this config (n_layer, tie_word_embeddings).")
    extra = sorted(set(sd) - wanted - {"lm_head.weight"})
    if extra:
        raise InteropError(f"the HF weights hold {extra[0]}, which a GPT-2 with this config does "
                           f"not have ({len(extra)} unexpected); its config.json does not fit them.")

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return as_array(sd[name], shape, name)

    def no_bias(name: str, shape: tuple[int, ...]) -> None:
        if np.any(get(name, shape) != 0):
            raise InteropError(f"{name} is non-zero but model.bias=False drops biases; set "
                               "model.bias=True.")

    wte_VD = get("transformer.wte.weight", (V, D))
    n_positions = np.shape(sd["transformer.wpe.weight"])[0]
    if n_positions < cfg.max_seq_len:
        raise InteropError(f"the HF model has {n_positions} positions but model.max_seq_len="
                           f"{cfg.max_seq_len}; lower model.max_seq_len (and data.seq_len).")
    pad = ((0, cfg.padded_vocab_size - V), (0, 0))
    params: dict[str, Any] = {
        "wte": {"embedding": np.pad(wte_VD, pad)},
        "wpe": {"embedding": get("transformer.wpe.weight", (n_positions, D))[:cfg.max_seq_len]},
        "ln_f": {"scale": get("transformer.ln_f.weight", (D,))},
    }
    if cfg.bias:
        params["ln_f"]["bias"] = get("transformer.ln_f.bias", (D,))
    else:
        no_bias("transformer.ln_f.bias", (D,))
    blocks = []
    for i in range(L):
        block: dict[str, Any] = {}
        for hf_name, path, hf_shape, our_shape in table:
            name = f"transformer.h.{i}.{hf_name}"
            if _is_bias(path) and not cfg.bias:
                no_bias(name, hf_shape)
                continue
            set_path(block, path, get(name, hf_shape).reshape(our_shape))
        blocks.append(block)
    return with_blocks_and_head(params, blocks, sd, wte_VD, cfg)


def with_blocks_and_head(params: dict[str, Any], blocks: list[dict[str, Any]],
                         sd: Mapping[str, Any], wte_VD: np.ndarray, cfg: GPTConfig
                         ) -> dict[str, Any]:
    """`params` with the blocks in the layout `cfg.scan_layers` names, and the LM head: a tied
    model refuses an `lm_head.weight` that is not the embedding; an untied one takes it (padded
    to the padded vocabulary). The last step of every HF → gpt_jax conversion."""
    if cfg.scan_layers:
        params["h"] = stack(blocks)
    else:
        params.update({f"h_{i}": block for i, block in enumerate(blocks)})
    V, D = cfg.vocab_size, cfg.d_model
    if cfg.tie_embeddings:
        if "lm_head.weight" in sd and not np.array_equal(np.asarray(sd["lm_head.weight"]), wte_VD):
            raise InteropError("lm_head.weight differs from the token embedding but "
                               "model.tie_embeddings=True; set model.tie_embeddings=False.")
    else:
        lm_head_VD = as_array(sd["lm_head.weight"], (V, D), "lm_head.weight")
        params["lm_head"] = {"kernel": np.pad(lm_head_VD.T, ((0, 0), (0, cfg.padded_vocab_size - V)))}
    return params


def stack(trees: list[Any]) -> Any:
    """Same-structured trees → one tree whose leaves have a leading layers axis (nn.scan's)."""
    if isinstance(trees[0], Mapping):
        return {k: stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


# --------------------------------------------------------------------------------- HF folders


def _looks_local(source: str) -> bool:
    return pathlib.Path(source).expanduser().exists() or source.startswith(("/", ".", "~"))


def conversion_extras() -> Any:
    """transformers, torch imported first: reading HF weights needs both (requirements-dev.txt),
    and a missing one fails here as an ImportError, which the commands turn into the fix. They
    take seconds to import, so only once the folder looks right."""
    import torch  # noqa: F401
    import transformers

    return transformers


def load_hf(source: str) -> tuple[Any, dict[str, np.ndarray]]:
    """(GPT2Config, state dict of float32 numpy arrays) from a local folder (config.json plus
    model.safetensors, sharded safetensors or pytorch_model.bin), or from a hub name through
    transformers' from_pretrained where the network allows."""
    if not _looks_local(source):
        transformers = conversion_extras()
        try:
            model = transformers.GPT2LMHeadModel.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise InteropError(f"{source!r} is no local folder and the Hugging Face hub cannot "
                               f"give it ({brief(e, 300, line=0)}); download it where the network "
                               "allows and pass its folder.") from e
        return model.config, {k: _to_numpy(v) for k, v in model.state_dict().items()}
    hf_config = read_local_config(source)
    return hf_config, read_weights(pathlib.Path(source).expanduser())


def check_folder(source: str) -> pathlib.Path:
    """`source` as a folder holding a config.json; InteropError (one line, the fix) if not."""
    folder = pathlib.Path(source).expanduser()
    if folder.is_file():
        raise InteropError(f"{source} is a file, not a folder; give the folder that holds "
                           "config.json and model.safetensors (as save_pretrained writes).")
    if not folder.is_dir():
        raise InteropError(f"{source}: no such folder; give a folder with config.json and "
                           "model.safetensors (as save_pretrained writes).")
    if not (folder / "config.json").is_file():
        raise InteropError(f"{source} has no config.json; give a folder that save_pretrained wrote.")
    return folder


def model_type(source: str) -> str | None:
    """config.json's model_type of a local HF folder (gpt2, llama, …); None for a hub name."""
    if not _looks_local(source):
        return None
    path = check_folder(source) / "config.json"
    return _read_json(path, "the config.json that save_pretrained wrote with the weights"
                      ).get("model_type")


def read_local_config(source: str) -> Any:
    """The GPT2Config of a local HF folder, with every refusal that needs no weights (no such
    folder, no config.json, another model type, values GPT-2 cannot take); an InteropError (or
    an OSError naming an unreadable file) otherwise."""
    folder = check_folder(source)
    config_path = folder / "config.json"
    model_type = _read_json(config_path, "the config.json that save_pretrained wrote with the "
                                         "weights").get("model_type")
    if model_type != "gpt2":
        raise InteropError(f"{config_path} has model_type={model_type!r}; GPT-2 "
                           "(GPT2LMHeadModel) and Llama (LlamaForCausalLM) models convert: give "
                           "one of those.")
    transformers = conversion_extras()  # Only now: a folder that is no GPT-2 is refused fast.
    try:
        hf_config = transformers.GPT2Config.from_pretrained(folder)
    except OSError:
        raise  # Unreadable: the caller says so with the path and the fix.
    except Exception as e:  # Values GPT2Config refuses; transformers raises many kinds.
        raise InteropError(f"{config_path} is not a GPT-2 config transformers reads "
                           f"({brief(e, 300)}); give the config.json that save_pretrained wrote "
                           "with the weights.") from e
    model_fields_from_hf(hf_config)  # Its refusals before the (large) weights are read.
    return hf_config


def _read_json(path: pathlib.Path, want: str) -> dict[str, Any]:
    """The JSON object in `path`; InteropError naming `want` (what the file should be) if it
    holds something else. Not cli.json_object, which answers None for a file that is absent or
    damaged alike: this file is required, so its refusal says what is wrong with it (truncated
    JSON, another type), and an unreadable one raises its OSError, which the command words with
    the path and the fix."""
    try:
        value = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError.
        raise InteropError(f"{path} is not valid JSON ({brief(e, 300)}); it may be truncated: "
                           f"give {want}.") from e
    if not isinstance(value, dict):
        raise InteropError(f"{path} holds a JSON {type(value).__name__}, not an object; give "
                           f"{want}.")
    return value


def read_tokenizer(source: str, build: bool = True
                   ) -> tuple[dict[str, bytes], tokenizers.HFTokenizer | None]:
    """The HF tokenizer files of `source` (name → contents): those of a local folder, or what a
    hub name's tokenizer saves where the network allows. With `build`, also the tokenizer they
    make: their tokenizer.json, or, from GPT-2's vocab.json + merges.txt alone, one converted
    offline by transformers (then added to the files as tokenizer.json). No usable files: None.
    Raises InteropError for files that do not make a tokenizer."""
    import transformers

    folder = pathlib.Path(source).expanduser()
    if _looks_local(source):
        files = {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}
    else:
        try:
            hub_tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            logging.warning("no tokenizer for %s (%s); the workdir has none", source, e)
            return {}, None
        with tempfile.TemporaryDirectory() as tmp:
            hub_tokenizer.save_pretrained(tmp)
            files = {p.name: p.read_bytes() for p in sorted(pathlib.Path(tmp).iterdir())
                     if p.name in TOKENIZER_FILES}
    if not build or not files:
        return files, None
    if "tokenizer.json" not in files:
        if not {"vocab.json", "merges.txt"} <= files.keys():
            logging.warning("%s has %s but neither tokenizer.json nor vocab.json + merges.txt: "
                            "the workdir gets no tokenizer", source, ", ".join(files))
            return files, None
        with tempfile.TemporaryDirectory() as tmp:  # Only the tokenizer files: nothing else read.
            for name, content in files.items():
                (pathlib.Path(tmp) / name).write_bytes(content)
            try:
                gpt2_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(
                    tmp, local_files_only=True)
                converted = gpt2_tokenizer.backend_tokenizer.to_str()
            except Exception as e:  # transformers and tokenizers raise many kinds.
                raise InteropError(
                    f"{source}: vocab.json + merges.txt do not make a GPT-2 tokenizer "
                    f"({brief(e, 300, line=0)}); fix them, or remove them to import without a "
                    "tokenizer.") from e
        files["tokenizer.json"] = converted.encode("utf-8")
    try:
        return files, tokenizers.HFTokenizer(files["tokenizer.json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InteropError(f"{source}: its tokenizer.json is not a Hugging Face tokenizer "
                           f"({brief(e, 300, line=0)}); fix it, or remove it to import without a "
                           "tokenizer.") from e


def _to_numpy(tensor: Any) -> np.ndarray:
    import torch

    return tensor.detach().to(torch.float32).cpu().numpy()


def read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """The state dict of an HF folder. Safetensors are read through torch so that bfloat16 and
    float16 files work too (numpy has no bfloat16). A file that does not read (truncated by an
    interrupted download or copy, or not weights at all) is an InteropError naming it."""
    import safetensors
    import torch

    index = folder / f"{WEIGHTS_NAME}.index.json"
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif index.is_file():  # Sharded: model-00001-of-0000N.safetensors …
        weight_map = _read_json(index, "the index that save_pretrained wrote").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InteropError(f"{index} has no weight_map; give the index that save_pretrained "
                               "wrote with the shards.")
        files = sorted({folder / str(f) for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InteropError(f"{folder} lacks {missing[0]} ({len(missing)} of the {len(files)} "
                               f"shards {index.name} names); download the missing shards.")
    elif (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise  # Unreadable: the caller says so with the path and the fix.
        except Exception as e:  # torch.load raises pickle, zip and runtime errors alike.
            raise InteropError(f"{path} is not a PyTorch state dict that loads safely "
                               f"({type(e).__name__}); it may be truncated: download or save it "
                               "again (save_pretrained writes model.safetensors).") from e
        if not isinstance(state, dict):
            raise InteropError(f"{path} holds a {type(state).__name__}, not a state dict; give a "
                               "folder that save_pretrained wrote.")
        return {k: _to_numpy(v) for k, v in state.items()}
    else:
        raise InteropError(f"{folder} has no {WEIGHTS_NAME} nor pytorch_model.bin; give a folder "
                           "that save_pretrained wrote.")
    out = {}
    for path in files:
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                out.update({k: _to_numpy(f.get_tensor(k)) for k in f.keys()})  # noqa: SIM118
        except safetensors.SafetensorError as e:
            raise InteropError(f"{path} is not a complete safetensors file ({brief(e, 300)}); "
                               "it may be truncated (an interrupted download or copy): download "
                               "or export it again.") from e
    return out


def check_local_source(source: str, cfg: GPTConfig) -> None:
    """What `import_params(source, cfg)` refuses before reading any weight, for a local folder
    (a hub name is only known once downloaded): so a training run refuses a bad
    checkpoint.init_from=hf: before it compiles."""
    if _looks_local(source):
        check_fits(read_local_config(source), cfg, source)


def import_params(source: str, cfg: GPTConfig) -> dict[str, Any]:
    """Our parameters for the model `cfg` from an HF folder or hub name, checked to fit."""
    hf_config, state_dict = load_hf(source)
    check_fits(hf_config, cfg, source)
    return params_from_hf(state_dict, cfg)


def save_hf(params: Mapping[str, Any], cfg: GPTConfig, out_dir: str | pathlib.Path) -> Any:
    """Writes `out_dir`/config.json and model.safetensors, which
    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads; returns the GPT2Config."""
    from safetensors.numpy import save_file

    hf_config = hf_config_from_model(cfg)
    state_dict = params_to_hf(params, cfg)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    # transformers refuses safetensors files without format metadata.
    save_file(state_dict, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return hf_config
