"""`python -m gpt_jax.train --config=configs/FILE.py[:VARIANT] --workdir=DIR [--config.KEY=VALUE]`.

No arguments: configs/quickstart.py into runs/quickstart.

A bad invocation (an unknown or mistyped flag, a config file that is missing or fails to run, a
--workdir that cannot be written) ends with one `error:` line naming the problem and its fix,
before any data is loaded or step compiled (gpt_jax/cli.py). tools/plan.py and tools/benchmark.py
share this module's flag and config handling.
"""

from __future__ import annotations

import contextlib
import difflib
import logging as std_logging
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Callable, Iterator

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from gpt_jax import cli

COMMAND = "python -m gpt_jax.train"


def default_workdir(config_arg: str) -> str:
    """runs/quickstart for configs/quickstart.py, runs/shakespeare_char_cpu for …py:cpu."""
    path, _, variant = config_arg.partition(":")
    name = pathlib.Path(path).stem
    return str(pathlib.Path("runs") / (f"{name}_{variant}" if variant else name))


def _last_line(e: BaseException) -> str:
    """config_flags wraps a config file's own error in a traceback; its last line is the cause."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")  # --config.KEY=VALUE, --noconfig.KEY (bools)
_CONFIG_ARG = re.compile(r"^--?config(?:=(.*))?$")  # --config=FILE, or --config FILE.
_LISTED = "(every field is listed in configs/base.py)"


def unknown_config_key(key: str, flag: str = "--config.") -> str | None:
    """The one-line message for an override `KEY=VALUE` (`--config.KEY`, or `flag`KEY as in
    tools/benchmark.py's --set=) that names no field of configs/base.py (every recipe has exactly
    its fields): the group or field that does not exist and the closest name, or the group it
    names instead of a field; None if KEY is a field."""
    from configs import base

    node, path = base.get_config(), []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return (f"config field {'.'.join(path)!r} is a value, not a group: set it with "
                    f"{flag}{'.'.join(path)}=VALUE {_LISTED}")
        if part not in node:
            names = list(node.keys())
            close = difflib.get_close_matches(part, names, n=1)
            hint = (f' Did you mean "{close[0]}"?' if close
                    else f" The groups are {', '.join(names)}." if not path else "")
            return (f"unknown config {'field' if path else 'group'}: {'.'.join([*path, part])!r}."
                    f"{hint} {_LISTED}")
        node, path = node[part], [*path, part]
    if isinstance(node, ml_collections.ConfigDict):  # `--config.model=…` would replace a group.
        fields = list(node.keys())
        return (f"config group {key!r} is not a field: set one of its fields, e.g. "
                f"{flag}{key}.{fields[0]}=VALUE (its fields: {', '.join(fields)}) {_LISTED}")
    return None


def _override_problem(argv: list[str]) -> str | None:
    """unknown_config_key's message for the first `--config.KEY` override of `argv` that names no
    field; None if they all do."""
    for arg in argv[1:]:
        match = _OVERRIDE.match(arg)
        if match and (msg := unknown_config_key(match.group(1))):
            return msg
    return None


def config_override_error(e: BaseException, argv: list[str]) -> str:
    """One line for the KeyError/AttributeError that config_flags raises when an override of
    `argv` names no field: ours, naming the closest group or field, for the first such override;
    else ml_collections' own text without its quotes, escapes and line breaks."""
    if msg := _override_problem(argv):
        return msg
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(…)).
        e = e.args[0]
    text = str(e.args[0]) if e.args else type(e).__name__
    return f"unknown config field: {' '.join(text.split())} {_LISTED}"


def config_arg(argv: list[str]) -> str | None:
    """The value of --config in `argv` (FILE.py[:VARIANT]; the last one given), None if absent."""
    found = None
    for i, arg in enumerate(argv[1:], start=1):
        if match := _CONFIG_ARG.match(arg):
            found = match.group(1) if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e` and the exceptions it was raised from or during (config_flags and absl wrap the file's
    own exception twice)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def config_file_error(e: BaseException, config: str) -> str | None:
    """One line for an exception raised while running the config file of `--config=config`; None
    if it did not come from that file. A ValueError the file raises on purpose (an unknown
    variant) is its own message; anything else is a bug in the file, shown with its line."""
    path = config.split(":", 1)[0]
    if not path:
        return None
    file = os.path.realpath(path)
    for err in _chain(e):
        if isinstance(err, AttributeError) and getattr(err, "name", None) == "get_config":
            return (f"--config={config}: {path} defines no get_config(); define one that returns "
                    "the run's config (see configs/quickstart.py).")
        if isinstance(err, TypeError) and str(err).startswith("get_config()"):
            variant = config.split(":", 1)[1] if ":" in config else ""
            if variant and str(err).startswith("get_config() takes 0"):
                return f"--config={config}: {path} has no variants ({err}); drop ':{variant}'."
            return (f"--config={config}: {err}; get_config takes one optional argument, the "
                    "variant (see configs/gpt2.py).")
        if isinstance(err, SyntaxError) and err.filename and os.path.realpath(err.filename) == file:
            return (f"--config={config}: {type(err).__name__} in {path}, line {err.lineno}: "
                    f"{err.msg}; fix the config file.")
        lines = [line for frame, line in traceback.walk_tb(err.__traceback__)
                 if os.path.realpath(frame.f_code.co_filename) == file]
        if not lines:
            continue
        if isinstance(err, ValueError):
            return f"--config={config}: {cli.one_line(err)}"
        return (f"--config={config}: {type(err).__name__} in {path}, line {lines[-1]}: "
                f"{cli.one_line(err) or 'raised'}; fix the config file.")
    return None


def config_load_error(config: str, e: BaseException) -> str:
    """One line for a config file that could not be read: missing, a folder, an empty path."""
    path = config.split(":", 1)[0]
    if not path:
        why = "the path is empty"
    elif not os.path.exists(path):
        why = "no such file"
    elif os.path.isdir(path):
        why = "it is a folder, not a .py file"
    else:
        why = _last_line(e)
    return (f"cannot load --config={config}: {why}; give a config file such as "
            "configs/quickstart.py (with :VARIANT where it has variants).")


def flags_parser(command: str) -> Callable[[list[str]], list[str]]:
    """app.run's flags_parser for `command` (e.g. "python tools/plan.py"): absl's parsing, with
    every refusal as one `error:` line: an unknown flag, a value of the wrong type or out of
    range, a missing required flag, and, where the command has --config, an override naming no
    field and a config file that is missing or fails to run."""
    see = f"see {command} --helpshort for the flags."

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # A config file's own error can be of any type.
            config = config_arg(argv)
            if msg := (config and config_file_error(e, config)) or _override_problem(argv):
                cli.fail(msg)
            if isinstance(e, (AttributeError, KeyError)):  # An override naming no field.
                cli.fail(config_override_error(e, argv))
            if isinstance(e, OSError) and config is not None:  # Overrides on a missing file.
                cli.fail(config_load_error(config, e))
            if isinstance(e, (flags.Error, ValueError, OSError)):
                cli.fail(f"{_last_line(e)}; {see}")
            raise  # A bug of ours: its traceback.

    return parse


parse_flags = flags_parser(COMMAND)


def define_config_flag(default: pathlib.Path, command: str) -> None:
    """Defines --config (default: the file `default`). Without --config on the command line,
    config_flags loads the default file and applies the `--config.*` overrides from sys.argv right
    here, so an override naming no field surfaces here: reported in one line, as parse's."""
    try:
        config_flags.DEFINE_config_file("config", str(default), "Config file, optionally `:variant`.")
    except Exception as e:  # As in flags_parser.
        if msg := _override_problem(sys.argv):
            cli.fail(msg)
        if isinstance(e, (AttributeError, KeyError)):
            cli.fail(config_override_error(e, sys.argv))
        if isinstance(e, (flags.Error, ValueError)):
            cli.fail(f"{_last_line(e)}; see {command} --helpshort for the flags.")
        raise


def loaded_config() -> ml_collections.ConfigDict:
    """The parsed --config, or one `error:` line if its file could not be loaded (config_flags
    defers a missing file's error to the first access) or get_config() returned no ConfigDict."""
    arg = flags.FLAGS["config"].serialize().split("=", 1)[-1]
    try:
        config = flags.FLAGS.config
        config.model  # noqa: B018 — raises the deferred error of a file that could not be read.
    except OSError as e:
        cli.fail(config_load_error(arg, e))
    except AttributeError:  # Not a ConfigDict: reported below.
        pass
    if not isinstance(config, ml_collections.ConfigDict) or "model" not in config:
        cli.fail(f"--config={arg}: get_config() returned {type(config).__name__}, not the config "
                 "of a run; return configs/base.py's get_config() with your changes.")
    return config


def check_workdir(workdir: pathlib.Path) -> None:
    """Refuses, in one line and before any data is loaded or step compiled, a --workdir the run
    could not write: a file, under a file, in a read-only or another user's folder, or holding
    one of the run's files with the wrong kind or permissions."""
    if workdir.exists() and not workdir.is_dir():
        cli.fail(f"--workdir={workdir} is a file, not a folder; choose another --workdir.")
    existing = workdir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        cli.fail(f"--workdir={workdir}: {existing} is a file, not a folder; choose another "
                 "--workdir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        cli.fail(f"--workdir={workdir}: {existing} is not writable (a read-only file system, or "
                 "another user's folder); choose a --workdir you can write.")
    if existing != workdir:
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
    created, path = [], workdir
    while not path.exists() and path != path.parent:
        created.append(path)
        path = path.parent
    try:
        yield
    except BaseException:
        for folder in created:  # Innermost first; rmdir fails, harmlessly, on a non-empty one.
            with contextlib.suppress(OSError):
                folder.rmdir()
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
        if isinstance(e, SystemExit):
            status = e.code if isinstance(e.code, int) else 1
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
    """Keeps Orbax's per-save INFO chatter out of the run's log; its warnings still show."""

    def filter(self, record) -> bool:
        if "/orbax/" in record.pathname:
            # Orbax logs a failed async save with its traceback; the run reports it in one line.
            record.exc_info, record.exc_text = None, None
        # Python's levels (absl.logging.WARNING is absl's verbosity number, not a levelno).
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def define_flags() -> None:
    """Defines --config and --workdir."""
    define_config_flag(cli.recipes_dir() / "quickstart.py", COMMAND)
    flags.DEFINE_string("workdir", None, "Run directory; default runs/<config>[_<variant>].")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a flag, "
                 f"--config.GROUP.FIELD=VALUE or --workdir=DIR; see {COMMAND} --helpshort.")
    config_file = flags.FLAGS["config"].serialize().split("=", 1)[-1]  # FILE.py[:VARIANT]
    config = loaded_config()
    if flags.FLAGS.workdir == "":
        cli.fail("--workdir is empty; give a folder, or leave the flag out for "
                 f"{default_workdir(config_file)}.")
    workdir = pathlib.Path(flags.FLAGS.workdir or default_workdir(config_file))
    check_workdir(workdir)
    from gpt_jax.training import loop  # Imported late so flag errors come fast.
    from gpt_jax.training.preemption import Preempted

    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    cli.quiet_library_noise()
    try:
        with (_exit_at_once_if_joined(), _remove_if_left_empty(workdir),
              cli.errors_as_one_line(loop.NonFiniteLossError)):
            loop.run(config, workdir)
    except Preempted as e:
        # 128 + signal: a scheduler reads "terminated by that signal" and can requeue the job.
        print(e, file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)


def run_main() -> None:
    """The command (`python -m gpt_jax.train`, or the installed `gpt-jax-train`)."""
    sys.argv = cli.resolve_config_args(sys.argv)  # configs/NAME.py from any folder once installed.
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run_main()
