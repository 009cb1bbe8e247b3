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

Neither overwrites: import wants a new (or empty) --workdir; export a new or empty --out, or an
earlier export, which it replaces whole. Both write into a temporary folder beside the target and
rename it into place, so a refused or failed conversion leaves nothing half-written. A bad
invocation ends with one `error:` line naming the problem and the fix (gpt_jax/cli.py).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # Run from anywhere.

import jax
import ml_collections
from absl import logging

from configs import gpt2 as gpt2_recipe
from configs import llama as llama_recipe
from gpt_jax import cli
from gpt_jax import config as config_lib
from gpt_jax.data import tokenizers
from gpt_jax.interop import hf_gpt2, hf_llama
from gpt_jax.models import registry
from gpt_jax.models.registry import count_params
from gpt_jax.training import checkpoint, weights

OUR_TOKENIZER = "tokenizer.json"  # A workdir's tokenizer (gpt_jax.data.tokenizers format).
EXPORTED_TOKENIZER = "gpt_jax_tokenizer.json"  # Its name in an HF folder, beside HF's own files.
HF_TOKENIZER_DIR = "hf_tokenizer"  # An imported model's HF tokenizer files, in a workdir.
# What an export writes: a folder holding only these (and an HF GPT-2 config.json) is an earlier
# export, which a new one may replace; anything else in --out is someone's files.
EXPORT_FILES = frozenset({"config.json", hf_gpt2.WEIGHTS_NAME, EXPORTED_TOKENIZER,
                          *hf_gpt2.TOKENIZER_FILES})
# Names that mark a gpt_jax workdir (a training run's or an import's).
WORKDIR_MARKS = ("checkpoints", weights.PARAMS_DIR, "metrics.jsonl")


def import_config(hf_config) -> ml_collections.ConfigDict:
    """configs/gpt2.py's (or for a Llama configs/llama.py's) recipe with the HF model's shape
    (model.* fields); data.seq_len at most its positions. Dropout stays the recipe's: it is a
    training choice, not part of the weights."""
    llama = getattr(hf_config, "model_type", None) == hf_llama.MODEL_TYPE
    config = llama_recipe.get_config("tiny") if llama else gpt2_recipe.get_config()
    interop = hf_llama if llama else hf_gpt2
    for field, value in interop.model_fields_from_hf(hf_config).items():
        config.model[field] = value
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    # GPT-2's own vocabulary is OpenAI's BPE; the name exists once tokenizers.py has it.
    if config.model.vocab_size == hf_gpt2.GPT2_VOCAB_SIZE and "gpt2" in tokenizers.TOKENIZERS:
        config.data.tokenizer = "gpt2"
    return config


def import_hf(source: str, workdir: str | pathlib.Path, scan_layers: bool = False,
              dtype: str = "float32") -> pathlib.Path:
    """Writes the gpt_jax workdir `workdir` for the HF GPT-2 `source`, computing in `dtype`;
    returns its params/. Everything is read and checked before anything is written, and the
    workdir appears whole or not at all (written beside it, then renamed)."""
    out = pathlib.Path(workdir)
    _check_new_workdir(out)
    interop = hf_llama if hf_gpt2.model_type(source) == hf_llama.MODEL_TYPE else hf_gpt2
    hf_config, state_dict = interop.load_hf(source)
    config = import_config(hf_config)
    config.model.scan_layers = scan_layers
    config.model.dtype = dtype
    ours = pathlib.Path(source).expanduser() / EXPORTED_TOKENIZER
    # The HF tokenizer files always travel along; they make the workdir's tokenizer unless the
    # folder came from a gpt_jax export, whose run's tokenizer comes back (HF has no char/byte).
    hf_files, hf_tokenizer = hf_gpt2.read_tokenizer(source, build=not ours.is_file())
    tokenizer_json, tokenizer_vocab = None, None  # OUT/tokenizer.json, and its vocab if known.
    if ours.is_file():
        try:
            tokenizer_json = ours.read_text(encoding="utf-8")
            name = json.loads(tokenizer_json).get("name")
        except (ValueError, AttributeError):  # Not UTF-8, not JSON, not an object.
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
    params = interop.params_from_hf(state_dict, cfg)
    config_json = config_lib.to_json(config)
    written = []
    with cli.staged_folder(out) as tmp:
        weights.save_params(tmp, params, config_json)
        (tmp / "config.json").write_text(config_json + "\n")
        if hf_files:
            (tmp / HF_TOKENIZER_DIR).mkdir()
            for name, content in hf_files.items():
                (tmp / HF_TOKENIZER_DIR / name).write_bytes(content)
                written.append(f"{HF_TOKENIZER_DIR}/{name}")
        if tokenizer_json is not None:
            (tmp / OUR_TOKENIZER).write_text(tokenizer_json, encoding="utf-8")
            written.append(OUR_TOKENIZER)
    params_dir = out.resolve() / weights.PARAMS_DIR
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
    GPT-2 folder `out`; returns `out`. `out` must be new, empty or an earlier export (replaced
    whole); it appears whole or is left as it was (written beside it, then renamed)."""
    out = pathlib.Path(out)
    checkpoints, run_dir = _run_folders(workdir)
    _check_export_dir(out, run_dir, checkpoints)
    cfg = registry.hyperparameters(weights.trained_config(workdir, which).config)
    if registry.arch_of(cfg).name != "gpt":
        raise hf_gpt2.InteropError(f"{workdir} holds a model.arch={registry.arch_of(cfg).name!r} "
                                   "model; only GPT-2 (model.arch=gpt) models export.")
    if cfg.lora_rank:
        raise hf_gpt2.InteropError(f"{workdir} holds LoRA adapters on a base model; merge them "
                                   "first (python tools/merge_lora.py --from=… --to=NEW), then "
                                   "export NEW.")
    if cfg.prompt_tokens:
        raise hf_gpt2.InteropError(f"{workdir} has a soft prompt, an input that no Hugging Face "
                                   "model takes; export its base (finetune.base) instead.")
    _, cfg, params, step = weights.load_trained(workdir, which)
    params = jax.device_get(params)
    # A Llama block exports as LlamaForCausalLM; anything else must be a GPT-2 (its refusal
    # names the field that is not).
    interop = hf_llama if cfg.norm == "rmsnorm" and cfg.positions == "rope" else hf_gpt2
    with cli.staged_folder(out) as tmp:
        interop.save_hf(params, cfg, tmp)
        written = ["config.json", hf_gpt2.WEIGHTS_NAME, *_copy_tokenizers(run_dir, tmp)]
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


def _run_folders(workdir: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(checkpoint folder, run folder) of an export's --workdir, refusing a folder that is no
    gpt_jax workdir before anything is loaded."""
    checkpoints, step = weights.params_source(str(workdir))
    # params_source falls back to the folder itself: a checkpoints/ or params/ folder given
    # directly holds step folders; anything else is not a run.
    if step is None and not any(p.name.isdigit() and p.is_dir() for p in checkpoints.iterdir()):
        if checkpoints.name in ("checkpoints", weights.PARAMS_DIR):
            raise checkpoint.CheckpointError(
                f"--workdir={workdir}: {checkpoints} holds no checkpoint yet (a run saves one "
                "every checkpoint.every steps); export once it has, or give another workdir.")
        config = cli.json_object(checkpoints / "config.json") or {}
        if "model_type" in config:
            raise hf_gpt2.InteropError(
                f"--workdir={workdir} is a Hugging Face folder, not a gpt_jax workdir; export "
                "takes a training run's or an imported model's workdir (import reads HF folders).")
        if "model" not in config:
            raise hf_gpt2.InteropError(
                f"--workdir={workdir} is not a gpt_jax workdir (no checkpoints/ nor params/); "
                "give a training run's or an imported model's workdir.")
        raise checkpoint.CheckpointError(
            f"--workdir={workdir} has no checkpoints/ folder: its run saved no checkpoint (a run "
            "saves one every checkpoint.every steps); export once it has, or give another workdir.")
    return checkpoints, checkpoints.parent


def _check_new_workdir(out: pathlib.Path) -> None:
    """Refuses an import --workdir that is a file or holds anything (a training run, an earlier
    import, other files): an import never overwrites. Also refuses an unwritable place up front,
    before the (slow) read."""
    if out.exists() and not out.is_dir():
        raise hf_gpt2.InteropError(f"--workdir={out} is a file; give the path of a new folder.")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names:
        what = ("a training run" if {"checkpoints", "metrics.jsonl"} & set(names) else
                "an imported model" if weights.PARAMS_DIR in names else "files")
        raise hf_gpt2.InteropError(f"--workdir={out} already holds {what} ({_names(names)}); "
                                   "import into a new or empty folder.")
    _check_writable(out, "--workdir")


def _check_export_dir(out: pathlib.Path, run_dir: pathlib.Path,
                      checkpoints: pathlib.Path) -> None:
    """Refuses an export --out that is a file, the run's workdir or inside its checkpoints, or a
    folder holding anything but an earlier export (which the export replaces whole): the run's
    config.json, another workdir or someone's files are never written over."""
    if out.exists() and not out.is_dir():
        raise hf_gpt2.InteropError(f"--out={out} is a file; give the path of a new folder.")
    where = out.resolve()
    clash = ("is the run's own workdir" if where == run_dir else
             f"holds the run's workdir {run_dir}" if run_dir.is_relative_to(where) else
             f"is inside the run's {checkpoints.name}/" if where.is_relative_to(checkpoints)
             else None)
    if clash:
        raise hf_gpt2.InteropError(f"--out={out} {clash}: the export would write over the run's "
                                   "files; give a folder outside it.")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and not _is_export(out, names):
        marked = [n for n in names if n in WORKDIR_MARKS]
        what = (f"a gpt_jax workdir ({_names(marked)})" if marked else
                f"files that are not a Hugging Face export of ours ({_names(names)})")
        raise hf_gpt2.InteropError(f"--out={out} already holds {what}; export into a new or "
                                   "empty folder (an earlier export is replaced whole).")
    _check_writable(out, "--out")


def _is_export(folder: pathlib.Path, names: list[str]) -> bool:
    """Whether `folder` (holding `names`) is an earlier export: only files an export writes, and
    a config.json that is an HF GPT-2 one (a workdir's has no model_type)."""
    if not set(names) <= EXPORT_FILES or not all((folder / n).is_file() for n in names):
        return False
    return (cli.json_object(folder / "config.json") or {}).get("model_type") == "gpt2"


def _names(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f", … ({len(names)} entries)" if len(names) > most else "")


def _check_writable(out: pathlib.Path, flag: str) -> None:
    """Refuses `out` if the nearest folder that exists above it is a file or not writable: found
    before the conversion's work, not after it. Its parent is what is written (cli.staged_folder
    writes beside `out` and renames), so an existing `out` need not be writable itself."""
    if problem := cli.output_problem(out, flag, out.resolve().parent):
        raise hf_gpt2.InteropError(problem)


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    # Subparsers are cli.ArgumentParsers too; the metavar names the choices in "arguments are
    # required".
    commands = parser.add_subparsers(dest="command", metavar="{import,export}", required=True)
    imp = commands.add_parser("import", help="HF GPT-2 → gpt_jax workdir")
    imp.add_argument("--hf", required=True, help="HF folder (config.json + weights) or hub name")
    imp.add_argument("--workdir", required=True, help="the gpt_jax workdir to write (new or empty)")
    imp.add_argument("--scan_layers", action="store_true",
                     help="stack the layers (model.scan_layers=True layout)")
    imp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="the workdir's compute dtype (model.dtype): float32 (default) gives "
                          "transformers' logits (to ~1e-6); bfloat16 is faster on accelerators, "
                          "its logits differ at bfloat16's precision")
    exp = commands.add_parser("export", help="gpt_jax workdir → HF GPT-2 folder")
    exp.add_argument("--workdir", required=True,
                     help="a training or imported workdir, its checkpoints/ or one step's folder")
    exp.add_argument("--out", required=True,
                     help="the HF folder to write: new, empty or an earlier export (replaced)")
    exp.add_argument("--checkpoint", type=cli.checkpoint_arg, default="newest",
                     help="newest (default), best (lowest val loss) or a step number")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv`; returns 0, or exits with one `error:` line (status 1)."""
    args = _parser().parse_args(argv)
    for flag in ("hf", "workdir", "out"):
        value = getattr(args, flag, None)
        if value is not None and not value.strip():  # "" would mean the current folder.
            cli.fail(f"--{flag} is empty; give a path.")
        cli.refuse_url(value, f"--{flag}")
    logging.set_verbosity(logging.WARNING)
    cli.quiet_orbax_reads()
    try:
        with cli.errors_as_one_line():
            if args.command == "import":
                import_hf(args.hf, args.workdir, args.scan_layers, args.dtype)
            else:
                export_hf(args.workdir, args.out, args.checkpoint)
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("torch", "transformers", "safetensors"):
            raise  # Not a missing optional dependency: a bug, with its traceback.
        cli.fail(f"{e}; the conversion needs torch, transformers and safetensors: pip install "
                 "'.[hf]' (or pip install -r requirements-dev.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
