"""Folds a LoRA run's adapters into its base model: a plain GPT workdir (params/ only, like an
import), which samples, evaluates, starts new runs and exports to Hugging Face like any other.

    python tools/merge_lora.py --from=WORKDIR --to=NEW_WORKDIR [--checkpoint=newest|best|STEP]
    python tools/convert_hf.py export --workdir=NEW_WORKDIR --out=HF_DIR   # then, for GPT-2s

Each adapted kernel becomes W + (lora_alpha / lora_rank) · A B, computed in float32 (with
float32 compute, the merged model's logits match the adapted run's to ~1e-6). NEW_WORKDIR must be
new or empty; it appears whole or not at all. A bad invocation ends with one `error:` line
naming the problem and the fix.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # Run from anywhere.

from absl import logging

from gpt_jax import cli
from gpt_jax import config as config_lib
from gpt_jax.finetune import lora
from gpt_jax.models.registry import count_params
from gpt_jax.training import weights


def merge(source: str, out: str | pathlib.Path, which: int | str = "newest") -> pathlib.Path:
    """Writes NEW_WORKDIR `out`: checkpoint `which` of the LoRA run `source` with its adapters
    folded into its base; returns its params/ folder."""
    out = pathlib.Path(out)
    _check_new_workdir(out)
    config, hparams, params, step = weights.load_trained(source, which)
    if not hparams.lora_rank:
        raise ValueError(f"{source} has no LoRA adapters (finetune.lora_rank=0): its parameters "
                         "are a plain model already; sample or export it as it is.")
    if hparams.prompt_tokens:
        raise ValueError(f"{source} also has a soft prompt, which is an input, not a weight: it "
                         "cannot be folded into the model; sample or evaluate the run itself.")
    merged, _ = lora.merge(params, hparams)
    config = config_lib.saved_run_config(json.dumps(config))
    config.finetune.lora_rank, config.finetune.base = 0, None
    config_json = config_lib.to_json(config)
    tokenizer = weights.params_source(source)[0].parent / "tokenizer.json"
    with cli.staged_folder(out) as tmp:
        weights.save_params(tmp, merged, config_json)
        (tmp / "config.json").write_text(config_json + "\n")
        if tokenizer.is_file():
            (tmp / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    print(f"merged the LoRA adapters of {source} (step {step}) into its base: "
          f"{count_params(merged):,} parameters in {out.resolve() / weights.PARAMS_DIR}; sample "
          f"with python -m gpt_jax.sample --workdir={out}")
    return out.resolve() / weights.PARAMS_DIR


def _check_new_workdir(out: pathlib.Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--to={out} is a file; give the path of a new folder.")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--to={out} is not empty; merge into a new or empty folder.")
    if problem := cli.output_problem(out, "--to", out.resolve().parent):
        raise ValueError(problem)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv`; returns 0, or exits with one `error:` line (status 1)."""
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="the LoRA run's workdir")
    parser.add_argument("--to", required=True, help="the workdir to write (new or empty)")
    parser.add_argument("--checkpoint", type=cli.checkpoint_arg, default="newest",
                        help="newest (default), best (lowest val loss) or a step number")
    args = parser.parse_args(argv)
    for flag, value in (("from", args.source), ("to", args.to)):
        if not value.strip():
            cli.fail(f"--{flag} is empty; give a path.")
        cli.refuse_url(value, f"--{flag}")
    logging.set_verbosity(logging.WARNING)
    cli.quiet_orbax_reads()
    with cli.errors_as_one_line():
        merge(args.source, args.to, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
