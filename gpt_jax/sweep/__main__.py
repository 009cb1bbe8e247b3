"""`python -m gpt_jax.sweep experiments/NAME/sweep.py [--report] [--dry_run] [--parallel=N]
[--slurm=FILE] [--root=DIR]`: runs every run of a sweep that is not done, then reports.

- no flag: train (and evaluate) the runs not yet done, sequentially or `--parallel=N` at a time
  with the GPUs or CPU cores split between them, then write the report;
- `--report`: only the report, from the runs there are: results.csv, results.md, the plots,
  and the results block of the experiment's README.md, beside the sweep file; with a --root
  elsewhere, in ROOT (the experiment's own record and README are left alone);
- `--dry_run`: list the runs, their state and commands; run nothing;
- `--slurm=FILE`: write a SLURM job-array script, one task per run (`--point=K`);
- `--point=K`: run the K-th run only (what each array task does).

Runs live in ROOT/<run name> (default: the sweep file's folder's runs/); a bad sweep file,
override or value stops the launch in one line before anything runs.
"""

from __future__ import annotations

import pathlib
import shlex
import sys

from gpt_jax import cli
from gpt_jax.sweep import report, runner

COMMAND = "python -m gpt_jax.sweep"


def parse(argv: list[str]):
    p = cli.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="the sweep file, e.g. experiments/positions/sweep.py")
    p.add_argument("--root", help="folder of the runs' workdirs (default: SWEEP's folder/runs)")
    p.add_argument("--report", action="store_true", help="only write the report")
    p.add_argument("--dry_run", action="store_true", help="list the runs; run nothing")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (devices split)")
    p.add_argument("--point", type=int, help="run only the K-th run (0-based)")
    p.add_argument("--slurm", help="write a SLURM job-array script here instead of running")
    p.add_argument("--slurm_arg", action="append", default=[],
                   help="an #SBATCH line's option, e.g. --slurm_arg=--gres=gpu:1 (repeatable)")
    p.add_argument("--slurm_concurrent", type=int, help="array tasks running at once (%%N)")
    p.add_argument("--svg", action="store_true", help="also write the plots as SVG")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel={args.parallel} must be ≥ 1")
    if sum(map(bool, (args.report, args.dry_run, args.slurm, args.point is not None))) > 1:
        p.error("give one of --report, --dry_run, --slurm and --point")
    if (args.slurm_arg or args.slurm_concurrent is not None) and not args.slurm:
        p.error("--slurm_arg and --slurm_concurrent shape the script --slurm=FILE writes; give "
                "--slurm too")
    if args.parallel != 1 and (args.report or args.dry_run or args.slurm):
        p.error("--parallel runs the runs: leave it out with --report, --dry_run and --slurm")
    return args


def write_report(loaded: runner.Loaded, svg: bool) -> list[pathlib.Path]:
    """results.csv, results.md, the plots and the README's results block beside the sweep file
    (with a --root elsewhere: in ROOT, README untouched); returns the files written."""
    points = loaded.sweep.runs()
    rows = report.collect(loaded, points)
    own = loaded.root == loaded.file.parent / "runs"
    out = loaded.file.parent if own else loaded.root
    if not rows:
        raise runner.SweepError(f"no run of {loaded.file} has finished under {loaded.root}; "
                                f"run {COMMAND} {loaded.file} first")
    report.write_csv(rows, out / "results.csv")
    table = report.table_from_csv(out / "results.csv")
    block = table + "\n" + report.summary_line(rows, report.launches(loaded.root)) + "\n"
    cli.write_atomically({out / "results.md": block})
    from gpt_jax.sweep import plots  # matplotlib: imported only for a report.

    groups: dict[str, list[pathlib.Path]] = {}
    for p in points:
        if any(r["run"] == p.name for r in rows):
            groups.setdefault(p.label, []).append(loaded.workdir(p))
    written = [out / "results.csv", out / "results.md"]
    written += plots.curves_figure(groups, out / "curves", svg=svg)
    written += plots.points_figure(report.read_csv(out / "results.csv"), out / "points", svg=svg)
    for e in loaded.sweep.evals:  # Evals run with --per_position: loss against context.
        curves: dict[str, list] = {}
        for label, workdirs in groups.items():
            found = [c for w in workdirs
                     if (c := plots.position_curve(runner.eval_record(w, e.name))) is not None]
            if found:
                curves[label] = found
        if curves:
            written += plots.positions_figure(curves, out / f"positions_{e.name}",
                                              f"eval {e.name}: mean ± 95% CI over seeds", svg=svg)
    for analysis in loaded.sweep.analyses:
        written += analysis(out)
    if own and report.update_readme(out / "README.md", block):
        written.append(out / "README.md")
    missing = len(points) - len(rows)
    print(table + (f"({missing} of {len(points)} runs not finished: left out)\n" if missing else ""))
    return written


def main(argv: list[str]) -> None:
    args = parse(argv)
    loaded = runner.load(args.sweep, args.root)
    points = loaded.sweep.runs()
    if args.point is not None and not 0 <= args.point < len(points):
        raise runner.SweepError(f"--point={args.point}: the sweep has runs 0..{len(points) - 1}")
    if args.report:
        for path in write_report(loaded, args.svg):
            print(f"wrote {path}", file=sys.stderr)
        return
    if args.slurm:
        for p in points:
            runner.config_of(loaded, p)
        path = pathlib.Path(args.slurm)
        cli.check_output(path, "--slurm", folder=False)
        path.write_text(runner.slurm_script(loaded, points, args.slurm_arg, args.slurm_concurrent))
        print(f"wrote {path}: sbatch {path} runs the {len(points)} runs as one array")
        return
    if args.dry_run:
        for i, p in enumerate(points):
            config = runner.config_of(loaded, p)
            print(f"[{i}] {p.name}: {runner.status(loaded, p, config.train.num_steps)}\n    "
                  + shlex.join(runner.train_command(loaded, p)[1:]))
        return
    chosen = [points[args.point]] if args.point is not None else points
    outcome = runner.run(loaded, chosen, args.parallel)
    print(f"{len(outcome['ran'])} ran, {len(outcome['done'])} already done, "
          f"{len(outcome['busy'])} busy in another launch, {len(outcome['failed'])} failed"
          + (f", {len(outcome['stopped'])} stopped by a signal" if outcome["stopped"] else ""))
    if args.point is None and (outcome["ran"] or outcome["done"]):
        write_report(loaded, args.svg)
    if outcome["stopped"] and not outcome["failed"]:  # 130: a SLURM task requeues itself.
        cli.fail(f"{', '.join(outcome['stopped'])} stopped by a signal after saving; the next "
                 "launch resumes them", status=130)
    if outcome["failed"]:
        cli.fail(f"{len(outcome['failed'])} run(s) failed: {', '.join(outcome['failed'])}; see "
                 f"their logs in {loaded.root / 'logs'}, fix, and launch again (finished runs "
                 "are skipped)")


if __name__ == "__main__":
    with cli.errors_as_one_line(runner.SweepError):
        try:
            main(sys.argv[1:])
        except KeyboardInterrupt:
            cli.fail("interrupted: the runs that were training saved a checkpoint and resume at "
                     "the next launch", status=130)
