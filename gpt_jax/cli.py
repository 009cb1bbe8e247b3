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
import sys
from collections.abc import Iterator
from typing import NoReturn

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
    what = e.strerror or one_line(e) or type(e).__name__
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


def quiet_orbax_reads() -> None:
    """Orbax warns, on every read-only open of a checkpoint folder, that it will not save: true,
    and no news to a command that only reads. Its errors still show."""
    std_logging.getLogger("absl").addFilter(
        lambda record: record.levelno >= std_logging.ERROR or "/orbax/" not in record.pathname)
