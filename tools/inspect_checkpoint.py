"""Lists a run's checkpoints and the parameter tree of one of them, without loading any array.

    python tools/inspect_checkpoint.py WORKDIR [--step=N]
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
from absl import logging

from gpt_jax.training import checkpoint


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


def parameter_table(step_dir: pathlib.Path) -> list[str]:
    """Every parameter with its shape and dtype, then the total count and bytes."""
    metadata = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata
    params = metadata["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a training workdir (or its checkpoints/ folder)")
    parser.add_argument("--step", type=int, default=None, help="step for the tree; default newest")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only manager will not save.
    directory = pathlib.Path(args.workdir).resolve()
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        print(f"error: {args.workdir} has no checkpoints/ folder.", file=sys.stderr)
        return 2
    manager = checkpoint.make_manager(directory, keep=1, read_only=True)
    if not manager.all_steps():
        print(f"error: no checkpoint in {directory}.", file=sys.stderr)
        return 2
    step = manager.latest_step() if args.step is None else args.step
    if step not in manager.all_steps():
        print(f"error: no checkpoint of step {step}; there are {manager.all_steps()}.",
              file=sys.stderr)
        return 2
    print(f"checkpoints in {directory}")
    print("\n".join(checkpoint_table(manager, directory)))
    print(f"\nparameters at step {step}")
    print("\n".join(parameter_table(directory / str(step))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
