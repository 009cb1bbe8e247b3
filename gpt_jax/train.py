"""`python -m gpt_jax.train --config=configs/FILE.py[:VARIANT] --workdir=DIR [--config.KEY=VALUE]`.

No arguments: configs/quickstart.py into runs/quickstart.

A bad invocation (an unknown or mistyped flag, a config file that is missing or fails to run, a
--workdir that cannot be written) ends with one `error:` line naming the problem and its fix,
before any data is loaded or step compiled (gpt_jax/cli.py, whose flag and --config handling the
tools share).
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import pathlib
import sys
import traceback
from collections.abc import Iterator

from absl import app, flags, logging

from gpt_jax import cli

COMMAND = "python -m gpt_jax.train"


def default_workdir(config_arg: str) -> str:
    """runs/quickstart for configs/quickstart.py, runs/shakespeare_char_cpu for …py:cpu."""
    path, _, variant = config_arg.partition(":")
    name = pathlib.Path(path).stem
    return str(pathlib.Path("runs") / (f"{name}_{variant}" if variant else name))


parse_flags = cli.flags_parser(COMMAND)


def check_workdir(workdir: pathlib.Path) -> None:
    """Refuses, in one line and before any data is loaded or step compiled, a --workdir the run
    could not write: a file, under a file, in a read-only or another user's folder, or holding
    one of the run's files with the wrong kind or permissions."""
    cli.check_output(workdir, "--workdir", folder=True)
    if not workdir.is_dir():
        return
    # What the run reads and (re)writes in the workdir; an existing one must be of its kind.
    for name, folder in (("config.json", False), ("metrics.jsonl", False), ("tokenizer.json", False),
                         (".lock", False), ("checkpoints", True), ("tb", True)):
        path = workdir / name
        if not path.exists():
            continue
        if path.is_dir() != folder:
            cli.fail(f"--workdir={workdir} holds {path}, a {'file' if folder else 'folder'} where "
                     f"the run keeps its {'folder' if folder else 'file'} {name}; move it away or "
                     "choose another --workdir.")
        if not os.access(path, os.R_OK | os.W_OK | (os.X_OK if folder else 0)):
            cli.fail(f"--workdir={workdir}: the run cannot read and write {path}; fix its "
                     "permissions or choose another --workdir.")


@contextlib.contextmanager
def _remove_if_left_empty(workdir: pathlib.Path) -> Iterator[None]:
    """A run that fails before writing anything leaves no empty workdir (nor the parents it
    made) behind. Only empty folders this run created are removed."""
    created = cli.missing_folders(workdir)
    try:
        yield
    except BaseException:
        cli.remove_empty(created)
        raise


@contextlib.contextmanager
def _exit_at_once_if_joined() -> Iterator[None]:
    """A process of a multi-process run that fails leaves at once. Python's normal exit would run
    jax.distributed's shutdown, which waits for every process at a barrier; the others wait for
    this one in a collective instead, so both would hang until a timeout (minutes). Leaving
    without it lets the others' launcher (tools/launch_local.py, Slurm) see the failure."""
    from gpt_jax.training.preemption import Preempted

    try:
        yield
    except Preempted:  # Every process stops together: the normal exit's barrier is met.
        raise
    except BaseException as e:
        import jax

        # Not jax.process_count(): after an early failure it would start the backend.
        if not jax.distributed.is_initialized():
            raise
        if isinstance(e, SystemExit):  # sys.exit(None) is a success; sys.exit("text") is not.
            status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)  # What Python's own exit would have printed.
        else:  # A bug: its traceback still shows.
            traceback.print_exc()
            status = 1
        if status == 0:
            raise
        std_logging.shutdown()  # Flushes absl's handler.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


class _QuietLibraries:
    """Keeps Orbax's per-save INFO chatter out of the run's log (its warnings still show), and
    JAX's GPU/TPU fallback warning, which the run's own replaces."""

    def filter(self, record) -> bool:
        if cli.jax_fallback_warning(record):  # Ours, with the install command, replaces it.
            return False
        if "/orbax/" in record.pathname:
            # Orbax logs a failed async save with its traceback; the run reports it in one line.
            record.exc_info, record.exc_text = None, None
        # Python's levels (absl.logging.WARNING is absl's verbosity number, not a levelno).
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def define_flags() -> None:
    """Defines --config and --workdir."""
    cli.define_config_flag(cli.recipes_dir() / "quickstart.py", COMMAND)
    flags.DEFINE_string("workdir", None, "Run directory; default runs/<config>[_<variant>].")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a flag, "
                 f"--config.GROUP.FIELD=VALUE or --workdir=DIR; see {COMMAND} --helpshort.")
    config_file = flags.FLAGS["config"].serialize().split("=", 1)[-1]  # FILE.py[:VARIANT]
    config = cli.loaded_config()
    if flags.FLAGS.workdir == "":
        cli.fail("--workdir is empty; give a folder, or leave the flag out for "
                 f"{default_workdir(config_file)}.")
    from gpt_jax.training import remote

    workdir: str | pathlib.Path = flags.FLAGS.workdir or default_workdir(config_file)
    if remote.is_url(workdir):  # Cloud storage: checked by its backend when the run locks it.
        if problem := remote.url_problem(str(workdir), "--workdir"):
            cli.fail(problem)
        left_empty = contextlib.nullcontext()
    else:
        workdir = pathlib.Path(workdir)
        check_workdir(workdir)
        left_empty = _remove_if_left_empty(workdir)
    from gpt_jax.training import loop  # Imported late so flag errors come fast.
    from gpt_jax.training.preemption import Preempted

    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    cli.quiet_library_noise()
    try:
        with (_exit_at_once_if_joined(), left_empty,
              cli.errors_as_one_line(loop.NonFiniteLossError)):
            loop.run(config, workdir)
    except Preempted as e:
        # 128 + signal: a scheduler reads "terminated by that signal" and can requeue the job.
        print(e, file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)


def run_main() -> None:
    """The command (`python -m gpt_jax.train`, or the installed `gpt-jax-train`)."""
    sys.argv = cli.recipe_args(sys.argv)  # configs/NAME.py from any folder once installed.
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run_main()
