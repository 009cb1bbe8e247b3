"""Writes a built-in evaluation task to a JSONL task file, to inspect it or to use it elsewhere.

    python tools/make_task.py --task=stdlib_nextline --out=FILE.jsonl [--force]
    python tools/make_task.py --task=shakespeare_cloze --source=tinyshakespeare.txt --out=FILE.jsonl

The file is in gpt_jax/eval/tasks.py's format (a header line, then one example a line with its
"split"), which `python -m gpt_jax.evaluate` and lm-eval's YAML tasks read. An existing file is
kept unless --force. A bad invocation ends with one `error:` line that names the problem and the
fix.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # Run from anywhere.

from gpt_jax import cli
from gpt_jax.eval import builtin_tasks, tasks


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    names = ", ".join(builtin_tasks.BUILTIN)
    parser.add_argument("--task", required=True, help=f"a built-in task ({names}) or a task file")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="the JSONL file to write")
    parser.add_argument("--source", default=None,
                        help="the text a built-in task is made from (shakespeare_cloze's)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = parser.parse_args(argv)
    for value, flag in ((args.task, "--task"), (str(args.out), "--out"), (args.source, "--source")):
        cli.refuse_url(value, flag)
    cli.check_output(args.out, "--out", folder=False)
    if args.out.exists() and not args.force:
        cli.fail(f"--out={args.out} already exists; pass --force to overwrite it or choose "
                 "another --out.")
    with cli.errors_as_one_line():
        task = tasks.load_task(args.task, args.source)
        missing = cli.missing_folders(args.out.parent)
        try:
            cli.write_atomically({args.out: tasks.to_jsonl(task)})
        except BaseException:
            cli.remove_empty(missing)
            raise
    print(f"Wrote {args.out}: task {task.name} ({task.kind}), {len(task.train)} train and "
          f"{len(task.test)} test examples.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
