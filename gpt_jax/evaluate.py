"""`python -m gpt_jax.evaluate --workdir=DIR [--data=PATH] [--task=T ...]`: score a trained run.

- `--data`: loss, perplexity and bits per byte on a text file, a folder of text, a .jsonl file
  or a prepared folder (gpt_jax/eval/text.py says how each is read and split); without `--data`
  and `--task`, the run's own val split (its loss is training's final full val loss).
  `--seq_len` (longer than training for length-extrapolation studies) and `--stride` give the
  sliding-window protocol.
- `--task`: task files or built-in names (gpt_jax/eval/tasks.py has the JSONL format,
  gpt_jax/eval/builtin_tasks.py the shipped tasks), scored by log-likelihood, `--num_fewshot`
  examples from each task's train split in the prompt: multiple choice gives acc and acc_norm,
  completion exact match, each with its standard error.

Runs on the run's mesh, or another one: `--config.mesh.*` as in training. Results print as
tables and are appended as one JSON line to `--out` (default WORKDIR/eval.jsonl), so earlier
results are never lost. A bad invocation ends with one `error:` line naming the fix.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sys

from absl import app, flags, logging

from gpt_jax import cli

COMMAND = "python -m gpt_jax.evaluate"
FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines the command's flags on `fv` (the sweep runner checks an Eval's arguments on its own
    FlagValues)."""
    into = {"flag_values": fv}
    flags.DEFINE_string("workdir", None, "A training run's workdir (required).", **into)
    flags.DEFINE_string("checkpoint", "newest", "newest | best (lowest val loss) | a step number.",
                        **into)
    flags.DEFINE_string("data", None, "Text file, folder, .jsonl or prepared folder to score.",
                        **into)
    flags.DEFINE_string("split", None, "all | train | val: training's split of --data (default "
                        "all with --data: both splits and their total; val without).", **into)
    flags.DEFINE_string("text_field", "text", "The text field of a .jsonl --data.", **into)
    flags.DEFINE_integer("seq_len", None, "Tokens per window (default: the run's data.seq_len).",
                         **into)
    flags.DEFINE_integer("stride", None, "New tokens scored per window (default: --seq_len, "
                         "non-overlapping windows).", **into)
    flags.DEFINE_integer("batch_size", None, "Windows or task rows per step (default: the run's "
                         "train.batch_size).", **into)
    flags.DEFINE_boolean("per_position", False, "Also the mean loss at each position of the "
                         "non-overlapping windows of --seq_len tokens (how loss falls with "
                         "context), in the record as per_position.", **into)
    flags.DEFINE_multi_string("task", [], "A task JSONL file or built-in name (repeatable).", **into)
    flags.DEFINE_string("task_source", None, "The text a built-in task is made from, where it "
                        "needs one (shakespeare_cloze: Tiny Shakespeare).", **into)
    flags.DEFINE_integer("num_fewshot", 0, "Train examples in each task prompt.", lower_bound=0,
                         **into)
    flags.DEFINE_string("fewshot_separator", None, "Between prompt examples (default: the "
                        "task's, else a blank line).", **into)
    flags.DEFINE_string("target_delimiter", None, "Between a context and its answer (default: "
                        "the task's, else a space).", **into)
    flags.DEFINE_integer("fewshot_seed", 1234, "Seed of the few-shot draws.", lower_bound=0,
                         **into)
    flags.DEFINE_integer("limit", None, "Score only the first N test examples of each task.",
                         lower_bound=2, **into)
    flags.DEFINE_string("out", None, "JSON-lines file the results are appended to (default "
                        "WORKDIR/eval.jsonl).", **into)


def main(argv: list[str], overrides: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}: every setting is a flag (--name=value); see "
                 f"{COMMAND} --helpshort.")
    logging.set_verbosity(logging.WARNING)
    from gpt_jax import sample
    from gpt_jax.eval import loaded as loaded_lib
    from gpt_jax.parallel import distributed

    with cli.errors_as_one_line():
        if not FLAGS.workdir:
            raise loaded_lib.EvalError("--workdir is required: give a training run's workdir.")
        split = _check_flags()
        folder, tokenizer = sample.open_run(FLAGS.workdir, FLAGS.checkpoint)
        if FLAGS.out is None and not isinstance(folder, pathlib.Path):
            raise loaded_lib.EvalError(f"--workdir={FLAGS.workdir} is remote: give --out=FILE "
                                       "for the results.")
        out = pathlib.Path(FLAGS.out).expanduser() if FLAGS.out else folder / "eval.jsonl"
        cli.check_output(out, "--out", folder=False)  # Refused now, not after the scoring.
        tasks = _load_tasks(tokenizer)  # Every prompt built and encoded before the model loads.
        cli.quiet_orbax_reads()
        run = loaded_lib.load(folder, FLAGS.checkpoint, seq_len=FLAGS.seq_len,
                              batch_size=FLAGS.batch_size,
                              overrides=loaded_lib.parse_overrides(overrides))
        show = distributed.is_primary()  # Every process scores; one prints and writes.
        record = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
                  "workdir": str(folder), "checkpoint": FLAGS.checkpoint, "step": run.step,
                  "seq_len": run.config.data.seq_len, "stride": FLAGS.stride,
                  "batch_size": run.config.train.batch_size, "mesh": dict(run.run.mesh.shape),
                  "data": FLAGS.data, "split": split, "num_fewshot": FLAGS.num_fewshot,
                  "text": [], "tasks": []}
        if show:
            print(f"# {folder}, checkpoint step {run.step}, seq_len {run.config.data.seq_len}, "
                  f"{run.run.mesh.size} device(s)")
        if FLAGS.data is not None or not tasks:
            record["text"] = _score_text(run, split, show)
        else:
            record["split"] = None  # No text scored.
        if tasks:
            record["tasks"] = _score_tasks(run, tasks, show)
        if show:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a", encoding="utf-8") as f:  # Appended: earlier results stay.
                f.write(json.dumps(record) + "\n")
            print(f"appended to {out}", file=sys.stderr)


def _check_flags() -> str:
    """The split to score; EvalError for a flag that cannot work, before anything loads."""
    from gpt_jax.eval import text
    from gpt_jax.eval.loaded import EvalError

    split = FLAGS.split or ("all" if FLAGS.data is not None else "val")
    if split not in text.SPLITS:
        raise EvalError(f"--split={split!r}: use one of {', '.join(text.SPLITS)}.")
    if FLAGS.seq_len is not None and FLAGS.seq_len < 2:
        raise EvalError(f"--seq_len={FLAGS.seq_len}: give at least 2 tokens per window.")
    if FLAGS.stride is not None and not 1 <= FLAGS.stride <= (FLAGS.seq_len or FLAGS.stride):
        raise EvalError(f"--stride={FLAGS.stride}: give 1 to --seq_len (the new tokens scored "
                        "per window).")
    text_only = [f"--{n}" for n in ("split", "stride", "text_field") if FLAGS[n].present]
    if FLAGS.task and FLAGS.data is None and text_only:
        raise EvalError(f"{', '.join(text_only)} shape the scoring of --data, and only tasks are "
                        "scored: give --data too, or leave them out.")
    if FLAGS.batch_size is not None and FLAGS.batch_size < 1:
        raise EvalError(f"--batch_size={FLAGS.batch_size}: give at least 1.")
    return split


def _load_tasks(tokenizer) -> list:
    from gpt_jax.eval import tasks

    loaded = tasks.load_tasks(FLAGS.task, source=FLAGS.task_source)
    for task in loaded:
        tasks.check_task(tokenizer, task, FLAGS.num_fewshot, FLAGS.fewshot_separator,
                         FLAGS.target_delimiter, FLAGS.fewshot_seed, FLAGS.limit)
    return loaded


def _score_text(run, split: str, show: bool) -> list[dict]:
    from gpt_jax.eval import text

    splits = text.read_splits(run, FLAGS.data, split, FLAGS.text_field)
    rows = [text.evaluate_split(run, s, FLAGS.stride) for s in splits]
    if split == "all":
        rows.append(text.total_row(rows))
    if FLAGS.per_position:
        from gpt_jax.eval import scoring

        r = run.run
        scorer = scoring.Scorer(r.model, run.params, max_len=r.config.data.seq_len,
                                batch_size=run.micro_batch, mesh=r.mesh, rules=r.rules)
        for row, s in zip(rows, splits, strict=False):  # Not the total row of "all".
            losses, windows = scorer.position_losses(s.tokens)
            row["per_position"], row["per_position_windows"] = losses.tolist(), windows
    if show:
        print(f"\n{FLAGS.data or 'the run’s own data'} (stride {FLAGS.stride or 'seq_len'})\n"
              "| split | loss | perplexity | bits per byte | tokens | bytes |\n| --- |"
              + " --- |" * 5)
        for r in rows:
            print(f"| {r['split']} | {r['loss']:.4f} | {r['ppl']:.3f} | "
                  f"{r['bits_per_byte']:.4f} | {r['tokens']:,} | {r['bytes']:,} |")
        for r in rows:
            if "per_position" in r:
                at = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
                      if p <= len(r["per_position"])]
                print(f"\n{r['split']}: loss by context length (tokens seen), "
                      f"{r['per_position_windows']:,} windows\n| "
                      + " | ".join(map(str, at)) + " |\n|" + " --- |" * len(at) + "\n| "
                      + " | ".join(f"{r['per_position'][p - 1]:.4f}" for p in at) + " |")
    return rows


def _score_tasks(run, loaded_tasks: list, show: bool) -> list[dict]:
    from gpt_jax.eval import scoring, tasks

    r = run.run
    scorer = scoring.Scorer(r.model, run.params, max_len=r.config.data.seq_len,
                            batch_size=run.micro_batch, mesh=r.mesh, rules=r.rules)
    rows = [tasks.evaluate_task(scorer, run.tokenizer, task, num_fewshot=FLAGS.num_fewshot,
                                separator=FLAGS.fewshot_separator,
                                delimiter=FLAGS.target_delimiter, seed=FLAGS.fewshot_seed,
                                limit=FLAGS.limit) for task in loaded_tasks]
    if show:
        print("\n| task | shots | n | metric | value | stderr | chance | requests cut |\n| --- |"
              + " --- |" * 7)
        for m in rows:
            for metric in ("acc", "acc_norm", "exact_match"):
                if metric in m:
                    chance = f"{m['chance']:.3f}" if "chance" in m else "–"
                    print(f"| {m['task']} | {m['num_fewshot']} | {m['n']} | {metric} | "
                          f"{m[metric]:.4f} | {m[metric + '_stderr']:.4f} | {chance} | "
                          f"{m['truncated']:.0%} |")
    return rows


def run_main() -> None:
    """The command (`python -m gpt_jax.evaluate`)."""
    define_flags()
    overrides: list[str] = []
    parse = cli.flags_parser(COMMAND)

    def parser(argv: list[str]) -> list[str]:  # --config.mesh.* are the run's, not flags.
        overrides.extend(a for a in argv[1:] if a.startswith("--config."))
        return parse([a for a in argv if not a.startswith("--config.")])

    app.run(lambda argv: main(argv, overrides), flags_parser=parser)


if __name__ == "__main__":
    run_main()
