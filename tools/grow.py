"""Grows a trained GPT to more layers (progressive stacking) in a new workdir that training
continues from.

    python tools/grow.py --from=WORKDIR --to=NEW_WORKDIR --layers=N [--mode=stacked|interleaved]
        [--init=preserve|copy] [--optimizer=carry|reset] [--checkpoint=newest|best|STEP]

The checkpoint's L layers become N > L (gpt_jax/finetune/grow.py): stacked, new layer i copies
layer i mod L (1..L, then 1..L again); interleaved, layer ⌊i·L/N⌋ (each layer repeated in
place). N need not be a multiple of L: stacked then repeats the first N mod L layers once more,
interleaved repeats some layers more often than others. A repeat is a full copy (copy; the grown
model computes another function, so the loss jumps, then recovers) or a copy whose residual
outputs (attn/out, mlp/proj) start at zero (preserve: the grown model computes exactly the
trained one's function). Embeddings and the final norm carry over. The optimizer state of each
copy is its source's (carry) or fresh (reset: zero moments); the step count, and so the lr
schedule, go on either way. --mode, --init and --optimizer default to the run's
train.grow_mode, train.grow_init and train.grow_optimizer.

NEW_WORKDIR gets config.json (the checkpoint's config with model.num_layers=N), tokenizer.json,
metrics.jsonl up to that step (so the curves continue), and checkpoints/STEP with the grown state
and the source's data position, so that

    python -m gpt_jax.train --config=SAME --workdir=NEW_WORKDIR --config.model.num_layers=N \\
        --config.train.num_steps=MORE

resumes there on the same data stream. The data position copied is a single process's (process
0's files): a run on several processes grows with train.grow_at instead. Refused with one
`error:` line, before any work: a NEW_WORKDIR that exists and is not empty, or lies inside
WORKDIR; a WORKDIR without checkpoints; N ≤ L; a run with LoRA or a soft prompt (grow its base
instead); an architecture other than gpt.
The output is written beside NEW_WORKDIR and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # Run from anywhere.

import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gpt_jax import cli
from gpt_jax import config as config_lib
from gpt_jax.finetune import grow
from gpt_jax.training import build, checkpoint, weights

CheckpointError = checkpoint.CheckpointError


class _Position:
    """The source's data-iterator position, saved as it was (Grain's checkpoint handler writes
    `get_state()`'s bytes for this process)."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def _check_paths(source: pathlib.Path, out: pathlib.Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--to={out} already exists and is not an empty folder; give a new "
                              "workdir (growing never writes over files).")
    if out.resolve().is_relative_to(source.resolve()):
        raise CheckpointError(f"--to={out} is inside --from={source}; give a workdir outside it.")
    if problem := cli.output_problem(out, "--to", out.resolve().parent):
        raise CheckpointError(problem)
    if not (source / "checkpoints").is_dir() or not (source / "config.json").is_file():
        raise CheckpointError(f"--from={source} is not a training workdir (no checkpoints/ or "
                              "config.json); give the workdir a training run wrote.")


def _refuse(saved: ml_collections.ConfigDict, step_num: int, layers: int) -> None:
    """The checkpoint's config must be a plain GPT of fewer layers."""
    if saved.model.arch != "gpt":
        raise CheckpointError(f"the run is model.arch={saved.model.arch!r}; only a GPT's layers "
                              "can be grown.")
    if saved.finetune.lora_rank or saved.finetune.prompt_tokens:
        raise CheckpointError("the run trains adapters (LoRA or a soft prompt) on a frozen "
                              "base; grow the base instead (its workdir, finetune.base).")
    if layers <= saved.model.num_layers:
        raise CheckpointError(f"--layers={layers} must exceed the {saved.model.num_layers} layers "
                              f"of the checkpoint at step {step_num}.")


def _data_position(step_dir: pathlib.Path) -> bytes:
    """The data position saved with the checkpoint (every process's is the same)."""
    states = {f.read_bytes() for f in sorted((step_dir / "data").glob("process_*-of-*.json"))}
    if len(states) != 1:
        raise CheckpointError(f"{step_dir}/data holds {len(states)} different data positions "
                              "(one is needed); grow another checkpoint with --checkpoint.")
    return states.pop()


def grow_workdir(source: pathlib.Path, out: pathlib.Path, layers: int, mode: str | None,
                 init: str | None, optimizer: str | None, which: int | str) -> str:
    """Writes `out`, the grown copy of checkpoint `which` of the run in `source`; returns a
    line saying what was done."""
    _check_paths(source, out)
    manager = checkpoint.open_to_read(checkpoint.checkpoint_dir(source))  # Absolute: Orbax's.
    step_num = weights.select_step(manager, which)
    saved = ml_collections.ConfigDict(
        checkpoint.saved_config(manager, step_num))
    _refuse(saved, step_num, layers)
    t = saved.train
    mode, init, optimizer = mode or t.grow_mode, init or t.grow_init, optimizer or t.grow_optimizer
    new = saved.copy_and_resolve_references()
    new.model.num_layers = layers
    new.train.grow_at = ""  # A plain run of N layers from here (its past is in --from).
    old_run, new_run = build.setup_without_data(saved), build.setup_without_data(new)
    step_dir = epath.Path(manager.directory) / str(step_num)
    position = _data_position(pathlib.Path(step_dir))
    checkpoint.check_structure(manager, step_num, old_run.abstract_state)
    try:
        state = manager.restore(step_num, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(old_run.abstract_state)))["state"]
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged file.
        raise CheckpointError(f"the checkpoint of step {step_num} in {manager.directory} cannot "
                              f"be read ({cli.brief(e, typed=True)}); grow another with "
                              "--checkpoint.") from e
    grown = grow.grow_state(state, new_run, mode, optimizer, init)
    rows = []
    if (source / "metrics.jsonl").is_file():
        for line in (source / "metrics.jsonl").read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step_num:
                    rows.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # A line cut by a kill: not a metric.
                continue
    with cli.staged_folder(out) as tmp:
        out_manager = checkpoint.make_manager(tmp / "checkpoints", new.checkpoint.keep)
        checkpoint.save(out_manager, step_num, grown, _Position(position),
                        config_lib.to_json(new), None)
        out_manager.wait_until_finished()
        out_manager.close()
        files = {tmp / "config.json": config_lib.to_json(new) + "\n",
                 tmp / "metrics.jsonl": "".join(rows)}
        cli.write_atomically(files)
        if (source / "tokenizer.json").is_file():
            shutil.copy2(source / "tokenizer.json", tmp / "tokenizer.json")
    return (f"grew step {step_num} of {source} from {saved.model.num_layers} to {layers} layers "
            f"({mode}, {init}; optimizer state {optimizer}) into {out}; continue with: python -m "
            f"gpt_jax.train --config=… --workdir={out} --config.model.num_layers={layers} "
            "--config.train.num_steps=…")


def _layers_arg(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of layers (an integer ≥ 1)")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv`; returns 0, or exits with one `error:` line (status 1)."""
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="the trained run's workdir")
    parser.add_argument("--to", required=True, help="the new workdir to write (new or empty)")
    parser.add_argument("--layers", type=_layers_arg, required=True, help="the new depth N > L")
    parser.add_argument("--mode", choices=grow.MODES, default=None,
                        help="stacked (1..L, 1..L) or interleaved (each layer repeated); default "
                             "the run's train.grow_mode")
    parser.add_argument("--init", choices=grow.INITS, default=None,
                        help="preserve (repeats' residual outputs start at zero: the same "
                             "function) or copy (full copies); default the run's train.grow_init")
    parser.add_argument("--optimizer", choices=grow.OPTIMIZERS, default=None,
                        help="carry (each copy takes its source's moments) or reset (zero "
                             "moments); default the run's train.grow_optimizer")
    parser.add_argument("--checkpoint", type=cli.checkpoint_arg, default="newest",
                        help="newest (default), best (lowest val loss) or a step number")
    args = parser.parse_args(argv)
    for flag, value in (("--from", args.source), ("--to", args.to)):
        if not value.strip():  # "" would mean the current folder.
            cli.fail(f"{flag} is empty; give a path.")
        cli.refuse_url(value, flag)
    logging.set_verbosity(logging.WARNING)
    cli.quiet_orbax_reads()
    with cli.errors_as_one_line():
        print(grow_workdir(pathlib.Path(args.source), pathlib.Path(args.to), args.layers,
                           args.mode, args.init, args.optimizer, args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
