"""`python -m gpt_jax.sample --workdir=DIR --prompt=TEXT`: continue a prompt with a trained run
(or a model imported by tools/convert_hf.py).

Loads the run's tokenizer and the parameters of one checkpoint (the newest by default,
`--checkpoint=best` for the lowest val loss, or a step number), then samples with the KV cache.
"""

from __future__ import annotations

import logging as std_logging
import pathlib
import sys

import flax.linen as nn
import jax
from absl import app, flags, logging

from gpt_jax.data import tokenizers
from gpt_jax.generate import SamplingParams, generate
from gpt_jax.models import registry
from gpt_jax.training import weights

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
flags.DEFINE_string("checkpoint", "newest", "newest | best (lowest val loss) | a step number.")
flags.DEFINE_string("prompt", "\n", "Prompt text, or FILE:path to read it from a file.")
flags.DEFINE_integer("num_samples", 1, "Continuations to draw (one batch).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.")
flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("stop", None, "Stop a sample when it emits the first token of this text "
                    "(e.g. a newline); a token that merges it with more text does not stop it.")


class RunError(ValueError):
    """A workdir or flag that cannot be sampled from; the message says why and what to do."""


def load_run(workdir: str | pathlib.Path, which: str = "newest"
             ) -> tuple[tokenizers.Tokenizer, nn.Module, dict, int]:
    """(tokenizer, model, params, step) of a run's checkpoint `which` (newest | best | a step).
    Only the parameters are read; they land on the default device."""
    workdir = pathlib.Path(workdir).expanduser()
    if not (workdir / "tokenizer.json").is_file():
        if (workdir / weights.PARAMS_DIR).is_dir() and not (workdir / "checkpoints").is_dir():
            raise RunError(f"{workdir} holds an imported model but no tokenizer.json (its "
                           "Hugging Face folder had no tokenizer files): add the model's "
                           "tokenizer.json (or vocab.json + merges.txt) to that folder and import "
                           "it again into a new --workdir with tools/convert_hf.py.")
        raise RunError(f"{workdir} has no tokenizer.json; give the --workdir of a training run.")
    if which not in ("newest", "best") and not which.isdigit():
        raise RunError(f"--checkpoint={which!r}: use newest, best or a step number.")
    _, hparams, params, step = weights.load_trained(workdir, which if not which.isdigit()
                                                    else int(which))
    return (tokenizers.load_tokenizer(workdir / "tokenizer.json"), registry.build(hparams),
            params, step)


def read_prompt(arg: str) -> str:
    """`--prompt` text, or the contents of the file named after `FILE:`."""
    if arg.startswith("FILE:"):
        path = pathlib.Path(arg[5:]).expanduser()
        if not path.is_file():
            raise RunError(f"--prompt={arg!r}: no such file.")
        return path.read_text(encoding="utf-8")
    return arg


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax's restore chatter would bury the samples.
    # Orbax also warns that a read-only checkpoint manager will not save: true, and no news here.
    std_logging.getLogger("absl").addFilter(
        lambda record: record.levelno >= std_logging.ERROR or "/orbax/" not in record.pathname)
    try:
        tokenizer, model, params, step = load_run(FLAGS.workdir, FLAGS.checkpoint)
        prompt = tokenizer.encode(read_prompt(FLAGS.prompt))
        stop = [] if FLAGS.stop is None else tokenizer.encode(FLAGS.stop)[:1].tolist()
        sampling = SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
        for name, value, ok in (("num_samples", FLAGS.num_samples, FLAGS.num_samples >= 1),
                                ("max_new_tokens", FLAGS.max_new_tokens, FLAGS.max_new_tokens >= 1),
                                ("temperature", FLAGS.temperature, FLAGS.temperature >= 0),
                                ("top_k", FLAGS.top_k, FLAGS.top_k >= 0),
                                ("top_p", FLAGS.top_p, 0 < FLAGS.top_p <= 1)):
            if not ok:
                raise RunError(f"--{name}={value} is out of range; see --help.")
    except ValueError as e:  # RunError, CheckpointError, ConfigError: one line each.
        sys.exit(f"error: {e}")
    outs = generate(model, params, [prompt] * FLAGS.num_samples, FLAGS.max_new_tokens,
                    jax.random.key(FLAGS.seed), sampling, stop_tokens=stop)
    print(f"# {FLAGS.workdir}, checkpoint step {step}", file=sys.stderr)
    for out in outs:
        print("-" * 40 + "\n" + tokenizer.decode(out.tolist()), flush=True)


if __name__ == "__main__":
    app.run(main)
