"""What every command does with a bad invocation: one `error:` line on stderr, exit status 1, no
traceback (train, sample, prepare and the tools all end through here).

Errors a user can fix are ValueErrors of ours (ConfigError, CheckpointError, RunError, …) and
OSErrors (a missing, unreadable or read-only path, a full disk); commands catch those around their
work with `errors_as_one_line`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging as std_logging
import os
import pathlib
import re
import sys
from collections.abc import Iterator
from typing import NoReturn

from absl import logging as absl_logging

# What to do about an OSError, by errno: the part of the message that names the fix.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOSPC: "the disk is full: free space or choose another path",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder where a file was expected: give a file",
    errno.EEXIST: "it already exists: remove it or choose another path",
}


def one_line(text: object) -> str:
    """`text` with its line breaks and runs of spaces collapsed: one line of a log."""
    return " ".join(str(text).split())


def os_error(e: OSError) -> str:
    """An OSError as one line: the path, what went wrong, and what to do about it."""
    where = f"{e.filename}: " if e.filename else ""
    what = (e.strerror or one_line(e) or type(e).__name__).rstrip(".")
    fix = _OS_FIXES.get(e.errno) if e.errno is not None else None
    return f"{where}{what}" + (f"; {fix}." if fix else ".")


def fail(msg: object, status: int = 1) -> NoReturn:
    """Exits the command with `error: msg` (one line) on stderr."""
    print(f"error: {one_line(msg)}", file=sys.stderr, flush=True)
    sys.exit(status)


@contextlib.contextmanager
def errors_as_one_line(*extra: type[BaseException]) -> Iterator[None]:
    """Turns ValueErrors, OSErrors and `extra` raised inside into `fail(...)`."""
    try:
        yield
    except OSError as e:
        fail(os_error(e))
    except (ValueError, *extra) as e:
        fail(e)


def check_output(path: pathlib.Path, flag: str, folder: bool) -> None:
    """Refuses, in one line and before any work, an output path (a folder if `folder`, else a
    file) that could not be written: one of the other kind, under a file, or in a read-only or
    another user's folder. Nothing is created (tools/plan.py, tools/benchmark.py and
    tools/compare_nanogpt.py check their outputs with it before minutes of work)."""
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        fail(f"{flag}={path} is a {'file' if folder else 'folder'}; give a {kind} path.")
    existing = path if folder else path.parent  # The folder the output goes in, or its parent.
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        fail(f"{flag}={path}: {existing} is a file, not a folder; choose another {flag}.")
    locked = existing if not os.access(existing, os.W_OK | os.X_OK) else (
        path if path.is_file() and not os.access(path, os.W_OK) else None)
    if locked is not None:
        fail(f"{flag}={path}: {locked} is not writable (a read-only file system, or another "
                 f"user's); choose another {flag}.")


def write_atomically(files: dict[pathlib.Path, str]) -> None:
    """Writes each file's text in full or not at all: all to temporary files beside them first,
    then each renamed over its path, so a failure (a full disk) leaves no half-written output and
    earlier files as they were. Makes the parent folders."""
    temporary: list[pathlib.Path] = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            temporary.append(tmp)
            tmp.write_text(text)
        for (path, _), tmp in zip(files.items(), temporary, strict=True):
            tmp.replace(path)
    finally:
        for tmp in temporary:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _noise(record: std_logging.LogRecord) -> bool:
    """Log lines of libraries that say nothing to a user of gpt_jax:
    - JAX's INFO line on every CPU-only start that it found no TPU runtime (libtpu.so); where a
      GPU or TPU driver is present but unused, gpt_jax warns itself (mesh.unused_accelerator);
    - Orbax's warning on every resume that a step has no `_CHECKPOINT_METADATA` file: its
      per-item metadata, which the composite checkpoints we restore do not have or need."""
    message = str(record.msg)
    return ((record.pathname.endswith("xla_bridge.py")
             and message.startswith("Unable to initialize backend"))
            or ("/orbax/" in record.pathname and message.startswith("Metadata file does not exist")))


def quiet_library_noise() -> None:
    """Drops `_noise` lines from absl's log handler, which every library's records reach (every
    command calls it)."""
    absl_logging.get_absl_handler().addFilter(lambda record: not _noise(record))


def quiet_orbax_reads() -> None:
    """Orbax warns, on every read-only open of a checkpoint folder, that it will not save: true,
    and no news to a command that only reads. Its errors still show, without the "Event loop is
    closed" tracebacks that follow a failed read (checkpoint.drop_closed_loop_callbacks)."""
    quiet_library_noise()
    from gpt_jax.training import checkpoint  # Late: cli.py is imported before flags are parsed.

    checkpoint.drop_closed_loop_callbacks()
    std_logging.getLogger("absl").addFilter(
        lambda record: record.levelno >= std_logging.ERROR or "/orbax/" not in record.pathname)


_CONFIG_ARG = re.compile(r"^(--?config=)([^:]+)(:.*)?$")


def recipes_dir() -> pathlib.Path:
    """The folder of the recipes (configs/): beside gpt_jax in a clone, in site-packages when
    installed."""
    import configs

    return pathlib.Path(configs.__file__).resolve().parent


def resolve_config_args(argv: list[str]) -> list[str]:
    """`argv` with a `--config=PATH[:VARIANT]` that names no file here but names a recipe
    (`configs/NAME.py` or `NAME.py`) pointed at the installed recipe, so recipes work from any
    directory once gpt_jax is installed; every other argument as it is."""
    out = []
    for arg in argv:
        match = _CONFIG_ARG.match(arg)
        if match and not pathlib.Path(match.group(2)).expanduser().exists():
            name = pathlib.PurePath(match.group(2))
            recipe = recipes_dir() / (name.relative_to("configs") if name.parts[:1] == ("configs",)
                                      else name)
            if recipe.is_file():
                arg = f"{match.group(1)}{recipe}{match.group(3) or ''}"
        out.append(arg)
    return out
