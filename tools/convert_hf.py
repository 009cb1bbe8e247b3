"""Converts Hugging Face GPT-2 models to gpt_jax workdirs and back.

    python tools/convert_hf.py import --hf=DIR_OR_HUB_NAME --workdir=OUT [--dtype=bfloat16] [--scan_layers]
    python tools/convert_hf.py export --workdir=DIR --out=OUT [--checkpoint=newest|best|STEP]

import: DIR holds config.json and model.safetensors (or sharded safetensors, or pytorch_model.bin);
a hub name (e.g. gpt2) goes through transformers' from_pretrained where the network allows. OUT
gets config.json (configs/gpt2.py's recipe with the model's shape, computing in float32 unless
--dtype=bfloat16, so its logits are transformers' to ~1e-6), the parameters in params/ (read by
`python -m gpt_jax.sample --workdir=OUT` and `--config.checkpoint.init_from=OUT`; never resumed
as a training state), the HF tokenizer files in hf_tokenizer/ as they came, and OUT/tokenizer.json,
gpt_jax's own, which the sample CLI decodes with: the run's tokenizer if DIR came from an export
(gpt_jax_tokenizer.json), else the HF tokenizer.json held whole (vocab.json + merges.txt are
converted to one, offline), else for a 50257-token model tiktoken's gpt2; with none of those the
workdir has no tokenizer.
`--config.checkpoint.init_from=hf:DIR` converts on the fly instead.

export: the newest (or best, or a given step's) parameters of a training or imported workdir go
to OUT/config.json and OUT/model.safetensors, which `transformers.GPT2LMHeadModel.from_pretrained
(OUT)` loads. The run's tokenizer goes along as gpt_jax_tokenizer.json (HF has no char or byte
tokenizer), and an imported model's HF tokenizer files as they came.
"""

from __future__ import annotations

import argparse
import json
import logging as std_logging
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # Run from anywhere.

import jax
import ml_collections
from absl import logging

from configs import gpt2 as gpt2_recipe
from gpt_jax import config as config_lib
from gpt_jax.data import tokenizers
from gpt_jax.interop import hf_gpt2
from gpt_jax.models import registry
from gpt_jax.models.registry import count_params
from gpt_jax.training import checkpoint, weights

OUR_TOKENIZER = "tokenizer.json"  # A workdir's tokenizer (gpt_jax.data.tokenizers format).
EXPORTED_TOKENIZER = "gpt_jax_tokenizer.json"  # Its name in an HF folder, beside HF's own files.
HF_TOKENIZER_DIR = "hf_tokenizer"  # An imported model's HF tokenizer files, in a workdir.


def import_config(hf_config) -> ml_collections.ConfigDict:
    """configs/gpt2.py's recipe with the HF model's shape (model.* fields); data.seq_len at most
    its positions. Dropout stays the recipe's: it is a training choice, not part of the weights."""
    config = gpt2_recipe.get_config()
    for field, value in hf_gpt2.model_fields_from_hf(hf_config).items():
        config.model[field] = value
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    # GPT-2's own vocabulary is OpenAI's BPE; the name exists once tokenizers.py has it.
    if config.model.vocab_size == hf_gpt2.GPT2_VOCAB_SIZE and "gpt2" in tokenizers.TOKENIZERS:
        config.data.tokenizer = "gpt2"
    return config


def import_hf(source: str, workdir: str | pathlib.Path, scan_layers: bool = False,
              dtype: str = "float32") -> pathlib.Path:
    """Writes the gpt_jax workdir `workdir` for the HF GPT-2 `source`, computing in `dtype`;
    returns its params/. Everything is read and checked before anything is written."""
    out = pathlib.Path(workdir)
    for sub in ("checkpoints", weights.PARAMS_DIR):
        if (out / sub).exists():
            raise checkpoint.CheckpointError(f"{out} already holds a model ({sub}/); choose a new "
                                             "--workdir.")
    hf_config, state_dict = hf_gpt2.load_hf(source)
    config = import_config(hf_config)
    config.model.scan_layers = scan_layers
    config.model.dtype = dtype
    ours = pathlib.Path(source).expanduser() / EXPORTED_TOKENIZER
    # The HF tokenizer files always travel along; they make the workdir's tokenizer unless the
    # folder came from a gpt_jax export, whose run's tokenizer comes back (HF has no char/byte).
    hf_files, hf_tokenizer = hf_gpt2.read_tokenizer(source, build=not ours.is_file())
    tokenizer_json, tokenizer_vocab = None, None  # OUT/tokenizer.json, and its vocab if known.
    if ours.is_file():
        tokenizer_json = ours.read_text(encoding="utf-8")
        try:
            name = json.loads(tokenizer_json).get("name")
        except (ValueError, AttributeError):
            raise hf_gpt2.InteropError(f"{ours} is not a gpt_jax tokenizer file; export the run "
                                       "again, or remove the file to import without it.") from None
        if name in tokenizers.TOKENIZERS:  # Not hf:PATH, whose path was the run's.
            config.data.tokenizer = name
    elif hf_tokenizer is not None:
        # Held whole (HFTokenizer.to_dict), so the workdir decodes wherever it is moved.
        tokenizer_json = json.dumps(hf_tokenizer.to_dict(), ensure_ascii=False)
        tokenizer_vocab = hf_tokenizer.vocab_size
        if config.data.tokenizer != "gpt2":  # gpt2: OpenAI's BPE, which tiktoken encodes faster.
            config.data.tokenizer = (f"{tokenizers.HF_PREFIX}"
                                     f"{out.resolve() / HF_TOKENIZER_DIR / 'tokenizer.json'}")
    elif config.data.tokenizer == "gpt2":
        # OpenAI's BPE is tiktoken's "gpt2": its saved form is the name (GPT2Tokenizer.to_dict);
        # building it here would need tiktoken's file, which sampling loads when it runs.
        tokenizer_json = json.dumps({"name": "gpt2"}) + "\n"
    if tokenizer_vocab is not None and tokenizer_vocab > config.model.vocab_size:
        logging.warning("the tokenizer has %d tokens but the model only %d: prompts holding the "
                        "others cannot be sampled from", tokenizer_vocab, config.model.vocab_size)
    config_lib.validate(config)
    cfg = registry.hyperparameters(config)
    params = hf_gpt2.params_from_hf(state_dict, cfg)
    config_json = config_lib.to_json(config)
    out.mkdir(parents=True, exist_ok=True)
    params_dir = weights.save_params(out, params, config_json)
    (out / "config.json").write_text(config_json + "\n")
    written = []
    if hf_files:
        (out / HF_TOKENIZER_DIR).mkdir(exist_ok=True)
        for name, content in hf_files.items():
            (out / HF_TOKENIZER_DIR / name).write_bytes(content)
            written.append(f"{HF_TOKENIZER_DIR}/{name}")
    if tokenizer_json is not None:
        (out / OUR_TOKENIZER).write_text(tokenizer_json, encoding="utf-8")
        written.append(OUR_TOKENIZER)
    print(f"imported {source} ({count_params(params):,} parameters, {cfg.num_layers} layers, "
          f"d_model {cfg.d_model}, computing in {dtype}) into {params_dir}"
          + (f"; tokenizer: {', '.join(written)}" if written else "; no tokenizer files"))
    print(f"sample with python -m gpt_jax.sample --workdir={out}; " if tokenizer_json else
          f"{source} has no tokenizer.json (nor vocab.json + merges.txt), so the sample CLI cannot "
          "decode for this workdir (import again from a folder that has them); ", end="")
    print(f"start a run from it with --config.checkpoint.init_from={out} and the model.* settings "
          "of its config.json")
    return params_dir


def export_hf(workdir: str | pathlib.Path, out: str | pathlib.Path,
              which: int | str | None = None) -> pathlib.Path:
    """Writes the parameters of `workdir`'s checkpoint `which` (newest, best or a step) as an HF
    GPT-2 folder `out`; returns `out`."""
    _, cfg, params, step = weights.load_trained(workdir, which)
    if registry.arch_of(cfg).name != "gpt":
        raise hf_gpt2.InteropError(f"{workdir} holds a model.arch={registry.arch_of(cfg).name!r} "
                                   "model; only GPT-2 (model.arch=gpt) models export.")
    params = jax.device_get(params)
    run_dir = weights.params_source(str(workdir))[0].parent
    out = pathlib.Path(out)
    hf_gpt2.save_hf(params, cfg, out)
    written = ["config.json", hf_gpt2.WEIGHTS_NAME, *_copy_tokenizers(run_dir, out)]
    print(f"exported step {step} of {run_dir} ({count_params(params):,} parameters) to {out}: "
          f"{', '.join(written)}")
    return out


def _copy_tokenizers(run_dir: pathlib.Path, out: pathlib.Path) -> list[str]:
    """The run's tokenizer as gpt_jax_tokenizer.json, and an imported model's HF tokenizer files
    (hf_tokenizer/) under their own names; returns the names written."""
    names = []
    if (run_dir / OUR_TOKENIZER).is_file():
        shutil.copyfile(run_dir / OUR_TOKENIZER, out / EXPORTED_TOKENIZER)
        names.append(EXPORTED_TOKENIZER)
    for name in hf_gpt2.TOKENIZER_FILES:
        if (run_dir / HF_TOKENIZER_DIR / name).is_file():
            shutil.copyfile(run_dir / HF_TOKENIZER_DIR / name, out / name)
            names.append(name)
    return names


def _checkpoint_arg(value: str) -> int | str:
    if value in ("newest", "best"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not newest, best or a step number") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF GPT-2 → gpt_jax workdir")
    imp.add_argument("--hf", required=True, help="HF folder (config.json + weights) or hub name")
    imp.add_argument("--workdir", required=True, help="the gpt_jax workdir to write")
    imp.add_argument("--scan_layers", action="store_true",
                     help="stack the layers (model.scan_layers=True layout)")
    imp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="the workdir's compute dtype (model.dtype): float32 (default) gives "
                          "transformers' logits (to ~1e-6); bfloat16 is faster on accelerators, "
                          "its logits differ at bfloat16's precision")
    exp = commands.add_parser("export", help="gpt_jax workdir → HF GPT-2 folder")
    exp.add_argument("--workdir", required=True,
                     help="a training or imported workdir, its checkpoints/ or one step's folder")
    exp.add_argument("--out", required=True, help="the HF folder to write")
    exp.add_argument("--checkpoint", type=_checkpoint_arg, default="newest",
                     help="newest (default), best (lowest val loss) or a step number")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    # Orbax warns that a read-only manager will not save: true, and no news here.
    std_logging.getLogger("absl").addFilter(
        lambda record: record.levelno >= std_logging.ERROR or "/orbax/" not in record.pathname)
    try:
        if args.command == "import":
            import_hf(args.hf, args.workdir, args.scan_layers, args.dtype)
        else:
            export_hf(args.workdir, args.out, args.checkpoint)
    except (config_lib.ConfigError, checkpoint.CheckpointError, hf_gpt2.InteropError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}; the conversion needs torch and transformers: pip install -r "
              "requirements-dev.txt", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
