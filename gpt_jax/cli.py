"""What every command does with a bad invocation: one `error:` line on stderr, exit status 1, no
traceback (train, sample, prepare and the tools all end through here).

Errors a user can fix are ValueErrors (ours: ConfigError, CheckpointError, RunError, …; and the
data code's, about a source or a file) and OSErrors (a missing, unreadable or read-only path, a
full disk); commands catch those around their work with `errors_as_one_line`. A library's own
ValueError (a bug) is then one line too: GPT_JAX_TRACEBACK=1 in the environment shows the full
traceback as well, for a bug report. Any other exception keeps its traceback.

Also the command-line code the commands share, so that each refuses the same mistake the same
way: absl flag parsing (`flags_parser`) and --config handling (`define_config_flag`,
`loaded_config`, recipes found from any folder), argparse (`ArgumentParser`), output paths
(`check_output`, and `missing_folders` / `remove_empty` to undo the folders a failed command
made), and a library's exception quoted in a message of ours (`brief`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import json
import logging as std_logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

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


def brief(e: BaseException, limit: int = 200, *, typed: bool = False,
          line: int | None = None) -> str:
    """A library's exception as a short line, to quote in a message of ours: its text with the
    line breaks collapsed (validation messages put the cause last), or only its line `line`
    (0: the first, a hub error's gist; -1: the last, as config_flags wraps a config file's error
    in a traceback whose last line is the cause); cut to `limit` characters, "…" marking the
    cut. With `typed`, after its type's name ("KeyError: 'name'"). Its type's name alone if it
    has no text."""
    lines = [text for text in str(e).splitlines() if text.strip()]
    text = one_line(lines[line] if line is not None and lines else e)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    name = type(e).__name__
    return f"{name}: {text}" if typed and text else text or name


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
        _traceback_if_asked()
        fail(os_error(e))
    except (ValueError, *extra) as e:
        _traceback_if_asked()
        fail(e)


def _traceback_if_asked() -> None:
    if os.environ.get("GPT_JAX_TRACEBACK", "") not in ("", "0"):
        traceback.print_exc()


class ArgumentParser(argparse.ArgumentParser):
    """argparse refusing as every gpt_jax command does: one `error:` line (the problem, the usage
    and where the help is) and exit status 1, where argparse's own prints the usage, then
    `PROG: error: …`, and exits with 2. Its subparsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        usage = one_line(self.format_usage()).removeprefix("usage: ")
        fail(f"{message}; usage: {usage}; `{self.prog} --help` lists the arguments.")


def output_problem(path: pathlib.Path, flag: str, within: pathlib.Path) -> str | None:
    """Why `flag`=`path` could not be written into the folder `within` (`path` itself, or its
    parent; made with its missing parents if need be), in one line: the nearest folder at or
    above `within` that exists is a file, or a folder this process cannot write in (a read-only
    file system, another user's). None if it can be written."""
    existing = within
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag}={path}: {existing} is a file, not a folder; choose another {flag}."
    if not os.access(existing, os.W_OK | os.X_OK):
        return _not_writable(path, flag, existing)
    return None


def _not_writable(path: pathlib.Path, flag: str, locked: pathlib.Path) -> str:
    return (f"{flag}={path}: {locked} is not writable (a read-only file system, or another "
            f"user's); check its permissions or choose a {flag} you can write.")


def check_output(path: pathlib.Path, flag: str, folder: bool) -> None:
    """Refuses, in one line and before any work, an output path (a folder if `folder`, else a
    file) that could not be written: one of the other kind, under a file, or in a read-only or
    another user's folder. Nothing is created (train's --workdir, and tools/plan.py,
    tools/benchmark.py and tools/compare_nanogpt.py check their outputs with it before minutes of
    work)."""
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        fail(f"{flag}={path} is a {other}, not a {kind}; choose another {flag} (give a {kind} "
             "path).")
    if problem := output_problem(path, flag, path if folder else path.parent):
        fail(problem)
    if not folder and path.is_file() and not os.access(path, os.W_OK):
        fail(_not_writable(path, flag, path))


def missing_folders(path: pathlib.Path) -> list[pathlib.Path]:
    """`path` and its parents that do not exist, innermost first: the folders that making `path`
    creates, and that `remove_empty` removes again if the command fails."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty(folders: Iterable[pathlib.Path]) -> None:
    """Removes each of `folders` (innermost first) that is empty; one that is not (someone's files
    appeared in it) or is already gone stays as it is."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


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


@contextlib.contextmanager
def staged_folder(out: pathlib.Path) -> Iterator[pathlib.Path]:
    """A new folder beside `out` to write into. When the block ends, it is renamed to `out` (an
    existing `out`, empty or an earlier export, is moved aside first and removed after); if the
    block or the rename fails, it and the parent folders made for it are removed and `out` is as
    it was. So `out` is never half-written."""
    out = out.resolve()  # A symbolic link's target is what the user means (and gets).
    made = []  # Parent folders created here, innermost first: removed again on failure.
    tmp = None
    try:
        for folder in reversed(missing_folders(out.parent)):
            folder.mkdir()
            made.insert(0, folder)
        try:
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial",
                                                dir=out.parent))
        except OSError as e:  # Name the folder, not the temporary one inside it.
            raise OSError(e.errno, e.strerror, str(out.parent)) from e
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # A plain folder's mode, not mkdtemp's private 0o700.
        yield tmp
        if out.exists():
            aside = tmp.with_name(tmp.name + ".old")
            os.rename(out, aside)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(aside, out)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        raise


def checkpoint_arg(value: str) -> int | str:
    """An argparse type for --checkpoint: newest, best or a step number."""
    if value in ("newest", "best"):
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not newest, best or a step number")
    return int(value)


def json_object(path: pathlib.Path) -> dict[str, Any] | None:
    """The JSON object in the file `path`; None if it is absent, unreadable, not JSON or holds
    something else: for a file whose absence or damage the caller handles by itself (an
    interrupted prepare's progress.json, a folder's config.json when telling what it is)."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError.
        return None
    return value if isinstance(value, dict) else None


def _noise(record: std_logging.LogRecord) -> bool:
    """Log lines of libraries that say nothing to a user of gpt_jax:
    - JAX's INFO line on every CPU-only start that it found no TPU runtime (libtpu.so);
    - Orbax's warning on every resume that a step has no `_CHECKPOINT_METADATA` file: its
      per-item metadata, which the composite checkpoints we restore do not have or need;
    - gcsfs's INFO line on every file it opens for reading (a gs:// workdir)."""
    message = str(record.msg)
    return ((record.pathname.endswith("xla_bridge.py")
             and message.startswith("Unable to initialize backend"))
            or ("/orbax/" in record.pathname and message.startswith("Metadata file does not exist"))
            or (record.name.startswith("gcsfs") and record.levelno < std_logging.WARNING))


def jax_fallback_warning(record: std_logging.LogRecord) -> bool:
    """JAX's warning that a GPU or TPU is present but unused; train says so itself, with the
    command that fixes it (mesh.unused_accelerator), and drops this one."""
    return record.pathname.endswith("xla_bridge.py") and str(record.msg).startswith(
        ("An NVIDIA GPU may be present", "A Google TPU may be present"))


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


# --- --config: the recipes, and config_flags' errors as one line. ---

_CONFIG_ARG = re.compile(r"^--?config(?:=(.*))?$")  # --config=FILE[:VARIANT], or --config FILE….
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")  # --config.KEY=VALUE, --noconfig.KEY (bools)
_LISTED = "(every field is listed in configs/base.py)"


def refuse_url(value: str | None, flag: str) -> None:
    """Fails in one line for a URL (gs://…) given to a tool that reads and writes local folders
    (train and sample take gs:// workdirs; the tools do not), before pathlib would turn it into
    a local folder "gs:/…"."""
    if value is not None and "://" in value:
        fail(f"{flag}={value}: this tool works on local folders; copy the run there first "
             "(gcloud storage cp -r URL DIR) and give that folder.")


def recipes_dir() -> pathlib.Path:
    """The folder of the recipes (configs/): beside gpt_jax in a clone, and in site-packages
    beside it when installed. Found from gpt_jax's own location, not sys.path, on which another
    `configs` package (the current folder's) may come first."""
    from gpt_jax.config import RECIPES

    return RECIPES


def use_own_recipes() -> None:
    """Makes `import configs` (the recipes' `from configs import base`, and ours) mean gpt_jax's
    recipes in this process, whatever `configs` package sys.path would find first (`python -m`
    puts the current folder there, and research projects often have a configs/ of their own).
    The commands that load configs call it (`recipe_args`); a program that imports gpt_jax
    keeps sys.path's `configs`."""
    import importlib.util

    module = sys.modules.get("configs")
    if module is not None and pathlib.Path(module.__file__ or "").resolve().parent == recipes_dir():
        return
    for name in [n for n in sys.modules if n == "configs" or n.startswith("configs.")]:
        del sys.modules[name]  # Someone else's, imported already: not what the recipes mean.
    spec = importlib.util.spec_from_file_location(
        "configs", recipes_dir() / "__init__.py", submodule_search_locations=[str(recipes_dir())])
    module = importlib.util.module_from_spec(spec)
    sys.modules["configs"] = module
    spec.loader.exec_module(module)


def recipe_args(argv: list[str]) -> list[str]:
    """`resolve_config_args(argv)`, and `use_own_recipes()` unless the config file it names is a
    module of another `configs` package (a folder named configs with an __init__.py, not
    gpt_jax's): that file's `from configs import …` means its own package. Any other config
    file (gpt_jax's recipes, the default, a copy of a recipe anywhere) builds on gpt_jax's."""
    argv = resolve_config_args(argv)
    named = [path for _, value in _config_values(argv) if (path := (value or "").split(":")[0])]
    folder = pathlib.Path(named[-1]).expanduser().resolve().parent if named else recipes_dir()
    if not (folder.name == "configs" and (folder / "__init__.py").is_file()
            and folder != recipes_dir()):
        use_own_recipes()
    return argv


def resolve_config_args(argv: list[str]) -> list[str]:
    """`argv` with a `--config=PATH[:VARIANT]` (or `--config PATH[:VARIANT]`) that names no file
    here but names a recipe (`configs/NAME.py` or `NAME.py`) pointed at the installed recipe, so
    recipes work from any directory once gpt_jax is installed; every other argument as it is."""
    out = list(argv)
    for i, value in _config_values(argv):
        path, colon, variant = (value or "").partition(":")
        if not path or pathlib.Path(path).expanduser().exists():
            continue
        name = pathlib.PurePath(path)
        recipe = recipes_dir() / (name.relative_to("configs") if name.parts[:1] == ("configs",)
                                  else name)
        if recipe.is_file():
            out[i] = argv[i].removesuffix(value) + f"{recipe}{colon}{variant}"
    return out


def _config_values(argv: list[str]) -> list[tuple[int, str | None]]:
    """(index, value) of every --config of `argv`: `--config=VALUE`'s own index, or the next
    argument's for `--config VALUE` (its value None if there is none)."""
    found, i = [], 0
    while i < len(argv):
        if match := _CONFIG_ARG.match(argv[i]):
            if match.group(1) is None:  # --config VALUE: the value is the next argument.
                i += 1
                found.append((i, argv[i] if i < len(argv) else None))
            else:
                found.append((i, match.group(1)))
        i += 1
    return found


def config_arg(argv: list[str]) -> str | None:
    """The value of --config in `argv` (FILE.py[:VARIANT]; the last one given), None if absent."""
    found = _config_values(argv)
    return found[-1][1] if found else None


def unknown_config_key(key: str, flag: str = "--config.") -> str | None:
    """The one-line message for an override `KEY=VALUE` (`--config.KEY`, or `flag`KEY as in
    tools/benchmark.py's --set=) that names no field of configs/base.py (every recipe has exactly
    its fields): the group or field that does not exist and the closest name, or the group it
    names instead of a field; None if KEY is a field."""
    from gpt_jax.config import reference_config

    node, path = reference_config(), []
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
            return f"--config={config}: {one_line(err)}"
        return (f"--config={config}: {type(err).__name__} in {path}, line {lines[-1]}: "
                f"{one_line(err) or 'raised'}; fix the config file.")
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
        why = brief(e, line=-1)
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
            # Without a --config flag (sample, prepare, launch_local) no argument is a config's.
            has_config = "config" in flags.FLAGS
            config = config_arg(argv) if has_config else None
            if has_config and (msg := (config and config_file_error(e, config))
                               or _override_problem(argv)):
                fail(msg)
            if has_config and isinstance(e, (AttributeError, KeyError)):  # An unknown override.
                fail(config_override_error(e, argv))
            if isinstance(e, OSError) and config is not None:  # Overrides on a missing file.
                fail(config_load_error(config, e))
            if isinstance(e, (flags.Error, ValueError, OSError)):
                fail(f"{brief(e, line=-1)}; {see}")
            raise  # A bug of ours: its traceback.

    return parse


def define_config_flag(default: pathlib.Path, command: str) -> None:
    """Defines --config (default: the file `default`). Without --config on the command line,
    config_flags loads the default file and applies the `--config.*` overrides from sys.argv right
    here, so an override naming no field surfaces here: reported in one line, as parse's."""
    try:
        config_flags.DEFINE_config_file("config", str(default), "Config file, optionally `:variant`.")
    except Exception as e:  # As in flags_parser.
        if msg := _override_problem(sys.argv):
            fail(msg)
        if isinstance(e, (AttributeError, KeyError)):
            fail(config_override_error(e, sys.argv))
        if isinstance(e, (flags.Error, ValueError)):
            fail(f"{brief(e, line=-1)}; see {command} --helpshort for the flags.")
        raise


def loaded_config() -> ml_collections.ConfigDict:
    """The parsed --config, or one `error:` line if its file could not be loaded (config_flags
    defers a missing file's error to the first access) or get_config() returned no ConfigDict."""
    arg = flags.FLAGS["config"].serialize().split("=", 1)[-1]
    try:
        config = flags.FLAGS.config
        config.model  # noqa: B018 — raises the deferred error of a file that could not be read.
    except OSError as e:
        fail(config_load_error(arg, e))
    except AttributeError:  # Not a ConfigDict: reported below.
        pass
    if not isinstance(config, ml_collections.ConfigDict) or "model" not in config:
        fail(f"--config={arg}: get_config() returned {type(config).__name__}, not the config "
             "of a run; return configs/base.py's get_config() with your changes.")
    return config
