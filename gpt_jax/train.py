"""`python -m gpt_jax.train --config=configs/FILE.py[:VARIANT] --workdir=DIR [--config.KEY=VALUE]`.

No arguments: configs/quickstart.py into runs/quickstart.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import pathlib
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from gpt_jax.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent


def default_workdir(config_arg: str) -> str:
    """runs/quickstart for configs/quickstart.py, runs/shakespeare_char_cpu for …py:cpu."""
    path, _, variant = config_arg.partition(":")
    name = pathlib.Path(path).stem
    return str(pathlib.Path("runs") / (f"{name}_{variant}" if variant else name))


def _fail(msg: str) -> None:
    sys.exit(f"error: {msg}")


def _last_line(e: BaseException) -> str:
    """config_flags wraps a config file's own error in a traceback; its last line is the cause."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")  # --config.KEY=VALUE, --noconfig.KEY (bools)
_LISTED = "(every field is listed in configs/base.py)"


def unknown_config_key(key: str) -> str | None:
    """The one-line message for an override `--config.KEY` that names no field of
    configs/base.py (every recipe has exactly its fields): the group or field that does not
    exist and the closest name; None if KEY is a field."""
    from configs import base

    node, path = base.get_config(), []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return (f"config field {'.'.join(path)!r} is a value, not a group: set it with "
                    f"--config.{'.'.join(path)}=VALUE {_LISTED}")
        if part not in node:
            names = list(node.keys())
            close = difflib.get_close_matches(part, names, n=1)
            hint = (f' Did you mean "{close[0]}"?' if close
                    else f" The groups are {', '.join(names)}." if not path else "")
            return (f"unknown config {'field' if path else 'group'}: {'.'.join([*path, part])!r}."
                    f"{hint} {_LISTED}")
        node, path = node[part], [*path, part]
    return None


def config_override_error(e: BaseException, argv: list[str]) -> str:
    """One line for the KeyError/AttributeError that config_flags raises when an override of
    `argv` names no field: ours, naming the closest group or field, for the first such override;
    else ml_collections' own text without its quotes, escapes and line breaks."""
    for arg in argv[1:]:
        match = _OVERRIDE.match(arg)
        if match and (msg := unknown_config_key(match.group(1))):
            return msg
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(…)).
        e = e.args[0]
    text = str(e.args[0]) if e.args else type(e).__name__
    return f"unknown config field: {' '.join(text.split())} {_LISTED}"


class _QuietLibraries:
    """Keeps Orbax's per-save INFO chatter out of the run's log; its warnings still show."""

    def filter(self, record) -> bool:
        if "/orbax/" in record.pathname:
            # Orbax logs a failed async save with its traceback; the run reports it in one line.
            record.exc_info, record.exc_text = None, None
        # Python's levels (absl.logging.WARNING is absl's verbosity number, not a levelno).
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def define_flags() -> None:
    """Defines --config and --workdir. config_flags reads `--config.*` overrides from sys.argv
    right here, so an unknown field surfaces here: reported in one line, with its 'did you mean'."""
    try:
        config_flags.DEFINE_config_file(
            "config", str(REPO / "configs" / "quickstart.py"), "Config file, optionally `:variant`."
        )
    except (AttributeError, KeyError) as e:
        _fail(config_override_error(e, sys.argv))
    flags.DEFINE_string("workdir", None, "Run directory; default runs/<config>[_<variant>].")


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing with one-line errors (bad values, unreadable config files)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # An override naming no field (a config file given).
        _fail(config_override_error(e, argv))
    except (flags.Error, ValueError, OSError) as e:
        _fail(_last_line(e))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from gpt_jax.training import loop  # Imported late so flag errors come fast.
    from gpt_jax.training.checkpoint import CheckpointError
    from gpt_jax.training.lock import WorkdirLockedError
    from gpt_jax.training.preemption import Preempted

    config_arg = flags.FLAGS["config"].serialize().split("=", 1)[-1]  # FILE.py[:VARIANT]
    try:
        config = flags.FLAGS.config
        config.model  # noqa: B018 — config_flags defers a missing-file error to first access.
    except OSError as e:
        _fail(f"cannot load --config={config_arg}: {_last_line(e)}")
    workdir = flags.FLAGS.workdir or default_workdir(config_arg)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        loop.run(config, workdir)
    except (ConfigError, CheckpointError, WorkdirLockedError, loop.NonFiniteLossError) as e:
        _fail(str(e))
    except Preempted as e:
        # 128 + signal: a scheduler reads "terminated by that signal" and can requeue the job.
        print(e, file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
