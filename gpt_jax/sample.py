"""`python -m gpt_jax.sample --workdir=DIR --prompt=TEXT`: continue a prompt with a trained run
(or a model imported by tools/convert_hf.py).

Loads the run's tokenizer and the parameters of one checkpoint (the newest by default,
`--checkpoint=best` for the lowest val loss, or a step number), then samples with the KV cache.
A prompt longer than the model's context is fine: the sampler slides its window over it.
For a sequence-pair run (model.arch=seq2seq) the prompt is a source: it prints the decoded
target, by beam search with `--beam_size=K` (`--length_penalty`), greedily by default, or
`--num_samples` draws with an explicit `--temperature`.

Prompt learning (the task posed in the prompt, the model not trained on it): `--prompt=FILE:path`
reads a few-shot prompt written by hand, and `--task=T --num_fewshot=k` puts k examples of a task
(gpt_jax/eval/tasks.py) before the prompt, formatted as the task's scoring formats them.

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
    flags.DEFINE_integer("beam_size", 1, "A sequence-pair (seq2seq) run: beams of the beam "
                         "search (1: greedy, or sampling with an explicit --temperature).", **into)
    flags.DEFINE_float("length_penalty", 0.6, "A seq2seq run's beam search ranks by log p / "
                       "((5 + length) / 6)^alpha (GNMT; 0 = none).", **into)
    flags.DEFINE_string("task", None, "Prompt learning: put --num_fewshot examples of this task "
                        "(a task JSONL file or built-in name, gpt_jax/eval/tasks.py) before the "
                        "prompt, formatted as the task's examples are.", **into)
    flags.DEFINE_integer("num_fewshot", 3, "With --task: examples drawn from its train split.",
                         **into)
    flags.DEFINE_string("task_source", None, "With --task: the text a built-in task is made "
                        "from, where it needs one.", **into)
    flags.DEFINE_integer("fewshot_seed", 1234, "With --task: the seed of the example draw.",
                         **into)
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
    "beam_size": (lambda v: v >= 1, "an integer ≥ 1 (1 = greedy)"),
    "length_penalty": (lambda v: v >= 0, "a number ≥ 0 (0 = none)"),
    "num_fewshot": (lambda v: v >= 0, "an integer ≥ 0"),
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

    workdir, tokenizer = open_run(workdir, which)
    _, hparams, params, step = weights.load_trained(workdir, checkpoint_choice(which))
    return tokenizer, registry.build(hparams), params, step


def checkpoint_choice(which: str) -> str | int:
    """--checkpoint's value as weights.select_step takes it: newest, best or a step number."""
    return int(which) if which.isdigit() else which


def open_run(workdir: str | pathlib.Path, which: str = "newest"
             ) -> tuple[Any, tokenizers.Tokenizer]:
    """(the folder, its tokenizer) of a run with a checkpoint to read, checked before any array
    is; RunError naming what is missing and the fix."""
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
    return workdir, load_tokenizer(workdir)


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


def fewshot_prompt(query: str) -> str:
    """`query` after --num_fewshot examples of --task, formatted as the task formats them."""
    from gpt_jax.eval import tasks

    [task] = tasks.load_tasks([FLAGS.task], source=FLAGS.task_source)
    return tasks.fewshot_text(task, query, FLAGS.num_fewshot, seed=FLAGS.fewshot_seed)


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
        if FLAGS.task is not None:
            text = fewshot_prompt(text)
        elif any(FLAGS[n].present for n in ("num_fewshot", "task_source", "fewshot_seed")):
            raise RunError("--num_fewshot, --task_source and --fewshot_seed shape a --task's "
                           "examples: give --task too, or leave them out.")
        cli.quiet_orbax_reads()
        tokenizer, model, params, step = load_run(FLAGS.workdir, FLAGS.checkpoint)
        vocab = model.cfg.vocab_size
        from gpt_jax.models import registry

        if registry.arch_of(model.cfg).reads_pairs:
            check_source_flags()
            prompt = encode_prompt(tokenizer, text, vocab)
            translate_source(tokenizer, model, params, step, prompt)
            return
        for name in ("beam_size", "length_penalty"):
            if FLAGS[name].present:
                raise RunError(f"--{name} is for sequence-pair (seq2seq) runs; this one is a "
                               f"language model ({model_name(model)}): leave it out.")
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


def model_name(model: nn.Module) -> str:
    """`model.arch=NAME` of a built model, for messages."""
    from gpt_jax.models import registry

    return f"model.arch={registry.arch_of(model.cfg).name}"


def check_source_flags() -> None:
    """RunError for a flag that a sequence-pair run cannot honour: it decodes one best target
    (greedy or beam search) unless --temperature asks for draws."""
    sampled = FLAGS["temperature"].present and FLAGS.temperature > 0
    if FLAGS.stop is not None:
        raise RunError("--stop does not apply to a seq2seq run: its targets end at their "
                       "end-of-sequence token; leave it out.")
    if FLAGS.beam_size > 1 and sampled:
        raise RunError(f"--beam_size={FLAGS.beam_size} searches for the best target; "
                       f"--temperature={FLAGS.temperature} draws one: give one of them.")
    if not sampled and (FLAGS.num_samples > 1 or FLAGS["top_k"].present
                        or FLAGS["top_p"].present):
        raise RunError("a seq2seq run decodes its one best target unless --temperature is "
                       "given: add --temperature=T (> 0) to draw --num_samples with --top_k / "
                       "--top_p, or leave those out.")
    if not FLAGS["prompt"].present:
        raise RunError("--prompt is missing: give the source to decode, e.g. --prompt=12+34.")


def translate_source(tokenizer: tokenizers.Tokenizer, model: nn.Module, params: dict, step: int,
                     source: np.ndarray) -> None:
    """A sequence-pair run: prints the decoding of the prompt as a source — the beam search's
    best with --beam_size > 1; else greedy, or --num_samples draws at an explicit --temperature."""
    import jax

    from gpt_jax import translate
    from gpt_jax.data import pairs
    from gpt_jax.generate import SamplingParams
    from gpt_jax.training import memory

    cfg = model.cfg
    if len(source) > cfg.max_source_len:
        print(f"warning: the source has {len(source)} tokens; the model reads the first "
              f"{cfg.max_source_len} (data.source_len).", file=sys.stderr)
        source = source[:cfg.max_source_len]
    max_new_tokens = min(FLAGS.max_new_tokens, cfg.max_seq_len)
    if FLAGS["max_new_tokens"].present and max_new_tokens < FLAGS.max_new_tokens:
        print(f"warning: targets are at most {cfg.max_seq_len} tokens (data.seq_len of the "
              f"run); --max_new_tokens={FLAGS.max_new_tokens} decodes that many.", file=sys.stderr)
    eos_id = pairs.eos_and_vocab(tokenizer)[0]
    sampled = FLAGS["temperature"].present and FLAGS.temperature > 0
    sampling = (SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p) if sampled
                else SamplingParams(temperature=0.0))
    try:
        outs = translate.translate(
            model, params, [source] * (FLAGS.num_samples if sampled else 1), bos_id=eos_id,
            eos_id=eos_id, max_new_tokens=max_new_tokens, beam_size=FLAGS.beam_size,
            length_penalty=FLAGS.length_penalty, sampling=sampling,
            key=jax.random.key(FLAGS.seed), batch_size=FLAGS.num_samples if sampled else 1)
    except jax.errors.JaxRuntimeError as e:
        if not memory.is_out_of_memory(e):
            raise
        raise RunError(f"out of device memory decoding with --beam_size={FLAGS.beam_size} "
                       f"({cli.brief(e)}); lower --beam_size or --num_samples.") from None
    print(f"# {FLAGS.workdir}, checkpoint step {step}", file=sys.stderr)
    for out in outs:
        print(tokenizer.decode(out[out < tokenizer.vocab_size]), flush=True)


def run_main() -> None:
    """The command (`python -m gpt_jax.sample`, or the installed `gpt-jax-sample`)."""
    _define_flags()
    app.run(main, flags_parser=cli.flags_parser(COMMAND))


if __name__ == "__main__":
    run_main()
