"""`python -m gpt_jax.plot WORKDIR... [--out=FILE.png] [--metric=val/loss] [--seeds]`: a metric of
any runs against step, tokens and training FLOPs, one line per run, as a sweep's report draws
them (gpt_jax/sweep/plots.py). `--seeds` draws runs whose configs differ only in train.seed as
one line, their mean with a shaded 95% confidence interval.
"""

from __future__ import annotations

import json
import pathlib
import sys

from gpt_jax import cli

COMMAND = "python -m gpt_jax.plot"


def _groups(workdirs: list[pathlib.Path], seeds: bool) -> dict[str, list[pathlib.Path]]:
    """Label → runs: one run each, or (seeds) runs of one config but train.seed together."""
    if not seeds:
        return {str(w): [w] for w in workdirs}
    groups: dict[str, list[pathlib.Path]] = {}
    keys: dict[str, str] = {}
    for w in workdirs:
        config = json.loads((w / "config.json").read_text())
        config["train"].pop("seed", None)
        key = json.dumps(config, sort_keys=True)
        label = keys.setdefault(key, str(w))
        groups.setdefault(label, []).append(w)
    return {(f"{label} ({len(runs)} seeds)" if len(runs) > 1 else label): runs
            for label, runs in groups.items()}


def main(argv: list[str]) -> None:
    p = cli.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+", help="training runs' workdirs")
    p.add_argument("--out", default="curves.png", help="the figure (.png; .svg also written "
                   "with --svg)")
    p.add_argument("--metric", default="val/loss", help="a metrics.jsonl key, e.g. train/loss")
    p.add_argument("--seeds", action="store_true", help="one line per config over its seeds")
    p.add_argument("--svg", action="store_true", help="also write an SVG")
    args = p.parse_args(argv)
    workdirs = [pathlib.Path(w).expanduser() for w in args.workdirs]
    for w in workdirs:
        if not (w / "metrics.jsonl").is_file():
            cli.fail(f"{w} has no metrics.jsonl; give training runs' workdirs")
        if args.seeds and not (w / "config.json").is_file():
            cli.fail(f"{w} has no config.json, which --seeds compares; drop --seeds")
    out = pathlib.Path(args.out).expanduser()
    if out.suffix not in (".png", ""):
        cli.fail(f"--out={args.out}: give a .png file (the SVG, with --svg, goes beside it)")
    cli.check_output(out.with_suffix(".png"), "--out", folder=False)
    from gpt_jax.sweep import plots  # matplotlib, after the arguments are checked.

    groups = _groups(workdirs, args.seeds)
    if not any(plots.curve(w, args.metric)["step"].size for runs in groups.values() for w in runs):
        cli.fail(f"--metric={args.metric}: no row of these runs has it; e.g. val/loss, train/loss")
    for path in plots.curves_figure(groups, out, metric=args.metric, svg=args.svg):
        print(f"wrote {path}")


if __name__ == "__main__":
    with cli.errors_as_one_line():
        main(sys.argv[1:])
