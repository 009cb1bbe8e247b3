"""Lists a run's checkpoints and the parameter tree of one of them, without loading any array.

    python tools/inspect_checkpoint.py WORKDIR [--step=N]

WORKDIR may also be its checkpoints/ folder, an imported model's workdir (params/) or one step's
folder. A bad invocation ends with one `error:` line that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # Run from anywhere.

import jax
import numpy as np
import orbax.checkpoint as ocp

from gpt_jax import cli
from gpt_jax.training import checkpoint, weights


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def folder_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_table(manager: ocp.CheckpointManager, directory: pathlib.Path) -> list[str]:
    """One line per checkpoint: step, val loss at that step, size on disk, best/newest markers."""
    steps = manager.all_steps()
    best, newest = manager.best_step(), manager.latest_step()
    lines = [f"{'step':>10}  {'val/loss':>9}  {'size':>10}"]
    for step in steps:
        metrics = manager.metrics(step) or {}
        loss = metrics.get(checkpoint.VAL_METRIC)
        marks = [m for m, on in (("best", step == best and loss is not None),
                                 ("newest", step == newest)) if on]
        lines.append(f"{step:>10}  {'-' if loss is None else f'{loss:.4f}':>9}  "
                     f"{human_bytes(folder_size(directory / str(step))):>10}  {' '.join(marks)}")
    unreadable = directory / "unreadable"
    if unreadable.is_dir() and any(unreadable.iterdir()):
        names = ", ".join(sorted(p.name for p in unreadable.iterdir()))
        lines.append(f"set aside as unreadable (kept, not used): {names}")
    return lines


def parameter_table(step_dir: pathlib.Path, others: list[int] | None = None) -> list[str]:
    """Every parameter with its shape and dtype, then the total count and bytes. A
    CheckpointError naming `others` (the steps to inspect instead) if the tree cannot be read."""
    def unreadable(cause: str) -> checkpoint.CheckpointError:
        instead = (f"inspect another step with --step ({', '.join(map(str, others))})" if others
                   else "it is the folder's only checkpoint: restore it from a copy")
        return checkpoint.CheckpointError(
            f"the parameter tree of checkpoint step {step_dir.name} in {step_dir.parent} cannot be "
            f"read ({cause}): {instead}.")

    try:
        metadata = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata
    except PermissionError:
        raise  # Reported with its path and the fix.
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged file.
        raise unreadable(f"damaged or incomplete; {cli.brief(e, typed=True)}") from e
    # Orbax returns no metadata (and logs a warning) when state/_METADATA or the array index is
    # missing or garbage.
    params = metadata.get("params") if metadata is not None else None
    leaves = jax.tree_util.tree_flatten_with_path(params)[0] if params is not None else []
    if not leaves:
        raise unreadable("its state/_METADATA or array index is missing or damaged")
    lines, total, nbytes = [], 0, 0
    width = max(len(jax.tree_util.keystr(p, simple=True, separator="/")) for p, _ in leaves)
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        size = math.prod(leaf.shape)
        total += size
        nbytes += size * np.dtype(leaf.dtype).itemsize
        lines.append(f"  {name:<{width}}  {leaf.shape!s:<20} {np.dtype(leaf.dtype).name}")
    lines.append(f"  total: {total:,} parameters ({human_bytes(nbytes)})")
    return lines


def report(path: str, step: int | None) -> list[str]:
    """The lines the tool prints for `path` (a workdir, its checkpoints/ or params/ folder, or one
    step's folder) and `step` (None: the step folder's, else the newest). Everything is read
    before anything is printed, so a damaged checkpoint gives its error line and no half table."""
    directory, folder_step = weights.params_source(path)  # CheckpointError: no such folder.
    manager = checkpoint.open_to_read(directory)
    steps = sorted(manager.all_steps())
    if not steps:
        if directory.name in ("checkpoints", weights.PARAMS_DIR):
            raise checkpoint.CheckpointError(
                f"{directory} holds no checkpoint yet: its run saves one every checkpoint.every "
                "steps; inspect it after the first save.")
        raise checkpoint.CheckpointError(
            f"{path} is not a training run: it has no checkpoints/ folder; give a run's workdir, "
            "its checkpoints/ folder or one step's folder.")
    step = step if step is not None else folder_step if folder_step is not None else steps[-1]
    if step not in steps:
        raise checkpoint.CheckpointError(
            f"{directory} has no checkpoint of step {step}; choose one of {', '.join(map(str, steps))} "
            "with --step.")
    params = parameter_table(directory / str(step), [s for s in steps if s != step])
    return [f"checkpoints in {directory}", *checkpoint_table(manager, directory), "",
            f"parameters at step {step}", *params]


def _step(text: str) -> int:
    """--step's type: a step number."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a step number; give one such as "
                                         "--step=1000")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a training workdir (or its checkpoints/ folder)")
    parser.add_argument("--step", type=_step, default=None, help="step for the tree; default newest")
    args = parser.parse_args(argv)
    cli.refuse_url(args.workdir, "WORKDIR")
    cli.quiet_orbax_reads()
    with cli.errors_as_one_line():
        lines = report(args.workdir, args.step)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
