"""`python -m gpt_jax.sample --workdir=DIR --prompt=TEXT`: continue a prompt with a trained run
(or a model imported by tools/convert_hf.py).

Loads the run's tokenizer and the parameters of one checkpoint (the newest by default,
`--checkpoint=best` for the lowest val loss, or a step number), then samples with the KV cache.
A prompt longer than the model's context is fine: the sampler slides its window over it.

A bad invocation (a flag, a folder that is no run, a damaged checkpoint or tokenizer.json) ends
with one `error:` line that names the problem and the fix, and exit status 1; nothing is written.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import app, flags, logging

from gpt_jax import cli
from gpt_jax.data import tokenizers

if TYPE_CHECKING:
    import flax.linen as nn

# jax, Flax and Orbax are imported where a checkpoint is read: a mistake in the flags or the
# prompt, or a folder that is no run, is reported before they load (a second saved).

COMMAND = "python -m gpt_jax.sample"
FLAGS = flags.FLAGS


def _define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The command's flags, in `flag_values`; defined only when run as a program, so that
    importers (load_run …) get no flags, which would clash with another command's (train's
    --workdir) in their process."""
    into = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "A training run's workdir (required).", **into)
    flags.DEFINE_string("checkpoint", "newest", "newest | best (lowest val loss) | a step number.",
                        **into)
    flags.DEFINE_string("prompt", "\n", "Prompt text, or FILE:path to read it from a file.", **into)
    flags.DEFINE_integer("num_samples", 1, "Continuations to draw (one batch).", **into)
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.", **into)
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.", **into)
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).", **into)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).", **into)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", **into)
    flags.DEFINE_string("stop", None, "Stop a sample when it emits the first token of this text "
                        "(e.g. a newline); a token that merges it with more text does not stop it.",
                        **into)


# Each numeric flag: whether a value is allowed, and the allowed values in words.
_RANGES = {
    "num_samples": (lambda v: v >= 1, "an integer ≥ 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer ≥ 1"),
    "temperature": (lambda v: v >= 0, "a number ≥ 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "an integer ≥ 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
}
_HELP = f"{COMMAND} --helpshort"


class RunError(ValueError):
    """A workdir or flag that cannot be sampled from; the message says why and what to do."""


def check_flags() -> None:
    """Raises RunError for a missing --workdir or a number out of its range: before anything is
    loaded, so such a mistake costs no checkpoint read."""
    if not FLAGS.workdir:
        raise RunError("--workdir is missing: give the workdir of a training run, e.g. "
                       "--workdir=runs/quickstart.")
    for name, (ok, allowed) in _RANGES.items():
        if not ok(FLAGS[name].value):
            raise RunError(f"--{name}={FLAGS[name].value} is out of range: give {allowed}.")
    if FLAGS.stop == "":
        raise RunError("--stop is empty: give the text to stop at (e.g. a newline), or leave "
                       "the flag out.")


def load_tokenizer(workdir: Any) -> tokenizers.Tokenizer:
    """The tokenizer a run saved in WORKDIR/tokenizer.json; RunError if it is damaged."""
    path = workdir / "tokenizer.json"
    fix = "it is damaged: put back the tokenizer.json that this run's training wrote."
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # Not JSON, or not UTF-8.
        raise RunError(f"{path} is not JSON ({cli.brief(e)}); {fix}") from e
    if isinstance(spec, dict) and spec.get("name") == "gpt2":
        # Its only failure (tiktoken's files offline) has a message of its own, with the fix.
        return tokenizers.tokenizer_from_dict(spec)
    try:
        if not isinstance(spec, dict):
            raise TypeError(f"a JSON {type(spec).__name__}, not an object")
        return tokenizers.tokenizer_from_dict(spec)
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} does not describe a tokenizer ({cli.brief(e, typed=True)}); "
                       f"{fix}") from e


def run_folder(workdir: str | pathlib.Path) -> Any:
    """`workdir` as a path (an etils.epath.Path for a URL, gs://…), if it is a folder this
    process can read; RunError (or an OSError naming it) if not."""
    from gpt_jax.training import remote

    if remote.is_url(workdir):
        if problem := remote.url_problem(str(workdir), "--workdir"):
            raise RunError(problem)
        url = remote.path(workdir)
        if not url.is_dir():
            raise RunError(f"--workdir={workdir}: nothing there; give the workdir of a training "
                           "run.")
        return url
    workdir = pathlib.Path(workdir).expanduser()
    if not workdir.exists():
        raise RunError(f"--workdir={workdir}: no such folder; give the workdir of a training run.")
    if not workdir.is_dir():
        raise RunError(f"--workdir={workdir} is a file, not a folder; give the workdir of a "
                       "training run.")
    os.listdir(workdir)  # An unreadable folder: an OSError naming it, not "no tokenizer.json".
    return workdir


def load_run(workdir: str | pathlib.Path, which: str = "newest"
             ) -> tuple[tokenizers.Tokenizer, nn.Module, dict, int]:
    """(tokenizer, model, params, step) of a run's checkpoint `which` (newest | best | a step).
    Only the parameters are read; they land on the default device."""
    from gpt_jax.models import registry
    from gpt_jax.training import weights

    workdir = run_folder(workdir)
    if which not in ("newest", "best") and not which.isdigit():
        raise RunError(f"--checkpoint={which!r}: use newest, best or a step number.")
    if not (workdir / "tokenizer.json").is_file():
        if (workdir / weights.PARAMS_DIR).is_dir() and not (workdir / "checkpoints").is_dir():
            raise RunError(f"{workdir} holds an imported model but no tokenizer.json (its "
                           "Hugging Face folder had no tokenizer files): add the model's "
                           "tokenizer.json (or vocab.json + merges.txt) to that folder and import "
                           "it again into a new --workdir with tools/convert_hf.py.")
        raise RunError(f"{workdir} has no tokenizer.json; give the --workdir of a training run.")
    if not any((workdir / sub).is_dir() for sub in ("checkpoints", weights.PARAMS_DIR)):
        raise RunError(f"{workdir} has no checkpoints/ folder: its run saved no checkpoint; train "
                       "until it saves one (every checkpoint.every steps), or give another "
                       "--workdir.")
    tokenizer = load_tokenizer(workdir)
    _, hparams, params, step = weights.load_trained(workdir, which if not which.isdigit()
                                                    else int(which))
    return tokenizer, registry.build(hparams), params, step


def read_prompt(arg: str) -> str:
    """`--prompt` text, or the contents of the file named after `FILE:`; RunError if it is empty
    (the model needs a token to continue) or the file cannot be read."""
    if not arg.startswith("FILE:"):
        if not arg:
            raise RunError("--prompt is empty: give at least one character (the default is a "
                           "newline).")
        return arg
    path = pathlib.Path(arg[5:]).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RunError(f"--prompt=FILE:{cli.os_error(e)}") from e
    except UnicodeDecodeError as e:
        raise RunError(f"--prompt={arg} is not UTF-8 text ({e.reason} at byte {e.start}); give "
                       "a text file.") from e
    if not text:
        raise RunError(f"--prompt={arg}: the file is empty; give a file holding at least one "
                       "character.")
    return text


def encode_prompt(tokenizer: tokenizers.Tokenizer, text: str, model_vocab: int) -> np.ndarray:
    """The prompt's token ids; RunError for text the tokenizer cannot encode, or a token the
    model has no embedding for (a tokenizer larger than the model: tools/convert_hf.py allows it)."""
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        raise RunError(f"--prompt: {e}") from e
    if ids.size and int(ids.max()) >= model_vocab:
        bad = int(ids[ids >= model_vocab][0])
        raise RunError(f"--prompt holds token {bad} ({tokenizer.decode([bad])!r}), which the "
                       f"model lacks: its vocab has {model_vocab} tokens, tokenizer.json "
                       f"{tokenizer.vocab_size}; leave that text out of the prompt.")
    return ids


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}: every setting is a flag (--name=value); see "
                 f"{_HELP}.")
    logging.set_verbosity(logging.WARNING)  # Orbax's restore chatter would bury the samples.
    with cli.errors_as_one_line():
        check_flags()
        text = read_prompt(FLAGS.prompt)
        run_folder(FLAGS.workdir)  # Before jax and Orbax load.
        cli.quiet_orbax_reads()
        tokenizer, model, params, step = load_run(FLAGS.workdir, FLAGS.checkpoint)
        vocab = model.cfg.vocab_size
        prompt = encode_prompt(tokenizer, text, vocab)
        try:
            stop = [] if FLAGS.stop is None else tokenizer.encode(FLAGS.stop)[:1].tolist()
        except ValueError as e:
            raise RunError(f"--stop: {e}") from e
    import jax

    from gpt_jax.generate import SamplingParams, generate
    from gpt_jax.training import memory

    sampling = SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    try:
        outs = generate(model, params, [prompt] * FLAGS.num_samples, FLAGS.max_new_tokens,
                        jax.random.key(FLAGS.seed), sampling, stop_tokens=stop)
    except jax.errors.JaxRuntimeError as e:
        if not memory.is_out_of_memory(e):
            raise
        cli.fail(f"out of device memory drawing {FLAGS.num_samples} × {FLAGS.max_new_tokens} "
                 f"tokens ({cli.brief(e)}); lower --num_samples or --max_new_tokens.")
    print(f"# {FLAGS.workdir}, checkpoint step {step}", file=sys.stderr)
    unknown = 0
    for out in outs:
        text, n = tokenizers.decode_known(tokenizer, out.tolist())
        unknown += n
        print("-" * 40 + "\n" + text, flush=True)
    if unknown:
        print(f"warning: the model drew {unknown} token id(s) that tokenizer.json lacks (it has "
              f"{tokenizer.vocab_size} tokens, the model {vocab}); they show as \ufffd.",
              file=sys.stderr)


def run_main() -> None:
    """The command (`python -m gpt_jax.sample`, or the installed `gpt-jax-sample`)."""
    _define_flags()
    app.run(main, flags_parser=cli.flags_parser(COMMAND))


if __name__ == "__main__":
    run_main()
